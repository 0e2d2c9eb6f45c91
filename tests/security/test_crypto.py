"""The algorithms are the ones named: sizes fixed by their standards, both halves of a hybrid
signature required, trust only from the caller's store, HPKE X-Wing bound to its info."""

from __future__ import annotations

import dataclasses

import pytest

from tensafe.security.crypto import (
    SIZES,
    CryptoError,
    Recipient,
    RecipientPublicKey,
    Signer,
    SigningPublicKey,
    dsse_signatures,
    pae,
    signatures_from_dsse,
    verify,
)


@pytest.fixture(scope="module")
def signer():
    return Signer.generate()


def test_key_and_signature_sizes_are_those_of_ed25519_and_ml_dsa_65(signer):
    sig = signer.sign("application/test", b"payload")
    assert len(signer.public.ed25519) == 32 and len(signer.public.ml_dsa_65) == 1952
    assert len(sig.ed25519) == 64 and len(sig.ml_dsa_65) == 3309
    assert SIZES["ml_dsa_65_signature"] == 3309
    recipient = Recipient.generate()
    assert len(recipient.public.ml_kem_768) == 1184 and len(recipient.public.x25519) == 32
    # X-Wing's encapsulation is ML-KEM-768's 1088-byte ciphertext plus X25519's 32-byte share
    sealed = recipient.public.seal(b"k" * 32, b"info")
    assert len(sealed) == 1088 + 32 + 32 + 16  # enc + data key + AES-256-GCM tag


def test_a_signature_verifies_only_against_a_trusted_key_and_only_with_both_halves(signer):
    sig = signer.sign("application/test", b"payload")
    trusted = {signer.key_id: signer.public}
    assert verify("application/test", b"payload", [sig], trusted) == signer.public
    with pytest.raises(CryptoError, match="not signed by a trusted key"):
        verify("application/test", b"payload", [sig], {})
    with pytest.raises(CryptoError, match="Ed25519"):
        verify("application/test", b"payload!", [sig], trusted)
    with pytest.raises(CryptoError, match="Ed25519"):  # the payload type is bound too
        verify("application/other", b"payload", [sig], trusted)
    other = Signer.generate().sign("application/test", b"payload")
    with pytest.raises(CryptoError, match="ML-DSA-65"):  # a valid Ed25519 half is not enough
        verify("application/test", b"payload", [dataclasses.replace(sig, ml_dsa_65=other.ml_dsa_65)], trusted)
    with pytest.raises(CryptoError, match="Ed25519"):
        verify("application/test", b"payload", [dataclasses.replace(sig, ed25519=other.ed25519)], trusted)


def test_keys_round_trip_through_json_and_seeds(signer):
    assert SigningPublicKey.from_json(signer.public.to_json()) == signer.public
    assert Signer.from_seeds(*signer.seeds()).public == signer.public
    recipient = Recipient.generate()
    assert RecipientPublicKey.from_json(recipient.public.to_json()) == recipient.public
    assert Recipient.from_seeds(*recipient.seeds()).public == recipient.public
    sig = signer.sign("t", b"x")
    assert signatures_from_dsse(dsse_signatures([sig])) == [sig]
    forged = dict(signer.public.to_json(), key_id="0" * 64)
    with pytest.raises(CryptoError, match="does not match"):
        SigningPublicKey.from_json(forged)


def test_hpke_opens_only_for_its_recipient_and_its_info():
    recipient, other = Recipient.generate(), Recipient.generate()
    sealed = recipient.public.seal(b"data key", b"manifest-digest")
    assert recipient.open(sealed, b"manifest-digest") == b"data key"
    with pytest.raises(CryptoError):
        other.open(sealed, b"manifest-digest")
    with pytest.raises(CryptoError):
        recipient.open(sealed, b"another manifest")
    with pytest.raises(CryptoError):
        recipient.open(sealed[:-1] + bytes([sealed[-1] ^ 1]), b"manifest-digest")


def test_pae_is_dsse():
    assert pae("http://example.com/HelloWorld", b"hello world") == (
        b"DSSEv1 29 http://example.com/HelloWorld 11 hello world"
    )
