"""Packages end to end: training emits one, the engine serves it only if it verifies and opens,
and the audit chain records loads and refusals."""

from __future__ import annotations

import asyncio
import hashlib
import json
from pathlib import Path

import pytest
import torch

from tensafe.errors import ConfigError
from tensafe.models.loader import model_digest
from tensafe.security.audit import AuditChain
from tensafe.security.context import SecurityContext
from tensafe.security.keys import Keystore
from tensafe.serving.base import AdapterError, SamplingParams
from tensafe.serving.build import build_embedded
from tests.cli import run_tensafe, start_tensafe
from tests.conftest import compose_cfg
from tests.serving.live import free_port
from tests.serving.made_adapters import trained_looking_adapter


@pytest.fixture(scope="module")
def world(tiny_cfg, tmp_path_factory):
    root = tmp_path_factory.mktemp("trust")
    store = Keystore(root / "keys")
    store.generate_signing("release", trust=True)
    store.generate_recipient("server")
    (root / "server.pub.json").write_text(json.dumps(store.export_public("server", kind="recipient")))
    reference = trained_looking_adapter(tiny_cfg, root / "run" / "adapter", seed=6)
    # what task=train writes beside its adapter: the package binds to this base model
    metrics = {"base_model_digest": model_digest(tiny_cfg.model)}
    (root / "run" / "metrics.json").write_text(json.dumps(metrics))
    overrides = [f"security.keystore={root / 'keys'}", f"security.audit_db={root / 'audit.sqlite3'}",
                 "security.signing_key=release", f"security.package_recipients=[{root / 'server.pub.json'}]",
                 "security.recipient_key=server"]
    security = SecurityContext(compose_cfg("model=tiny_llama", *overrides).security)
    security.package_run(root / "run", root / "adapter.tssp")
    return root, overrides, reference, security


def _cfg(world, *extra):
    root, overrides, _, _ = world
    return compose_cfg("model=tiny_llama", *overrides, *extra)


def _greedy(engine, adapter, prompt="Patient 4 has"):
    async def go():
        text = ""
        async for ev in engine.generate(engine.tokenizer(prompt).input_ids, adapter,
                                        SamplingParams(max_tokens=6, temperature=0)):
            text += ev.text
        return text

    engine.start()
    try:
        return asyncio.run(go())
    finally:
        engine.stop()


def test_the_engine_serves_a_verified_encrypted_package_like_the_adapter_it_holds(world, tokenizer):
    root, _, reference, _ = world
    engine = build_embedded(_cfg(world, f"+serving.adapters.sec={root / 'adapter.tssp'}"))
    assert engine.lora.adapters["sec"].manifest["members"][1]["name"] == "adapter_model.safetensors"
    ids = tokenizer("Patient 4 has", return_tensors="pt").input_ids
    with torch.no_grad():
        expected = reference.generate(ids, max_new_tokens=6, do_sample=False)
    assert _greedy(engine, "sec") == tokenizer.decode(expected[0, ids.shape[1]:], skip_special_tokens=True)
    events = [r.event for r in AuditChain(root / "audit.sqlite3").records("default")]
    assert events[:2] == ["package_create", "key_use"] and "package_open" in events
    assert events[-1] == "adapter_load"


def test_a_package_from_an_untrusted_signer_or_for_another_recipient_is_refused_and_recorded(world):
    root, _, _, _ = world
    store = Keystore(root / "keys")
    store.untrust("release")
    try:
        with pytest.raises(ConfigError, match="not signed by a trusted key"):
            build_embedded(_cfg(world, f"+serving.adapters.sec={root / 'adapter.tssp'}"))
    finally:
        store.trust(store.export_public("release", kind="signing"))
    store.generate_recipient("other-server")
    with pytest.raises(ConfigError, match="not encrypted for recipient"):
        build_embedded(_cfg(world, "security.recipient_key=other-server",
                            f"+serving.adapters.sec={root / 'adapter.tssp'}"))
    records = AuditChain(root / "audit.sqlite3").records("default")
    refused = [r for r in records if r.event == "adapter_load_refused"]
    assert len(refused) == 2 and [r for r in records if r.event == "package_verify_fail"]
    assert AuditChain(root / "audit.sqlite3").verify().ok


def test_runtime_loads_verify_packages_too(world, tmp_path):
    root, _, _, _ = world
    engine = build_embedded(_cfg(world))
    tampered = tmp_path / "tampered.tssp"
    data = bytearray((root / "adapter.tssp").read_bytes())
    data[-100] ^= 1
    tampered.write_bytes(bytes(data))
    engine.start()
    try:
        with pytest.raises(AdapterError, match="package refused"):
            asyncio.run(engine.load_adapter("bad", str(tampered)))
        asyncio.run(engine.load_adapter("good", str(root / "adapter.tssp")))
        assert "good" in engine.adapters and "bad" not in engine.adapters
    finally:
        engine.stop()


def test_train_with_package_true_emits_a_verifiable_package(world, tmp_path):
    root, overrides, _, _ = world
    run = run_tensafe("model=tiny_llama", "privacy=none", "train.max_steps=2", "train.eval_max_examples=4",
                      "train.package=true", *overrides, f"hydra.run.dir={tmp_path / 'run'}", timeout=600)
    assert run.returncode == 0, run.stderr[-2000:]
    package = tmp_path / "run" / "adapter.tssp"
    verify = run_tensafe("package", "--keystore", str(root / "keys"), "verify", str(package))
    assert verify.returncode == 0 and "ok" in verify.stdout, verify.stderr
    out = tmp_path / "opened"
    opened = run_tensafe("package", "--keystore", str(root / "keys"), "open", str(package), "--out",
                         str(out), "--recipient-key", "server")
    assert opened.returncode == 0, opened.stderr
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["training_config"]["model"]["name"] == "tiny_llama"
    assert manifest["base_model"]["digest"] and manifest["audit_head"]["seq"] >= 1
    events = [r.event for r in AuditChain(root / "audit.sqlite3").records("default")]
    assert {"train_start", "train_end", "package_create", "evidence_create"} <= set(events)
    chain = AuditChain(root / "audit.sqlite3")
    assert chain.heads("default") and chain.verify(trusted=Keystore(root / "keys").trusted()).ok
    evidence = run_tensafe("evidence", "--keystore", str(root / "keys"), "verify",
                           str(tmp_path / "run" / "evidence.json"), "--subjects", str(tmp_path / "run"))
    assert evidence.returncode == 0, evidence.stdout + evidence.stderr
    assert "software" in evidence.stdout and "adapter.tssp" in evidence.stdout
    bad = run_tensafe("package", "--keystore", str(root / "keys"), "verify", str(tmp_path))
    assert bad.returncode == 2 and bad.stderr.startswith("tensafe: ") and len(bad.stderr.splitlines()) == 1


def test_a_serving_session_ends_with_signed_evidence_of_what_it_served(world, tmp_path):
    import signal
    import time

    import httpx

    from tensafe.security.evidence import read_evidence, verify_envelope
    from tensafe.serving.auth import hash_api_key

    root, overrides, _, _ = world
    port = free_port()
    proc = start_tensafe("task=serve", "model=tiny_llama", *overrides, f"serving.port={port}",
                         f"serving.api_key_sha256=[{hash_api_key('k')}]",
                         f"+serving.adapters.sec={root / 'adapter.tssp'}",
                         f"hydra.run.dir={tmp_path / 'serve'}")
    try:
        deadline = time.time() + 120
        while True:
            assert proc.poll() is None, proc.stderr.read()
            try:
                if httpx.get(f"http://127.0.0.1:{port}/ready").status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert time.time() < deadline
            time.sleep(0.2)
        r = httpx.post(f"http://127.0.0.1:{port}/v1/completions", headers={"Authorization": "Bearer k"},
                       json={"model": "sec", "prompt": "Hi", "max_tokens": 2})
        assert r.status_code == 200
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=60) == 0, proc.stderr.read()
    finally:
        if proc.poll() is None:
            proc.kill()
    envelope = read_evidence(tmp_path / "serve" / "evidence.json")
    verified = verify_envelope(envelope, Keystore(root / "keys").trusted())
    package_digest = hashlib.sha256((root / "adapter.tssp").read_bytes()).hexdigest()
    assert verified.statement["subject"] == [{"name": "sec", "digest": {"sha256": package_digest}}]
    assert verified.attestation["hardware_root_of_trust"] is False


def test_package_build_and_inspect_from_the_command_line(world, tmp_path):
    root, _, _, _ = world
    out = tmp_path / "cli.tssp"
    built = run_tensafe("package", "--keystore", str(root / "keys"), "build", str(root / "run"), "--key",
                        "release", "--recipient", str(root / "server.pub.json"), "--out", str(out))
    assert built.returncode == 0 and "encrypted for 1 recipient" in built.stdout, built.stderr
    shown = run_tensafe("package", "inspect", str(out))
    header = json.loads(shown.stdout)
    assert shown.returncode == 0 and header["verified"] is False and header["payload"]["encrypted"] is True
    assert run_tensafe("package", "--help").returncode == 0
    junk = tmp_path / "junk.tssp"
    junk.write_bytes(b"TSSP\x00\x02\x00\x00\x00\x05{{{{{")
    bad = run_tensafe("package", "inspect", str(junk))
    assert bad.returncode == 2 and "not JSON" in bad.stderr and len(bad.stderr.splitlines()) == 1


def test_with_allow_unsigned_false_only_verified_packages_are_served(world):
    root, _, _, _ = world
    with pytest.raises(ConfigError, match="serves only signed packages"):
        build_embedded(_cfg(world, "serving.allow_unsigned=false", f"+serving.adapters.raw={root / 'run'}"))
    engine = build_embedded(_cfg(world, "serving.allow_unsigned=false",
                                 f"+serving.adapters.sec={root / 'adapter.tssp'}"))
    engine.start()
    try:
        with pytest.raises(AdapterError, match="serves only signed packages"):
            asyncio.run(engine.load_adapter("raw", str(root / "run" / "adapter")))
    finally:
        engine.stop()


def test_engines_that_load_from_disk_get_a_verified_package_in_a_private_folder(world):
    from tensafe.serving.adapters import materialize, read_adapter

    root, _, _, security = world
    adapter, where = materialize("sec", root / "adapter.tssp", security.package_trust(), "k")
    folder = Path(where)
    assert adapter.manifest is not None and adapter.signer  # verified once, with its manifest
    assert oct(folder.stat().st_mode & 0o777) == "0o700"
    assert read_adapter("sec", folder).digest == read_adapter("sec", root / "run" / "adapter").digest
    store = Keystore(root / "keys")
    store.untrust("release")
    try:
        with pytest.raises(ConfigError, match="not signed by a trusted key"):
            materialize("sec", root / "adapter.tssp", security.package_trust(), "k")
    finally:
        store.trust(store.export_public("release", kind="signing"))


def _package(world, name: str, *extra: str, base_digest: str | None = None) -> Path:
    """A package of the world's adapter, built with the extra security overrides."""
    root, _, _, _ = world
    run = root / f"run-{name}"
    if not run.exists():
        run.mkdir()
        (run / "adapter").symlink_to(root / "run" / "adapter")
        metrics = json.loads((root / "run" / "metrics.json").read_text())
        if base_digest is not None:
            metrics["base_model_digest"] = base_digest
        (run / "metrics.json").write_text(json.dumps(metrics))
    out = root / f"{name}.tssp"
    SecurityContext(_cfg(world, *extra).security).package_run(run, out)
    return out


def _refusals(world) -> list[str]:
    root = world[0]
    return [r.data["reason"] for r in AuditChain(root / "audit.sqlite3").records("default")
            if r.event == "adapter_load_refused"]


def test_a_package_made_for_another_base_model_is_refused_and_recorded(world):
    package = _package(world, "otherbase", base_digest="random_init:0123456789abcdef")
    with pytest.raises(ConfigError, match="made for base model 'random_init:0123456789abcdef'"):
        build_embedded(_cfg(world, f"+serving.adapters.wrongbase={package}"))
    assert "made for base model" in _refusals(world)[-1]


def test_an_older_release_of_the_same_signer_cannot_replace_a_newer_one(world):
    newer = _package(world, "v5", "security.package_version=5")
    older = _package(world, "v3", "security.package_version=3")
    build_embedded(_cfg(world, f"+serving.adapters.rollme={newer}"))  # release 5 served as "rollme"
    with pytest.raises(ConfigError, match="rollback: release 3 is older than release 5"):
        build_embedded(_cfg(world, f"+serving.adapters.rollme={older}"))
    assert "rollback" in _refusals(world)[-1]
    engine = build_embedded(_cfg(world, f"+serving.adapters.rollme={newer}"))  # the same release again: fine
    engine.start()
    try:
        asyncio.run(engine.load_adapter("rollme-admin", str(newer)))
        asyncio.run(engine.unload_adapter("rollme-admin"))
        with pytest.raises(AdapterError, match="rollback"):  # the admin API enforces it too
            asyncio.run(engine.load_adapter("rollme-admin", str(older)))
    finally:
        engine.stop()
    other_name = build_embedded(_cfg(world, f"+serving.adapters.another={older}"))  # per adapter name
    assert "another" in other_name.lora.adapters


def test_an_expired_package_is_refused(world):
    import time

    package = _package(world, "expiring", "security.package_valid_days=0.00001")  # about a second
    time.sleep(1.5)
    with pytest.raises(ConfigError, match="expired at"):
        build_embedded(_cfg(world, f"+serving.adapters.expired={package}"))


def test_the_he_evaluator_service_verifies_and_opens_a_package(world, tmp_path):
    import signal

    import httpx

    root, overrides, _, _ = world
    port = free_port()
    proc = start_tensafe("task=he_evaluator", "he=ckks_numpy", "he.params=n4096", "model=tiny_llama",
                         *overrides, f"task.adapter={root / 'adapter.tssp'}", f"task.port={port}",
                         f"task.api_key_sha256=[{'0' * 64}]", f"hydra.run.dir={tmp_path / 'he'}",
                         cwd=tmp_path)
    try:
        line = proc.stdout.readline()
        failed = proc.stderr.read() if proc.poll() is not None else ""
        assert line.startswith("HE evaluator for adapter adapter ("), line + failed
        import time

        deadline = time.time() + 60
        while True:  # the line comes just before uvicorn binds the port
            try:
                if httpx.get(f"http://127.0.0.1:{port}/health", timeout=10).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert time.time() < deadline and proc.poll() is None, "the evaluator never became healthy"
            time.sleep(0.1)
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=60)
    loads = [r for r in AuditChain(root / "audit.sqlite3").records("default") if r.event == "adapter_load"]
    assert loads[-1].data["adapter"] == "adapter" and loads[-1].data["signed"] is True


def test_a_package_served_from_disk_is_opened_once_per_load(world):
    from tensafe.serving.adapters import remove_materialized
    from tensafe.serving.session import ServingSession

    root, _, _, security = world
    chain = AuditChain(root / "audit.sqlite3")
    before = sum(r.event == "package_open" for r in chain.records("default"))
    session = ServingSession(security, allow_unsigned=False, base_model_digest=None)
    adapter, folder = session.open_on_disk("once", root / "adapter.tssp", "serving.adapters.once")
    try:
        after = sum(r.event == "package_open" for r in chain.records("default"))
        assert after == before + 1  # one verification, one decryption, one record
        assert adapter.signer and Path(folder).is_dir()
    finally:
        remove_materialized(folder)
