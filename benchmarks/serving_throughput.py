"""Serving throughput: the live server under concurrent streaming clients, against a sequential
transformers `generate` loop.

One `tensafe task=serve` process serves the base model and three adapters: `lora_a` and `lora_b`
(plaintext, random weights of the model's LoRA shape) and `he_a` (lora_a's weights, with the
modules `he_modules` under HE-LoRA, packed as `he_packing`, and the rest in plaintext). `he_a`'s
evaluator is a separate `tensafe task=he_evaluator` process reached over HTTP on loopback, so its
time includes the wire.

For every variant, (a) base, (b) plaintext LoRA, (c) two adapters mixed request by request, and
(d) HE-LoRA, and every concurrency level, `c` clients each stream `requests_per_client` completions
(greedy, `max_tokens`) and the run records output tokens/s (completion tokens over the wall time
of the level), time to first token and inter-token latency (p50/p99 over requests and chunks).
The plaintext variants run `rounds` times, interleaved (every variant and level once per round),
and each cell reports the round with the median throughput beside every round's figure: a
shared machine's noise moves single runs by more than the differences worth measuring. HE-LoRA
runs once per level (a level takes about a minute).
The baseline is `generate` on one sequence at a time with plaintext LoRA (PEFT), in this process.
The HE variant's time is broken down from the server's tensafe_he_lora_latency_seconds.

Speculative decoding: per drafter of `speculative_drafters` (n-gram prompt lookup, the base model)
a further server, the same but with `speculative_tokens` drafts, and the first one answer the
bundled dataset's questions (chat completions, greedy) for plaintext LoRA and HE-LoRA at
`speculative_concurrency`: tok/s with and without drafts, and the acceptance rate from the
drafting server's tensafe_speculative_draft_tokens.
"""

from __future__ import annotations

import asyncio
import json
import os
import secrets
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import torch
from tensafe.benchmarks.processes import ServerProcess, free_port
from tensafe.benchmarks.results import machine

from tensafe.models.loader import load_model
from tensafe.models.lora import random_adapter
from tensafe.serving.auth import hash_api_key

PROMPTS = [
    "Patient 4 was admitted with",
    "Summarise the discharge note:",
    "The medication schedule for the next week is",
    "Explain the diagnosis in plain words:",
    "List three follow-up tests:",
    "The insurance claim was rejected because",
]


def _seconds(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.3f} s"


def _percentile(values: list[float], q: float) -> float | None:
    return float(np.percentile(values, q)) if values else None


def _bundled_questions(count: int) -> list[str]:
    """The first `count` distinct user questions of the bundled dataset."""
    from tensafe.data.datasets import bundled_path

    questions: list[str] = []
    for line in bundled_path().read_text().splitlines():
        question = json.loads(line)["messages"][0]["content"]
        if question not in questions:
            questions.append(question)
        if len(questions) == count:
            break
    return questions


async def _one_request(client: httpx.AsyncClient, model: str, prompt: str, max_tokens: int,
                       chat: bool = False) -> dict:
    body: dict[str, Any] = {"model": model, "max_tokens": max_tokens, "temperature": 0, "stream": True,
                            "stream_options": {"include_usage": True}}
    if chat:
        body["messages"] = [{"role": "user", "content": prompt}]
    else:
        body["prompt"] = prompt
    start = time.perf_counter()
    arrivals, tokens = [], 0
    path = "/v1/chat/completions" if chat else "/v1/completions"
    async with client.stream("POST", path, json=body) as response:
        if response.status_code != 200:
            raise RuntimeError(f"{model}: HTTP {response.status_code}: {(await response.aread())[:300]!r}")
        async for line in response.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            if "error" in chunk:
                raise RuntimeError(f"{model}: {chunk['error']['message']}")
            choice = chunk["choices"][0] if chunk.get("choices") else {}
            if choice.get("text") or (choice.get("delta") or {}).get("content"):
                arrivals.append(time.perf_counter())
            if chunk.get("usage"):
                tokens = chunk["usage"]["completion_tokens"]
    return {"ttft": arrivals[0] - start if arrivals else None,
            "itl": [b - a for a, b in zip(arrivals, arrivals[1:], strict=False)], "tokens": tokens}


async def _level(url: str, key: str, models: list[str], clients: int, per_client: int,
                 max_tokens: int, prompts: list[str] = PROMPTS, chat: bool = False) -> dict:
    """`clients` concurrent clients, each streaming `per_client` requests one after another."""
    headers = {"Authorization": f"Bearer {key}"}
    limits = httpx.Limits(max_connections=clients + 4)
    async with httpx.AsyncClient(base_url=url, headers=headers, timeout=3600, limits=limits) as client:

        async def worker(index: int) -> list[dict]:
            out = []
            for j in range(per_client):
                n = index * per_client + j
                out.append(await _one_request(client, models[n % len(models)], prompts[n % len(prompts)],
                                              max_tokens, chat))
            return out

        start = time.perf_counter()
        results = [r for rs in await asyncio.gather(*(worker(i) for i in range(clients))) for r in rs]
        wall = time.perf_counter() - start
    tokens = sum(r["tokens"] for r in results)
    ttft = [r["ttft"] for r in results if r["ttft"] is not None]
    itl = [x for r in results for x in r["itl"]]
    return {
        "concurrency": clients, "requests": len(results), "output_tokens": tokens, "wall_s": wall,
        "output_tokens_per_s": tokens / wall,
        "ttft_p50_s": _percentile(ttft, 50), "ttft_p99_s": _percentile(ttft, 99),
        "itl_p50_s": _percentile(itl, 50), "itl_p99_s": _percentile(itl, 99),
    }


def _he_seconds(url: str, key: str) -> dict[str, float]:
    """Cumulative HE-LoRA seconds and calls per stage, from the server's /metrics (behind its key)."""
    out: dict[str, float] = {}
    metrics = httpx.get(url + "/metrics", headers={"Authorization": f"Bearer {key}"}, timeout=30)
    for line in metrics.text.splitlines():
        if line.startswith("tensafe_he_lora_latency_seconds_sum") or line.startswith(
            "tensafe_he_lora_latency_seconds_count"
        ):
            name, value = line.rsplit(" ", 1)
            stage = name.split('stage="')[1].split('"')[0]
            kind = "calls" if "_count" in name else "seconds"
            out[f"{stage}_{kind}"] = out.get(f"{stage}_{kind}", 0.0) + float(value)
    return out


def _baseline(cfg, adapter_dir: Path, requests: int, max_tokens: int) -> dict:
    """transformers `generate`, one request at a time, plaintext LoRA (PEFT)."""
    from tensafe.models.lora import load_adapter

    loaded = load_model(cfg.model, seed=cfg.seed)
    model = load_adapter(loaded.model, adapter_dir)
    tokenizer = loaded.tokenizer
    tokens, start = 0, time.perf_counter()
    for n in range(requests):
        ids = tokenizer(PROMPTS[n % len(PROMPTS)], return_tensors="pt").input_ids
        with torch.no_grad():
            out = model.generate(ids, max_new_tokens=max_tokens, do_sample=False)
        new = out[0, ids.shape[1]:].tolist()
        tokens += len([t for t in new if t != tokenizer.eos_token_id])
    wall = time.perf_counter() - start
    return {"requests": requests, "output_tokens": tokens, "wall_s": wall,
            "output_tokens_per_s": tokens / wall}


def _draft_counts(url: str, key: str) -> dict[str, float]:
    """Cumulative speculative draft tokens by outcome, from the server's /metrics."""
    out = {"accepted": 0.0, "rejected": 0.0}
    metrics = httpx.get(url + "/metrics", headers={"Authorization": f"Bearer {key}"}, timeout=30)
    for line in metrics.text.splitlines():
        if line.startswith("tensafe_speculative_draft_tokens_total"):
            name, value = line.rsplit(" ", 1)
            out[name.split('outcome="')[1].split('"')[0]] += float(value)
    return out


def _he_every_module_forward(cfg, adapter_dir: Path, he_params: str, packing: str, rows: int,
                             evaluator: str | None = None) -> dict:
    """One decode step's forward for `rows` one-token rows with every adapted module under HE, and
    the same forward with plaintext LoRA: medians of 5 after a warm-up, and the HE stages of the
    median HE forward. `evaluator`: the evaluator service's URL (its key in TENSAFE_HE_EVALUATOR_KEY);
    None: evaluators in this process, so without the wire."""
    from tensafe.config.schema import IN_PROCESS_EVALUATOR, HEAdapterOptions, HEConfig
    from tensafe.serving.adapters import read_adapter
    from tensafe.serving.build import he_deltas, key_holders
    from tensafe.serving.multi_lora import MultiLoRA

    he_cfg = HEConfig.model_validate({"backend": "ckks_numpy", "params": he_params, "packing": packing})
    loaded = load_model(cfg.model, seed=cfg.seed)
    lora, adapter = MultiLoRA(loaded.model), read_adapter("he_a", adapter_dir)
    options = HEAdapterOptions(enabled=True, evaluator=evaluator or IN_PROCESS_EVALUATOR)
    he = he_deltas(adapter, options, he_cfg, key_holders(he_cfg, "he_a"))
    lora.add(adapter, he)
    lora.add(read_adapter("plain", adapter_dir))
    ids = torch.tensor([[i + 100] for i in range(rows)])
    timings: dict[str, list[tuple[float, dict[str, float]]]] = {"he": [], "plaintext": []}
    for variant, name in (("he", "he_a"), ("plaintext", "plain")):
        lora.route([name] * rows)
        for repeat in range(6):
            before = dict(he.stats.stage_seconds)
            start = time.perf_counter()
            with torch.no_grad():
                loaded.model(input_ids=ids)
            seconds = time.perf_counter() - start
            stages = {k: he.stats.stage_seconds[k] - before[k] for k in before}
            if repeat:  # the first is a warm-up
                timings[variant].append((seconds, stages))
    lora.route([])
    he.close()
    median = {variant: sorted(rows_)[len(rows_) // 2] for variant, rows_ in timings.items()}
    return {"modules": len(he.modules), "rows": rows, "packing": packing,
            "evaluator": "separate process over HTTP on loopback" if evaluator else "in process",
            "he_forward_s": median["he"][0], "plaintext_forward_s": median["plaintext"][0],
            "he_over_plaintext_x": median["he"][0] / median["plaintext"][0],
            "he_stage_seconds": median["he"][1],
            "he_forwards_s": [t for t, _ in timings["he"]]}


def run(
    cfg, *, name: str, concurrency: list[int], requests_per_client: int, he_requests_per_client: int,
    rounds: int, max_tokens: int, he_params: str, he_packing: str, he_modules: list[str] | None,
    he_every_module_forward: bool, speculative_tokens: int, speculative_drafters: list[str],
    speculative_concurrency: list[int],
    speculative_requests_per_client: int, baseline_requests: int, startup_timeout_s: float, output_dir: str,
) -> dict[str, Any]:
    work = Path(tempfile.mkdtemp(prefix="tensafe-serving-bench-"))
    adapters = {}
    for seed, adapter in enumerate(["lora_a", "lora_b"]):
        model = random_adapter(load_model(cfg.model, seed=cfg.seed).model, cfg.model.lora, seed, b_scale=0.02)
        model.save_pretrained(work / adapter)
        adapters[adapter] = work / adapter
    key, he_key = secrets.token_urlsafe(24), secrets.token_urlsafe(24)
    model_args = [f"model={cfg.model.name}", f"hardware={cfg.hardware.name}"]
    he_args = ["he=ckks_numpy", f"he.params={he_params}", f"he.packing={he_packing}"]
    evaluator_port, server_port = free_port(), free_port()
    modules = "null" if he_modules is None else "[" + ",".join(f"'{m}'" for m in he_modules) + "]"
    he_spec = (f"{{path: '{adapters['lora_a']}', he: {{enabled: true, "
               f"evaluator: 'http://127.0.0.1:{evaluator_port}', modules: {modules}}}}}")
    processes = []
    try:
        processes.append(ServerProcess(
            ["task=he_evaluator", *model_args, *he_args, f"task.adapter={adapters['lora_a']}",
             "task.adapter_name=he_a", f"task.port={evaluator_port}",
             f"task.api_key_sha256=[{hash_api_key(he_key)}]"],
            f"http://127.0.0.1:{evaluator_port}/health", {}, work / "he_evaluator.log", startup_timeout_s,
        ))
        url = f"http://127.0.0.1:{server_port}"

        def serve(port: int, log: str, *extra: str) -> ServerProcess:
            return ServerProcess(
                ["task=serve", *model_args, *he_args, f"serving.port={port}",
                 f"serving.api_key_sha256=[{hash_api_key(key)}]", f"serving.max_running={max(concurrency)}",
                 f"+serving.adapters.lora_a={adapters['lora_a']}",
                 f"+serving.adapters.lora_b={adapters['lora_b']}",
                 f"+serving.adapters.he_a={he_spec}", *extra],
                f"http://127.0.0.1:{port}/ready", {"TENSAFE_HE_EVALUATOR_KEY": he_key}, work / log,
                startup_timeout_s,
            )

        processes.append(serve(server_port, "serve.log"))
        plan = {"a_base": [cfg.model.name], "b_plaintext_lora": ["lora_a"],
                "c_two_adapters_mixed": ["lora_a", "lora_b"], "d_he_lora": ["he_a"]}
        samples: dict[tuple[str, int], list[dict]] = {}
        he_breakdown = []
        asyncio.run(_level(url, key, [cfg.model.name], 1, 1, 2))  # warm-up

        def measure(variant: str, clients: int, per_client: int) -> dict:
            he = variant == "d_he_lora"  # its time is broken down from the server's HE histogram
            before = _he_seconds(url, key) if he else {}
            row = asyncio.run(_level(url, key, plan[variant], clients, per_client, max_tokens))
            if he:
                after = _he_seconds(url, key)
                spent = {k: after.get(k, 0.0) - before.get(k, 0.0) for k in after}
                spent["share_of_wall"] = spent.get("total_seconds", 0.0) / row["wall_s"]
                he_breakdown.append({"concurrency": clients, **spent})
            print(f"  {variant:22} c={clients:<3} {row['output_tokens_per_s']:8.2f} tok/s  "
                  f"TTFT p50 {_seconds(row['ttft_p50_s'])}  ITL p50 {_seconds(row['itl_p50_s'])}",
                  flush=True)
            return row

        for _ in range(rounds):
            for variant in [v for v in plan if v != "d_he_lora"]:
                for clients in concurrency:
                    samples.setdefault((variant, clients), []).append(
                        measure(variant, clients, requests_per_client))
        for clients in concurrency:
            samples[("d_he_lora", clients)] = [measure("d_he_lora", clients, he_requests_per_client)]
        variants = {variant: [_median_row(samples[(variant, c)]) for c in concurrency] for variant in plan}
        every_wire = None
        if he_every_module_forward:  # the same forwards as below, through the evaluator process
            os.environ["TENSAFE_HE_EVALUATOR_KEY"] = he_key
            try:
                every_wire = [_he_every_module_forward(cfg, adapters["lora_a"], he_params, he_packing, rows,
                                                       f"http://127.0.0.1:{evaluator_port}")
                              for rows in sorted({1, *concurrency})]
            finally:
                del os.environ["TENSAFE_HE_EVALUATOR_KEY"]
            for forward in every_wire:
                _print_forward(forward)
        speculative = None
        if speculative_tokens:
            questions = _bundled_questions(max(speculative_concurrency) * speculative_requests_per_client)
            without: dict[tuple[str, int], dict] = {}  # the drafter-less server, measured once per level
            speculative = []
            for drafter in speculative_drafters:
                port = free_port()
                drafting = serve(port, f"serve_speculative_{drafter}.log",
                                 f"serving.speculative_tokens={speculative_tokens}",
                                 f"serving.speculative_drafter={drafter}")
                processes.append(drafting)
                spec_url = f"http://127.0.0.1:{port}"
                asyncio.run(_level(spec_url, key, [cfg.model.name], 1, 1, 2))  # warm-up
                for variant in ("b_plaintext_lora", "d_he_lora"):
                    for clients in speculative_concurrency:
                        row: dict[str, Any] = {"drafter": drafter, "variant": variant, "concurrency": clients}
                        for label, target in (("without", url), ("with", spec_url)):
                            if label == "without" and (variant, clients) in without:
                                row[label] = without[(variant, clients)]
                                continue
                            before = _draft_counts(target, key)
                            level = asyncio.run(_level(target, key, plan[variant], clients,
                                                       speculative_requests_per_client, max_tokens, questions,
                                                       chat=True))
                            after = _draft_counts(target, key)
                            row[label] = {**level, "drafts": {k: after[k] - before[k] for k in after}}
                        without[(variant, clients)] = row["without"]
                        drafts = row["with"]["drafts"]
                        proposed = drafts["accepted"] + drafts["rejected"]
                        row["acceptance_rate"] = drafts["accepted"] / proposed if proposed else None
                        with_ = row["with"]["output_tokens_per_s"]
                        plain = row["without"]["output_tokens_per_s"]
                        row["speedup_x"] = with_ / plain
                        rate = "n/a" if row["acceptance_rate"] is None else f"{row['acceptance_rate']:.3f}"
                        print(f"  speculative {drafter:10} {variant:18} c={clients:<3} without {plain:7.2f} "
                              f"tok/s, with {with_:7.2f} tok/s, acceptance {rate}", flush=True)
                        speculative.append(row)
                drafting.stop()
                processes.remove(drafting)
    finally:
        for process in reversed(processes):
            process.stop()
    baseline = _baseline(cfg, adapters["lora_a"], baseline_requests, max_tokens)
    print(f"  {'baseline_generate':22} c=1   {baseline['output_tokens_per_s']:8.2f} tok/s", flush=True)
    every = None
    if he_every_module_forward:
        every = [_he_every_module_forward(cfg, adapters["lora_a"], he_params, he_packing, rows)
                 for rows in sorted({1, *concurrency})]
        for row in every:
            _print_forward(row)
    by_c = {v: {row["concurrency"]: row for row in rows} for v, rows in variants.items()}
    lora, he = by_c["b_plaintext_lora"], by_c["d_he_lora"]
    ratios = {
        "plaintext_lora_over_baseline": {
            c: lora[c]["output_tokens_per_s"] / baseline["output_tokens_per_s"] for c in concurrency
        },
        "he_lora_overhead_x": {
            c: lora[c]["output_tokens_per_s"] / he[c]["output_tokens_per_s"] for c in concurrency
        },
    }
    out_dir = Path(output_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / f"serving_throughput-{cfg.hardware.name}-{cfg.model.name}.json"
    result = {
        "benchmark": name,
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "machine": machine(torch=torch.__version__),
        "model": cfg.model.name, "hardware": cfg.hardware.name, "max_tokens": max_tokens,
        "requests_per_client": requests_per_client, "he_requests_per_client": he_requests_per_client,
        "rounds": rounds,
        "he": {"params": he_params, "packing": he_packing, "modules": he_modules,
               "adapted_modules": _adapted_modules(adapters["lora_a"]),
               "evaluator": "separate process over HTTP on loopback", "breakdown": he_breakdown,
               "every_module_decode_forward_in_process": every,
               "every_module_decode_forward_over_http": every_wire},
        "speculative": {"draft_tokens": speculative_tokens, "drafters": speculative_drafters,
                        "levels": speculative,
                        "prompts": "the bundled dataset's questions (chat completions)"},
        "variants": variants, "baseline_sequential_generate": baseline, "ratios": ratios,
        "engine_beats_baseline_at_concurrency_ge_4": all(
            lora[c]["output_tokens_per_s"] > baseline["output_tokens_per_s"] for c in concurrency if c >= 4
        ),
        "path": str(path),
    }
    path.write_text(json.dumps(result, indent=2) + "\n")
    for key_, values in ratios.items():
        print(f"  {key_}: " + ", ".join(f"c={c}: {v:.2f}" for c, v in values.items()))
    for row in he_breakdown:
        print("  HE time at c={concurrency}: {share:.0%} of wall; encrypt {e:.1f} s, evaluator {v:.1f} s, "
              "decrypt {d:.1f} s over {n:.0f} module calls".format(
                  concurrency=row["concurrency"], share=row["share_of_wall"], e=row.get("encrypt_seconds", 0),
                  v=row.get("evaluator_seconds", 0), d=row.get("decrypt_seconds", 0),
                  n=row.get("total_calls", 0)))
    return result


def _print_forward(row: dict) -> None:
    print(f"  one decode forward of {row['rows']} rows with all {row['modules']} modules under HE "
          f"({row['evaluator']}, {row['packing']}): {row['he_forward_s']:.3f} s, plaintext "
          f"{row['plaintext_forward_s']:.3f} s ({row['he_over_plaintext_x']:.1f}x)", flush=True)


def _median_row(rows: list[dict]) -> dict:
    """The row of median throughput (the lower middle of an even count), with every round's figure."""
    ordered = sorted(rows, key=lambda r: r["output_tokens_per_s"])
    every = [r["output_tokens_per_s"] for r in rows]
    return {**ordered[(len(ordered) - 1) // 2], "rounds_output_tokens_per_s": every}


def _adapted_modules(folder: Path) -> int:
    from tensafe.serving.adapters import read_adapter

    return len(read_adapter("lora_a", folder).modules)

