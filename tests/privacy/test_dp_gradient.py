"""The DP gradient with zero noise equals a brute-force per-example clip-and-sum reference."""

from __future__ import annotations

import pytest
import torch

from tensafe.models.loader import load_model
from tensafe.models.lora import attach_lora
from tensafe.privacy.dp_sgd import GRAD_SAMPLE_MODES, DPGradient
from tensafe.privacy.randomness import SeededRandom
from tests.privacy.dp_reference import assert_dp_gradient_matches


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


@pytest.mark.parametrize("mode", GRAD_SAMPLE_MODES)
def test_zero_noise_dp_gradient_equals_brute_force_clip_and_sum(mode, tiny_cfg, tokenizer):
    # Two physical micro-batches with different padding; float32 sums differ only in order.
    assert_dp_gradient_matches(
        _lora_model(tiny_cfg),
        _examples(tokenizer),
        tokenizer.pad_token_id,
        mode,
        micro_batch=4,
        rtol=1e-4,
        atol=1e-6,
    )


def test_noise_has_std_sigma_c_over_expected_batch(tiny_cfg):
    p = torch.nn.Parameter(torch.zeros(200_000))
    dp = DPGradient([p], noise_multiplier=1.5, max_grad_norm=2.0, expected_batch_size=10, rng=SeededRandom(0))
    dp.begin()
    dp.finalize(step=0)  # an empty batch: noise only
    assert abs(float(p.grad.std()) - 1.5 * 2.0 / 10) < 0.003
    assert abs(float(p.grad.mean())) < 0.002


@pytest.mark.parametrize("mode", GRAD_SAMPLE_MODES)
def test_every_clipped_contribution_stays_within_c_under_bf16_autocast(mode, tiny_cfg, tokenizer):
    """bf16 mixed precision gives bf16 per-example gradients; the clip must still hold exactly."""
    from tensafe.data.collate import collate
    from tensafe.privacy.dp_sgd import per_sample_gradient_module
    from tensafe.training.loss import per_example_loss

    model = _lora_model(tiny_cfg)
    params = [p for p in model.parameters() if p.requires_grad]
    wrapped = per_sample_gradient_module(model, mode)
    clip = 0.05  # below every example's norm: each contribution is clipped
    dp = DPGradient(
        params, noise_multiplier=0.0, max_grad_norm=clip, expected_batch_size=1, rng=SeededRandom(0)
    )
    dtypes, worst = set(), 0.0
    with torch.autocast("cpu", dtype=torch.bfloat16):
        for example in _examples(tokenizer, n=12):
            dp.begin()
            batch = collate([example], pad_token_id=tokenizer.pad_token_id)
            logits = wrapped(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
            per_example_loss(logits, batch["labels"]).sum().backward()
            dtypes |= {p.grad_sample.dtype for p in params}
            norms = dp.clip_and_accumulate()
            assert float(norms.min()) > clip
            contribution = torch.sqrt(sum(t.double().pow(2).sum() for t in dp.summed))
            worst = max(worst, float(contribution) / clip)
    wrapped._close()
    if mode == "hooks":  # functorch's vmapped gradients come out in float32 anyway
        assert dtypes == {torch.bfloat16}  # the per-example gradients really were bf16
    assert worst <= 1 + 1e-6, worst


def test_noise_and_gradient_are_float32_for_bf16_parameters():
    p = torch.nn.Parameter(torch.zeros(50_000, dtype=torch.bfloat16))
    dp = DPGradient([p], noise_multiplier=1.0, max_grad_norm=1.0, expected_batch_size=1, rng=SeededRandom(0))
    dp.begin()
    assert dp.summed[0].dtype == torch.float32
    dp.finalize(step=0)
    assert p.grad.dtype == torch.bfloat16 and abs(float(p.grad.float().std()) - 1.0) < 0.02
