"""The embedded SmolLM2-135M: it loads from the packaged GGUF, and DP-SGD's per-example
gradients on its real PEFT LoRA layers equal the brute-force reference (opacus issue 820)."""

from __future__ import annotations

import pytest
import torch

from tensafe.data.datasets import ChatDataset, bundled_path, load_records
from tensafe.models.loader import load_model
from tensafe.models.lora import attach_lora
from tests.conftest import compose_cfg
from tests.privacy.dp_reference import assert_dp_gradient_matches

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def smollm2():
    cfg = compose_cfg("model=smollm2_135m")
    loaded = load_model(cfg.model)
    return cfg, loaded


def test_embedded_model_loads_with_its_chat_template(smollm2):
    cfg, loaded = smollm2
    assert loaded.digest.startswith("sha256:") and loaded.model.config.num_hidden_layers == 30
    text = loaded.tokenizer.apply_chat_template(
        [{"role": "user", "content": "hi"}], tokenize=False, add_generation_prompt=True
    )
    assert text.endswith("<|im_start|>assistant\n")


def test_dp_gradient_on_the_embedded_model_equals_brute_force(smollm2):
    cfg, loaded = smollm2
    model = attach_lora(loaded.model, cfg.model.lora)
    torch.manual_seed(0)
    for p in model.parameters():
        if p.requires_grad:  # PEFT starts B at zero; random B makes every gradient non-trivial
            torch.nn.init.normal_(p, std=0.02)
    model.train()
    examples = ChatDataset(load_records(bundled_path())[:4], loaded.tokenizer, cfg.model.max_seq_len).items
    assert_dp_gradient_matches(
        model, examples, loaded.tokenizer.pad_token_id, "hooks", micro_batch=4, rtol=1e-3, atol=1e-6
    )
