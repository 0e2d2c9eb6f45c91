"""The algorithms, from `cryptography` only: hybrid signatures (Ed25519 + ML-DSA-65, both must
verify) and hybrid key encapsulation (HPKE with X-Wing: ML-KEM-768 + X25519).

Key ids are fingerprints: SHA-256 over a domain label and the raw public key bytes. A signature
is accepted only against public keys the caller trusts (a trust store), never against a key that
arrives with the signed data.
"""

from __future__ import annotations

import base64
import hashlib
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from cryptography.exceptions import InvalidSignature, InvalidTag
from cryptography.hazmat.primitives import hpke
from cryptography.hazmat.primitives.asymmetric import ed25519, mldsa, mlkem, x25519

SIGNATURE_ALGORITHMS = ("ed25519", "ml-dsa-65")
KEM_ALGORITHM = "hpke-xwing-mlkem768-x25519-hkdf-sha256-aes-256-gcm"
SIZES = {  # raw bytes, as FIPS 204 / FIPS 203 / RFC 8032 / RFC 7748 fix them
    "ed25519_public": 32, "ed25519_signature": 64, "ml_dsa_65_public": 1952, "ml_dsa_65_signature": 3309,
    "ml_kem_768_public": 1184, "x25519_public": 32,
}
_SUITE = hpke.Suite(hpke.KEM.MLKEM768_X25519, hpke.KDF.HKDF_SHA256, hpke.AEAD.AES_256_GCM)


class CryptoError(Exception):
    """A signature, key or ciphertext that does not check out; the message says which."""


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def unb64(text: str, what: str) -> bytes:
    try:
        return base64.b64decode(text.encode(), validate=True)
    except (ValueError, AttributeError):
        raise CryptoError(f"{what} is not base64") from None


def fingerprint(label: str, *parts: bytes) -> str:
    digest = hashlib.sha256(label.encode() + b"\0")
    for part in parts:
        digest.update(len(part).to_bytes(4, "big") + part)
    return digest.hexdigest()


def pae(payload_type: str, payload: bytes) -> bytes:
    """DSSE's pre-authentication encoding: what is signed, with the type bound to the bytes."""
    kind = payload_type.encode()
    return b"DSSEv1 %d %b %d %b" % (len(kind), kind, len(payload), payload)


# --- signatures ------------------------------------------------------------------------------


@dataclass(frozen=True)
class SigningPublicKey:
    ed25519: bytes
    ml_dsa_65: bytes

    def __post_init__(self):
        if len(self.ed25519) != SIZES["ed25519_public"] or len(self.ml_dsa_65) != SIZES["ml_dsa_65_public"]:
            raise CryptoError("a signing public key is Ed25519 (32 bytes) + ML-DSA-65 (1952 bytes)")

    @property
    def key_id(self) -> str:
        return fingerprint("tensafe-signing-key-v1", self.ed25519, self.ml_dsa_65)

    def to_json(self) -> dict:
        return {"kind": "signing", "algorithms": list(SIGNATURE_ALGORITHMS), "key_id": self.key_id,
                "ed25519": b64(self.ed25519), "ml_dsa_65": b64(self.ml_dsa_65)}

    @classmethod
    def from_json(cls, data: Mapping) -> SigningPublicKey:
        if not isinstance(data, Mapping) or data.get("kind") != "signing":
            raise CryptoError("not a signing public key")
        key = cls(unb64(data.get("ed25519", ""), "ed25519"), unb64(data.get("ml_dsa_65", ""), "ml_dsa_65"))
        if data.get("key_id") not in (None, key.key_id):
            raise CryptoError(f"key id {data.get('key_id')} does not match the key ({key.key_id})")
        return key


@dataclass(frozen=True)
class Signature:
    """One hybrid signature: both halves by the signing key `key_id` (b"" for a half not present)."""

    key_id: str
    ed25519: bytes
    ml_dsa_65: bytes

    def to_dsse(self) -> list[dict]:
        """Standard DSSE signature entries, one per algorithm; each keyid names its half."""
        return [{"keyid": f"{self.key_id}:ed25519", "sig": b64(self.ed25519)},
                {"keyid": f"{self.key_id}:ml-dsa-65", "sig": b64(self.ml_dsa_65)}]


_HALF = re.compile(r"^([0-9a-f]{64}):(ed25519|ml-dsa-65)$")


def dsse_signatures(signatures: list[Signature]) -> list[dict]:
    """The DSSE `signatures` list of hybrid signatures: two standard `{keyid, sig}` entries each."""
    return [entry for signature in signatures for entry in signature.to_dsse()]


def signatures_from_dsse(entries: Any) -> list[Signature]:
    """TenSafe's hybrid signatures among standard DSSE entries. Entries of other signers and
    algorithms are left alone (they are not ours to check); a half that is missing stays empty,
    so verification names it."""
    if not isinstance(entries, list):
        raise CryptoError("DSSE signatures are a list of {keyid, sig} entries")
    halves: dict[str, dict[str, bytes]] = {}
    for entry in entries:
        if not isinstance(entry, Mapping) or not isinstance(entry.get("sig"), str):
            raise CryptoError("a DSSE signature entry is an object with a base64 `sig`")
        found = _HALF.match(entry.get("keyid") or "")
        if found is None:
            continue
        key_id, algorithm = found.groups()
        if algorithm in halves.setdefault(key_id, {}):
            raise CryptoError(f"two {algorithm} signatures for key {key_id[:16]}")
        halves[key_id][algorithm] = unb64(entry["sig"], f"{algorithm} signature")
    return [Signature(key_id, h.get("ed25519", b""), h.get("ml-dsa-65", b"")) for key_id, h in halves.items()]


class Signer:
    """A hybrid signing key: every signature carries both an Ed25519 and an ML-DSA-65 signature."""

    def __init__(self, ed: ed25519.Ed25519PrivateKey, ml: mldsa.MLDSA65PrivateKey):
        self._ed, self._ml = ed, ml
        self.public = SigningPublicKey(ed.public_key().public_bytes_raw(), ml.public_key().public_bytes_raw())

    @classmethod
    def generate(cls) -> Signer:
        return cls(ed25519.Ed25519PrivateKey.generate(), mldsa.MLDSA65PrivateKey.generate())

    @classmethod
    def from_seeds(cls, ed_seed: bytes, ml_seed: bytes) -> Signer:
        return cls(ed25519.Ed25519PrivateKey.from_private_bytes(ed_seed),
                   mldsa.MLDSA65PrivateKey.from_seed_bytes(ml_seed))

    def seeds(self) -> tuple[bytes, bytes]:
        return self._ed.private_bytes_raw(), self._ml.private_bytes_raw()

    @property
    def key_id(self) -> str:
        return self.public.key_id

    def sign(self, payload_type: str, payload: bytes) -> Signature:
        message = pae(payload_type, payload)
        return Signature(self.key_id, self._ed.sign(message), self._ml.sign(message))


def verify(payload_type: str, payload: bytes, signatures: list[Signature],
           trusted: Mapping[str, SigningPublicKey]) -> SigningPublicKey:
    """The trusted key that signed `payload`: some signature is by a key in `trusted` and both of
    its halves verify. Otherwise CryptoError saying why (no trusted signer, or a bad signature)."""
    message = pae(payload_type, payload)
    known = [s for s in signatures if s.key_id in trusted]
    if not known:
        ids = ", ".join(s.key_id[:16] for s in signatures) or "none"
        raise CryptoError(f"not signed by a trusted key (signers: {ids}); `tensafe keys trust` adds one")
    for signature in known:
        key = trusted[signature.key_id]
        missing = [name for name, half in (("Ed25519", signature.ed25519), ("ML-DSA-65", signature.ml_dsa_65))
                   if not half]
        if missing:
            raise CryptoError(f"the {' and '.join(missing)} half of key {signature.key_id[:16]}'s hybrid "
                              "signature is missing; both must verify")
        try:
            ed25519.Ed25519PublicKey.from_public_bytes(key.ed25519).verify(signature.ed25519, message)
        except InvalidSignature:
            raise CryptoError(f"the Ed25519 signature of key {signature.key_id[:16]} does not verify") \
                from None
        try:
            mldsa.MLDSA65PublicKey.from_public_bytes(key.ml_dsa_65).verify(signature.ml_dsa_65, message)
        except InvalidSignature:
            raise CryptoError(f"the ML-DSA-65 signature of key {signature.key_id[:16]} does not verify") \
                from None
    return trusted[known[0].key_id]


# --- key encapsulation (recipients) ------------------------------------------------------------


@dataclass(frozen=True)
class RecipientPublicKey:
    ml_kem_768: bytes
    x25519: bytes

    def __post_init__(self):
        if len(self.ml_kem_768) != SIZES["ml_kem_768_public"] or len(self.x25519) != SIZES["x25519_public"]:
            raise CryptoError("a recipient public key is ML-KEM-768 (1184 bytes) + X25519 (32 bytes)")

    @property
    def key_id(self) -> str:
        return fingerprint("tensafe-recipient-key-v1", self.ml_kem_768, self.x25519)

    def to_json(self) -> dict:
        return {"kind": "recipient", "algorithm": KEM_ALGORITHM, "key_id": self.key_id,
                "ml_kem_768": b64(self.ml_kem_768), "x25519": b64(self.x25519)}

    @classmethod
    def from_json(cls, data: Mapping) -> RecipientPublicKey:
        if not isinstance(data, Mapping) or data.get("kind") != "recipient":
            raise CryptoError("not a recipient public key")
        key = cls(unb64(data.get("ml_kem_768", ""), "ml_kem_768"), unb64(data.get("x25519", ""), "x25519"))
        if data.get("key_id") not in (None, key.key_id):
            raise CryptoError(f"key id {data.get('key_id')} does not match the key ({key.key_id})")
        return key

    def seal(self, plaintext: bytes, info: bytes) -> bytes:
        """HPKE base-mode single-shot encryption to this key; `info` binds the context."""
        key = hpke.MLKEM768X25519PublicKey(mlkem.MLKEM768PublicKey.from_public_bytes(self.ml_kem_768),
                                           x25519.X25519PublicKey.from_public_bytes(self.x25519))
        return _SUITE.encrypt(plaintext, key, info=info)


class Recipient:
    """A recipient's private key (X-Wing: ML-KEM-768 + X25519)."""

    def __init__(self, ml: mlkem.MLKEM768PrivateKey, x: x25519.X25519PrivateKey):
        self._key = hpke.MLKEM768X25519PrivateKey(ml, x)
        self._ml, self._x = ml, x
        self.public = RecipientPublicKey(ml.public_key().public_bytes_raw(),
                                         x.public_key().public_bytes_raw())

    @classmethod
    def generate(cls) -> Recipient:
        return cls(mlkem.MLKEM768PrivateKey.generate(), x25519.X25519PrivateKey.generate())

    @classmethod
    def from_seeds(cls, ml_seed: bytes, x_seed: bytes) -> Recipient:
        return cls(mlkem.MLKEM768PrivateKey.from_seed_bytes(ml_seed),
                   x25519.X25519PrivateKey.from_private_bytes(x_seed))

    def seeds(self) -> tuple[bytes, bytes]:
        return self._ml.private_bytes_raw(), self._x.private_bytes_raw()

    @property
    def key_id(self) -> str:
        return self.public.key_id

    def open(self, sealed: bytes, info: bytes) -> bytes:
        try:
            return _SUITE.decrypt(sealed, self._key, info=info)
        except (InvalidTag, ValueError):
            raise CryptoError("the wrapped key does not open with this recipient key (or was altered)") \
                from None
