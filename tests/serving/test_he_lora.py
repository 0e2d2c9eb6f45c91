"""HE-LoRA inside a model: the same greedy tokens and logits within the HE error as plaintext LoRA."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from tensafe.he.backends import build_backend
from tensafe.he.params import preset
from tensafe.models.loader import load_model
from tensafe.models.lora import attach_lora
from tensafe.serving.he_lora import InProcessEvaluators, enable_in_process, lora_factors


@pytest.fixture(scope="module")
def adapted(tiny_cfg):
    """The tiny Llama with a LoRA adapter whose B is not zero (a trained-looking adapter)."""
    loaded = load_model(tiny_cfg.model, seed=0)
    model = attach_lora(loaded.model, tiny_cfg.model.lora)
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=generator) * 0.3)
    model.eval()
    return model, loaded.tokenizer


def _logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids).logits.double()


def test_he_lora_logits_match_plaintext_lora_and_greedy_tokens_agree(adapted):
    model, tokenizer = adapted
    ids = tokenizer("Patient 17 has secret code", return_tensors="pt").input_ids
    plain = _logits(model, ids)
    with model.disable_adapter():
        base = _logits(model, ids)
    plain_tokens = model.generate(ids, max_new_tokens=6, do_sample=False)

    hook = enable_in_process(model, lambda: build_backend("ckks_numpy", preset("n4096")))
    try:
        assert "protects nothing" in repr(hook.transport)
        encrypted = _logits(model, ids)
        he_tokens = model.generate(ids, max_new_tokens=6, do_sample=False)
    finally:
        hook.remove()

    lora_effect = (plain - base).abs().max().item()
    he_error = (encrypted - plain).abs().max().item()
    assert lora_effect > 0.05  # the adapter matters
    assert 0 < he_error < 1e-3 * lora_effect  # and HE reproduces it to CKKS precision
    assert torch.equal(he_tokens, plain_tokens)
    assert hook.stats.calls >= 4 and hook.stats.tokens >= ids.shape[1]
    assert torch.allclose(_logits(model, ids), plain)  # remove() restores plaintext LoRA


def test_the_hooked_modules_really_run_through_the_evaluator(adapted):
    model, tokenizer = adapted
    ids = tokenizer("hello", return_tensors="pt").input_ids
    hook = enable_in_process(model, lambda: build_backend("ckks_numpy", preset("n4096")))
    try:
        transport = hook.transport
        assert isinstance(transport, InProcessEvaluators)
        names = sorted(lora_factors(model))
        assert sorted(transport.evaluators) == names
        _logits(model, ids)
        for evaluator in transport.evaluators.values():
            counters = evaluator.last_counters
            assert counters.levels_used == 2 and counters.rotations == 0 and counters.key_switches == 0
        # a zeroed evaluator adapter changes the output: the delta comes from the evaluator, not PEFT
        first = transport.evaluators[names[0]]
        first.sb = np.zeros_like(first.sb)
        changed = _logits(model, ids)
    finally:
        hook.remove()
    assert not torch.allclose(changed, _logits(model, ids), atol=1e-4)
