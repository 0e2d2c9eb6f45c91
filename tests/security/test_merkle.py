"""RFC 9162 Merkle trees: Certificate Transparency's reference vectors, and every proof of every
small tree against the recursive definition."""

from __future__ import annotations

import hashlib

import pytest

from tensafe.security import merkle

# RFC 6962 / 9162 reference data (certificate-transparency's merkle tree tests).
LEAVES = [bytes.fromhex(h) for h in ("", "00", "10", "2021", "3031", "40414243", "5051525354555657",
                                     "606162636465666768696a6b6c6d6e6f")]
ROOTS = [
    "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855",
    "6e340b9cffb37a989ca544e6bb780a2c78901d3fb33738768511a30617afa01d",
    "fac54203e7cc696cf0dfcb42c92a1d9dbaf70ad9e621f4bd8d98662f00e3c125",
    "aeb6bcfe274b70a14fb067a5e5578264db0fa9b51af5e0ba159158f329e06e77",
    "d37ee418976dd95753c1c73862b9398fa2a2cf9b4ff0fdfe8b30cd95209614b7",
    "4e3bbb1f7b478dcfe71fb631631519a3bca12c9aefca1612bfce4c13a86264d4",
    "76e67dadbcdf1e10e1b74ddc608abd2f98dfb16fbce75277b5232a127f2087ef",
    "ddb89be403809e325750d3d263cd78929c2942b7942a34b77e122c9594a74c8c",
    "5dc9da79a70659a9ad559cb701ded9a2ab9d823aad2f4960cfe370eff4604328",
]
INCLUSION = [  # (0-based leaf, tree size, path)
    (0, 8, ["96a296d224f285c67bee93c30f8a309157f0daa35dc5b87e410b78630a09cfc7",
            "5f083f0a1a33ca076a95279832580db3e0ef4584bdff1f54c8a360f50de3031e",
            "6b47aaf29ee3c2af9af889bc1fb9254dabd31177f16232dd6aab035ca39bf6e4"]),
    (5, 8, ["bc1a0643b12e4d2d7c77918f44e0f4f79a838b6cf9ec5b5c283e1f4d88599e6b",
            "ca854ea128ed050b41b35ffc1b87b8eb2bde461e9e3b5596ece6b9d5975a0ae0",
            "d37ee418976dd95753c1c73862b9398fa2a2cf9b4ff0fdfe8b30cd95209614b7"]),
]
HASHED = [merkle.leaf_hash(x) for x in LEAVES]


def test_roots_match_the_reference_for_every_size():
    assert [merkle.root(HASHED[:n]).hex() for n in range(9)] == ROOTS


@pytest.mark.parametrize("index,size,path", INCLUSION)
def test_inclusion_proofs_match_the_reference(index, size, path):
    proof = merkle.inclusion_proof(index, HASHED[:size])
    assert [p.hex() for p in proof] == path
    assert merkle.verify_inclusion(HASHED[index], index, size, proof, bytes.fromhex(ROOTS[size]))


def _mth(leaves):
    """The recursive definition, independently of the module's bottom-up loop."""
    if len(leaves) == 1:
        return leaves[0]
    k = 1
    while k * 2 < len(leaves):
        k *= 2
    return merkle.node_hash(_mth(leaves[:k]), _mth(leaves[k:]))


def _leaves(n):
    return [merkle.leaf_hash(hashlib.sha256(bytes([i])).digest()) for i in range(n)]


def test_every_proof_of_every_tree_up_to_33_leaves_verifies_and_any_change_breaks_it():
    leaves = _leaves(33)
    for n in range(1, 34):
        tree = leaves[:n]
        top = merkle.root(tree)
        assert top == _mth(tree)
        for i in range(n):
            proof = merkle.inclusion_proof(i, tree)
            assert merkle.verify_inclusion(tree[i], i, n, proof, top)
            assert not merkle.verify_inclusion(tree[(i + 1) % n], i, n, proof, top) or n == 1
        for m in range(1, n + 1):
            proof = merkle.consistency_proof(m, tree)
            old = merkle.root(tree[:m])
            assert merkle.verify_consistency(m, n, old, top, proof)
            if m < n:
                assert not merkle.verify_consistency(m, n, merkle.root(leaves[1 : m + 1]), top, proof)
                assert not merkle.verify_consistency(m, n, old, merkle.root(leaves[:n - 1] + [old]), proof)
                assert not merkle.verify_consistency(m, n, old, top, proof[:-1])


def test_a_rewritten_prefix_is_inconsistent_with_the_old_head():
    leaves = _leaves(20)
    old = merkle.root(leaves[:12])
    forged = leaves[:5] + [merkle.leaf_hash(b"rewritten")] + leaves[6:]
    proof = merkle.consistency_proof(12, forged)
    assert not merkle.verify_consistency(12, 20, old, merkle.root(forged), proof)
