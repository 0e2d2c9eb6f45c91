"""The DP gradient with zero noise equals a brute-force per-example clip-and-sum reference."""

from __future__ import annotations

import pytest
import torch

from tensafe.data.collate import collate
from tensafe.models.loader import load_model
from tensafe.models.lora import attach_lora
from tensafe.privacy.dp_sgd import GRAD_SAMPLE_MODES, DPGradient, per_sample_gradient_module
from tensafe.privacy.randomness import SeededRandom
from tensafe.training.loss import per_example_loss


def _examples(tokenizer, n=6):
    out = []
    g = torch.Generator().manual_seed(1)
    for i in range(n):
        length = 6 + 3 * i
        ids = torch.randint(5, len(tokenizer), (length,), generator=g)
        labels = ids.clone()
        labels[: length // 2] = -100  # a prompt part, as in chat data
        out.append({"input_ids": ids, "labels": labels})
    return out


def _lora_model(tiny_cfg):
    model = attach_lora(load_model(tiny_cfg.model, seed=3).model, tiny_cfg.model.lora)
    torch.manual_seed(4)
    for p in model.parameters():
        if p.requires_grad:  # PEFT starts B at zero; random B makes every gradient non-trivial
            torch.nn.init.normal_(p, std=0.5)
    model.train()
    return model


def _reference(model, examples, clip_norm, pad_id):
    params = [p for p in model.parameters() if p.requires_grad]
    total = [torch.zeros_like(p) for p in params]
    norms = []
    for ex in examples:
        batch = collate([ex], pad_token_id=pad_id)
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        grads = torch.autograd.grad(per_example_loss(logits, batch["labels"]).sum(), params)
        norm = torch.sqrt(sum(g.pow(2).sum() for g in grads))
        norms.append(norm)
        factor = min(1.0, clip_norm / (float(norm) + 1e-6))
        for t, g in zip(total, grads):
            t.add_(g * factor)
    return [t / len(examples) for t in total], torch.stack(norms)


@pytest.mark.parametrize("mode", GRAD_SAMPLE_MODES)
def test_zero_noise_dp_gradient_equals_brute_force_clip_and_sum(mode, tiny_cfg, tokenizer):
    model = _lora_model(tiny_cfg)
    examples = _examples(tokenizer)
    pad_id = tokenizer.pad_token_id
    _, norms = _reference(model, examples, clip_norm=1e9, pad_id=pad_id)
    clip = float(norms.median())  # about half the examples get clipped
    expected, _ = _reference(model, examples, clip_norm=clip, pad_id=pad_id)
    assert (norms > clip).sum() >= 2 and (norms < clip).sum() >= 2

    params = [p for p in model.parameters() if p.requires_grad]
    wrapped = per_sample_gradient_module(model, mode)
    dp = DPGradient(
        params,
        noise_multiplier=0.0,
        max_grad_norm=clip,
        expected_batch_size=len(examples),
        rng=SeededRandom(0),
    )
    dp.begin()
    seen = []
    for start in (0, 4):  # two physical micro-batches, different padding
        batch = collate(examples[start : start + 4], pad_token_id=pad_id)
        logits = wrapped(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        per_example_loss(logits, batch["labels"]).sum().backward()
        seen.append(dp.clip_and_accumulate())
    dp.finalize()
    torch.testing.assert_close(torch.cat(seen), norms, rtol=1e-4, atol=1e-6)
    for p, ref in zip(params, expected):
        torch.testing.assert_close(p.grad, ref, rtol=1e-4, atol=1e-6)  # float32 sums in another order
    wrapped._close()


def test_noise_has_std_sigma_c_over_expected_batch(tiny_cfg):
    p = torch.nn.Parameter(torch.zeros(200_000))
    dp = DPGradient([p], noise_multiplier=1.5, max_grad_norm=2.0, expected_batch_size=10, rng=SeededRandom(0))
    dp.begin()
    dp.finalize()  # an empty batch: noise only
    assert abs(float(p.grad.std()) - 1.5 * 2.0 / 10) < 0.003
    assert abs(float(p.grad.mean())) < 0.002
