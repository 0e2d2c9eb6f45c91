"""`tensafe audit`: show, verify, sign and prove the hash-chained audit log."""

from __future__ import annotations

import json
import sys
from pathlib import Path

from tensafe.security.audit import AuditChain, AuditError, default_db, read_anchor, write_head
from tensafe.security.canonical import canonical_json
from tensafe.security.keys import Keystore, default_root
from tensafe.verbs.parsing import KEYSTORE_HELP, verb_parser


def _open_existing(path: Path) -> AuditChain:
    if not path.is_file():
        raise AuditError(f"no audit database at {path} (--db FILE or $TENSAFE_AUDIT_DB)")
    return AuditChain(path)


def _keystore(root: Path | None):
    return Keystore(root or default_root())


def cli(argv: list[str]) -> int:
    db_help = "the audit database (default: $TENSAFE_AUDIT_DB or ~/.tensafe/audit.sqlite3)"
    keystore_help = KEYSTORE_HELP
    parser, sub, common = verb_parser(
        "tensafe audit", "Show, verify and sign the hash-chained audit log (one chain per tenant).",
        AuditError, {"--db": {"type": Path, "help": db_help}},
    )
    verify_cmd = sub.add_parser("verify", parents=[common], help="check every record and signed head; "
                                "exit 1 naming the first bad record")
    verify_cmd.add_argument("--tenant", default=None, help="verify only this tenant")
    verify_cmd.add_argument("--keystore", type=Path, default=None,
                            help=keystore_help + "; its trust store checks the signed heads")
    verify_cmd.add_argument("--anchor", type=Path, action="append", default=[], metavar="FILE",
                            help="a tree head kept outside the database: a signed head (sign-head --out), "
                                 "a .tssp package or an evidence.json (the head they carry); repeatable. "
                                 "Catches truncation, rollback and rewrites of what it covers")
    show = sub.add_parser("show", parents=[common], help="print the records")
    show.add_argument("--tenant", default=None, help="only this tenant")
    show.add_argument("--limit", type=int, default=None, help="only the last N records of each tenant")
    show.add_argument("--json", action="store_true", help="one JSON array of records")
    sign = sub.add_parser("sign-head", parents=[common], help="sign a tenant's current head")
    sign.add_argument("--tenant", required=True)
    sign.add_argument("--key", required=True, help="signing key (id, prefix or name)")
    sign.add_argument("--keystore", type=Path, default=None, help=keystore_help)
    sign.add_argument("--out", type=Path, default=None, metavar="FILE",
                      help="also write the signed head here: keep it outside the database as an anchor")
    prove = sub.add_parser("prove", parents=[common], help="print an inclusion or a consistency proof (JSON)",
                           description="An RFC 9162 inclusion proof of record --seq, or a consistency proof "
                           "from the log's first --old-size records, in the log of --size records (default: "
                           "all).")
    prove.add_argument("--tenant", required=True)
    which = prove.add_mutually_exclusive_group(required=True)
    which.add_argument("--seq", type=int, help="the record to prove included")
    which.add_argument("--old-size", type=int, help="the earlier log size to prove consistent")
    prove.add_argument("--size", type=int, default=None, help="the log size the proof is for")
    args = parser.parse_args(argv)
    path = args.db or default_db()
    chain = _open_existing(path)
    if args.command == "verify":
        return _cli_verify(chain, args)
    if args.command == "show":
        return _cli_show(chain, args)
    if args.command == "prove":
        proof = (chain.inclusion_proof(args.tenant, args.seq, args.size) if args.seq is not None
                 else chain.consistency_proof(args.tenant, args.old_size, args.size))
        print(json.dumps(proof, indent=2))
        return 0
    head = chain.sign_head(args.tenant, _keystore(args.keystore).signer(args.key))
    if args.out is not None:
        write_head(head, args.out)
    print(f"signed head of tenant {head.tenant!r}: seq {head.seq} root {head.root} "
          f"(key {head.signatures[0].key_id[:16]})" + (f", written to {args.out}" if args.out else ""))
    return 0


def _cli_verify(chain: AuditChain, args) -> int:
    trusted = None
    if args.keystore is not None or args.anchor or chain.heads(args.tenant):
        trusted = _keystore(args.keystore).trusted()
    anchors = [read_anchor(path, trusted or {}) for path in args.anchor]
    report = chain.verify(tenant=args.tenant, trusted=trusted, heads=anchors)
    if args.tenant is not None and report.records == 0 and report.ok:
        raise AuditError(f"tenant {args.tenant!r} has no audit records in {chain.path}")
    print(report)
    if report.ok:
        return 0
    first = report.problems[0]
    for problem in report.problems[1:]:
        if problem.tenant != first.tenant:
            print(f"also: {problem}")
    clean = report.tenants - len(report.failed_tenants())
    print(f"{len(report.failed_tenants())} tenant(s) damaged, {clean} verify")
    return 1


def _cli_show(chain: AuditChain, args) -> int:
    if args.limit is not None and args.limit < 1:
        raise AuditError(f"--limit {args.limit}: give a positive number of records")
    names = [args.tenant] if args.tenant is not None else chain.tenants()
    records = []
    for name in names:
        tenant_records = chain.records(name)
        records += tenant_records[-args.limit:] if args.limit else tenant_records
    if args.json:
        json.dump([r.to_json() for r in records], sys.stdout, indent=2)
        print()
        return 0
    if not records:
        print("no audit records" + (f" for tenant {args.tenant!r}" if args.tenant else ""))
    for r in records:
        data = canonical_json(r.data).decode()
        print(f"{r.tenant}  {r.seq:>6}  {r.ts}  {r.event:<20}  {data}  {r.hash[:16]}")
    return 0
