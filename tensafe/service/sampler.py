"""Sampling from saved weights (or the base model): the model a client trained, decoded with a KV
cache, temperature, top-k and top-p. Samples of DP-trained weights are post-processing: they spend
no privacy budget."""

from __future__ import annotations

import io
import os

import torch

from tensafe.config.schema import ModelConfig
from tensafe.models.loader import load_model
from tensafe.service import wire
from tensafe.service.errors import UserFault
from tensafe.service.learner import build_lora_model, check_tokens


class Sampler:
    def __init__(
        self, model_cfg: ModelConfig, spec: wire.LoraSpec | None, alpha: float, lora_blob: bytes | None
    ):
        if spec is None:
            loaded = load_model(model_cfg, seed=0)
            self.model, self.tokenizer = loaded.model, loaded.tokenizer
        else:
            self.model, self.tokenizer = build_lora_model(model_cfg, spec, alpha)
            assert lora_blob is not None
            state = torch.load(io.BytesIO(lora_blob), weights_only=True)["lora"]
            named = dict(self.model.named_parameters())
            with torch.no_grad():
                for name, value in state.items():
                    named[name].copy_(value)
        self.model.eval()
        self.vocab = int(self.model.get_input_embeddings().num_embeddings)
        self.max_len = model_cfg.max_seq_len

    def _stops(self, stop: str | list[str] | list[int] | None) -> tuple[set[int], list[str]]:
        eos = self.tokenizer.eos_token_id
        ids = {eos} if eos is not None else set()
        if stop is None:
            return ids, []
        items = [stop] if isinstance(stop, str) else list(stop)
        return ids | {s for s in items if isinstance(s, int)}, [s for s in items if isinstance(s, str)]

    @torch.no_grad()
    def sample(
        self, prompt: list[int], n: int, params: wire.SamplingParams, max_tokens: int
    ) -> wire.SampleResult:
        check_tokens(prompt, self.vocab, "prompt")
        limit = min(params.max_tokens or max_tokens, max_tokens)
        if len(prompt) + limit > self.max_len:
            limit = self.max_len - len(prompt)
            if limit < 1:
                raise UserFault(
                    400,
                    f"prompt: {len(prompt)} tokens leave no room under the model's {self.max_len}",
                    param="prompt",
                    code="prompt_too_long",
                )
        stop_ids, stop_texts = self._stops(params.stop)
        generator = torch.Generator().manual_seed(
            params.seed if params.seed is not None else int.from_bytes(os.urandom(8), "little") >> 1
        )
        ids = torch.tensor([prompt] * n)
        out = self.model(input_ids=ids, use_cache=True)
        past, logits = out.past_key_values, out.logits[:, -1, :].float()
        tokens: list[list[int]] = [[] for _ in range(n)]
        logprobs: list[list[float]] = [[] for _ in range(n)]
        done = [False] * n
        reasons: list[str] = ["length"] * n
        for _ in range(limit):
            next_ids = self._choose(logits, params, generator)
            lp = torch.log_softmax(logits / max(params.temperature, 1e-6), dim=-1).gather(
                -1, next_ids[:, None]
            )
            for row in range(n):
                if done[row]:
                    continue
                token = int(next_ids[row])
                tokens[row].append(token)
                logprobs[row].append(float(lp[row]))
                text_hit = stop_texts and any(s in self.tokenizer.decode(tokens[row]) for s in stop_texts)
                if token in stop_ids or text_hit:
                    done[row], reasons[row] = True, "stop"
            if all(done):
                break
            out = self.model(input_ids=next_ids[:, None], past_key_values=past, use_cache=True)
            past, logits = out.past_key_values, out.logits[:, -1, :].float()
        return wire.SampleResult(
            sequences=[
                wire.SampledSequence(stop_reason=r, tokens=t, logprobs=p)  # type: ignore[arg-type]
                for r, t, p in zip(reasons, tokens, logprobs)
            ]
        )

    @staticmethod
    def _choose(
        logits: torch.Tensor, params: wire.SamplingParams, generator: torch.Generator
    ) -> torch.Tensor:
        if params.temperature == 0:
            return logits.argmax(dim=-1)
        scaled = logits / params.temperature
        if params.top_k > 0:
            kth = torch.topk(scaled, min(params.top_k, scaled.shape[-1]), dim=-1).values[:, -1:]
            scaled = scaled.masked_fill(scaled < kth, float("-inf"))
        if params.top_p < 1:
            ordered, order = torch.sort(scaled, descending=True, dim=-1)
            cumulative = torch.softmax(ordered, dim=-1).cumsum(dim=-1)
            drop = cumulative - torch.softmax(ordered, dim=-1) > params.top_p
            scaled = scaled.scatter(-1, order, ordered.masked_fill(drop, float("-inf")))
        return torch.multinomial(torch.softmax(scaled, dim=-1), 1, generator=generator).squeeze(-1)
