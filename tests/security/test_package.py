"""TSSP packages: every region of a package is covered (signature, digests, AEAD), trust comes only
from the verifier's store, and a failed open writes and loads nothing."""

from __future__ import annotations

import json
import struct

import pytest

from tensafe.security.canonical import canonical_json
from tensafe.security.crypto import Recipient, Signer
from tensafe.security.package import (
    _PREFIX,
    _TAG,
    FORMAT_VERSION,
    PAYLOAD_TYPE,
    PackageError,
    _decrypt,
    build_package,
    manifest_digest,
    open_to,
    read_package,
    run_manifest,
)
from tests.cli import run_tensafe
from tests.serving.made_adapters import trained_looking_adapter


@pytest.fixture(scope="module")
def keys():
    return {"signer": Signer.generate(), "intruder": Signer.generate(), "me": Recipient.generate(),
            "other": Recipient.generate()}


@pytest.fixture(scope="module")
def adapter_dir(tiny_cfg, tmp_path_factory):
    folder = tmp_path_factory.mktemp("pkg") / "adapter"
    trained_looking_adapter(tiny_cfg, folder, seed=4)
    return folder


def _trusted(keys):
    return {keys["signer"].key_id: keys["signer"].public}


def _build(tmp_path, adapter_dir, keys, encrypt=True, chunk_size=1024, name="a.tssp"):
    members, fields = run_manifest(adapter_dir)
    path = tmp_path / name
    build_package(path, members, fields, keys["signer"], [keys["me"].public] if encrypt else [], chunk_size)
    return path, members


def _split(data: bytes):
    _, _, length = _PREFIX.unpack_from(data)
    header = json.loads(data[_PREFIX.size : _PREFIX.size + length])
    return header, data[_PREFIX.size + length :]


def _join(header: dict, payload: bytes) -> bytes:
    body = canonical_json(header)
    return _PREFIX.pack(b"TSSP", FORMAT_VERSION, len(body)) + body + payload


@pytest.mark.parametrize("encrypt", [True, False])
def test_a_package_round_trips_for_its_recipient_with_its_manifest(tmp_path, adapter_dir, keys, encrypt):
    path, members = _build(tmp_path, adapter_dir, keys, encrypt)
    opened = read_package(path, _trusted(keys), keys["me"] if encrypt else None)
    assert opened.members == members and opened.encrypted is encrypt
    assert opened.signer == keys["signer"].public
    manifest = opened.manifest
    assert manifest["format_version"] == FORMAT_VERSION and manifest["lora_config"]["peft_type"] == "LORA"
    assert [m["name"] for m in manifest["members"]] == ["adapter_config.json", "adapter_model.safetensors"]
    if encrypt:  # the weights are not in the file in the clear
        assert members["adapter_model.safetensors"][-4096:] not in path.read_bytes()


def test_a_package_for_another_recipient_or_without_a_key_is_refused(tmp_path, adapter_dir, keys):
    path, _ = _build(tmp_path, adapter_dir, keys)
    with pytest.raises(PackageError, match="not encrypted for recipient"):
        read_package(path, _trusted(keys), keys["other"])
    with pytest.raises(PackageError, match="give a recipient key"):
        read_package(path, _trusted(keys), None)


def test_a_self_consistent_package_by_an_untrusted_key_is_refused(tmp_path, adapter_dir, keys):
    members, fields = run_manifest(adapter_dir)
    path = tmp_path / "evil.tssp"
    build_package(path, members, fields, keys["intruder"], [keys["me"].public])
    assert read_package(path, {keys["intruder"].key_id: keys["intruder"].public}, keys["me"])  # consistent
    with pytest.raises(PackageError, match="not signed by a trusted key"):
        read_package(path, _trusted(keys), keys["me"])


def _tampered(data: bytes):
    """(region, bytes) for every region of a package."""
    header, payload = _split(data)
    step = 1024 + _TAG
    out = []

    def edit(fn):
        h = json.loads(json.dumps(header))
        fn(h)
        return _join(h, payload)

    out.append(("manifest: ledger edited", edit(
        lambda h: h["statement"]["manifest"].update(privacy_ledger={"eps": 0}))))
    out.append(("manifest: member digest", edit(
        lambda h: h["statement"]["manifest"]["members"][0].update(sha256="0" * 64))))
    rewrapped = header["statement"]["recipients"][0]["sealed_key"][::-1]
    out.append(("recipients: key rewrapped", edit(
        lambda h: h["statement"]["recipients"][0].update(sealed_key=rewrapped))))
    out.append(("recipients: removed", edit(lambda h: h["statement"].update(recipients=[]))))
    out.append(("payload: signed digest", edit(lambda h: h["statement"]["payload"].update(sha256="0" * 64))))
    other = Signer.generate().sign("x", b"y").to_dsse()
    out.append(("signature: ed25519", edit(lambda h: h["signatures"][0].update(sig=other[0]["sig"]))))
    out.append(("signature: ml-dsa-65", edit(lambda h: h["signatures"][1].update(sig=other[1]["sig"]))))
    out.append(("signature: ml-dsa-65 half removed", edit(lambda h: h["signatures"].pop(1))))
    out.append(("signature: removed", edit(lambda h: h.update(signatures=[]))))
    flipped = bytearray(payload)
    flipped[step + 5] ^= 1
    out.append(("payload: a chunk flipped", _join(header, bytes(flipped))))
    out.append(("payload: last chunk removed", _join(header, payload[: (len(payload) - 1) // step * step])))
    swapped = payload[step : 2 * step] + payload[:step] + payload[2 * step :]
    out.append(("payload: chunks swapped", _join(header, swapped)))
    out.append(("payload: a byte appended", _join(header, payload + b"\0")))
    out.append(("prefix: magic", b"XSSP" + data[4:]))
    out.append(("prefix: version", data[:4] + struct.pack(">H", FORMAT_VERSION + 1) + data[6:]))
    out.append(("prefix: header length", data[:6] + struct.pack(">I", 1 << 30) + data[10:]))
    out.append(("header: not JSON", data[:_PREFIX.size] + b"{" * 10 + data[_PREFIX.size + 10 :]))
    for cut in (3, _PREFIX.size + 20, len(data) // 2, len(data) - 1):
        out.append((f"truncated at {cut}", data[:cut]))
    return out


def test_every_region_of_a_package_is_covered_and_nothing_is_written(tmp_path, adapter_dir, keys):
    path, _ = _build(tmp_path, adapter_dir, keys)
    data = path.read_bytes()
    assert len(data) > _PREFIX.size + 3 * (1024 + _TAG)  # several chunks
    for region, bad in _tampered(data):
        target = tmp_path / "bad.tssp"
        target.write_bytes(bad)
        out = tmp_path / "opened"
        with pytest.raises(PackageError):
            open_to(target, out, _trusted(keys), keys["me"])
        assert not out.exists(), region
        assert not [p for p in tmp_path.iterdir() if p.name.startswith(".opened")], region
    assert open_to(path, tmp_path / "opened", _trusted(keys), keys["me"]).members  # the original opens
    assert sorted(p.name for p in (tmp_path / "opened").iterdir()) == [
        "adapter_config.json", "adapter_model.safetensors", "manifest.json"]


def test_chunk_aad_binds_index_and_final_flag_even_past_the_signed_digest(tmp_path, adapter_dir, keys):
    path, _ = _build(tmp_path, adapter_dir, keys)
    header, payload = _split(path.read_bytes())
    statement = header["statement"]
    digest, step, count = manifest_digest(statement["manifest"]), 1024 + _TAG, statement["payload"]["chunks"]
    recipients = statement["recipients"]
    assert _decrypt(payload, recipients, digest, 1024, count, keys["me"])
    swapped = payload[step : 2 * step] + payload[:step] + payload[2 * step :]
    with pytest.raises(PackageError, match="chunk 0 does not decrypt"):
        _decrypt(swapped, recipients, digest, 1024, count, keys["me"])
    truncated = payload[: (count - 1) * step]  # drop the final chunk: the new last one lacks the flag
    with pytest.raises(PackageError, match="does not decrypt"):
        _decrypt(truncated, recipients, digest, 1024, count - 1, keys["me"])
    other_manifest = manifest_digest({**statement["manifest"], "package_id": "x"})
    with pytest.raises(PackageError):
        _decrypt(payload, recipients, other_manifest, 1024, count, keys["me"])


def test_path_traversal_member_names_are_refused_even_when_trusted(tmp_path, keys):
    for name in ("../evil", "/etc/passwd", "a/b", "..", ".hidden", ""):
        with pytest.raises(PackageError, match="not allowed"):
            build_package(tmp_path / "x.tssp", {name: b"x"}, {}, keys["signer"])
    # a trusted signer's package whose manifest names a path is still refused before writing
    path = tmp_path / "ok.tssp"
    build_package(path, {"good": b"data"}, {}, keys["signer"])
    header, payload = _split(path.read_bytes())
    header["statement"]["manifest"]["members"][0]["name"] = "../escape"
    header["signatures"] = keys["signer"].sign(PAYLOAD_TYPE, canonical_json(header["statement"])).to_dsse()
    path.write_bytes(_join(header, payload))
    with pytest.raises(PackageError, match="not allowed"):
        open_to(path, tmp_path / "out", _trusted(keys))
    assert not (tmp_path / "escape").exists() and not (tmp_path / "out").exists()


def test_opening_into_an_existing_folder_is_refused(tmp_path, adapter_dir, keys):
    path, _ = _build(tmp_path, adapter_dir, keys, encrypt=False)
    (tmp_path / "there").mkdir()
    with pytest.raises(PackageError, match="exists"):
        open_to(path, tmp_path / "there", _trusted(keys))


def test_the_algorithms_are_those_the_package_names(tmp_path, adapter_dir, keys):
    import base64

    from tensafe.security.package import ALGORITHMS

    path, _ = _build(tmp_path, adapter_dir, keys)
    header, _ = _split(path.read_bytes())
    statement = header["statement"]
    assert statement["algorithms"] == {"signature": ["ed25519", "ml-dsa-65"], "aead": "aes-256-gcm",
                                       "kem": "hpke-xwing-mlkem768-x25519-hkdf-sha256-aes-256-gcm",
                                       "digest": "sha-256", "canonical_json": "RFC 8785"} == ALGORITHMS
    ed, ml = header["signatures"]  # standard DSSE entries, one per half
    assert len(base64.b64decode(ed["sig"])) == 64  # RFC 8032
    assert len(base64.b64decode(ml["sig"])) == 3309  # FIPS 204, ML-DSA-65
    key_id = keys["signer"].key_id
    assert (ed["keyid"], ml["keyid"]) == (f"{key_id}:ed25519", f"{key_id}:ml-dsa-65")
    sealed = base64.b64decode(statement["recipients"][0]["sealed_key"])
    assert len(sealed) == 1120 + 32 + 16  # X-Wing encapsulation (1088 + 32) + AES-256 key + GCM tag
    # a trusted signer's package naming other algorithms is refused
    statement["algorithms"] = {**ALGORITHMS, "aead": "none"}
    header["signatures"] = keys["signer"].sign(PAYLOAD_TYPE, canonical_json(statement)).to_dsse()
    _, payload = _split(path.read_bytes())
    path.write_bytes(_join(header, payload))
    with pytest.raises(PackageError, match="names algorithms"):
        read_package(path, _trusted(keys), keys["me"])


def _raw_header(data: bytes) -> tuple[bytes, bytes]:
    _, _, length = _PREFIX.unpack_from(data)
    return data[_PREFIX.size : _PREFIX.size + length], data[_PREFIX.size + length :]


def _with_header(header: bytes, payload: bytes) -> bytes:
    return _PREFIX.pack(b"TSSP", FORMAT_VERSION, len(header)) + header + payload


def _signed_header_variants(tmp_path, adapter_dir, keys) -> dict[str, bytes]:
    """Headers that carry a valid signature of a GOOD statement but are not its canonical bytes."""
    path, _ = _build(tmp_path, adapter_dir, keys, encrypt=False, name="good.tssp")
    raw, payload = _raw_header(path.read_bytes())
    header = json.loads(raw)
    good, sigs = canonical_json(header["statement"]), canonical_json(header["signatures"])
    evil = canonical_json({**header["statement"], "manifest": {**header["statement"]["manifest"],
                                                               "base_model": {"name": "EVIL"}}})
    variants = {
        "duplicate statement, the signed one last": b'{"signatures":' + sigs + b',"statement":' + evil
        + b',"statement":' + good + b"}",
        "insignificant whitespace": raw.replace(b'{"signatures":', b'{ "signatures" :', 1),
        "keys out of order": b'{"statement":' + good + b',"signatures":' + sigs + b"}",
        "an unsigned extra field": canonical_json({**header, "note": "trust me"}),
    }
    return {name: _with_header(h, payload) for name, h in variants.items()}


def test_a_header_that_is_not_the_canonical_form_of_a_signed_statement_is_refused(
    tmp_path, adapter_dir, keys
):
    """The verifier checks the bytes on disk: a first-wins parser reads EVIL where json.loads reads GOOD."""
    for name, data in _signed_header_variants(tmp_path, adapter_dir, keys).items():
        path = tmp_path / "variant.tssp"
        path.write_bytes(data)
        with pytest.raises(PackageError, match="canonical|unsigned") as err:
            read_package(path, _trusted(keys))
        assert "\n" not in str(err.value), name


@pytest.mark.parametrize(
    "header,why",
    [
        (b'{"signatures":[],"statement":{"x":NaN}}', "NaN"),
        (b'{"signatures":[],"statement":{"x":1e999}}', "out of range"),
        (b'{"signatures":[],"statement":{"x":' + b"7" * 5000 + b"}}", "not JSON"),
        (b'{"signatures":[],"statement":' + b"[" * 100_000 + b"]" * 100_000 + b"}", "nested deeper"),
    ],
    ids=["nan", "1e999", "5000 digits", "100000 deep"],
)
def test_hostile_headers_are_refused_in_one_line_and_recorded(tmp_path, header, why):
    from tensafe.errors import ConfigError
    from tensafe.security.package import PackageTrust

    path = tmp_path / "hostile.tssp"
    path.write_bytes(_with_header(header, b""))
    events = []
    with pytest.raises(ConfigError, match=why) as err:
        PackageTrust({}, record=lambda event, data: events.append(event)).open(path, "serving.adapters.x")
    assert "\n" not in str(err.value) and events == ["package_verify_fail"]


def test_a_hostile_header_is_one_line_and_exit_2_from_the_command_line(tmp_path):

    path = tmp_path / "deep.tssp"
    deep = b"[" * 100_000 + b"]" * 100_000
    path.write_bytes(_with_header(b'{"signatures":[],"statement":' + deep + b"}", b""))
    done = run_tensafe("package", "verify", str(path), timeout=60)
    assert done.returncode == 2 and len(done.stderr.splitlines()) == 1 and "nested deeper" in done.stderr
