"""The audit chain finds a modified, deleted, inserted or reordered record and names the first one;
what only a rewrite of the whole tail hides, a signed head catches. Tampering is done the way an
attacker with write access would: raw SQL on the file, after dropping the append-only triggers."""

from __future__ import annotations

import json
import sqlite3
import subprocess
import threading
from pathlib import Path

import pytest

from tensafe.security.audit import (
    DELETED,
    GENESIS_HASH,
    INSERTED,
    MODIFIED,
    REORDERED,
    REWRITTEN,
    UNTRUSTED_HEAD,
    AuditChain,
    AuditError,
    Problem,
    SignedHead,
    read_anchor,
    record_hash,
)
from tensafe.security.canonical import canonical_json
from tensafe.security.crypto import Signer
from tensafe.security.events import CHECKPOINT, EVENTS, TRAIN_END, TRAIN_START
from tests.cli import run_tensafe, start_tensafe


@pytest.fixture(scope="module")
def signer():
    return Signer.generate()


@pytest.fixture
def chain(tmp_path):
    """Tenant A with six records: train_start, four checkpoints, train_end."""
    chain = AuditChain(tmp_path / "audit.sqlite3")
    chain.append("A", TRAIN_START, {"run": "r1"})
    for step in range(1, 5):
        chain.append("A", CHECKPOINT, {"step": step * 10})
    chain.append("A", TRAIN_END, {"run": "r1"})
    return chain


def tamper(chain: AuditChain, *statements: tuple[str, tuple] | str) -> None:
    db = sqlite3.connect(chain.path, isolation_level=None)
    try:
        for name in ("records_append_only_update", "records_append_only_delete",
                     "tree_heads_append_only_update", "tree_heads_append_only_delete"):
            db.execute(f"DROP TRIGGER IF EXISTS {name}")
        for statement in statements:
            sql, args = (statement, ()) if isinstance(statement, str) else statement
            db.execute(sql, args)
    finally:
        db.close()


def shift_tail_up(tenant: str, after: int) -> list[str]:
    """Renumber seq > after to seq + 1 (in two steps, since (tenant, seq) is unique)."""
    return [f"UPDATE records SET seq = -(seq + 1) WHERE tenant = '{tenant}' AND seq > {after}",
            f"UPDATE records SET seq = -seq WHERE tenant = '{tenant}' AND seq < 0"]


def insert_row(tenant: str, seq: int, prev_hash: str, digest: str | None = None, event: str = CHECKPOINT,
               data: dict | None = None) -> tuple[str, tuple]:
    data = data if data is not None else {"step": 25}
    ts = "2024-01-01T00:00:00.000000Z"
    digest = digest or record_hash(tenant, seq, ts, event, data, prev_hash)
    return ("INSERT INTO records (tenant, seq, ts, event, data, prev_hash, hash) "
            "VALUES (?, ?, ?, ?, ?, ?, ?)",
            (tenant, seq, ts, event, canonical_json(data).decode(), prev_hash, digest))


def rehash_from(chain: AuditChain, tenant: str, seq: int) -> None:
    """What an attacker does to hide an edit: recompute every link and hash from `seq` on."""
    records = chain.records(tenant)
    prev = records[seq - 2].hash if seq > 1 else GENESIS_HASH
    updates = []
    for r in records[seq - 1:]:
        digest = record_hash(tenant, r.seq, r.ts, r.event, r.data, prev)
        updates.append(("UPDATE records SET prev_hash = ?, hash = ? WHERE tenant = ? AND seq = ?",
                        (prev, digest, tenant, r.seq)))
        prev = digest
    tamper(chain, *updates)


def first(chain: AuditChain, **kwargs) -> Problem:
    report = chain.verify(**kwargs)
    assert not report.ok
    return report.first


# --- building ----------------------------------------------------------------------------------


def test_records_chain_from_the_zero_genesis_with_seq_1_to_n_and_verify(chain):
    records = chain.records("A")
    assert [r.seq for r in records] == [1, 2, 3, 4, 5, 6]
    assert records[0].prev_hash == GENESIS_HASH
    for before, r in zip(records, records[1:]):
        assert r.prev_hash == before.hash
    for r in records:
        assert r.hash == record_hash(r.tenant, r.seq, r.ts, r.event, r.data, r.prev_hash)
        assert r.ts.endswith("Z")
    assert chain.head("A") == (6, records[-1].hash)
    assert chain.head("nobody") == (0, GENESIS_HASH)
    assert chain.tenants() == ["A"]
    report = chain.verify()
    assert report.ok and (report.records, report.tenants, report.heads) == (6, 1, 0)
    db = sqlite3.connect(chain.path)
    assert db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    db.close()


def test_unknown_events_and_non_json_data_are_refused(chain):
    with pytest.raises(AuditError, match="unknown audit event 'train_begin'"):
        chain.append("A", "train_begin", {})
    with pytest.raises(AuditError, match="not representable"):
        chain.append("A", CHECKPOINT, {"loss": float("nan")})
    with pytest.raises(AuditError, match="non-empty tenant"):
        chain.append("", CHECKPOINT, {})
    assert len(EVENTS) == 19 and chain.head("A")[0] == 6


def test_the_file_refuses_updates_and_deletes_through_sql(chain):
    db = sqlite3.connect(chain.path)
    with pytest.raises(sqlite3.IntegrityError, match="append-only"):
        db.execute("UPDATE records SET data = '{}' WHERE seq = 2")
    with pytest.raises(sqlite3.IntegrityError, match="append-only"):
        db.execute("DELETE FROM records WHERE seq = 6")
    db.close()


# --- tampering with a record -------------------------------------------------------------------


@pytest.mark.parametrize("column, value", [
    ("data", '{"step":99}'), ("event", "budget_stop"), ("ts", "2020-01-01T00:00:00.000000Z"),
])
def test_modifying_a_records_data_event_or_ts_names_that_record(chain, column, value):
    tamper(chain, (f"UPDATE records SET {column} = ? WHERE tenant = 'A' AND seq = 3", (value,)))
    report = chain.verify()
    assert [(p.tenant, p.seq, p.kind) for p in report.problems] == [("A", 3, MODIFIED)]


def test_modifying_a_record_and_rehashing_only_it_names_that_record(chain):
    tamper(chain, "UPDATE records SET data = '{\"step\":99}' WHERE tenant = 'A' AND seq = 3")
    r = chain.records("A")[2]
    tamper(chain, ("UPDATE records SET hash = ? WHERE tenant = 'A' AND seq = 3",
                   (record_hash("A", 3, r.ts, r.event, r.data, r.prev_hash),)))
    problem = first(chain)
    assert (problem.seq, problem.kind) == (3, MODIFIED)


def test_deleting_a_middle_record_names_the_missing_seq(chain):
    tamper(chain, "DELETE FROM records WHERE tenant = 'A' AND seq = 4")
    problem = first(chain)
    assert (problem.tenant, problem.seq, problem.kind) == ("A", 4, DELETED)
    assert "seq 4 missing" in problem.detail


def test_deleting_a_middle_record_and_renumbering_the_tail_names_the_missing_seq(chain):
    tamper(chain, "DELETE FROM records WHERE tenant = 'A' AND seq = 4",
           "UPDATE records SET seq = -(seq - 1) WHERE tenant = 'A' AND seq > 4",
           "UPDATE records SET seq = -seq WHERE tenant = 'A' AND seq < 0")
    problem = first(chain)
    assert (problem.seq, problem.kind) == (4, DELETED)


def test_deleting_the_last_record_passes_the_links_but_is_caught_by_a_signed_head(chain, signer):
    trusted = {signer.key_id: signer.public}
    head = chain.sign_head("A", signer)
    assert (head.seq, head.hash) == chain.head("A")
    assert chain.verify(trusted=trusted).heads == 1
    tamper(chain, "DELETE FROM records WHERE tenant = 'A' AND seq = 6")
    problem = first(chain, trusted=trusted)
    assert (problem.seq, problem.kind) == (6, DELETED)
    assert "truncated" in problem.detail
    tamper(chain, "DELETE FROM tree_heads")
    assert chain.verify(trusted=trusted).ok  # without the head, a shorter chain is a valid chain


def test_a_head_kept_elsewhere_still_catches_truncation_when_the_stored_heads_are_deleted(chain, signer):
    trusted = {signer.key_id: signer.public}
    kept = chain.sign_head("A", signer).to_json()
    tamper(chain, "DELETE FROM tree_heads", "DELETE FROM records WHERE tenant = 'A' AND seq >= 5")
    problem = first(chain, trusted=trusted, heads=[SignedHead.from_json(kept)])
    assert (problem.seq, problem.kind) == (5, DELETED)


def test_inserting_a_record_with_a_forged_hash_names_the_inserted_record(chain):
    prev = chain.records("A")[2].hash
    tamper(chain, *shift_tail_up("A", 3), insert_row("A", 4, prev, digest="f" * 64))
    report = chain.verify()
    assert [(p.seq, p.kind) for p in report.problems] == [(4, INSERTED)]


def test_inserting_a_self_hashed_record_without_rehashing_the_tail_names_the_inserted_record(chain):
    prev = chain.records("A")[2].hash
    tamper(chain, *shift_tail_up("A", 3), insert_row("A", 4, prev))
    problem = first(chain)
    assert (problem.seq, problem.kind) == (4, INSERTED)


def test_inserting_a_record_and_rehashing_the_tail_is_caught_only_by_a_signed_head(chain, signer):
    trusted = {signer.key_id: signer.public}
    chain.sign_head("A", signer)  # at seq 6
    records = chain.records("A")
    tamper(chain, *shift_tail_up("A", 3), insert_row("A", 4, records[2].hash))
    rehash_from(chain, "A", 5)
    problem = first(chain, trusted=trusted)
    assert (problem.seq, problem.kind) == (6, REWRITTEN)
    assert "between seq 1 and seq 6" in problem.detail
    tamper(chain, "DELETE FROM tree_heads")
    assert chain.verify().ok  # a self-consistent rewrite: the links alone cannot tell


def test_a_rewrite_is_bounded_by_the_last_signed_head_that_still_matches(tmp_path, signer):
    chain = AuditChain(tmp_path / "audit.sqlite3")
    for step in range(3):
        chain.append("A", CHECKPOINT, {"step": step})
    chain.sign_head("A", signer)  # seq 3
    for step in range(3, 6):
        chain.append("A", CHECKPOINT, {"step": step})
    chain.sign_head("A", signer)  # seq 6
    tamper(chain, "UPDATE records SET data = '{\"step\":40}' WHERE tenant = 'A' AND seq = 5")
    rehash_from(chain, "A", 5)
    report = chain.verify(trusted={signer.key_id: signer.public})
    assert report.heads == 1
    assert [(p.seq, p.kind) for p in report.problems] == [(6, REWRITTEN)]
    assert "between seq 4 and seq 6" in report.first.detail


def test_swapping_two_records_seq_names_the_first_as_reordered(chain):
    tamper(chain, "UPDATE records SET seq = -1 WHERE tenant = 'A' AND seq = 3",
           "UPDATE records SET seq = 3 WHERE tenant = 'A' AND seq = 4",
           "UPDATE records SET seq = 4 WHERE tenant = 'A' AND seq = -1")
    problem = first(chain)
    assert (problem.tenant, problem.seq, problem.kind) == ("A", 3, REORDERED)


# --- tenants, heads, concurrency ---------------------------------------------------------------


def test_tenants_chain_independently_and_damage_in_one_leaves_the_other_valid(tmp_path):
    chain = AuditChain(tmp_path / "audit.sqlite3")
    for step in range(5):
        chain.append("A", CHECKPOINT, {"step": step})
        chain.append("B", CHECKPOINT, {"step": step})
    assert [r.seq for r in chain.records("B")] == [1, 2, 3, 4, 5]
    assert chain.records("B")[0].prev_hash == GENESIS_HASH
    tamper(chain, "UPDATE records SET data = '{\"step\":7}' WHERE tenant = 'A' AND seq = 2")
    report = chain.verify()
    assert report.failed_tenants() == ["A"] and report.records == 10 and report.tenants == 2
    assert (report.first.tenant, report.first.seq, report.first.kind) == ("A", 2, MODIFIED)
    assert chain.verify(tenant="B").ok


def test_a_head_signed_by_an_untrusted_key_or_altered_after_signing_is_reported(chain, signer):
    chain.sign_head("A", Signer.generate())
    problem = first(chain, trusted={signer.key_id: signer.public})
    assert (problem.seq, problem.kind) == (6, UNTRUSTED_HEAD)
    assert "not signed by a trusted key" in problem.detail

    other = AuditChain(chain.path.with_name("other.sqlite3"))
    other.append("A", TRAIN_START, {})
    other.append("A", TRAIN_END, {})
    other.sign_head("A", signer)
    tamper(other, "UPDATE tree_heads SET seq = 1, hash = (SELECT hash FROM records WHERE seq = 1)")
    problem = first(other, trusted={signer.key_id: signer.public})
    assert (problem.seq, problem.kind) == (1, UNTRUSTED_HEAD)


def test_concurrent_appends_from_four_threads_keep_one_valid_chain(tmp_path):
    path = tmp_path / "audit.sqlite3"
    AuditChain(path)
    errors = []

    def worker(n: int) -> None:
        try:
            chain = AuditChain(path)
            for i in range(25):
                chain.append("A" if i % 2 else "B", CHECKPOINT, {"thread": n, "i": i})
        except Exception as err:  # surfaced by the assert below
            errors.append(err)

    threads = [threading.Thread(target=worker, args=(n,)) for n in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    chain = AuditChain(path)
    report = chain.verify()
    assert report.ok and report.records == 100
    assert [r.seq for r in chain.records("A")] == list(range(1, 49))
    assert [r.seq for r in chain.records("B")] == list(range(1, 53))


# --- the CLI, through the installed entrypoint -------------------------------------------------


def tensafe(*args: str) -> subprocess.CompletedProcess:
    return run_tensafe("audit", *args, timeout=60)


def test_cli_shows_verifies_and_names_the_first_bad_record(chain):
    chain.append("B", TRAIN_START, {"run": "r2"})
    db = str(chain.path)

    shown = tensafe("--db", db, "show", "--tenant", "A", "--limit", "2")
    assert shown.returncode == 0, shown.stderr
    lines = shown.stdout.splitlines()
    assert len(lines) == 2 and "checkpoint" in lines[0] and "train_end" in lines[1]
    as_json = json.loads(tensafe("--db", db, "show", "--json").stdout)
    assert [(r["tenant"], r["seq"]) for r in as_json] == [("A", s) for s in range(1, 7)] + [("B", 1)]

    ok = tensafe("--db", db, "verify")
    assert ok.returncode == 0, ok.stderr
    assert ok.stdout.strip() == "ok: 7 records in 2 tenants, 0 signed heads verified"

    tamper(chain, "UPDATE records SET data = '{\"step\":99}' WHERE tenant = 'A' AND seq = 3")
    bad = tensafe("verify", "--db", db)
    assert bad.returncode == 1
    assert "tenant 'A' seq 3: modified" in bad.stdout.splitlines()[0]
    assert tensafe("--db", db, "verify", "--tenant", "B").returncode == 0


def test_cli_help_works_for_every_subcommand_and_a_missing_db_is_one_line(tmp_path):
    top = tensafe("--help")
    assert top.returncode == 0 and "verify" in top.stdout and "sign-head" in top.stdout
    for command in ("verify", "show", "sign-head"):
        assert tensafe(command, "--help").returncode == 0
    missing = tensafe("--db", str(tmp_path / "none.sqlite3"), "verify")
    assert missing.returncode == 2
    assert missing.stderr.strip().startswith("tensafe: no audit database at")
    assert len(missing.stderr.strip().splitlines()) == 1


def test_a_record_whose_stored_data_is_not_canonical_is_caught(chain):
    """`{"kind":"EVIL",…}` prepended to a record's data: json.loads reads the last value, the hash
    would be recomputed over a re-serialisation; the stored bytes are what is checked."""
    stored = chain._rows("A")[2].data_text
    tamper(chain, ("UPDATE records SET data = ? WHERE tenant = 'A' AND seq = 3",
                   ('{"step":"EVIL",' + stored[1:],)))
    problem = first(chain)
    assert (problem.seq, problem.kind) == (3, MODIFIED)


def test_audit_show_into_a_closed_pipe_stops_without_a_traceback(tmp_path):
    chain = AuditChain(tmp_path / "audit.sqlite3")
    for step in range(2000):
        chain.append("A", CHECKPOINT, {"step": step})
    reader = start_tensafe("audit", "show", "--limit", "2000", env={"TENSAFE_AUDIT_DB": str(chain.path)},
                           text=False)
    reader.stdout.readline()
    reader.stdout.close()  # what `| head -1` does
    _, err = reader.communicate(timeout=60)
    assert b"Traceback" not in err and b"BrokenPipe" not in err, err


# --- the transparency log: tree heads, anchors, proofs ------------------------------------------


@pytest.fixture
def anchored(tmp_path):
    """A keystore with a trusted signing key, an audit DB with tenant A's six records, and a signed
    tree head of them exported by `tensafe audit sign-head --out` (the anchor kept elsewhere)."""
    from tensafe.security.keys import Keystore

    store = Keystore(tmp_path / "keys")
    store.generate_signing("auditor", trust=True)
    db = tmp_path / "audit.sqlite3"
    chain = AuditChain(db)
    chain.append("A", TRAIN_START, {"run": "r1"})
    for step in range(1, 5):
        chain.append("A", CHECKPOINT, {"step": step * 10})
    chain.append("A", TRAIN_END, {"run": "r1"})
    older = tmp_path / "older-copy.sqlite3"
    with sqlite3.connect(db) as source, sqlite3.connect(older) as copy:
        source.backup(copy)  # what a rollback puts back: the log at 6 records
    chain.append("A", CHECKPOINT, {"step": 50})
    anchor = tmp_path / "outside" / "head.json"
    signed = tensafe("--db", str(db), "sign-head", "--tenant", "A", "--key", "auditor",
                     "--keystore", str(store.root), "--out", str(anchor))
    assert signed.returncode == 0, signed.stderr
    tamper(chain, "DELETE FROM tree_heads")  # whoever can write the file can drop the stored heads too
    return db, anchor, store.root, older


def _verify(db, anchor, keystore):
    return tensafe("--db", str(db), "verify", "--anchor", str(anchor), "--keystore", str(keystore))


def test_an_outside_anchor_keeps_verifying_while_the_log_only_grows(anchored):
    db, anchor, keys, _ = anchored
    done = _verify(db, anchor, keys)
    assert done.returncode == 0 and "1 signed heads verified" in done.stdout, done.stdout + done.stderr


@pytest.mark.parametrize("attack", ["truncate", "rollback", "empty file", "rewrite and rehash"])
def test_an_outside_anchor_catches_what_the_database_alone_cannot(anchored, attack):
    db, anchor, keys, older = anchored
    chain = AuditChain(db)
    if attack == "truncate":
        tamper(chain, "DELETE FROM records WHERE tenant = 'A' AND seq >= 4")
    elif attack in ("rollback", "empty file"):
        for suffix in ("-wal", "-shm"):
            Path(str(db) + suffix).unlink(missing_ok=True)
        db.write_bytes(older.read_bytes() if attack == "rollback" else b"")
    else:
        tamper(chain, "UPDATE records SET data = '{\"step\":99}' WHERE tenant = 'A' AND seq = 3")
        rehash_from(chain, "A", 3)
    assert tensafe("--db", str(db), "verify").returncode == 0  # self-consistent: the file alone says ok
    caught = _verify(db, anchor, keys)
    assert caught.returncode == 1 and "tenant 'A'" in caught.stdout, caught.stdout + caught.stderr
    assert ("truncated" in caught.stdout) or ("rewritten" in caught.stdout)


def test_a_package_manifest_is_an_anchor_too(tmp_path, signer):
    from tensafe.security.package import build_package

    chain = AuditChain(tmp_path / "audit.sqlite3")
    for step in range(5):
        chain.append("A", CHECKPOINT, {"step": step})
    package = tmp_path / "a.tssp"
    build_package(package, {"m": b"x"}, {"audit_head": chain.tree_head("A")}, signer)
    trusted = {signer.key_id: signer.public}
    anchor = read_anchor(package, trusted)
    assert chain.verify(trusted=trusted, heads=[anchor]).ok
    tamper(chain, "DELETE FROM records WHERE tenant = 'A' AND seq = 5")
    problem = first(chain, trusted=trusted, heads=[anchor])
    assert problem.kind == DELETED and "truncated" in problem.detail


def test_inclusion_and_consistency_proofs_verify_against_the_tree_heads(anchored):
    from tensafe.security import merkle

    db, anchor, _, older = anchored
    head = json.loads(anchor.read_text())  # the signed head: 7 records
    root = bytes.fromhex(head["root"])
    included = json.loads(tensafe("--db", str(db), "prove", "--tenant", "A", "--seq", "3").stdout)
    assert included["root"] == head["root"] and included["size"] == head["seq"] == 7
    leaf = merkle.leaf_hash(included["record_hash"].encode())
    assert merkle.verify_inclusion(leaf, 2, 7, [bytes.fromhex(p) for p in included["path"]], root)
    earlier = AuditChain(older).tree_head("A")  # a head someone kept at 6 records
    grown = json.loads(tensafe("--db", str(db), "prove", "--tenant", "A", "--old-size", "6").stdout)
    assert grown["old_root"] == earlier["root"]
    assert merkle.verify_consistency(6, 7, bytes.fromhex(earlier["root"]), root,
                                     [bytes.fromhex(p) for p in grown["path"]])
    bad = tensafe("--db", str(db), "prove", "--tenant", "A", "--seq", "99")
    assert bad.returncode == 2 and len(bad.stderr.splitlines()) == 1


def test_a_signed_evidence_statement_is_an_anchor_too(tmp_path, signer):
    from tensafe.security.evidence import SoftwareAttestation, serving_statement

    chain = AuditChain(tmp_path / "audit.sqlite3")
    for step in range(4):
        chain.append("A", CHECKPOINT, {"step": step})
    session = {"config_digest": "c" * 64, "started": "2026-01-01T00:00:00+00:00", "finished": None,
               "adapters": [{"name": "a", "digest": "d" * 64}], "audit_head": chain.tree_head("A")}
    evidence = tmp_path / "evidence.json"
    evidence.write_text(json.dumps(SoftwareAttestation(signer).sign(serving_statement(session))))
    trusted = {signer.key_id: signer.public}
    anchor = read_anchor(evidence, trusted)
    assert chain.verify(trusted=trusted, heads=[anchor]).ok
    tamper(chain, "DELETE FROM records WHERE tenant = 'A' AND seq = 4")
    assert first(chain, trusted=trusted, heads=[anchor]).kind == DELETED
    with pytest.raises(AuditError, match="does not verify"):
        read_anchor(evidence, {})
