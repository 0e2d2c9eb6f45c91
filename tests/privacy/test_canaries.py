"""Secret Sharer exposure: canary generation and insertion, both estimators, and LM scoring."""

from __future__ import annotations

import math
import random
from collections import Counter

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from tensafe.errors import UserError
from tensafe.privacy import canaries as cn

N_CANDIDATES = 999
SPACE = 10**6


def synthetic_scores(n: int = N_CANDIDATES, seed: int = 0) -> list[float]:
    rng = random.Random(seed)
    return [rng.gauss(30.0, 3.0) for _ in range(n)]


# --- secrets and records ------------------------------------------------------------------------


def test_canaries_are_distinct_secrets_of_the_requested_format():
    secrets = cn.make_canaries(50, 6, random.Random(0))
    assert len(set(secrets)) == 50
    for s in secrets:
        digits = s.removeprefix(cn.SECRET_PREFIX)
        assert s.startswith(cn.SECRET_PREFIX) and len(digits) == 6 and digits.isdigit()


def test_canary_record_is_a_chat_record_answering_with_the_secret():
    record = cn.canary_record("the secret number is 012345")
    assert [m["role"] for m in record["messages"]] == ["user", "assistant"]
    assert "012345" in record["messages"][1]["content"]


def test_insert_canaries_adds_repeats_copies_and_leaves_the_input_alone():
    data = [
        {"messages": [{"role": "user", "content": f"q{i}"}, {"role": "assistant", "content": "a"}]}
        for i in range(20)
    ]
    secrets = cn.make_canaries(3, 6, random.Random(1))
    mixed = cn.insert_canaries(data, secrets, repeats=4, rng=random.Random(2))
    assert len(data) == 20 and len(mixed) == 20 + 3 * 4
    answers = Counter(r["messages"][1]["content"] for r in mixed)
    assert all(answers[s] == 4 for s in secrets)
    assert mixed[:20] != data  # shuffled in, not appended


def test_candidates_never_repeat_an_inserted_canary():
    # 3 digits: 1000 secrets; 4 canaries + 996 candidates use the whole space.
    secrets = cn.make_canaries(4, 3, random.Random(0))
    candidates = cn.candidate_records(996, 3, random.Random(1), exclude=secrets)
    answers = [r["messages"][1]["content"] for r in candidates]
    assert len(set(answers)) == 996 and not set(answers) & set(secrets)


def test_asking_for_more_candidates_than_the_space_holds_is_a_user_error():
    secrets = cn.make_canaries(4, 3, random.Random(0))
    with pytest.raises(UserError, match="more digits"):
        cn.candidate_records(997, 3, random.Random(1), exclude=secrets)


# --- exposure ------------------------------------------------------------------------------------


def test_best_canary_gets_the_sampled_ceiling():
    scores = synthetic_scores()
    e = cn.exposure(min(scores) - 1.0, scores, SPACE)
    assert e.rank == 1 and e.sampled == pytest.approx(math.log2(N_CANDIDATES + 1)) == e.sampled_max
    assert e.extrapolated > e.sampled  # the fitted tail reaches past the sampling ceiling


def test_median_canary_has_about_one_bit():
    scores = sorted(synthetic_scores())
    e = cn.exposure(scores[len(scores) // 2], scores, SPACE)
    assert e.sampled == pytest.approx(1.0, abs=0.01)
    assert e.extrapolated == pytest.approx(1.0, abs=0.15)


def test_worst_canary_has_no_exposure():
    scores = synthetic_scores()
    e = cn.exposure(max(scores) + 1.0, scores, SPACE)
    assert e.sampled == 0.0 and e.extrapolated == pytest.approx(0.0, abs=0.01)


def test_ties_count_half():
    e = cn.exposure(2.0, [1.0, 2.0, 2.0, 3.0], 100)
    assert e.rank == 1 + 1 + 1.0


def test_extrapolated_exposure_falls_as_the_canary_gets_less_likely():
    scores = synthetic_scores()
    values = [cn.exposure(s, scores, SPACE).extrapolated for s in range(18, 42, 2)]
    assert all(a > b for a, b in zip(values, values[1:]))
    assert max(values) <= math.log2(SPACE)


def test_extrapolated_exposure_is_capped_by_the_space():
    e = cn.exposure(-1e6, synthetic_scores(), SPACE)
    assert e.extrapolated == e.max_bits == pytest.approx(math.log2(SPACE))


# --- scoring under a causal LM -------------------------------------------------------------------

VOCAB = 64
PROMPT = [1, 2, 3]


def tiny_lm() -> LlamaForCausalLM:
    torch.manual_seed(0)
    config = LlamaConfig(
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=1,
        vocab_size=VOCAB,
        max_position_embeddings=32,
    )
    return LlamaForCausalLM(config)


def toy_tokenize(answer: list[int]) -> tuple[list[int], list[int]]:
    """A record is its answer ids; the prompt is fixed and masked, like the chat template's."""
    return PROMPT + answer, [cn.IGNORE_INDEX] * len(PROMPT) + answer


def overfit(model: LlamaForCausalLM, answer: list[int], steps: int = 60) -> None:
    ids, labels = toy_tokenize(answer)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    model.train()
    for _ in range(steps):
        loss = model(input_ids=torch.tensor([ids]), labels=torch.tensor([labels])).loss
        opt.zero_grad()
        loss.backward()
        opt.step()


def test_score_is_the_summed_answer_nll_hf_computes():
    model = tiny_lm()
    answer = [10, 20, 30, 40]
    ids, labels = toy_tokenize(answer)
    mean_nll = model(input_ids=torch.tensor([ids]), labels=torch.tensor([labels])).loss.item()
    [score] = cn.score_sequences(model, toy_tokenize, [answer], batch_size=1)
    assert score == pytest.approx(mean_nll * len(answer), rel=1e-5)
    # The data layer's items are LongTensors; they score the same as lists.
    [from_tensors] = cn.score_sequences(
        model, lambda a: tuple(map(torch.tensor, toy_tokenize(a))), [answer], batch_size=1
    )
    assert from_tensors == pytest.approx(score)


def test_padding_does_not_change_scores():
    model = tiny_lm()
    rng = random.Random(0)
    answers = [[rng.randrange(4, VOCAB) for _ in range(rng.randrange(2, 9))] for _ in range(7)]
    alone = cn.score_sequences(model, toy_tokenize, answers, batch_size=1)
    batched = cn.score_sequences(model, toy_tokenize, answers, batch_size=4)
    assert batched == pytest.approx(alone, rel=1e-4)


def test_memorised_sequence_scores_lower_than_random_ones():
    model = tiny_lm()
    rng = random.Random(1)
    secret = [rng.randrange(4, VOCAB) for _ in range(6)]
    overfit(model, secret)
    others = [[rng.randrange(4, VOCAB) for _ in range(6)] for _ in range(20)]
    scores = cn.score_sequences(model, toy_tokenize, [secret, *others], batch_size=8)
    assert scores[0] < min(scores[1:])
    assert cn.exposure(scores[0], scores[1:], VOCAB**6).rank == 1
    assert model.training  # scoring restored the mode it found


def test_record_without_answer_tokens_is_refused():
    with pytest.raises(UserError, match="no answer tokens"):
        cn.score_sequences(tiny_lm(), toy_tokenize, [[]], batch_size=1)
