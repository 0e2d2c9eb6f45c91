"""Load chat JSONL files, tokenize them with the model's chat template, and split train/eval.

Loss is on the final assistant answer only: prompt tokens are labelled -100.
"""

from __future__ import annotations

import hashlib
import json
import logging
import random
from dataclasses import dataclass
from importlib.resources import files
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import Dataset

from tensafe.config.schema import DataConfig
from tensafe.data.collate import IGNORE_INDEX
from tensafe.data.digest import DatasetKey
from tensafe.errors import ConfigError, DataError

BUNDLED_FILE = "sample_private.jsonl"
ROLES = ("system", "user", "assistant")
log = logging.getLogger(__name__)


def bundled_path() -> Path:
    """The bundled synthetic dataset (package data of tensafe.data, so it ships in the wheel)."""
    path = Path(str(files("tensafe.data").joinpath(BUNDLED_FILE)))
    if not path.is_file():
        raise DataError(f"{path}: bundled dataset missing; reinstall tensafe")
    return path


def file_digest(path: str | Path) -> str:
    """sha256 hex digest of a file's bytes."""
    h = hashlib.sha256()
    with Path(path).open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _messages(obj: Any) -> list[dict]:
    """The record's conversation as [{"role", "content"}]; ValueError says what is wrong."""
    if not isinstance(obj, dict):
        raise ValueError(f"expected a JSON object, got {type(obj).__name__}")
    if "messages" in obj and ("prompt" in obj or "completion" in obj):
        raise ValueError('has both "messages" and "prompt"/"completion"; use one format')
    if "messages" not in obj:
        missing = [k for k in ("prompt", "completion") if k not in obj]
        if len(missing) == 2:
            raise ValueError('needs "messages" or "prompt" and "completion"')
        if missing:
            raise ValueError(f'missing key "{missing[0]}"')
        for key in ("prompt", "completion"):
            if not isinstance(obj[key], str):
                raise ValueError(f'"{key}" must be a string')
        obj = {
            "messages": [
                {"role": "user", "content": obj["prompt"]},
                {"role": "assistant", "content": obj["completion"]},
            ]
        }
    messages = obj["messages"]
    if not isinstance(messages, list) or not messages:
        raise ValueError('"messages" must be a non-empty list')
    out = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or "role" not in m or "content" not in m:
            raise ValueError(f'messages[{i}] must be an object with "role" and "content"')
        if m["role"] not in ROLES:
            raise ValueError(f"messages[{i}] has role {m['role']!r}; allowed: {', '.join(ROLES)}")
        if not isinstance(m["content"], str):
            raise ValueError(f'messages[{i}] "content" must be a string')
        out.append({"role": m["role"], "content": m["content"]})
    if out[-1]["role"] != "assistant":
        raise ValueError(f"the last message must be the assistant's answer, got role {out[-1]['role']!r}")
    if not out[-1]["content"].strip():
        raise ValueError("the final assistant answer is empty")
    if not any(m["role"] == "user" for m in out[:-1]):
        raise ValueError("needs a user message before the final assistant answer")
    return out


def load_records(path: str | Path) -> list[dict]:
    """Records `{"messages": [...]}` (plus `"id"` where given) from a JSONL file.

    Each line holds `{"messages": [...]}` (roles system/user/assistant, last one assistant) or
    `{"prompt": str, "completion": str}`; blank lines are skipped. Anything else is a DataError
    naming the file and line.
    """
    path = Path(path).expanduser()
    if not path.is_file():
        raise DataError(f"{path}: no such file" if not path.exists() else f"{path}: not a file")
    records = []
    with path.open("rb") as f:
        for lineno, raw in enumerate(f, 1):
            try:
                line = raw.decode("utf-8")
                if not line.strip():
                    continue
                obj = json.loads(line)
            except UnicodeDecodeError:
                raise DataError(f"{path}:{lineno}: not UTF-8 text") from None
            except json.JSONDecodeError as e:
                raise DataError(f"{path}:{lineno}: invalid JSON ({e.msg} at column {e.colno})") from None
            try:
                record = {"messages": _messages(obj)}
            except ValueError as e:
                raise DataError(f"{path}:{lineno}: {e}") from None
            if "id" in obj:
                record["id"] = obj["id"]
            records.append(record)
    if not records:
        raise DataError(f"{path}: empty file (no records)")
    return records


class ChatDataset(Dataset):
    """Tokenized chat records: items `{"input_ids", "labels"}` (1-D LongTensors, at most max_seq_len).

    The prompt (everything before the final assistant answer, incl. the generation prompt) and the
    answer are tokenized separately, so the model is trained on exactly the prompt tokens it sees
    at generation time. Records whose answer is truncated away entirely are dropped (`dropped`);
    `records` holds the kept ones, aligned with the items.
    """

    def __init__(self, records: list[dict], tokenizer, max_seq_len: int):
        if not getattr(tokenizer, "chat_template", None):
            raise ConfigError("model.hf_id", tokenizer.name_or_path, "tokenizer has no chat template")
        prompts, answers = [], []
        for record in records:
            full = tokenizer.apply_chat_template(record["messages"], tokenize=False)
            prompt = tokenizer.apply_chat_template(
                record["messages"][:-1], tokenize=False, add_generation_prompt=True
            )
            if not full.startswith(prompt):
                raise ConfigError(
                    "model.hf_id",
                    tokenizer.name_or_path,
                    "its chat template does not render the prompt as a prefix of the "
                    "conversation, which answer-only labels need",
                )
            prompts.append(prompt)
            answers.append(full[len(prompt) :])
        # The rendered text already holds the template's special tokens; add none twice.
        prompt_ids = tokenizer(prompts, add_special_tokens=False)["input_ids"]
        answer_ids = tokenizer(answers, add_special_tokens=False)["input_ids"]
        self.items: list[dict[str, torch.Tensor]] = []
        self.records: list[dict] = []
        for record, p, a in zip(records, prompt_ids, answer_ids):
            if len(p) >= max_seq_len:
                continue
            ids = (p + a)[:max_seq_len]
            labels = ([IGNORE_INDEX] * len(p) + a)[:max_seq_len]
            self.items.append(
                {
                    "input_ids": torch.tensor(ids, dtype=torch.long),
                    "labels": torch.tensor(labels, dtype=torch.long),
                }
            )
            self.records.append(record)
        self.dropped = len(records) - len(self.items)
        if records and not self.items:
            raise DataError(
                f"all {len(records)} examples lose their whole answer at "
                f"model.max_seq_len={max_seq_len}; raise model.max_seq_len"
            )

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return self.items[i]


@dataclass(frozen=True)
class DataBundle:
    train: ChatDataset
    eval: ChatDataset
    train_size: int  # len(train), after duplicates, max_examples and dropping
    source: Path  # the train file (the bundled one when data.path is null)
    dropped: int  # train + eval records dropped because max_seq_len cut their whole answer
    duplicates_dropped: int = 0  # repeated records removed under data.duplicates=drop

    def digest(self, key: DatasetKey) -> str:
        """The keyed digest of the training records actually used (after split and caps)."""
        return key.digest(self.train.records)


def _content(record: dict) -> str:
    """What makes two records the same example: their conversation, not their id."""
    return json.dumps(record["messages"], sort_keys=True, separators=(",", ":"), ensure_ascii=False)


def _without_duplicates(records: list[dict], path: Path, policy: str) -> tuple[list[dict], int]:
    """`records` with every repeat of an earlier record removed (`policy` drop), or a DataError
    naming the first repeat (`policy` refuse): ε is per record, and a record present k times has
    only the group guarantee of k records."""
    first: dict[str, int] = {}
    kept, repeats = [], []
    for index, record in enumerate(records):
        key = _content(record)
        if key in first:
            repeats.append((index, first[key]))
        else:
            first[key] = index
            kept.append(record)
    if repeats and policy == "refuse":
        index, original = repeats[0]
        raise DataError(
            f"{path}: record {index + 1} repeats record {original + 1} ({len(repeats)} repeats of "
            f"{len({o for _, o in repeats})} distinct records); DP's ε is per record and a repeated "
            "record has only the weaker guarantee of a group: remove the repeats or set data.duplicates=drop"
        )
    if repeats:
        log.warning("%s: dropped %d repeated records (kept the first of each)", path, len(repeats))
    return kept, len(repeats)


def _split(records: list[dict], fraction: float, seed: int, path: Path) -> tuple[list[dict], list[dict]]:
    """Hold out round(fraction * n) records (at least one, leaving at least one) by a seeded shuffle."""
    if len(records) < 2:
        raise DataError(
            f"{path}: {len(records)} record; holding out an eval split needs at least 2 "
            "(or set data.eval_path)"
        )
    n_eval = min(max(1, round(fraction * len(records))), len(records) - 1)
    order = list(range(len(records)))
    random.Random(seed).shuffle(order)
    # Both splits keep file order; the train loader shuffles anyway.
    held_out = sorted(order[:n_eval])
    kept = sorted(order[n_eval:])
    return [records[i] for i in kept], [records[i] for i in held_out]


def _disjoint_eval(train: list[dict], held: list[dict], path: Path, policy: str) -> list[dict]:
    """The eval records that do not also occur in training (by content); overlap is refused or dropped."""
    seen = {_content(r) for r in train}
    overlap = [i for i, r in enumerate(held) if _content(r) in seen]
    if overlap and policy == "refuse":
        raise DataError(
            f"{path}: eval record {overlap[0] + 1} ({len(overlap)} in all) also occurs in the training "
            "data, so eval loss would not measure held-out data: remove them or set data.duplicates=drop"
        )
    if overlap:
        log.warning("%s: dropped %d eval records that also occur in training", path, len(overlap))
    dropped = set(overlap)
    kept = [r for i, r in enumerate(held) if i not in dropped]
    if not kept:
        raise DataError(f"{path}: every eval record also occurs in the training data")
    return kept


def build_datasets(data_cfg: DataConfig, tokenizer, max_seq_len: int, seed: int) -> DataBundle:
    """Train and eval datasets for `data_cfg`; the split depends only on the file and `seed`.

    Repeated records are refused or dropped (`data.duplicates`) before the split, and eval never
    holds a record that training holds.
    """
    source = Path(data_cfg.path).expanduser() if data_cfg.path else bundled_path()
    records, repeats = _without_duplicates(load_records(source), source, data_cfg.duplicates)
    if data_cfg.eval_path:
        eval_source = Path(data_cfg.eval_path).expanduser()
        eval_records, eval_repeats = _without_duplicates(load_records(eval_source), eval_source,
                                                         data_cfg.duplicates)
        eval_records = _disjoint_eval(records, eval_records, eval_source, data_cfg.duplicates)
        train_records, repeats = records, repeats + eval_repeats
    else:
        train_records, eval_records = _split(records, data_cfg.eval_fraction, seed, source)
    if data_cfg.max_examples is not None:
        train_records = train_records[: data_cfg.max_examples]
    train = ChatDataset(train_records, tokenizer, max_seq_len)
    eval_ = ChatDataset(eval_records, tokenizer, max_seq_len)
    return DataBundle(
        train=train,
        eval=eval_,
        train_size=len(train),
        source=source,
        dropped=train.dropped + eval_.dropped,
        duplicates_dropped=repeats,
    )
