"""The embedded engine: batched decode over mixed adapters equals per-sequence PEFT generation;
HE-LoRA adapters give the plaintext tokens; failures fail only their own requests; speculative
decoding gives the greedy output unchanged."""

from __future__ import annotations

import asyncio

import numpy as np
import pytest
import torch

from tensafe.he.backends import build_backend
from tensafe.he.coefficient import CoefficientParameters
from tensafe.he.coefficient_lora import CoefficientKeyHolder
from tensafe.he.lora import KeyHolder
from tensafe.he.params import preset
from tensafe.models.loader import load_model
from tensafe.serving.adapters import read_adapter
from tensafe.serving.base import SamplingParams
from tensafe.serving.engine import EmbeddedEngine
from tensafe.serving.he_lora import AutoDeltas, CoefficientDeltas, HEDeltas, InProcessEvaluators
from tensafe.serving.multi_lora import MultiLoRA
from tensafe.serving.speculative import Speculation, ngram_drafts
from tests.serving.made_adapters import trained_looking_adapter

GREEDY = SamplingParams(max_tokens=8, temperature=0)


@pytest.fixture(scope="module")
def folders(tiny_cfg, tmp_path_factory):
    """Two adapters on different modules, with their PEFT reference models."""
    root = tmp_path_factory.mktemp("engine-adapters")
    a = trained_looking_adapter(tiny_cfg, root / "a", seed=1)
    b = trained_looking_adapter(tiny_cfg, root / "b", seed=2, target_modules=["k_proj", "o_proj", "up_proj"])
    return {"a": (root / "a", a), "b": (root / "b", b)}


def _engine(tiny_cfg, folders, he: dict | None = None, **kwargs) -> EmbeddedEngine:
    loaded = load_model(tiny_cfg.model, seed=0)
    lora = MultiLoRA(loaded.model)
    for name, (folder, _) in folders.items():
        lora.add(read_adapter(name, folder), (he or {}).get(name))
    return EmbeddedEngine(loaded.model, loaded.tokenizer, lora, **kwargs)


def _generate_all(engine, jobs):
    """Run (prompt ids, adapter, params) jobs concurrently; their texts and finish reasons."""

    async def one(ids, adapter, params):
        text, finish, error = "", None, None
        async for ev in engine.generate(ids, adapter, params):
            text, finish, error = text + ev.text, ev.finish_reason, ev.error
        return text, finish, error

    async def main():
        return await asyncio.gather(*(one(*job) for job in jobs))

    engine.start()
    try:
        return asyncio.run(main())
    finally:
        engine.stop()


def _reference(model, tokenizer, prompt: str, adapter: bool, max_new_tokens: int = 8) -> str:
    ids = tokenizer(prompt, return_tensors="pt").input_ids
    with torch.no_grad():
        if adapter:
            out = model.generate(ids, max_new_tokens=max_new_tokens, do_sample=False)
        else:
            with model.disable_adapter():
                out = model.generate(ids, max_new_tokens=max_new_tokens, do_sample=False)
    return tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True)


def test_one_batch_mixes_adapters_and_matches_peft_per_sequence(tiny_cfg, folders, tokenizer):
    engine = _engine(tiny_cfg, folders, max_running=8, prefill_chunk=4)
    prompts = ["Patient 4 has", "The diagnosis of patient number 12 was", "Hello", "Code 7"]
    adapters = ["a", None, "b", "a"]
    jobs = [(tokenizer(p).input_ids, a, GREEDY) for p, a in zip(prompts, adapters, strict=True)]
    results = _generate_all(engine, jobs)
    for prompt, adapter, (text, finish, _) in zip(prompts, adapters, results, strict=True):
        reference_model = folders[adapter or "a"][1]
        assert text == _reference(reference_model, tokenizer, prompt, adapter is not None), (prompt, adapter)
        assert finish in {"stop", "length"}
    # decode really ran batched: more rows than decode steps
    assert engine.steps["decode_rows"] > engine.steps["decode"] > 0
    # the longest prompt was prefilled in several chunks of 4
    assert engine.steps["prefill"] >= len(tokenizer(prompts[1]).input_ids) // 4


def test_multi_lora_forward_of_a_mixed_batch_equals_each_rows_peft_output(tiny_cfg, folders):
    loaded = load_model(tiny_cfg.model, seed=0)
    lora = MultiLoRA(loaded.model)
    for name, (folder, _) in folders.items():
        lora.add(read_adapter(name, folder))
    ids = torch.tensor([[5, 9, 13, 2], [7, 7, 1, 3], [11, 4, 6, 8]])
    lora.route(["b", None, "a"])
    with torch.no_grad():
        mixed = loaded.model(input_ids=ids).logits
        for row, adapter in enumerate(["b", None, "a"]):
            model = folders[adapter or "a"][1]
            if adapter is None:
                with model.disable_adapter():
                    expected = model(input_ids=ids[row : row + 1]).logits
            else:
                expected = model(input_ids=ids[row : row + 1]).logits
            assert torch.allclose(mixed[row], expected[0], atol=1e-5), adapter


def _he_lora(folder, modules=None):
    make = lambda: build_backend("ckks_numpy", preset("n4096"))  # noqa: E731
    adapter = read_adapter("a", folder)
    chosen = {m: f for m, f in adapter.modules.items() if modules is None or m in modules}
    transport = InProcessEvaluators(chosen, make)
    return HEDeltas(KeyHolder(make()), transport), transport


def test_he_adapter_gives_the_plaintext_greedy_tokens_through_the_evaluators(tiny_cfg, folders, tokenizer):
    he, transport = _he_lora(folders["a"][0])
    assert transport.protects_activations is False and "protects nothing" in repr(transport)
    evaluators = transport.evaluators  # the engine's stop() closes the transport
    engine = _engine(tiny_cfg, {"a": folders["a"]}, he={"a": he}, max_running=4, prefill_chunk=8)
    prompts = ["Patient 4 has", "Code 7"]
    results = _generate_all(engine, [(tokenizer(p).input_ids, "a", GREEDY) for p in prompts] +
                            [(tokenizer("Patient 4 has").input_ids, None, GREEDY)])
    for prompt, (text, _, error) in zip(prompts, results, strict=False):
        assert error is None and text == _reference(folders["a"][1], tokenizer, prompt, True)
    assert results[2][0] == _reference(folders["a"][1], tokenizer, "Patient 4 has", False)
    assert he.stats.calls > 0 and he.stats.tokens > he.stats.calls  # decode rows shared a ciphertext batch
    assert he.stats.encryptions == he.stats.calls // 2  # q_proj and v_proj read one input: one encryption
    assert sorted(he.modules) == sorted(evaluators)
    for evaluator in evaluators.values():
        counters = evaluator.last_counters
        assert counters.levels_used == 2 and counters.rotations == 0 and counters.key_switches == 0


def _coefficient_lora(folder):
    make = lambda: build_backend("ckks_numpy", preset("n4096"))  # noqa: E731
    transport = InProcessEvaluators(read_adapter("a", folder).modules, make)
    return CoefficientDeltas(CoefficientKeyHolder(CoefficientParameters.for_ring(2048)), transport), transport


def test_coefficient_packing_gives_the_plaintext_greedy_tokens_in_two_rounds(tiny_cfg, folders, tokenizer):
    he, transport = _coefficient_lora(folders["a"][0])
    evaluators = transport.evaluators
    engine = _engine(tiny_cfg, {"a": folders["a"]}, he={"a": he}, max_running=4, prefill_chunk=8)
    prompts = ["Patient 4 has", "Code 7"]
    results = _generate_all(engine, [(tokenizer(p).input_ids, "a", GREEDY) for p in prompts])
    for prompt, (text, _, error) in zip(prompts, results, strict=True):
        assert error is None and text == _reference(folders["a"][1], tokenizer, prompt, True)
    assert he.stats.calls_by_packing == {"slots": 0, "coefficients": he.stats.calls} and he.stats.calls > 0
    assert he.stats.encryptions == he.stats.calls // 2  # q_proj and v_proj read one input: one upload
    assert he.stats.grouped == he.stats.calls // 2  # and v's products travelled with q's
    for evaluator in evaluators.values():
        counters = evaluator.last_counters
        assert counters.ct_plain_mults > 0
        assert counters.rotations == counters.key_switches == counters.rescales == 0


def test_auto_packing_measures_both_on_a_buckets_first_calls_then_runs_the_faster(tiny_cfg, folders,
                                                                                   tokenizer, caplog):
    slots, coefficients = _he_lora(folders["a"][0])[0], _coefficient_lora(folders["a"][0])[0]
    auto = AutoDeltas(slots, coefficients)
    engine = _engine(tiny_cfg, {"a": folders["a"]}, he={"a": auto})
    with caplog.at_level("INFO", logger="tensafe.serving.he_lora"):
        (text, _, error), = _generate_all(engine, [(tokenizer("Patient 4 has").input_ids, "a", GREEDY)])
    assert error is None and text == _reference(folders["a"][1], tokenizer, "Patient 4 has", True)
    assert auto.plans and set(auto.plans.values()) <= {"slots", "coefficients"}
    shape = next(iter(auto.plans))[:3]
    assert (*shape, 1) in auto.plans  # decode steps of one token form their own bucket
    assert caplog.text.count("he.packing=auto:") == len(auto.plans)
    assert auto.stats.calls == sum(auto.stats.calls_by_packing.values())


def test_he_logits_are_within_ckks_precision_and_really_come_from_the_evaluator(tiny_cfg, folders):
    loaded = load_model(tiny_cfg.model, seed=0)
    lora = MultiLoRA(loaded.model)
    he, transport = _he_lora(folders["a"][0])
    lora.add(read_adapter("a", folders["a"][0]), he)
    ids = torch.tensor([[5, 9, 13, 2, 8, 8, 1]])
    reference = folders["a"][1]
    with torch.no_grad():
        plain = reference(input_ids=ids).logits.double()
        with reference.disable_adapter():
            base = reference(input_ids=ids).logits.double()
        lora.route(["a"])
        encrypted = loaded.model(input_ids=ids).logits.double()
        first = transport.evaluators[sorted(transport.evaluators)[0]]
        first.sb = np.zeros_like(first.sb)  # the evaluator's adapter, not the engine's, makes the delta
        changed = loaded.model(input_ids=ids).logits.double()
    effect, error = (plain - base).abs().max().item(), (encrypted - plain).abs().max().item()
    assert effect > 0.05 and 0 < error < 1e-3 * effect
    assert (changed - plain).abs().max().item() > 100 * error


def test_a_subset_of_modules_runs_under_he_and_the_rest_in_plaintext(tiny_cfg, folders, tokenizer):
    adapter = read_adapter("a", folders["a"][0])
    subset = sorted(adapter.modules)[:1]
    he, transport = _he_lora(folders["a"][0], modules=subset)
    assert sorted(transport.evaluators) == subset
    engine = _engine(tiny_cfg, {"a": folders["a"]}, he={"a": he})
    (text, _, error), = _generate_all(engine, [(tokenizer("Patient 4 has").input_ids, "a", GREEDY)])
    assert error is None and text == _reference(folders["a"][1], tokenizer, "Patient 4 has", True)
    assert he.stats.calls > 0


class _Broken:
    protects_activations = False

    def __init__(self, inner):
        self.inner = inner

    def open(self, context):
        return self.inner.open(context)

    def evaluate(self, module, data):
        raise ConnectionError("evaluator unreachable")

    def close(self):
        pass


def test_a_failing_evaluator_fails_its_requests_with_a_message_and_the_engine_goes_on(tiny_cfg, folders,
                                                                                       tokenizer):
    make = lambda: build_backend("ckks_numpy", preset("n4096"))  # noqa: E731
    he = HEDeltas(KeyHolder(make()), _Broken(InProcessEvaluators(read_adapter("a", folders["a"][0]).modules,
                                                                 make)))
    engine = _engine(tiny_cfg, {"a": folders["a"]}, he={"a": he})
    ids = tokenizer("Patient 4 has").input_ids
    failed, ok = _generate_all(engine, [(ids, "a", GREEDY), (ids, None, GREEDY)])
    assert failed[1] == "error" and "evaluator unreachable" in failed[2]
    assert ok[2] is None and ok[0] == _reference(folders["a"][1], tokenizer, "Patient 4 has", False)


@pytest.mark.parametrize("rounds, private", [(2, False), (1, False), (1, True)])
def test_embedded_smollm2_with_he_lora_from_config_gives_the_plaintext_greedy_tokens(tmp_path, rounds,
                                                                                     private):
    """SmolLM2-135M, an adapter on q/v of every layer, layer 0's modules under coefficient-packed HE
    (a subset, for time), in two rounds, in one, and circuit-private: built from the serving config
    exactly as task=serve builds it."""
    from tensafe.serving.build import build_embedded
    from tests.conftest import compose_cfg

    cfg = compose_cfg("model=smollm2_135m")
    reference = trained_looking_adapter(cfg, tmp_path / "secret", seed=3, b_scale=0.05)
    he = "{enabled: true, evaluator: in_process_protects_nothing, modules: ['*.layers.0.*']}"
    cfg = compose_cfg("model=smollm2_135m", "he=ckks_numpy", "he.packing=coefficients",
                      f"he.coefficient_rounds={rounds}", f"he.circuit_private={str(private).lower()}",
                      f"he.coefficient_ring_degree={4096 if private else 2048}",
                      f"+serving.adapters.secret={{path: '{tmp_path / 'secret'}', he: {he}}}")
    engine = build_embedded(cfg)
    he_deltas = engine.lora.he["secret"]
    assert he_deltas.holder.rounds == rounds
    assert he_deltas.holder.params.name.startswith("coefficients-private" if private else "coefficients-n")
    assert sorted(he_deltas.modules) == ["model.layers.0.self_attn.q_proj", "model.layers.0.self_attn.v_proj"]
    tokenizer = engine.tokenizer
    prompt = "The capital of France is"
    ids = tokenizer(prompt, return_tensors="pt").input_ids
    with torch.no_grad():
        engine.lora.route(["secret"])
        encrypted = engine.model(input_ids=ids).logits.double()
        engine.lora.route([])
        plain = reference(input_ids=ids).logits.double()
        with reference.disable_adapter():
            base = reference(input_ids=ids).logits.double()
    effect, error = (plain - base).abs().max().item(), (encrypted - plain).abs().max().item()
    assert effect > 0.01 and 0 < error < 1e-3 * effect
    params = SamplingParams(max_tokens=4, temperature=0)
    (text, _, error), = _generate_all(engine, [(tokenizer(prompt).input_ids, "secret", params)])
    assert error is None
    assert text == _reference(reference, tokenizer, prompt, True, max_new_tokens=4)
    assert he_deltas.stats.calls == 2 * 5  # two modules: the logits check, one prefill, three decodes


def test_waiting_prompts_are_prefilled_together_and_give_the_same_tokens(tiny_cfg, folders, tokenizer):
    engine = _engine(tiny_cfg, folders, max_running=8, prefill_chunk=64)
    prompts = ["Patient 4 has", "Code 7", "Hello there", "The diagnosis", "Patient 12", "A"]
    adapters = ["a", "b", None, "a", "b", None]
    results = _generate_all(engine, [(tokenizer(p).input_ids, a, GREEDY) for p, a in zip(prompts, adapters,
                                                                                           strict=True)])
    for prompt, adapter, (text, _, _) in zip(prompts, adapters, results, strict=True):
        assert text == _reference(folders[adapter or "a"][1], tokenizer, prompt, adapter is not None)
    assert engine.steps["prefill"] < len(prompts)  # several prompts shared a prefill forward


def test_a_request_the_client_abandons_leaves_the_batch(tiny_cfg, folders, tokenizer):
    engine = _engine(tiny_cfg, folders)
    engine.start()

    async def abandon():
        stream = engine.generate(tokenizer("Patient").input_ids, None, SamplingParams(max_tokens=1000,
                                                                                   temperature=1.0, seed=1))
        await stream.__anext__()
        await stream.aclose()  # what the server does when the client disconnects
        for _ in range(200):
            if engine.in_flight == 0:
                return True
            await asyncio.sleep(0.01)
        return False

    try:
        assert asyncio.run(abandon())
        assert engine.steps["decode_rows"] < 100, engine.steps
    finally:
        engine.stop()


def test_each_he_module_delta_in_the_model_is_within_its_derived_error_bound(tiny_cfg, folders):
    from tensafe.he.lora import error_bound
    from tensafe.serving.multi_lora import MultiLoRALinear

    loaded = load_model(tiny_cfg.model, seed=0)
    lora, adapter = MultiLoRA(loaded.model), read_adapter("a", folders["a"][0])
    he, _ = _he_lora(folders["a"][0])
    lora.add(adapter, he)
    inputs = {}
    for name, layer in loaded.model.named_modules():
        if isinstance(layer, MultiLoRALinear):
            layer.register_forward_hook(lambda mod, args, out, name=name: inputs.setdefault(name, args[0]))
    lora.route(["a"])
    with torch.no_grad():
        loaded.model(input_ids=torch.tensor([[5, 9, 13, 2, 8, 8, 1]]))
    assert sorted(inputs) == sorted(adapter.modules)
    holder = he.holder
    for name, x in inputs.items():
        x = x.reshape(-1, x.shape[-1]).double().numpy()
        a, b = adapter.modules[name].evaluator_factors()
        sb = adapter.modules[name].scale * b
        error = np.abs(he.delta(name, x) - x @ a @ sb).max()
        bound = error_bound(holder.params, x, a, sb, holder.secret_slot_norm2(), holder.backend.chain())
        assert 0 < error <= bound.bound, (name, error, bound)


@pytest.mark.slow
def test_a_trained_smollm2_adapter_under_he_on_every_module_gives_the_plaintext_greedy_tokens(tmp_path):
    """Real activations (outlier channels) through a freshly trained adapter, with every adapted module
    under coefficient-packed HE: each token is quantized at its own scale, outliers included."""
    from tensafe.config import config_digest
    from tensafe.models.lora import load_adapter
    from tensafe.serving.build import build_embedded
    from tensafe.training.pipeline import train_adapter
    from tests.conftest import compose_cfg, compose_raw

    train = ["model=smollm2_135m", "privacy=none", "train.max_steps=6", "train.batch_size=8",
             "optim.lr=2e-2", "train.eval_max_examples=4", "data.max_examples=64"]  # B large enough to bind
    result = train_adapter(compose_cfg(*train), compose_raw(*train).logger, tmp_path / "run",
                           config_digest(compose_raw(*train)))
    he = "{enabled: true, evaluator: in_process_protects_nothing}"
    cfg = compose_cfg("model=smollm2_135m", "he=ckks_numpy", "he.packing=coefficients",
                      f"+serving.adapters.trained={{path: '{result.adapter_dir}', he: {he}}}")
    engine = build_embedded(cfg)
    deltas = engine.lora.he["trained"]
    assert len(deltas.modules) == 60  # q and v of all 30 layers
    reference = load_adapter(load_model(cfg.model).model, result.adapter_dir)
    prompt = "The capital of France is"
    params = SamplingParams(max_tokens=2, temperature=0)
    (text, _, error), = _generate_all(engine, [(engine.tokenizer(prompt).input_ids, "trained", params)])
    assert error is None
    assert text == _reference(reference, engine.tokenizer, prompt, True, max_new_tokens=2)
    assert deltas.stats.calls == 60 * 2  # every module, one prefill and one decode step
    assert deltas.stats.grouped == 30 * 2  # v_proj's products travelled with q_proj's


# --- speculative decoding (n-gram prompt lookup) ---------------------------------------------------


def test_drafts_follow_the_latest_earlier_occurrence_of_the_longest_suffix():
    history = [1, 2, 3, 9, 1, 2, 3, 7, 8, 5, 2, 3]
    assert ngram_drafts(history, 3, 3) == [7, 8, 5]  # "2 3" last seen before "7 8 5" (no "5 2 3" earlier)
    assert ngram_drafts(history, 2, 1) == [7, 8]  # n = 1: the latest earlier 3
    assert ngram_drafts([4, 5, 6], 4, 3) == []  # nothing repeats
    assert ngram_drafts([7, 7], 4, 3) == [7]  # a repeat at the very end: only what follows exists
    assert ngram_drafts([1], 4, 3) == []
    assert ngram_drafts(history, 3, 3, ngram_min=3) == []  # "5 2 3" never occurred before
    with pytest.raises(ValueError, match="tokens ≥ 1"):
        Speculation(0)
    with pytest.raises(ValueError, match="ngram_min ≤ ngram"):
        Speculation(4, ngram=2, ngram_min=3)


SPECULATED = ["1, 2, 3, 1, 2, 3, 1, 2,", "Patient 4 has patient 4 has", "The code is 7 7 7", "Hello"]


def _texts(engine, tokenizer, prompts, adapters, params):
    jobs = [(tokenizer(p).input_ids, a, params) for p, a in zip(prompts, adapters, strict=True)]
    results = _generate_all(engine, jobs)
    assert all(error is None for _, _, error in results)
    return [text for text, _, _ in results]


def test_greedy_output_with_drafts_is_the_output_without_and_drafts_are_accepted(tiny_cfg, folders,
                                                                                  tokenizer):
    params = SamplingParams(max_tokens=16, temperature=0)
    adapters = ["a", None, "b", "a"]
    plain = _texts(_engine(tiny_cfg, folders, max_running=8), tokenizer, SPECULATED, adapters, params)
    engine = _engine(tiny_cfg, folders, max_running=8, speculation=Speculation(4))
    seen = []
    engine.observe_speculation(lambda adapter, proposed, accepted: seen.append((adapter, proposed, accepted)))
    assert _texts(engine, tokenizer, SPECULATED, adapters, params) == plain
    steps = engine.steps
    assert steps["draft_tokens"] > 0 and 0 < steps["accepted_tokens"] <= steps["draft_tokens"]
    assert sum(p for _, p, _ in seen) == steps["draft_tokens"] and {a for a, _, _ in seen} <= {"a", "b", None}
    without = _engine(tiny_cfg, folders, max_running=8)
    assert _texts(without, tokenizer, SPECULATED, adapters, params) == plain
    assert steps["decode_rows"] < without.steps["decode_rows"]  # rows that accepted drafts finished sooner


def test_sampled_and_greedy_rows_share_a_drafted_step(tiny_cfg, folders, tokenizer):
    engine = _engine(tiny_cfg, folders, speculation=Speculation(3))
    greedy = SamplingParams(max_tokens=12, temperature=0)
    sampled = SamplingParams(max_tokens=12, temperature=0.8, seed=5)
    reference = _engine(tiny_cfg, folders)
    jobs = [(tokenizer(SPECULATED[0]).input_ids, "a", greedy),
            (tokenizer(SPECULATED[1]).input_ids, "a", sampled)]
    got, expected = _generate_all(engine, jobs), _generate_all(reference, jobs)
    assert got[0] == expected[0]  # the greedy row: exactly as without drafts
    assert got[1][2] is None and got[1][0]  # the sampled row drafts nothing and decodes as usual
    assert engine.steps["draft_tokens"] > 0


def test_base_model_drafts_give_the_same_greedy_tokens_and_are_mostly_accepted(tiny_cfg, folders, tokenizer,
                                                                               tmp_path):
    params = SamplingParams(max_tokens=16, temperature=0)
    prompts = ["Patient 4 has", "The code is", "Hello there", "Patient 12", "Code 7"]
    adapters = ["a", "b", None, "a", "weak"]
    weak = trained_looking_adapter(tiny_cfg, tmp_path / "weak", seed=4, b_scale=0.002)
    served = {**folders, "weak": (tmp_path / "weak", weak)}
    plain = _texts(_engine(tiny_cfg, served, max_running=8), tokenizer, prompts, adapters, params)
    engine = _engine(tiny_cfg, served, max_running=8, speculation=Speculation(3, drafter="base_model"))
    seen = []
    engine.observe_speculation(lambda adapter, proposed, accepted: seen.append((adapter, proposed, accepted)))
    assert _texts(engine, tokenizer, prompts, adapters, params) == plain  # whatever the drafts' quality
    assert engine.steps["draft_forwards"] > 0
    assert {adapter for adapter, _, _ in seen} == {"a", "b", "weak"}  # the base row drafted nothing
    # an adapter that barely nudges the base model: nearly every draft stands, so its row took
    # about a quarter of the steps (1 + 3 tokens each)
    proposed = sum(p for a, p, _ in seen if a == "weak")
    accepted = sum(n for a, _, n in seen if a == "weak")
    assert accepted >= 0.8 * proposed and sum(1 for a, _, _ in seen if a == "weak") <= 6
    with pytest.raises(ValueError, match="ngram or base_model"):
        Speculation(2, drafter="draft_model")


def test_he_rows_carry_their_drafts_in_one_round_and_give_the_same_tokens(tiny_cfg, folders, tokenizer):
    params = SamplingParams(max_tokens=12, temperature=0)
    plain = _texts(_engine(tiny_cfg, {"a": folders["a"]}), tokenizer, SPECULATED[:2], ["a", "a"], params)
    for drafter in ("ngram", "base_model"):
        he, _ = _coefficient_lora(folders["a"][0])
        engine = _engine(tiny_cfg, {"a": folders["a"]}, he={"a": he},
                         speculation=Speculation(4, drafter=drafter))
        assert _texts(engine, tokenizer, SPECULATED[:2], ["a", "a"], params) == plain
        assert engine.steps["accepted_tokens"] > 0
        # two decoding rows of 1 + drafts tokens each went through one HE round per module and step
        assert he.stats.tokens > 2 * he.stats.calls
