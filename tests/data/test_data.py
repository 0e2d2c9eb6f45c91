"""Data layer: synthetic generator, JSONL loading, answer-only labels, truncation, splits, collation."""

from __future__ import annotations

import json
import re

import pytest
import torch
from hydra import compose, initialize_config_module

from tensafe.config import validate_config
from tensafe.config.schema import DataConfig
from tensafe.data import synthetic
from tensafe.data.collate import collate
from tensafe.data.datasets import (
    ChatDataset,
    build_datasets,
    bundled_path,
    file_digest,
    load_records,
)
from tensafe.data.digest import DatasetKey
from tensafe.errors import DataError
from tensafe.models.loader import load_tokenizer


@pytest.fixture(scope="module")
def tokenizer():
    with initialize_config_module("tensafe.conf", version_base="1.3"):
        cfg = validate_config(compose("config", overrides=["model=tiny_llama"]))
    return load_tokenizer(cfg.model)


def _write(path, lines):
    path.write_text("".join(line + "\n" for line in lines), encoding="utf-8")
    return path


def _prompt_len(tokenizer, messages):
    prompt = tokenizer.apply_chat_template(messages[:-1], tokenize=False, add_generation_prompt=True)
    return len(tokenizer(prompt, add_special_tokens=False)["input_ids"])


# --- generator ---------------------------------------------------------------------------------


def test_generator_is_deterministic_with_distinct_names():
    a = synthetic.generate(200, seed=7)
    assert a == synthetic.generate(200, seed=7)
    assert a != synthetic.generate(200, seed=8)
    names = {r["messages"][0]["content"] for r in a}
    assert len(names) == 200


def test_bundled_file_is_the_generator_output(tmp_path):
    out = tmp_path / "regen.jsonl"
    synthetic.main(
        ["--out", str(out), "--n", str(synthetic.DEFAULT_N), "--seed", str(synthetic.DEFAULT_SEED)]
    )
    assert out.read_bytes() == bundled_path().read_bytes()
    assert file_digest(out) == file_digest(bundled_path())


def test_bundled_records_parse():
    records = load_records(bundled_path())
    assert len(records) == synthetic.DEFAULT_N
    assert all([m["role"] for m in r["messages"]] == ["user", "assistant"] for r in records)
    assert len({r["id"] for r in records}) == len(records)


# --- tokenization and labels -------------------------------------------------------------------


def test_prompt_is_masked_and_answer_is_not(tokenizer):
    records = [r for r in synthetic.generate(60) if "secret code" in r["messages"][0]["content"]][:5]
    ds = ChatDataset(records, tokenizer, max_seq_len=96)
    assert len(ds) == 5 and ds.dropped == 0
    for record, item in zip(records, ds):
        secret = re.search(r"\d{6}", record["messages"][-1]["content"]).group()
        n_prompt = _prompt_len(tokenizer, record["messages"])
        labels, ids = item["labels"], item["input_ids"]
        assert labels.dtype == ids.dtype == torch.long and labels.shape == ids.shape
        assert (labels[:n_prompt] == -100).all()
        assert (labels[n_prompt:] == ids[n_prompt:]).all()
        answer = tokenizer.decode(ids[labels != -100])
        assert answer.startswith(record["messages"][-1]["content"])
        assert secret in answer
        assert secret not in tokenizer.decode(ids[labels == -100])


def test_truncation_keeps_partial_answers_and_drops_empty_ones(tokenizer):
    short, long_ = synthetic.generate(2)
    long_ = {"messages": [{"role": "user", "content": "word " * 80}, long_["messages"][-1]]}
    n_prompt = _prompt_len(tokenizer, short["messages"])
    ds = ChatDataset([short, long_], tokenizer, max_seq_len=n_prompt + 3)
    assert len(ds) == 1 and ds.dropped == 1 and ds.records == [short]
    assert len(ds[0]["input_ids"]) == n_prompt + 3
    assert int((ds[0]["labels"] != -100).sum()) == 3
    with pytest.raises(DataError, match="model.max_seq_len"):
        ChatDataset([short], tokenizer, max_seq_len=n_prompt)


def test_bundled_examples_fit_the_tiny_model_untruncated(tokenizer, tiny_cfg):
    ds = ChatDataset(load_records(bundled_path()), tokenizer, max_seq_len=10_000)
    assert max(len(item["input_ids"]) for item in ds) <= tiny_cfg.model.max_seq_len


# --- file formats and errors -------------------------------------------------------------------


def test_prompt_completion_format(tmp_path, tokenizer):
    path = _write(
        tmp_path / "pc.jsonl",
        [
            json.dumps({"prompt": "Capital of Peru?", "completion": "Lima."}),
            "",
            json.dumps(
                {
                    "messages": [
                        {"role": "system", "content": "Be brief."},
                        {"role": "user", "content": "2+2?"},
                        {"role": "assistant", "content": "4"},
                    ],
                    "id": 9,
                }
            ),
        ],
    )
    records = load_records(path)
    assert records[0] == {
        "messages": [
            {"role": "user", "content": "Capital of Peru?"},
            {"role": "assistant", "content": "Lima."},
        ]
    }
    assert records[1]["id"] == 9 and records[1]["messages"][0]["role"] == "system"
    ds = ChatDataset(records, tokenizer, max_seq_len=96)
    assert tokenizer.decode(ds[0]["input_ids"][ds[0]["labels"] != -100]).startswith("Lima.")


@pytest.mark.parametrize(
    "bad, why",
    [
        ('{"messages": [', "invalid JSON"),
        ('["a"]', "JSON object"),
        ('{"prompt": "hi"}', 'missing key "completion"'),
        ('{"text": "hi"}', '"messages" or "prompt"'),
        ('{"messages": [{"role": "bot", "content": "x"}]}', "role 'bot'"),
        ('{"messages": [{"role": "user", "content": "x"}]}', "last message"),
        ('{"messages": [{"role": "user"}, {"role": "assistant", "content": "y"}]}', '"content"'),
        ('{"messages": [{"role": "assistant", "content": "y"}]}', "user message"),
        ('{"prompt": "x", "completion": "  "}', "empty"),
    ],
)
def test_bad_lines_name_file_and_line(tmp_path, bad, why):
    path = _write(tmp_path / "bad.jsonl", [json.dumps({"prompt": "ok", "completion": "fine"}), bad])
    with pytest.raises(DataError, match=re.escape(f"{path}:2: ") + ".*" + re.escape(why)):
        load_records(path)


def test_empty_and_missing_files(tmp_path):
    with pytest.raises(DataError, match="empty"):
        load_records(_write(tmp_path / "empty.jsonl", ["", "  "]))
    with pytest.raises(DataError, match="no such file"):
        load_records(tmp_path / "nope.jsonl")


# --- splits ------------------------------------------------------------------------------------


def _ids(ds):
    return [r["id"] for r in ds.records]


def test_split_is_disjoint_deterministic_and_capped(tokenizer):
    cfg = DataConfig(name="sample_private", eval_fraction=0.1)
    a = build_datasets(cfg, tokenizer, max_seq_len=96, seed=3)
    train, held = set(_ids(a.train)), set(_ids(a.eval))
    assert not train & held
    assert len(train | held) == synthetic.DEFAULT_N and len(held) == synthetic.DEFAULT_N // 10
    assert a.train_size == len(a.train) and a.dropped == 0
    assert a.source == bundled_path()
    again = build_datasets(cfg, tokenizer, max_seq_len=96, seed=3)
    assert _ids(again.train) == _ids(a.train) and _ids(again.eval) == _ids(a.eval)
    key = DatasetKey.generate()
    assert again.digest(key) == a.digest(key)
    other = build_datasets(cfg, tokenizer, 96, seed=4)
    assert set(_ids(other.eval)) != held and other.digest(key) != a.digest(key)  # it names the training set
    capped = build_datasets(cfg.model_copy(update={"max_examples": 10}), tokenizer, 96, seed=3)
    assert capped.train_size == 10 and _ids(capped.eval) == _ids(a.eval)
    assert capped.digest(key) == key.digest(a.train.records[:10]) != a.digest(key)
    assert a.digest(key) != a.digest(DatasetKey.generate())  # keyed: useless without the owner's key


def test_explicit_eval_file(tmp_path, tokenizer):
    train = _write(
        tmp_path / "train.jsonl", [json.dumps({"prompt": f"q{i}", "completion": f"a{i}"}) for i in range(4)]
    )
    held = _write(tmp_path / "eval.jsonl", [json.dumps({"prompt": "q", "completion": "a"})])
    cfg = DataConfig(name="jsonl", path=str(train), eval_path=str(held), eval_fraction=0.1)
    bundle = build_datasets(cfg, tokenizer, max_seq_len=96, seed=0)
    assert bundle.train_size == 4 and len(bundle.eval) == 1 and bundle.source == train
    assert bundle.digest(DatasetKey.generate()) not in (file_digest(train), file_digest(held))


def _chats(n, repeat=1):
    return [json.dumps({"prompt": f"question {i}", "completion": f"answer {i}"}) for i in range(n)] * repeat


def test_repeated_records_are_refused_naming_the_repeat_and_the_fix(tmp_path, tokenizer):
    path = _write(tmp_path / "dup.jsonl", _chats(60, repeat=5))
    cfg = DataConfig(name="jsonl", path=str(path), eval_fraction=0.1)
    with pytest.raises(DataError, match=r"record 61 repeats record 1 \(240 repeats of 60 distinct") as err:
        build_datasets(cfg, tokenizer, max_seq_len=96, seed=0)
    assert "data.duplicates=drop" in str(err.value)


def test_dropping_repeats_trains_on_distinct_records_and_keeps_eval_disjoint_by_content(tmp_path, tokenizer):
    path = _write(tmp_path / "dup.jsonl", _chats(60, repeat=5))
    cfg = DataConfig(name="jsonl", path=str(path), eval_fraction=0.1, duplicates="drop")
    bundle = build_datasets(cfg, tokenizer, max_seq_len=96, seed=0)
    assert bundle.train_size == 54 and len(bundle.eval) == 6 and bundle.duplicates_dropped == 240
    content = {json.dumps(r["messages"]) for r in bundle.train.records}
    assert len(content) == 54 and not content & {json.dumps(r["messages"]) for r in bundle.eval.records}


def test_records_differing_only_in_id_are_the_same_record(tmp_path, tokenizer):
    lines = [json.dumps({"id": i, "prompt": "same", "completion": "same"}) for i in range(2)] + _chats(3)
    cfg = DataConfig(name="jsonl", path=str(_write(tmp_path / "ids.jsonl", lines)), eval_fraction=0.2)
    with pytest.raises(DataError, match="record 2 repeats record 1"):
        build_datasets(cfg, tokenizer, max_seq_len=96, seed=0)


def test_an_eval_file_overlapping_training_is_refused_or_trimmed(tmp_path, tokenizer):
    train = _write(tmp_path / "train.jsonl", _chats(10))
    held = _write(tmp_path / "eval.jsonl", _chats(12)[8:])  # questions 8, 9 are training records
    cfg = DataConfig(name="jsonl", path=str(train), eval_path=str(held), eval_fraction=0.1)
    with pytest.raises(DataError, match="eval record 1 .2 in all. also occurs in the training"):
        build_datasets(cfg, tokenizer, max_seq_len=96, seed=0)
    bundle = build_datasets(cfg.model_copy(update={"duplicates": "drop"}), tokenizer, max_seq_len=96, seed=0)
    assert [r["messages"][0]["content"] for r in bundle.eval.records] == ["question 10", "question 11"]


# --- collation ---------------------------------------------------------------------------------


def test_collate_right_pads():
    batch = [
        {"input_ids": torch.tensor([5, 6, 7]), "labels": torch.tensor([-100, 6, 7])},
        {"input_ids": torch.tensor([8]), "labels": torch.tensor([8])},
    ]
    out = collate(batch, pad_token_id=0)
    assert out["input_ids"].tolist() == [[5, 6, 7], [8, 0, 0]]
    assert out["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]
    assert out["labels"].tolist() == [[-100, 6, 7], [8, -100, -100]]


def test_collate_empty_batch():
    out = collate([], pad_token_id=0)
    assert set(out) == {"input_ids", "attention_mask", "labels"}
    assert all(t.shape == (0, 1) and t.dtype == torch.long for t in out.values())
