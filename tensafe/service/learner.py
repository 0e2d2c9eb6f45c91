"""One training model of the service: a LoRA model stepped by DP-SGD over the examples clients send.

The pieces are task=train's: `load_model`, `attach_lora`, Opacus per-sample gradients
(`per_sample_gradient_module`), `DPGradient` (clip each example to C, sum, add N(0, σ²C²) once per
step) and `PrivacyAccountant`. What differs is who chooses the batch: the client. The server cannot
prove any sampling, so each step is accounted at q = 1 (every example may be in every step), the
noisy *sum* is the step's gradient (Tinker's losses are sums), and an example repeated within one
step is refused.
"""

from __future__ import annotations

import hashlib
import io
import os
from collections.abc import Sequence

import numpy as np
import torch

from tensafe.config.schema import LoraConfig, ModelConfig
from tensafe.models.loader import load_model
from tensafe.models.lora import attach_lora
from tensafe.privacy.accounting import PrivacyAccountant
from tensafe.privacy.dp_sgd import DPGradient, per_sample_gradient_module
from tensafe.privacy.randomness import SecureRandom
from tensafe.privacy.sampling import poisson_batch
from tensafe.service import wire
from tensafe.service.errors import UserFault
from tensafe.service.policy import Policy

LOSS_FNS = ("cross_entropy",)
_ATTN = ("q_proj", "k_proj", "v_proj", "o_proj")
_MLP = ("gate_proj", "up_proj", "down_proj")


def lora_targets(model: torch.nn.Module, spec: wire.LoraSpec) -> list[str]:
    wanted = (
        (_ATTN if spec.train_attn else ())
        + (_MLP if spec.train_mlp else ())
        + (("lm_head",) if spec.train_unembed else ())
    )
    present = {name.rsplit(".", 1)[-1] for name, m in model.named_modules() if isinstance(m, torch.nn.Linear)}
    targets = [t for t in wanted if t in present]
    if not targets:
        raise UserFault(
            400,
            "lora_config: no module to adapt (train_attn, train_mlp and train_unembed are "
            "all false, or name none of this model's layers)",
            param="lora_config",
        )
    return targets


def build_lora_model(model_cfg: ModelConfig, spec: wire.LoraSpec, alpha: float):
    """The base model with a fresh LoRA adapter (PEFT's initialisation, seeded by spec.seed or at
    random) and its tokenizer."""
    loaded = load_model(model_cfg, seed=0)
    cfg = LoraConfig(r=spec.rank, alpha=alpha, dropout=0.0, target_modules=lora_targets(loaded.model, spec))
    with torch.random.fork_rng():
        torch.manual_seed(
            spec.seed if spec.seed is not None else int.from_bytes(os.urandom(8), "little") >> 1
        )
        model = attach_lora(loaded.model, cfg)
    return model, loaded.tokenizer


def check_tokens(tokens: Sequence[int], vocab: int, where: str) -> None:
    bad = next((t for t in tokens if not 0 <= t < vocab), None)
    if bad is not None:
        raise UserFault(
            400,
            f"{where}: token id {bad} is outside the model's vocabulary [0, {vocab})",
            code="token_out_of_vocabulary",
            param=where,
        )


class Learner:
    """A model's weights, optimizer and the clipped sum of the step being accumulated."""

    def __init__(
        self,
        model_cfg: ModelConfig,
        spec: wire.LoraSpec,
        policy: Policy,
        alpha: float,
        micro_batch_size: int,
        max_datums_per_step: int,
    ):
        self.model, self.tokenizer = build_lora_model(model_cfg, spec, alpha)
        self.model.train()
        self.vocab = int(self.model.get_input_embeddings().num_embeddings)
        self.max_len = model_cfg.max_seq_len
        self.policy, self.micro_batch_size, self.max_datums = policy, micro_batch_size, max_datums_per_step
        self.forward = per_sample_gradient_module(self.model, "hooks")
        self.params = [p for p in self.model.parameters() if p.requires_grad]
        self.rng = SecureRandom()  # the noise and, for server-side sampling, the Poisson draws
        self.gradient = DPGradient(
            self.params,
            policy.noise_multiplier,
            policy.max_grad_norm,
            expected_batch_size=policy.normaliser,
            rng=self.rng,
        )
        self.optimizer = torch.optim.AdamW(
            self.params, lr=1e-4, betas=(0.9, 0.95), eps=1e-12, weight_decay=0.0
        )
        self._in_step: set[bytes] = set()  # digests of the examples accumulated since the last step
        self.accumulating = False

    # --- a step's examples -----------------------------------------------------------------------

    def _check(self, examples: list[wire.Example], check_duplicates: bool = True) -> list[bytes]:
        if not examples:
            raise UserFault(400, "data: at least one example is needed", param="data")
        digests = []
        for i, ex in enumerate(examples):
            where = f"data[{i}]"
            n = len(ex.tokens)
            if n > self.max_len:
                raise UserFault(
                    400,
                    f"{where}: {n} tokens, over the model's {self.max_len}",
                    param=where,
                    code="sequence_too_long",
                )
            if len(ex.target_tokens) != n or (ex.weights is not None and len(ex.weights) != n):
                raise UserFault(
                    400,
                    f"{where}: target_tokens and weights need one value per input token ({n})",
                    param=f"{where}.loss_fn_inputs",
                )
            check_tokens(ex.tokens, self.vocab, f"{where}.model_input")
            check_tokens(ex.target_tokens, self.vocab, f"{where}.loss_fn_inputs.target_tokens")
            if ex.weights is not None and not all(np.isfinite(ex.weights)):
                raise UserFault(400, f"{where}.loss_fn_inputs.weights: must be finite", param=where)
            digest = hashlib.sha256(repr((ex.tokens, ex.target_tokens, ex.weights)).encode()).digest()
            if check_duplicates and (digest in self._in_step or digest in digests):
                raise UserFault(
                    400,
                    f"{where}: this example is already in the current step; DP-SGD bounds "
                    "each example's influence per step, so an example may appear once per "
                    "optim_step",
                    code="duplicate_example",
                    param=where,
                )
            digests.append(digest)
        if check_duplicates and len(self._in_step) + len(examples) > self.max_datums:
            raise UserFault(
                413,
                f"data: {len(self._in_step)} examples are already in this step; "
                f"{len(examples)} more would pass service.max_datums_per_step={self.max_datums}; "
                "call optim_step first or send fewer",
                code="step_too_large",
                param="data",
            )
        return digests

    def _batch(self, examples: list[wire.Example]) -> tuple[torch.Tensor, ...]:
        width = max(len(ex.tokens) for ex in examples)
        ids = torch.zeros(len(examples), width, dtype=torch.long)
        targets = torch.zeros_like(ids)
        weights = torch.zeros(len(examples), width)
        mask = torch.zeros_like(ids)
        for row, ex in enumerate(examples):
            n = len(ex.tokens)
            ids[row, :n] = torch.tensor(ex.tokens)
            targets[row, :n] = torch.tensor(ex.target_tokens)
            weights[row, :n] = torch.tensor(ex.weights if ex.weights is not None else [1.0] * n)
            mask[row, :n] = 1
        return ids, targets, weights, mask

    def forward_backward(
        self, examples: list[wire.Example], forward_only: bool, check_duplicates: bool = True
    ) -> wire.ForwardBackwardResult:
        """Per-example cross-entropy (−Σ w·log p of the targets); unless forward_only, each example's
        gradient is clipped to C and added to the step's sum."""
        if not examples and not check_duplicates:  # an empty Poisson draw: the step is noise only
            return wire.ForwardBackwardResult(loss_fn_outputs=[], metrics={"loss:sum": 0.0})
        digests = self._check(examples, check_duplicates)
        if not forward_only and not self.accumulating:
            self.gradient.begin()
            self.accumulating = True
        outputs: list[dict[str, wire.Tensor]] = []
        total = 0.0
        for start in range(0, len(examples), self.micro_batch_size):
            part = examples[start : start + self.micro_batch_size]
            ids, targets, weights, mask = self._batch(part)
            with torch.set_grad_enabled(not forward_only):
                logits = self.forward(input_ids=ids, attention_mask=mask).logits
                logp = torch.log_softmax(logits.float(), dim=-1).gather(-1, targets.unsqueeze(-1)).squeeze(-1)
                losses = -(logp * weights * mask).sum(dim=1)
                if not forward_only:
                    losses.sum().backward()
                    self.gradient.clip_and_accumulate()
            total += float(losses.detach().sum())
            for row, ex in enumerate(part):
                n = len(ex.tokens)
                lp = logp[row, :n].detach().tolist()
                elementwise = (-(logp[row, :n] * weights[row, :n])).detach().tolist()
                outputs.append(
                    {
                        "logprobs": wire.Tensor(data=lp, dtype="float32", shape=[n]),
                        "elementwise_loss": wire.Tensor(data=elementwise, dtype="float32", shape=[n]),
                    }
                )
        if not forward_only:
            self._in_step.update(digests)
        return wire.ForwardBackwardResult(loss_fn_outputs=outputs, metrics={"loss:sum": total})

    # --- the optimizer step ----------------------------------------------------------------------

    def allowed_epsilon(self, accountant: PrivacyAccountant) -> float:
        """ε once the next step is taken (the accountant's own figure after it); refuses the step,
        changing nothing, when that would pass the policy's max_epsilon."""
        policy = self.policy
        after = accountant.epsilon_if(policy.noise_multiplier, policy.sample_rate, 1, policy.delta)
        if policy.max_epsilon is not None and after > policy.max_epsilon:
            raise UserFault(
                400,
                f"privacy budget exhausted: this step would take ε from "
                f"{accountant.epsilon(policy.delta):.4g} to {after:.4g}, past the policy's "
                f"max_epsilon={policy.max_epsilon:g} (δ={policy.delta:g}); no step was taken",
                code="privacy_budget_exhausted",
            )
        return after

    def sampled_step(
        self, dataset: list[wire.Example], adam: wire.AdamStep, accountant: PrivacyAccountant
    ) -> dict[str, float]:
        """One step of server-side DP-SGD: the batch is each record with probability q (drawn for
        step t from the CSPRNG, as task=train's PoissonBatchSampler), possibly empty; then optim_step."""
        after = self.allowed_epsilon(accountant)  # before any work
        indices = poisson_batch(self.rng, accountant.steps, len(dataset), self.policy.sample_rate)
        # distinct records by construction: no duplicate check, and no client cap on the draw
        batch = [dataset[i] for i in indices]
        loss = self.forward_backward(batch, forward_only=False, check_duplicates=False).metrics["loss:sum"]
        metrics = self.optim_step(adam, accountant, after)
        return {**metrics, "loss:sum": loss, "dp_examples:sum": float(len(indices))}

    def optim_step(
        self, adam: wire.AdamStep, accountant: PrivacyAccountant, epsilon_after: float | None = None
    ) -> dict[str, float]:
        """One DP step: noise once on the sum accumulated since the last step, then AdamW. Refused
        (nothing changes) when it would take ε past the policy's max_epsilon. `epsilon_after`: the
        allowed_epsilon already computed for this step (one accountant evaluation a step)."""
        policy = self.policy
        after = self.allowed_epsilon(accountant) if epsilon_after is None else epsilon_after
        if not self.accumulating:
            self.gradient.begin()  # a step with no examples is still noise, and still accounted
        examples = len(self._in_step)
        self.gradient.finalize(step=accountant.steps)
        if adam.grad_clip_norm > 0:
            torch.nn.utils.clip_grad_norm_(self.params, adam.grad_clip_norm)
        for group in self.optimizer.param_groups:
            group.update(
                lr=adam.learning_rate,
                betas=(adam.beta1, adam.beta2),
                eps=adam.eps,
                weight_decay=adam.weight_decay,
            )
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        accountant.step(policy.noise_multiplier, policy.sample_rate)
        self._in_step.clear()
        self.accumulating = False
        return {
            "dp_epsilon:max": after,
            "dp_delta:max": policy.delta,
            "dp_noise_multiplier:max": policy.noise_multiplier,
            "dp_max_grad_norm:max": policy.max_grad_norm,
            "dp_steps:max": float(accountant.steps),
            "dp_examples:sum": float(examples),
        }

    # --- state -----------------------------------------------------------------------------------

    def lora_state(self) -> dict[str, torch.Tensor]:
        return {n: p.detach().cpu().clone() for n, p in self.model.named_parameters() if p.requires_grad}

    def state_bytes(self, with_optimizer: bool = True) -> bytes:
        buffer = io.BytesIO()
        torch.save(
            {"lora": self.lora_state(), "optimizer": self.optimizer.state_dict() if with_optimizer else None},
            buffer,
        )
        return buffer.getvalue()

    def load_state(self, blob: bytes, optimizer: bool) -> None:
        state = torch.load(io.BytesIO(blob), weights_only=True)
        named = dict(self.model.named_parameters())
        with torch.no_grad():
            for name, value in state["lora"].items():
                named[name].copy_(value)
        if optimizer and state.get("optimizer") is not None:
            self.optimizer.load_state_dict(state["optimizer"])
