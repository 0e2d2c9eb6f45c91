"""The KV cache of a running batch: one tensor per layer, rows left-padded to a common length.

Every row of a decode step appends one token, so all rows share one write position; a row that
joins with a shorter history is left-padded, and the attention mask hides the padding. Buffers
grow by doubling along the sequence axis, so a decode step writes one column per layer instead of
copying the cache (as concatenating caches would). Rows join (`extend`) and leave (`keep`) between
steps; those copy, and padding that no row needs any more is trimmed then.
"""

from __future__ import annotations

import torch
from transformers.cache_utils import Cache, CacheLayerMixin


class _Layer(CacheLayerMixin):
    """One attention layer's keys and values in [batch, heads, capacity, head_dim] buffers."""

    is_compileable = False
    is_sliding = False
    keys: torch.Tensor  # never None here: the buffers exist from the start
    values: torch.Tensor

    def __init__(self, keys: torch.Tensor, values: torch.Tensor, length: int):
        super().__init__()
        self.keys, self.values, self.length = keys, values, length
        self.is_initialized = True

    def lazy_initialization(self, key_states, value_states) -> None:  # buffers exist from the start
        pass

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        end = self.length + key_states.shape[-2]
        if end > self.keys.shape[-2]:
            self.keys, self.values = _grow(self.keys, end), _grow(self.values, end)
        self.keys[:, :, self.length : end] = key_states
        self.values[:, :, self.length : end] = value_states
        self.length = end
        return self.keys[:, :, :end], self.values[:, :, :end]

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self.length + query_length, 0

    def get_seq_length(self) -> int:
        return self.length

    def get_max_length(self) -> int:
        return -1


def _grow(buffer: torch.Tensor, needed: int) -> torch.Tensor:
    capacity = max(needed, 2 * buffer.shape[-2], 16)
    grown = buffer.new_zeros(*buffer.shape[:2], capacity, buffer.shape[-1])
    grown[:, :, : buffer.shape[-2]] = buffer
    return grown


class BatchCache:
    """The cache of `rows` sequences; `pad[i]` leading positions of row i are padding."""

    def __init__(self, num_layers: int, rows: int = 0):
        self.num_layers = num_layers
        self.layers: list[_Layer] | None = None
        self.pad = torch.zeros(rows, dtype=torch.long)

    @property
    def rows(self) -> int:
        return len(self.pad)

    @property
    def length(self) -> int:
        return self.layers[-1].length if self.layers and self.layers[-1] is not None else 0

    def cache(self) -> Cache:
        """A transformers cache view of the batch; a forward pass with it appends in place."""
        if self.layers is None:
            return Cache(layers=[_Lazy(self, i) for i in range(self.num_layers)])
        return Cache(layers=list(self.layers))

    def attention_mask(self, new_tokens: int) -> torch.Tensor:
        """[rows, length + new_tokens]: 0 on each row's padding, 1 elsewhere."""
        columns = torch.arange(self.length + new_tokens)
        return (columns[None, :] >= self.pad[:, None]).long()

    def positions(self, new_tokens: int) -> torch.Tensor:
        """[rows, new_tokens]: each row's true positions for the next tokens."""
        start = self.length - self.pad
        return start[:, None] + torch.arange(new_tokens)[None, :]

    def extend(self, other: BatchCache) -> None:
        """Append `other`'s rows (left-padding whichever side is shorter)."""
        if other.layers is None:
            raise ValueError("cannot join an empty cache")
        if self.layers is None:
            self.layers, self.pad = other.layers, other.pad.clone()
            return
        length = max(self.length, other.length)
        capacity = max(length + 1, self.layers[0].keys.shape[-2], other.layers[0].keys.shape[-2])
        mine, theirs = self._padded_to(length, capacity), other._padded_to(length, capacity)
        self.pad = torch.cat([self.pad + length - self.length, other.pad + length - other.length])
        self.layers = [
            _Layer(torch.cat([a.keys, b.keys]), torch.cat([a.values, b.values]), length)
            for a, b in zip(mine, theirs, strict=True)
        ]

    def drop_last(self, counts: list[int]) -> None:
        """Forget the last `counts[i]` positions of row i (a decode step's rejected draft tokens).
        What all rows drop goes by shortening the cache; the rest by moving a row's history right by
        its remainder, which becomes left padding (its true positions, length − pad, stay right)."""
        if self.layers is None or not counts:
            return
        common = min(counts)
        extra = [c - common for c in counts]
        for layer in self.layers:
            layer.length -= common
            end = layer.length
            for row, shift in enumerate(extra):
                if shift:
                    layer.keys[row, :, shift:end] = layer.keys[row, :, : end - shift].clone()
                    layer.values[row, :, shift:end] = layer.values[row, :, : end - shift].clone()
        self.pad = self.pad + torch.tensor(extra, dtype=torch.long)

    def keep(self, rows: list[int]) -> None:
        """Keep only `rows` (in that order), and drop padding every remaining row shares."""
        if not rows:
            self.layers, self.pad = None, torch.zeros(0, dtype=torch.long)
            return
        assert self.layers is not None, "keep() on an empty cache"
        index = torch.tensor(rows, dtype=torch.long)
        self.pad = self.pad[index]
        shared = int(self.pad.min())
        length = self.length
        self.layers = [
            _Layer(layer.keys[index, :, shared:length].contiguous(),
                   layer.values[index, :, shared:length].contiguous(), length - shared)
            for layer in self.layers
        ]
        self.pad -= shared

    def _padded_to(self, length: int, capacity: int) -> list[_Layer]:
        """The layers as buffers of `capacity` positions whose first `length` hold the rows, right-aligned."""
        assert self.layers is not None
        extra = length - self.length
        if extra == 0 and self.layers[0].keys.shape[-2] == capacity:
            return self.layers
        out = []
        for layer in self.layers:
            keys = layer.keys.new_zeros(*layer.keys.shape[:2], capacity, layer.keys.shape[-1])
            values = torch.zeros_like(keys)
            keys[:, :, extra:length] = layer.keys[:, :, : layer.length]
            values[:, :, extra:length] = layer.values[:, :, : layer.length]
            out.append(_Layer(keys, values, length))
        return out


class _Lazy(_Layer):
    """A layer of an empty batch: its first update creates the buffers and hands them to the batch."""

    def __init__(self, owner: BatchCache, index: int):
        CacheLayerMixin.__init__(self)
        self.owner, self.index, self.length = owner, index, 0

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        shape = (*key_states.shape[:2], max(16, key_states.shape[-2]), key_states.shape[-1])
        layer = _Layer(key_states.new_zeros(shape), value_states.new_zeros(shape), 0)
        if self.owner.layers is None:  # filled layer by layer during this forward
            self.owner.layers = [None] * self.owner.num_layers  # type: ignore[list-item]
        self.owner.layers[self.index] = layer
        return layer.update(key_states, value_states)
