"""Both engines trust, record and attest through one ServingSession: the same audit records from the
embedded engine and from the vLLM engine (against the recording fake), refusals included, and the
same signed evidence of what each served."""

from __future__ import annotations

import asyncio
import json

import pytest

from tensafe.models.loader import load_model
from tensafe.security.audit import AuditChain
from tensafe.security.context import SecurityContext
from tensafe.security.evidence import verify_envelope
from tensafe.security.keys import Keystore
from tensafe.serving.base import AdapterError
from tests.conftest import compose_cfg
from tests.serving.made_adapters import trained_looking_adapter
from tests.serving.test_vllm_engine import fake_vllm, make_engine  # noqa: F401  (fake_vllm: a fixture)


def _session(tmp_path, allow_unsigned=True):
    from tensafe.serving.session import ServingSession

    cfg = compose_cfg(f"security.keystore={tmp_path / 'keys'}", f"security.audit_db={tmp_path / 'audit.db'}",
                      "security.signing_key=release")
    Keystore(tmp_path / "keys").generate_signing("release", trust=True)
    return ServingSession(SecurityContext(cfg.security), allow_unsigned, base_model_digest=None)


def _records(tmp_path) -> list[tuple[str, str, str]]:
    """(event, adapter, what the record says of its source) of every serving record."""
    out = []
    for r in AuditChain(tmp_path / "audit.db").records("default"):
        if r.event.startswith("adapter_"):
            source = r.data.get("path", "").rsplit("/", 1)[-1]
            blamed = r.data.get("reason", "").split("=", 1)[0]  # a refusal names the key to change
            out.append((r.event, r.data["adapter"], blamed if r.event == "adapter_load_refused" else source))
    return out


async def _script(engine, good: str, missing: str) -> list[str]:
    """What an operator does through the admin API; the errors the engine answers."""
    errors = []
    await engine.load_adapter("good", good)
    for name, path in (("missing", missing), ("good", good)):  # not an adapter; a name in use
        try:
            await engine.load_adapter(name, path)
        except AdapterError as err:
            errors.append(str(err))
    await engine.unload_adapter("good")
    return errors


@pytest.fixture
def folders(tiny_cfg, tmp_path):
    good = tmp_path / "good"
    trained_looking_adapter(tiny_cfg, good, seed=1)
    return str(good), str(tmp_path / "nowhere")


def _embedded(tiny_cfg, session):
    from tensafe.serving.engine import EmbeddedEngine

    loaded = load_model(tiny_cfg.model, seed=0)
    return EmbeddedEngine(loaded.model, loaded.tokenizer, max_running=4, session=session)


def _run_embedded(engine, good, missing):
    engine.start()
    try:
        return asyncio.run(_script(engine, good, missing))
    finally:
        engine.stop()


def _run_vllm(engine, good, missing):
    async def main():
        engine.start()
        errors = await _script(engine, good, missing)
        await asyncio.to_thread(engine.stop)
        return errors

    return asyncio.run(main())


def test_both_engines_write_the_same_session_records_and_evidence(fake_vllm, tiny_cfg, tmp_path,  # noqa: F811
                                                                   folders):
    good, missing = folders
    seen = {}
    for kind in ("embedded", "vllm"):
        where = tmp_path / kind
        where.mkdir()
        session = _session(where)
        if kind == "embedded":
            errors = _run_embedded(_embedded(tiny_cfg, session), good, missing)
        else:
            errors = _run_vllm(make_engine(where, session=session), good, missing)
        evidence = session.evidence("c" * 64, where)
        envelope = json.loads(evidence.read_text())
        trusted = Keystore(where / "keys").trusted()
        statement = verify_envelope(envelope, trusted).statement
        seen[kind] = (_records(where), len(errors), [a["name"] for a in statement["predicate"]["adapters"]],
                      [s["digest"]["sha256"] for s in statement["subject"]])
        assert (where / "audit_head.json").is_file()
    assert seen["embedded"] == seen["vllm"]
    records, errors, served, _ = seen["vllm"]
    assert records == [("adapter_load", "good", "good"), ("adapter_load_refused", "missing", "path"),
                       ("adapter_unload", "good", "")]
    assert errors == 2 and served == ["good"]


def test_both_engines_refuse_bare_folders_when_only_packages_may_be_served(fake_vllm, tiny_cfg,  # noqa: F811
                                                                             tmp_path, folders):
    good, _ = folders
    for kind in ("embedded", "vllm"):
        where = tmp_path / kind
        where.mkdir()
        session = _session(where, allow_unsigned=False)
        engine = _embedded(tiny_cfg, session) if kind == "embedded" else make_engine(where, session=session)

        async def load(engine=engine):
            with pytest.raises(AdapterError, match="only signed packages"):
                await engine.load_adapter("good", good)

        if kind == "embedded":
            engine.start()
            try:
                asyncio.run(load())
            finally:
                engine.stop()
        else:
            async def main(engine=engine):
                engine.start()
                await load()
                await asyncio.to_thread(engine.stop)

            asyncio.run(main())
        assert _records(where) == [("adapter_load_refused", "good", "path")]
        assert session.evidence("c" * 64, where) is None  # nothing served: nothing to attest
