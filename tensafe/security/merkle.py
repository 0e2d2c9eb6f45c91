"""The Merkle tree of a transparency log (RFC 9162, section 2.1, as Certificate Transparency uses
it): tree hashes, inclusion and consistency proofs, and their verification.

Leaves are hashed as SHA-256(0x00 ‖ entry) and interior nodes as SHA-256(0x01 ‖ left ‖ right), the
left subtree of n leaves holding the largest power of two below n. A holder of a tree head (size,
root) checks with `verify_inclusion` that an entry is in the log, and with `verify_consistency`
that a later head extends it: the log was only appended to, never truncated, rolled back or
rewritten. Functions take leaf hashes (`leaf_hash` of each entry), oldest first.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence

EMPTY_ROOT = hashlib.sha256(b"").digest()


def leaf_hash(entry: bytes) -> bytes:
    return hashlib.sha256(b"\x00" + entry).digest()


def node_hash(left: bytes, right: bytes) -> bytes:
    return hashlib.sha256(b"\x01" + left + right).digest()


def _split(n: int) -> int:
    """The largest power of two smaller than n (n ≥ 2)."""
    return 1 << ((n - 1).bit_length() - 1)


def root(leaves: Sequence[bytes]) -> bytes:
    """The Merkle tree hash of `leaves` (RFC 9162 MTH)."""
    if not leaves:
        return EMPTY_ROOT
    level = list(leaves)
    # Bottom-up, pairing left to right and carrying an odd last node up: the same tree as the
    # recursive definition, without recursion.
    while len(level) > 1:
        paired = [node_hash(level[i], level[i + 1]) for i in range(0, len(level) - 1, 2)]
        if len(level) % 2:
            paired.append(level[-1])
        level = paired
    return level[0]


def inclusion_proof(index: int, leaves: Sequence[bytes]) -> list[bytes]:
    """The audit path of leaf `index` (0-based) in the tree of `leaves` (RFC 9162 PATH)."""
    if not 0 <= index < len(leaves):
        raise ValueError(f"leaf {index} is not in a tree of {len(leaves)}")
    path: list[bytes] = []
    lo, hi = 0, len(leaves)
    while hi - lo > 1:
        k = _split(hi - lo)
        if index - lo < k:
            path.append(root(leaves[lo + k : hi]))
            hi = lo + k
        else:
            path.append(root(leaves[lo : lo + k]))
            lo += k
    return path[::-1]


def consistency_proof(old_size: int, leaves: Sequence[bytes]) -> list[bytes]:
    """The proof that the tree of the first `old_size` leaves is a prefix of the tree of `leaves`
    (RFC 9162 PROOF, via SUBPROOF)."""
    if not 0 < old_size <= len(leaves):
        raise ValueError(f"a consistency proof needs 0 < old size ({old_size}) <= new size ({len(leaves)})")
    path: list[bytes] = []
    lo, hi, m, complete = 0, len(leaves), old_size, True
    while True:
        n = hi - lo
        if m == n:
            if not complete:
                path.append(root(leaves[lo:hi]))
            break
        k = _split(n)
        if m <= k:
            path.append(root(leaves[lo + k : hi]))
            hi = lo + k
        else:
            path.append(root(leaves[lo : lo + k]))
            lo, m, complete = lo + k, m - k, False
    return path[::-1]


def verify_inclusion(leaf: bytes, index: int, size: int, path: Sequence[bytes], expected_root: bytes) -> bool:
    """Whether `path` proves leaf hash `leaf` at `index` of the tree of `size` with root
    `expected_root` (RFC 9162, section 2.1.3.2)."""
    if not 0 <= index < size:
        return False
    fn, sn, r = index, size - 1, leaf
    for p in path:
        if sn == 0:
            return False
        if fn & 1 or fn == sn:
            r = node_hash(p, r)
            while not fn & 1 and fn != 0:
                fn, sn = fn >> 1, sn >> 1
        else:
            r = node_hash(r, p)
        fn, sn = fn >> 1, sn >> 1
    return sn == 0 and r == expected_root


def verify_consistency(old_size: int, new_size: int, old_root: bytes, new_root: bytes,
                       path: Sequence[bytes]) -> bool:
    """Whether `path` proves that the tree (`old_size`, `old_root`) is a prefix of the tree
    (`new_size`, `new_root`) (RFC 9162, section 2.1.4.2)."""
    if not 0 < old_size <= new_size:
        return False
    if old_size == new_size:
        return not path and old_root == new_root
    path = list(path)
    if old_size & (old_size - 1) == 0:  # a power of two: the old tree is a whole subtree
        path = [old_root, *path]
    if not path:
        return False
    fn, sn = old_size - 1, new_size - 1
    while fn & 1:
        fn, sn = fn >> 1, sn >> 1
    fr = sr = path[0]
    for c in path[1:]:
        if sn == 0:
            return False
        if fn & 1 or fn == sn:
            fr, sr = node_hash(c, fr), node_hash(c, sr)
            while not fn & 1 and fn != 0:
                fn, sn = fn >> 1, sn >> 1
        else:
            sr = node_hash(sr, c)
        fn, sn = fn >> 1, sn >> 1
    return sn == 0 and fr == old_root and sr == new_root
