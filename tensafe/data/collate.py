"""Collate tokenized chat examples into a right-padded batch for a causal LM."""

from __future__ import annotations

import torch
from torch.nn.utils.rnn import pad_sequence

IGNORE_INDEX = -100  # label value the loss skips (torch cross_entropy's default ignore_index)


def collate(batch: list[dict], pad_token_id: int) -> dict[str, torch.Tensor]:
    """Right-pad `input_ids` with `pad_token_id`, `labels` with -100; `attention_mask` marks real tokens.

    An empty `batch` (Poisson sampling can draw none) gives three long tensors of shape (0, 1):
    a zero batch dimension contributes nothing, and a non-zero sequence dimension keeps code
    that reshapes or indexes over positions valid.
    """
    if not batch:
        empty = torch.zeros((0, 1), dtype=torch.long)
        return {"input_ids": empty, "attention_mask": empty.clone(), "labels": empty.clone()}
    ids = [item["input_ids"] for item in batch]
    return {
        "input_ids": pad_sequence(ids, batch_first=True, padding_value=pad_token_id),
        "attention_mask": pad_sequence([torch.ones_like(t) for t in ids], batch_first=True, padding_value=0),
        "labels": pad_sequence(
            [item["labels"] for item in batch], batch_first=True, padding_value=IGNORE_INDEX
        ),
    }
