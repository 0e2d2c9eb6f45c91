"""The audit chain: append-only, hash-chained records per tenant in one SQLite file (WAL).

Each record commits to its tenant, sequence number, time, event, data and the hash of the
record before it (SHA-256 over canonical JSON; the first record of a tenant links to 64 zeros),
so `verify` finds a record that was modified, deleted, inserted or reordered *after* later
records were chained onto it, and names the first one.

Each tenant's records are also the leaves of a transparency log (RFC 9162 Merkle tree over the
record hashes, `merkle.py`): a tree head (size, last record hash, root) is what `sign_head` signs
and what packages carry, `inclusion_proof` shows that a record is in the log a head describes,
and `consistency_proof` that a later head only appended to an earlier one.

What this proves, and what it does not: the hashes use no secret. Anyone with write access to
the file can rewrite a tenant's history and recompute every hash from the change onwards, drop
the newest records, or replace the file with an older copy or an empty one; such a log is
self-consistent and verifies on its own. Tree heads anchor it: a signed head (or a package's
manifest, signed with the package) held outside the file, passed to `verify(anchors=)`, catches
truncation, rollback and any rewrite of the records it covers. Heads stored in the same file can
be deleted along with the history, so without an outside anchor only in-place edits, insertions,
reorderings and gaps are caught. The log says nothing about events that were never appended, or
appended after the newest anchor.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import os
import sqlite3
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from tensafe.errors import UserError
from tensafe.security import merkle
from tensafe.security.canonical import CanonicalError, canonical_json, parse_canonical, strict_loads
from tensafe.security.crypto import (
    CryptoError,
    Signature,
    Signer,
    SigningPublicKey,
    dsse_signatures,
    signatures_from_dsse,
)
from tensafe.security.crypto import verify as verify_signature
from tensafe.security.events import EVENTS
from tensafe.security.package import is_package

GENESIS_HASH = "0" * 64
HEAD_PAYLOAD_TYPE = "application/vnd.tensafe.audit-tree-head+json"


# What `verify` can find wrong, by the record it names.
MODIFIED = "modified"      # the record's content no longer matches its hash (or what the next links to)
DELETED = "deleted"        # the named seq is missing (gap, renumbered tail, or cut below a signed head)
INSERTED = "inserted"      # the named record was put between records that were chained to each other
REORDERED = "reordered"    # the named record links to a record that now comes after it
REWRITTEN = "rewritten"    # self-consistent, but a signed head no longer matches the record at its seq
UNTRUSTED_HEAD = "untrusted_head"  # a signed head whose signature does not verify against the trust store

_SCHEMA = """
CREATE TABLE IF NOT EXISTS records (
    tenant TEXT NOT NULL,
    seq INTEGER NOT NULL,
    ts TEXT NOT NULL,
    event TEXT NOT NULL,
    data TEXT NOT NULL,
    prev_hash TEXT NOT NULL,
    hash TEXT NOT NULL,
    UNIQUE (tenant, seq)
);
CREATE TABLE IF NOT EXISTS tree_heads (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    tenant TEXT NOT NULL,
    seq INTEGER NOT NULL,
    hash TEXT NOT NULL,
    root TEXT NOT NULL,
    ts TEXT NOT NULL,
    signatures TEXT NOT NULL
);
CREATE TRIGGER IF NOT EXISTS records_append_only_update BEFORE UPDATE ON records
    BEGIN SELECT RAISE(ABORT, 'audit records are append-only'); END;
CREATE TRIGGER IF NOT EXISTS records_append_only_delete BEFORE DELETE ON records
    BEGIN SELECT RAISE(ABORT, 'audit records are append-only'); END;
CREATE TRIGGER IF NOT EXISTS tree_heads_append_only_update BEFORE UPDATE ON tree_heads
    BEGIN SELECT RAISE(ABORT, 'signed heads are append-only'); END;
CREATE TRIGGER IF NOT EXISTS tree_heads_append_only_delete BEFORE DELETE ON tree_heads
    BEGIN SELECT RAISE(ABORT, 'signed heads are append-only'); END;
"""
_SCHEMA_VERSION = 2


class AuditError(UserError):
    """An append the chain refuses (unknown event, bad tenant or data) or an unusable audit file."""


def record_hash(tenant: str, seq: int, ts: str, event: str, data: Any, prev_hash: str) -> str:
    """The SHA-256 (hex) a record with these fields carries."""
    body = {"tenant": tenant, "seq": seq, "ts": ts, "event": event, "data": data, "prev_hash": prev_hash}
    return hashlib.sha256(canonical_json(body)).hexdigest()


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="microseconds").replace("+00:00", "Z")


@dataclass(frozen=True)
class Record:
    tenant: str
    seq: int
    ts: str
    event: str
    data: dict
    prev_hash: str
    hash: str

    def to_json(self) -> dict:
        return {"tenant": self.tenant, "seq": self.seq, "ts": self.ts, "event": self.event, "data": self.data,
                "prev_hash": self.prev_hash, "hash": self.hash}


@dataclass(frozen=True)
class SignedHead:
    """A tenant's tree head at time `ts`, signed: the log's size (= the last record's seq), the last
    record's hash and the Merkle root over the record hashes."""

    tenant: str
    seq: int
    hash: str
    root: str
    ts: str
    signatures: tuple[Signature, ...]

    @property
    def payload(self) -> bytes:
        return canonical_json({"tenant": self.tenant, "seq": self.seq, "hash": self.hash, "root": self.root,
                               "ts": self.ts})

    def verify(self, trusted: Mapping[str, SigningPublicKey]) -> SigningPublicKey:
        """The trusted key that signed this head; CryptoError if none did."""
        return verify_signature(HEAD_PAYLOAD_TYPE, self.payload, list(self.signatures), trusted)

    def to_json(self) -> dict:
        return {"tenant": self.tenant, "seq": self.seq, "hash": self.hash, "root": self.root, "ts": self.ts,
                "signatures": dsse_signatures(list(self.signatures))}

    @classmethod
    def from_json(cls, data: Mapping) -> SignedHead:
        try:
            return cls(str(data["tenant"]), int(data["seq"]), str(data["hash"]), str(data["root"]),
                       str(data["ts"]), tuple(signatures_from_dsse(data["signatures"])))
        except (KeyError, TypeError, ValueError) as err:
            raise CryptoError(f"not a signed audit head: {err}") from None


@dataclass(frozen=True)
class Anchor:
    """A tree head vouched for outside the audit file (a package's signed manifest), already
    authenticated by whoever built it; `origin` says where it came from."""

    tenant: str
    seq: int
    hash: str
    root: str
    origin: str


@dataclass(frozen=True)
class Problem:
    """What is wrong with one tenant's chain, at the record (seq) it names."""

    tenant: str
    seq: int
    kind: str
    detail: str

    def __str__(self) -> str:
        return f"tenant {self.tenant!r} seq {self.seq}: {self.kind} ({self.detail})"


@dataclass
class VerifyReport:
    records: int = 0
    tenants: int = 0
    heads: int = 0  # signed heads that verified (signature against `trusted`, when given) and match the chain
    signatures_checked: bool = False
    problems: list[Problem] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems

    @property
    def first(self) -> Problem | None:
        return self.problems[0] if self.problems else None

    def failed_tenants(self) -> list[str]:
        return sorted({p.tenant for p in self.problems})

    def __str__(self) -> str:
        if self.ok:
            return f"ok: {self.records} records in {self.tenants} tenants, {self.heads} signed heads verified"
        return f"FAILED: first bad record: {self.first}"


@dataclass(frozen=True)
class _Row:
    seq: int
    ts: str
    event: str
    data_text: str
    prev_hash: str
    hash: str

    def rehash(self, tenant: str, seq: int) -> str | None:
        """The hash these fields give at `seq` (None when the stored data is not canonical JSON: the
        hash covers exactly the stored bytes, so `{"kind":"EVIL", …}` prepended to them is caught)."""
        try:
            data = parse_canonical(self.data_text.encode())
        except CanonicalError:
            return None
        return record_hash(tenant, seq, self.ts, self.event, data, self.prev_hash)


class AuditChain:
    """The audit chain in the SQLite file at `path` (created if missing)."""

    def __init__(self, path: Path | str):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        try:
            with self._connect() as db:
                db.execute("PRAGMA journal_mode=WAL")
                db.executescript(f"BEGIN IMMEDIATE; {_SCHEMA} PRAGMA user_version={_SCHEMA_VERSION}; COMMIT;")
        except sqlite3.DatabaseError as err:
            raise AuditError(f"{self.path} is not a usable audit database: {err}") from None

    @contextlib.contextmanager
    def _connect(self):
        # One connection per operation: safe across threads, and BEGIN IMMEDIATE plus the busy
        # timeout serialize writers across processes.
        db = sqlite3.connect(self.path, timeout=30.0, isolation_level=None)
        try:
            yield db
        except BaseException:
            if db.in_transaction:
                db.execute("ROLLBACK")
            raise
        finally:
            db.close()

    # --- writing ------------------------------------------------------------------------------

    def append(self, tenant: str, event: str, data: dict) -> Record:
        """Chain a new record onto `tenant`'s head and return it."""
        if not isinstance(tenant, str) or not tenant:
            raise AuditError("an audit record needs a non-empty tenant name")
        if event not in EVENTS:
            raise AuditError(f"unknown audit event {event!r}; events are: {', '.join(sorted(EVENTS))}")
        if not isinstance(data, dict):
            raise AuditError(f"audit data is a dict, not {type(data).__name__}")
        try:
            data_text = canonical_json(data).decode()
        except CanonicalError as err:
            raise AuditError(f"audit data for {event}: {err}") from None
        data = parse_canonical(data_text.encode())
        with self._connect() as db:
            db.execute("BEGIN IMMEDIATE")
            seq, prev_hash = self._head(db, tenant)
            ts = _now()
            digest = record_hash(tenant, seq + 1, ts, event, data, prev_hash)
            db.execute("INSERT INTO records (tenant, seq, ts, event, data, prev_hash, hash) "
                       "VALUES (?, ?, ?, ?, ?, ?, ?)",
                       (tenant, seq + 1, ts, event, data_text, prev_hash, digest))
            db.execute("COMMIT")
        return Record(tenant, seq + 1, ts, event, data, prev_hash, digest)

    def sign_head(self, tenant: str, signer: Signer) -> SignedHead:
        """Sign `tenant`'s current tree head and store it in the tree_heads table."""
        with self._connect() as db:
            db.execute("BEGIN IMMEDIATE")
            hashes = [h for (h,) in db.execute("SELECT hash FROM records WHERE tenant = ? ORDER BY seq",
                                                (tenant,))]
            if not hashes:
                raise AuditError(f"tenant {tenant!r} has no audit records; there is no head to sign")
            seq, digest, top = len(hashes), hashes[-1], merkle.root(_leaves(hashes)).hex()
            ts = _now()
            unsigned = SignedHead(tenant, seq, digest, top, ts, ())
            signature = signer.sign(HEAD_PAYLOAD_TYPE, unsigned.payload)
            head = dataclasses.replace(unsigned, signatures=(signature,))
            signatures = canonical_json(dsse_signatures([signature])).decode()
            db.execute("INSERT INTO tree_heads (tenant, seq, hash, root, ts, signatures) "
                       "VALUES (?, ?, ?, ?, ?, ?)", (tenant, seq, digest, top, ts, signatures))
            db.execute("COMMIT")
        return head

    # --- reading ------------------------------------------------------------------------------

    @staticmethod
    def _head(db: sqlite3.Connection, tenant: str) -> tuple[int, str]:
        row = db.execute("SELECT seq, hash FROM records WHERE tenant = ? ORDER BY seq DESC LIMIT 1",
                         (tenant,)).fetchone()
        return (row[0], row[1]) if row else (0, GENESIS_HASH)

    def head(self, tenant: str) -> tuple[int, str]:
        """(seq, hash) of `tenant`'s last record; (0, 64 zeros) for a tenant with none."""
        with self._connect() as db:
            return self._head(db, tenant)

    def tree_head(self, tenant: str) -> dict:
        """`tenant`'s current tree head, unsigned: {tenant, seq, hash, root}."""
        hashes = [row.hash for row in self._rows(tenant)]
        return {"tenant": tenant, "seq": len(hashes), "hash": hashes[-1] if hashes else GENESIS_HASH,
                "root": merkle.root(_leaves(hashes)).hex()}

    def inclusion_proof(self, tenant: str, seq: int, size: int | None = None) -> dict:
        """The proof that record `seq` is in `tenant`'s log of `size` records (default: all)."""
        hashes = self._prefix(tenant, size)
        if not 1 <= seq <= len(hashes):
            raise AuditError(f"tenant {tenant!r} has no record {seq} in a log of {len(hashes)}")
        leaves = _leaves(hashes)
        return {"kind": "inclusion", "tenant": tenant, "seq": seq, "record_hash": hashes[seq - 1],
                "size": len(hashes), "root": merkle.root(leaves).hex(),
                "path": [p.hex() for p in merkle.inclusion_proof(seq - 1, leaves)]}

    def consistency_proof(self, tenant: str, old_size: int, size: int | None = None) -> dict:
        """The proof that `tenant`'s log of `old_size` records is a prefix of its log of `size`."""
        hashes = self._prefix(tenant, size)
        if not 1 <= old_size <= len(hashes):
            raise AuditError(f"--old-size {old_size}: tenant {tenant!r}'s log has {len(hashes)} records")
        leaves = _leaves(hashes)
        return {"kind": "consistency", "tenant": tenant, "old_size": old_size,
                "old_root": merkle.root(leaves[:old_size]).hex(), "size": len(hashes),
                "root": merkle.root(leaves).hex(),
                "path": [p.hex() for p in merkle.consistency_proof(old_size, leaves)]}

    def _prefix(self, tenant: str, size: int | None) -> list[str]:
        hashes = [row.hash for row in self._rows(tenant)]
        if size is not None:
            if not 1 <= size <= len(hashes):
                raise AuditError(f"--size {size}: tenant {tenant!r}'s log has {len(hashes)} records")
            hashes = hashes[:size]
        return hashes

    def tenants(self) -> list[str]:
        with self._connect() as db:
            return [r[0] for r in db.execute("SELECT DISTINCT tenant FROM records ORDER BY tenant")]

    def _rows(self, tenant: str) -> list[_Row]:
        with self._connect() as db:
            return [_Row(*r) for r in db.execute(
                "SELECT seq, ts, event, data, prev_hash, hash FROM records WHERE tenant = ? ORDER BY seq",
                (tenant,))]

    def records(self, tenant: str) -> list[Record]:
        records = []
        for row in self._rows(tenant):
            try:
                data = parse_canonical(row.data_text.encode())
            except CanonicalError:
                raise AuditError(f"tenant {tenant!r} seq {row.seq}: stored data is not canonical JSON "
                                 "(run `tensafe audit verify`)") from None
            records.append(Record(tenant, row.seq, row.ts, row.event, data, row.prev_hash, row.hash))
        return records

    def heads(self, tenant: str | None = None) -> list[SignedHead]:
        """The stored signed heads (of `tenant`, or all), oldest first."""
        query = "SELECT tenant, seq, hash, root, ts, signatures FROM tree_heads"
        args: tuple = ()
        if tenant is not None:
            query, args = query + " WHERE tenant = ?", (tenant,)
        with self._connect() as db:
            rows = db.execute(query + " ORDER BY id", args).fetchall()
        heads = []
        for t, seq, digest, top, ts, signatures in rows:
            try:
                sigs = tuple(signatures_from_dsse(strict_loads(signatures)))
            except (ValueError, TypeError, CryptoError):
                sigs = ()  # unreadable signatures: reported by verify as an untrusted head
            heads.append(SignedHead(t, seq, digest, top, ts, sigs))
        return heads

    # --- verifying ----------------------------------------------------------------------------

    def verify(self, tenant: str | None = None, trusted: Mapping[str, SigningPublicKey] | None = None,
               heads: Iterable[SignedHead | Anchor] = ()) -> VerifyReport:
        """Recompute every record's hash, link and seq, and check the tree heads (the stored
        ones plus `heads` kept elsewhere: signed heads, or anchors already authenticated), per
        tenant. With `trusted`, a signed head counts only if its signature verifies against it;
        without, heads are compared with the log unverified. The report names the first bad
        record of each damaged tenant."""
        all_heads = list(dict.fromkeys(self.heads(tenant) + [h for h in heads if tenant in (None, h.tenant)]))
        names = [tenant] if tenant is not None else sorted({*self.tenants(), *(h.tenant for h in all_heads)})
        report = VerifyReport(signatures_checked=trusted is not None)
        for name in names:
            rows = self._rows(name)
            report.records += len(rows)
            tenant_heads = sorted((h for h in all_heads if h.tenant == name), key=lambda h: h.seq)
            report.tenants += 1 if rows or tenant_heads else 0
            problems = []
            chain_problem = _walk(name, rows)
            if chain_problem:
                problems.append(chain_problem)
            head_problems, good = _check_heads(name, rows, tenant_heads, trusted)
            problems += head_problems
            report.heads += good
            seen = set()
            for problem in sorted(problems, key=lambda p: p.seq):
                if (problem.seq, problem.kind) not in seen:
                    seen.add((problem.seq, problem.kind))
                    report.problems.append(problem)
        return report


def _root(rows: list[_Row]) -> str:
    return merkle.root(_leaves([r.hash for r in rows])).hex()


def _leaves(record_hashes: list[str]) -> list[bytes]:
    """The log's leaves: each record's hash, as its hex text."""
    return [merkle.leaf_hash(h.encode()) for h in record_hashes]


def _walk(tenant: str, rows: list[_Row]) -> Problem | None:
    """The first record in `rows` (sorted by seq) that breaks the chain, classified."""

    def bad(seq: int, kind: str, detail: str) -> Problem:
        return Problem(tenant, seq, kind, detail)

    expected_prev = GENESIS_HASH
    by_hash = {row.hash: i for i, row in enumerate(rows)}
    for i, row in enumerate(rows):
        want = i + 1
        if row.seq > want:
            missing = f"seq {want}" if row.seq == want + 1 else f"seqs {want}..{row.seq - 1}"
            return bad(want, DELETED, f"{missing} missing: the chain jumps from seq {want - 1} to {row.seq}")
        if row.seq < want:
            return bad(row.seq, INSERTED, f"a second record with seq {row.seq}")
        hash_ok = row.rehash(tenant, row.seq) == row.hash
        link_ok = row.prev_hash == expected_prev
        if hash_ok and link_ok:
            expected_prev = row.hash
            continue
        after = rows[i + 1] if i + 1 < len(rows) else None
        if link_ok:  # content or hash changed in place, or a record put in with a made-up hash
            if after is not None and after.prev_hash == row.prev_hash:
                return bad(row.seq, INSERTED, f"the next record links past it to seq {row.seq - 1}, and its "
                           "own hash is forged")
            return bad(row.seq, MODIFIED, "its content does not match its hash")
        target = by_hash.get(row.prev_hash)
        if target is not None and target > i:
            return bad(row.seq, REORDERED, f"it links to the record now at seq {rows[target].seq}, which "
                       "comes after it")
        if target is not None and target < i - 1:
            first, last = rows[target + 1].seq, rows[i - 1].seq
            which = f"seq {first} was" if first == last else f"seqs {first}..{last} were"
            return bad(first, INSERTED, f"seq {row.seq} links to seq {rows[target].seq}, so {which} put in "
                       "between")
        if row.rehash(tenant, row.seq + 1) == row.hash:
            return bad(row.seq, DELETED, f"the record at seq {row.seq} was removed and later records "
                       f"renumbered down (the one now at seq {row.seq} was seq {row.seq + 1})")
        if i > 0 and row.rehash(tenant, row.seq - 1) == row.hash:
            return bad(rows[i - 1].seq, INSERTED, f"seq {row.seq} was seq {row.seq - 1}, so the record "
                       "before it was put in")
        if hash_ok and i > 0:
            return bad(rows[i - 1].seq, MODIFIED, f"it was rewritten (and rehashed) after seq {row.seq} was "
                       "chained onto it")
        if hash_ok:
            return bad(row.seq, MODIFIED, "the first record does not link to the genesis hash")
        return bad(row.seq, MODIFIED, "neither its hash nor its link to the previous record match")
    return None


def _check_heads(tenant: str, rows: list[_Row], heads: list[SignedHead | Anchor],
                 trusted: Mapping[str, SigningPublicKey] | None) -> tuple[list[Problem], int]:
    """Problems with `tenant`'s signed heads (sorted by seq), and how many verify and match."""
    by_seq = {row.seq: row for row in rows}
    last = rows[-1].seq if rows else 0
    problems, good, last_match = [], 0, 0
    for head in heads:
        if trusted is not None and isinstance(head, SignedHead):
            try:
                head.verify(trusted)
            except CryptoError as err:
                problems.append(Problem(tenant, head.seq, UNTRUSTED_HEAD,
                                        f"the signed head at seq {head.seq} does not verify: {err}"))
                continue
        row = by_seq.get(head.seq)
        if row is None and head.seq > last:
            problems.append(Problem(tenant, last + 1, DELETED,
                                    f"the chain was truncated: it ends at seq {last} but a signed head "
                                    f"covers seq {head.seq}"))
        elif row is None:
            problems.append(Problem(tenant, head.seq, DELETED, "the record a signed head covers is missing"))
        elif row.hash != head.hash or _root(rows[: head.seq]) != head.root:
            what = f"signed head ({head.ts})" if isinstance(head, SignedHead) else f"anchor ({head.origin})"
            problems.append(Problem(tenant, head.seq, REWRITTEN,
                                    f"the log's first {head.seq} records no longer hash to the tree its "
                                    f"{what} holds: history between seq {last_match + 1} and seq "
                                    f"{head.seq} was rewritten"))
        else:
            good += 1
            last_match = max(last_match, head.seq)
    return problems, good


# --- anchors and the default database --------------------------------------------------------


def default_db() -> Path:
    return Path(os.environ.get("TENSAFE_AUDIT_DB") or Path.home() / ".tensafe" / "audit.sqlite3")


def write_head(head: SignedHead, path: Path) -> Path:
    from tensafe.files import write_atomically

    return write_atomically(path, (json.dumps(head.to_json(), indent=2) + "\n").encode())


def _anchor(head: Any, path: Path, origin: str) -> Anchor:
    if not isinstance(head, Mapping) or not {"tenant", "seq", "hash", "root"} <= set(head):
        raise AuditError(f"--anchor {path}: the {origin} carries no audit tree head")
    return Anchor(str(head["tenant"]), int(head["seq"]), str(head["hash"]), str(head["root"]),
                  f"{origin} {path.name}")


def read_anchor(path: Path, trusted: Mapping[str, SigningPublicKey]) -> SignedHead | Anchor:
    """The tree head in `path`: a signed head file, the head in a package's manifest, or the head
    in an evidence statement (package and evidence verified against `trusted`)."""
    if is_package(path):
        from tensafe.security.package import PackageError, read_package

        try:
            manifest = read_package(path, trusted).manifest
        except PackageError as err:
            raise AuditError(f"--anchor {path}: {err}") from None
        return _anchor(manifest.get("audit_head"), path, "package")
    try:
        data = strict_loads(path.read_bytes())
    except OSError as err:
        raise AuditError(f"--anchor {path}: {err.strerror}") from None
    except CanonicalError as err:
        raise AuditError(f"--anchor {path}: not JSON ({err})") from None
    if isinstance(data, Mapping) and "payloadType" in data:
        from tensafe.security.evidence import EvidenceInvalid, verify_envelope

        try:
            statement = verify_envelope(data, trusted).statement
        except EvidenceInvalid as err:
            raise AuditError(f"--anchor {path}: the evidence does not verify ({err})") from None
        return _anchor(statement["predicate"].get("audit_head"), path, "evidence")
    try:
        return SignedHead.from_json(data)
    except CryptoError as err:
        raise AuditError(f"--anchor {path}: not a signed audit head ({err})") from None
