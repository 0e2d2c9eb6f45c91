"""The Lightning module for LoRA fine-tuning. One training step = one logical batch, processed in
physical micro-batches; the privacy mechanism decides how their gradients become the step.
"""

from __future__ import annotations

from collections.abc import Callable
from functools import partial
from typing import Any

import lightning as L
import torch

from tensafe.config.schema import OptimConfig
from tensafe.data.collate import collate
from tensafe.privacy.mechanisms import Mechanism
from tensafe.training.loss import per_example_loss

_OPTIMIZERS = {"adamw": torch.optim.AdamW, "sgd": torch.optim.SGD}


class LoRAFineTuning(L.LightningModule):
    _forward_module: Callable[..., Any]  # the (per-sample-gradient) wrapper forward runs through
    def __init__(
        self,
        model: torch.nn.Module,
        mechanism: Mechanism,
        optim: OptimConfig,
        micro_batch_size: int,
        pad_token_id: int,
        compile: bool = False,
    ):
        super().__init__()
        self.model = model
        self.mechanism = mechanism
        # The per-sample-gradient wrapper shares `model`'s parameters; keeping it out of the
        # module tree keeps them out of state_dict twice.
        forward = mechanism.wrap(model)
        # hardware.compile (refused with DP-SGD by apply_hardware: Opacus hooks do not compile).
        object.__setattr__(self, "_forward_module", torch.compile(forward) if compile else forward)
        self.optim_cfg = optim
        self.micro_batch_size = micro_batch_size
        self.collate = partial(collate, pad_token_id=pad_token_id)
        self.automatic_optimization = False
        self.strict_loading = False  # checkpoints hold only the trainable (LoRA) weights
        self.stopped_by_budget = False

    def trainable_parameters(self) -> list[torch.nn.Parameter]:
        return [p for p in self.model.parameters() if p.requires_grad]

    def configure_optimizers(self):
        params = self.trainable_parameters()
        self.mechanism.attach(params)
        return _OPTIMIZERS[self.optim_cfg.name](
            params, lr=self.optim_cfg.lr, weight_decay=self.optim_cfg.weight_decay
        )

    def on_fit_start(self) -> None:
        # Lightning keeps the modes modules had when fit was called; the base model was loaded
        # in eval mode, and Opacus only records activations of modules in training mode.
        self.model.train()

    def on_train_batch_start(self, batch: Any, batch_idx: int) -> int | None:
        if not self.mechanism.budget_allows_step():
            self.stopped_by_budget = True
            self.trainer.should_stop = True
            return -1
        return None

    def training_step(self, examples: list[dict[str, torch.Tensor]], batch_idx: int) -> None:
        opt = self.optimizers()
        assert not isinstance(opt, list)  # configure_optimizers returns one
        opt.zero_grad(set_to_none=True)
        self.mechanism.begin_batch()  # an empty Poisson batch still steps: noise only, as accounted
        loss_sum = torch.zeros((), device=self.device)
        for start in range(0, len(examples), self.micro_batch_size):
            mb = self.collate(examples[start : start + self.micro_batch_size])
            logits = self._forward_module(
                input_ids=mb["input_ids"], attention_mask=mb["attention_mask"]
            ).logits
            losses = per_example_loss(logits, mb["labels"])
            self.manual_backward(losses.sum() * self.mechanism.loss_scale)
            self.mechanism.after_backward()
            loss_sum += losses.detach().sum()
        self.mechanism.end_batch()
        opt.step()
        self.mechanism.step_taken()
        # Un-noised statistics of the batch are not covered by ε: under DP they reach the progress
        # line and the private step log (callback metrics), never a logger.
        public = not self.mechanism.differentially_private
        examples_seen = max(len(examples), 1)
        self.log(
            "train_loss", loss_sum / examples_seen, batch_size=examples_seen, prog_bar=True, logger=public
        )
        self.log("batch_examples", float(len(examples)), batch_size=1, logger=public)

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        trainable = {n for n, p in self.named_parameters() if p.requires_grad}
        checkpoint["state_dict"] = {k: v for k, v in checkpoint["state_dict"].items() if k in trainable}
        checkpoint["tensafe_privacy"] = self.mechanism.state_dict()

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        self.mechanism.load_state_dict(checkpoint["tensafe_privacy"])
