"""Evidence: in-toto statements in DSSE envelopes, signed with the hybrid key; verification trusts
only the trust store, refuses any altered byte, rechecks subject files, never reports a hardware
root of trust, and `tensafe evidence` works through the real entrypoint."""

from __future__ import annotations

import base64
import copy
import hashlib
import json
import subprocess
from pathlib import Path

import pytest

from tensafe.he.params import preset
from tensafe.security.canonical import canonical_json
from tensafe.security.crypto import Signer, pae
from tensafe.security.evidence import (
    PAYLOAD_TYPE,
    SERVING_SESSION,
    STATEMENT_TYPE,
    TRAINING_RUN,
    AttestationProvider,
    EvidenceError,
    EvidenceInvalid,
    SoftwareAttestation,
    create_evidence,
    he_parameters,
    serving_statement,
    sign_statement,
    training_statement,
    verify_envelope,
    verify_subjects,
    write_evidence,
)
from tensafe.security.keys import Keystore
from tests.cli import run_tensafe

CFG_DIGEST = "c" * 64
BASE_DIGEST = "b" * 64
SOFTWARE_NOTE = ("signed with a local evidence key; this attests what the software recorded, "
                 "not the platform it ran on")


@pytest.fixture(scope="module")
def keys():
    return {"signer": Signer.generate(), "intruder": Signer.generate()}


def _trusted(signer: Signer) -> dict:
    return {signer.key_id: signer.public}


def _run_dir(root: Path) -> Path:
    run = root / "run"
    (run / "adapter").mkdir(parents=True)
    (run / "adapter" / "adapter_config.json").write_text(json.dumps({"r": 4, "lora_alpha": 8}))
    (run / "adapter" / "adapter_model.safetensors").write_bytes(bytes(range(256)) * 16)
    (run / "adapter.tssp").write_bytes(b"TSSP" + b"\x01" * 200)
    return run


def _statement(run: Path) -> dict:
    metrics = {"base_model_digest": BASE_DIGEST, "dataset_digest": "d" * 64, "epsilon": 3.2, "delta": 1e-5,
               "steps": 40, "eval_loss_base": 2.5, "eval_loss_adapter": 2.1, "eval_perplexity_adapter": 8.2,
               "eval_examples": 16, "started_at": "2025-01-01T00:00:00Z",
               "finished_at": "2025-01-01T00:10:00Z"}
    ledger = {"accountant": "rdp", "entries": [{"steps": 40, "noise_multiplier": 1.1, "sample_rate": 0.01}]}
    config = {"model": {"name": "tiny_llama", "hf_id": None}, "privacy": {"mechanism": "dp_sgd"}}
    return training_statement(run, CFG_DIGEST, config, metrics, ledger, [run / "adapter.tssp"])


def _signed(tmp_path, keys):
    run = _run_dir(tmp_path)
    return run, sign_statement(_statement(run), SoftwareAttestation(keys["signer"]))


def _decoded(envelope: dict) -> dict:
    return json.loads(base64.b64decode(envelope["payload"]))


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_a_training_statement_signs_and_verifies_with_its_subjects_and_predicate(tmp_path, keys):
    run, envelope = _signed(tmp_path, keys)
    assert envelope["payloadType"] == PAYLOAD_TYPE and len(envelope["signatures"]) == 2  # one per half
    payload = base64.b64decode(envelope["payload"])
    assert payload == canonical_json(json.loads(payload))

    verified = verify_envelope(envelope, _trusted(keys["signer"]))
    assert verified.signer_key_id == keys["signer"].key_id
    statement = verified.statement
    assert statement["_type"] == STATEMENT_TYPE and statement["predicateType"] == TRAINING_RUN
    assert {s["name"]: s["digest"]["sha256"] for s in statement["subject"]} == {
        "adapter/adapter_config.json": _sha(run / "adapter" / "adapter_config.json"),
        "adapter/adapter_model.safetensors": _sha(run / "adapter" / "adapter_model.safetensors"),
        "adapter.tssp": _sha(run / "adapter.tssp"),
    }
    predicate = statement["predicate"]
    assert predicate["config"]["digest"] == CFG_DIGEST
    assert predicate["config"]["resolved"]["privacy"]["mechanism"] == "dp_sgd"
    assert predicate["base_model"]["digest"] == BASE_DIGEST
    assert predicate["privacy_ledger"]["accountant"] == "rdp"
    assert predicate["eval"] == {"eval_examples": 16, "eval_loss_adapter": 2.1, "eval_loss_base": 2.5,
                                 "eval_perplexity_adapter": 8.2}
    assert predicate["run"] == {"started": "2025-01-01T00:00:00Z", "finished": "2025-01-01T00:10:00Z"}
    assert predicate["code"]["name"] == "tensafe" and predicate["code"]["version"]
    assert predicate["attestation"] == SoftwareAttestation().describe()

    report = verify_subjects(statement, run)
    assert report.ok and len(report.matched) == 3 and not report.missing


def test_the_software_attestation_says_it_has_no_hardware_root_of_trust(tmp_path, keys):
    provider = SoftwareAttestation(keys["signer"])
    assert isinstance(provider, AttestationProvider)
    assert provider.describe() == {"provider": "software", "hardware_root_of_trust": False,
                                   "note": SOFTWARE_NOTE}
    _, envelope = _signed(tmp_path, keys)
    verified = provider.verify(envelope, _trusted(keys["signer"]))
    assert verified.attestation["provider"] == "software"
    assert verified.attestation["hardware_root_of_trust"] is False


def test_a_hardware_claim_never_verifies(tmp_path, keys):
    class ClaimsHardware(SoftwareAttestation):
        def describe(self) -> dict:
            return {"provider": "software", "hardware_root_of_trust": True, "note": "trust me"}

    class ClaimsSgx(SoftwareAttestation):
        def describe(self) -> dict:
            return {"provider": "sgx", "hardware_root_of_trust": True, "note": "quote verified"}

    run = _run_dir(tmp_path)
    for liar, reason in ((ClaimsHardware, "claims a hardware root of trust"), (ClaimsSgx, "'sgx' cannot be")):
        envelope = sign_statement(_statement(run), liar(keys["signer"]))
        with pytest.raises(EvidenceInvalid, match=reason):
            verify_envelope(envelope, _trusted(keys["signer"]))


def test_a_key_outside_the_trust_store_is_refused_even_if_it_signed(tmp_path, keys):
    _, envelope = _signed(tmp_path, keys)
    with pytest.raises(EvidenceInvalid, match="not signed by a trusted key"):
        verify_envelope(envelope, _trusted(keys["intruder"]))
    with pytest.raises(EvidenceInvalid, match="not signed by a trusted key"):
        verify_envelope(envelope, {})
    # The intruder re-signs an altered statement with its own key: still untrusted.
    forged = sign_statement(_decoded(envelope), SoftwareAttestation(keys["intruder"]))
    with pytest.raises(EvidenceInvalid, match="not signed by a trusted key"):
        verify_envelope(forged, _trusted(keys["signer"]))


def test_an_altered_payload_is_refused(tmp_path, keys):
    _, envelope = _signed(tmp_path, keys)
    statement = _decoded(envelope)
    statement["predicate"]["privacy"]["epsilon"] = 0.1
    altered = {**envelope, "payload": base64.b64encode(canonical_json(statement)).decode()}
    with pytest.raises(EvidenceInvalid, match="does not verify"):
        verify_envelope(altered, _trusted(keys["signer"]))

    statement = _decoded(envelope)
    statement["subject"][0]["digest"]["sha256"] = "0" * 64
    altered = {**envelope, "payload": base64.b64encode(canonical_json(statement)).decode()}
    with pytest.raises(EvidenceInvalid, match="does not verify"):
        verify_envelope(altered, _trusted(keys["signer"]))


def test_a_changed_payload_type_is_refused(tmp_path, keys):
    _, envelope = _signed(tmp_path, keys)
    with pytest.raises(EvidenceInvalid, match="payloadType"):
        verify_envelope({**envelope, "payloadType": "application/json"}, _trusted(keys["signer"]))


def test_a_signature_with_one_half_swapped_is_refused(tmp_path, keys):
    _, envelope = _signed(tmp_path, keys)
    payload = base64.b64decode(envelope["payload"])
    other = keys["intruder"].sign(PAYLOAD_TYPE, payload).to_dsse()
    for half, algorithm in ((0, "Ed25519"), (1, "ML-DSA-65")):
        swapped = copy.deepcopy(envelope)
        swapped["signatures"][half]["sig"] = other[half]["sig"]
        with pytest.raises(EvidenceInvalid, match=f"the {algorithm} signature .* does not verify"):
            verify_envelope(swapped, _trusted(keys["signer"]))
    # Both halves are over DSSE's PAE of the type and the payload, not the payload alone.
    bare = Signer.generate()
    signature = bare.sign(PAYLOAD_TYPE, payload)
    assert signature.ed25519 != bare._ed.sign(payload) and pae(PAYLOAD_TYPE, payload) != payload


def test_a_non_canonical_or_malformed_statement_is_refused(tmp_path, keys):
    statement = _statement(_run_dir(tmp_path))
    statement["predicate"]["attestation"] = SoftwareAttestation().describe()
    payload = json.dumps(statement, indent=1).encode()  # signed, but not the canonical bytes
    envelope = {"payloadType": PAYLOAD_TYPE, "payload": base64.b64encode(payload).decode(),
                "signatures": keys["signer"].sign(PAYLOAD_TYPE, payload).to_dsse()}
    with pytest.raises(EvidenceInvalid, match="not the canonical JSON"):
        verify_envelope(envelope, _trusted(keys["signer"]))

    bad = _statement(_run_dir(tmp_path / "other"))
    bad["subject"][0]["digest"]["sha256"] = "XYZ"
    with pytest.raises(EvidenceError, match="sha256"):
        sign_statement(bad, SoftwareAttestation(keys["signer"]))
    bad = {**_statement(_run_dir(tmp_path / "third")), "_type": "https://in-toto.io/Statement/v0.1"}
    with pytest.raises(EvidenceError, match="_type"):
        sign_statement(bad, SoftwareAttestation(keys["signer"]))


def test_a_modified_adapter_file_is_reported_as_a_subject_mismatch(tmp_path, keys):
    run, envelope = _signed(tmp_path, keys)
    statement = verify_envelope(envelope, _trusted(keys["signer"])).statement
    weights = run / "adapter" / "adapter_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-1] + b"\x00")
    (run / "adapter.tssp").unlink()
    report = verify_subjects(statement, run)
    assert [c.name for c in report.mismatched] == ["adapter/adapter_model.safetensors"]
    assert report.mismatched[0].actual == _sha(weights)
    assert [c.name for c in report.missing] == ["adapter.tssp"]
    assert [c.name for c in report.matched] == ["adapter/adapter_config.json"]
    assert not report.ok


def test_a_serving_statement_records_the_he_parameters_actually_used(tmp_path, keys):
    params = preset("n8192")
    session = {"config_digest": CFG_DIGEST, "started": "2025-01-02T00:00:00Z",
               "finished": "2025-01-02T01:00:00Z",
               "adapters": [{"name": "medical", "digest": "a" * 64, "package_id": "p-1",
                             "he": he_parameters("ckks_numpy", params)},
                            {"name": "plain", "digest": "e" * 64, "he": None}]}
    statement = serving_statement(session)
    records = []
    provider = SoftwareAttestation(keys["signer"])
    envelope = create_evidence(statement, tmp_path / "serve.evidence.json", provider,
                               lambda event, data: records.append((event, data)))
    verified = verify_envelope(json.loads((tmp_path / "serve.evidence.json").read_text()),
                               _trusted(keys["signer"]))
    assert envelope["payload"] == json.loads((tmp_path / "serve.evidence.json").read_text())["payload"]
    assert verified.predicate_type == SERVING_SESSION
    assert [s["name"] for s in verified.subjects] == ["medical", "plain"]
    predicate = verified.statement["predicate"]
    assert predicate["he"] == [{"adapter": "medical", "backend": "ckks_numpy", "params": "n8192",
                                "ring_degree": 8192, "moduli_bits": [q.bit_length() for q in params.moduli]}]
    assert predicate["config"]["digest"] == CFG_DIGEST
    assert predicate["session"] == {"started": "2025-01-02T00:00:00Z", "finished": "2025-01-02T01:00:00Z"}
    assert records[0][0] == "evidence_create"
    assert records[0][1]["signers"] == [keys["signer"].key_id]
    assert records[0][1]["subjects"] == {"medical": "a" * 64, "plain": "e" * 64}
    with pytest.raises(EvidenceError, match="sha256 hex digest"):
        serving_statement({"adapters": [{"name": "x", "digest": "short"}]})


def _tensafe(*args: str) -> subprocess.CompletedProcess:
    return run_tensafe("evidence", *args, timeout=60)


def test_the_cli_verifies_refuses_and_reports_through_the_entrypoint(tmp_path):
    store = Keystore(tmp_path / "ks")
    signer = store.generate_signing("evidence", trust=True)
    run = _run_dir(tmp_path)
    good = tmp_path / "train.evidence.json"
    write_evidence(good, sign_statement(_statement(run), SoftwareAttestation(signer)))
    ks = ["--keystore", str(store.root)]

    ok = _tensafe(*ks, "verify", str(good), "--subjects", str(run))
    assert ok.returncode == 0, ok.stderr
    assert signer.key_id in ok.stdout and TRAINING_RUN in ok.stdout
    assert "adapter/adapter_model.safetensors" in ok.stdout
    assert "provider software, hardware root of trust: no" in ok.stdout and SOFTWARE_NOTE in ok.stdout

    envelope = json.loads(good.read_text())
    statement = _decoded(envelope)
    statement["predicate"]["config"]["digest"] = "f" * 64
    tampered = tmp_path / "tampered.json"
    payload = base64.b64encode(canonical_json(statement)).decode()
    tampered.write_text(json.dumps({**envelope, "payload": payload}))
    bad = _tensafe(*ks, "verify", str(tampered))
    assert bad.returncode == 1 and "FAILED" in bad.stderr and "does not verify" in bad.stderr

    (run / "adapter" / "adapter_config.json").write_text("{}")
    mismatch = _tensafe("verify", str(good), "--subjects", str(run), *ks)
    assert mismatch.returncode == 1 and "subject digest mismatch" in mismatch.stderr
    assert "adapter/adapter_config.json" in mismatch.stderr

    junk = tmp_path / "junk.json"
    junk.write_text("not json {")
    broken = _tensafe(*ks, "verify", str(junk))
    assert broken.returncode == 2 and "not JSON" in broken.stderr
    assert len(broken.stderr.strip().splitlines()) == 1 and "Traceback" not in broken.stderr

    show = _tensafe("show", str(tampered))
    assert show.returncode == 0 and "UNVERIFIED" in show.stdout and "f" * 64 in show.stdout

    for args in (["--help"], ["verify", "--help"]):
        helped = _tensafe(*args)
        assert helped.returncode == 0 and "usage: tensafe evidence" in helped.stdout


def test_envelopes_are_standard_dsse_a_stock_verifier_checks_the_ed25519_half(tmp_path, keys):
    """securesystemslib parses the envelope and verifies the Ed25519 entry against the signer's key."""
    from securesystemslib.dsse import Envelope
    from securesystemslib.exceptions import VerificationError
    from securesystemslib.signer import SSlibKey

    _, envelope = _signed(tmp_path, keys)
    parsed = Envelope.from_dict(copy.deepcopy(envelope))
    ed_id = f"{keys['signer'].key_id}:ed25519"
    key = SSlibKey(ed_id, "ed25519", "ed25519", {"public": keys["signer"].public.ed25519.hex()})
    assert set(parsed.verify([key], threshold=1)) == {ed_id}
    tampered = Envelope.from_dict({**copy.deepcopy(envelope), "payload": base64.b64encode(b"{}").decode()})
    with pytest.raises(VerificationError, match="Found: 0"):
        tampered.verify([key], threshold=1)


def test_extra_standard_entries_are_accepted_but_both_hybrid_halves_are_required(tmp_path, keys):
    from cryptography.hazmat.primitives.asymmetric import ed25519

    _, envelope = _signed(tmp_path, keys)
    payload = base64.b64decode(envelope["payload"])
    someone = ed25519.Ed25519PrivateKey.generate().sign(pae(PAYLOAD_TYPE, payload))
    extra = {"keyid": "sigstore-key-1", "sig": base64.b64encode(someone).decode()}
    mixed = {**envelope, "signatures": [extra, *envelope["signatures"]]}
    assert verify_envelope(mixed, _trusted(keys["signer"]))
    for dropped, name in ((0, "Ed25519"), (1, "ML-DSA-65")):
        halves = [e for i, e in enumerate(envelope["signatures"]) if i != dropped]
        with pytest.raises(EvidenceInvalid, match=f"the {name} half .* is missing"):
            verify_envelope({**envelope, "signatures": [extra, *halves]}, _trusted(keys["signer"]))
