"""The embedded SmolLM2-135M: it loads from the packaged GGUF, and DP-SGD's per-example
gradients on its real PEFT LoRA layers equal the brute-force reference (opacus issue 820)."""

from __future__ import annotations

import pytest
import torch

from tensafe.data.collate import collate
from tensafe.data.datasets import ChatDataset, bundled_path, load_records
from tensafe.models.loader import load_model
from tensafe.models.lora import attach_lora
from tensafe.privacy.dp_sgd import DPGradient, per_sample_gradient_module
from tensafe.privacy.randomness import SeededRandom
from tensafe.training.loss import per_example_loss
from tests.conftest import compose_cfg

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
        if p.requires_grad:
            torch.nn.init.normal_(p, std=0.02)
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    examples = ChatDataset(load_records(bundled_path())[:3], loaded.tokenizer, cfg.model.max_seq_len).items
    pad = loaded.tokenizer.pad_token_id
    clip = 0.05
    expected = [torch.zeros_like(p) for p in params]
    for ex in examples:
        batch = collate([ex], pad)
        grads = torch.autograd.grad(
            per_example_loss(model(input_ids=batch["input_ids"]).logits, batch["labels"]).sum(), params
        )
        norm = float(torch.sqrt(sum(g.pow(2).sum() for g in grads)))
        for e, g in zip(expected, grads):
            e.add_(g * min(1.0, clip / (norm + 1e-6)) / len(examples))
    wrapped = per_sample_gradient_module(model, "hooks")
    dp = DPGradient(
        params,
        noise_multiplier=0.0,
        max_grad_norm=clip,
        expected_batch_size=len(examples),
        rng=SeededRandom(0),
    )
    dp.begin()
    batch = collate(examples, pad)
    logits = wrapped(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    per_example_loss(logits, batch["labels"]).sum().backward()
    dp.clip_and_accumulate()
    dp.finalize()
    for p, e in zip(params, expected):
        torch.testing.assert_close(p.grad, e, rtol=1e-3, atol=1e-6)
    wrapped._close()
