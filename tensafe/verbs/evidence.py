"""`tensafe evidence`: verify or show the signed evidence of training runs and serving sessions."""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from tensafe.security.evidence import (
    EvidenceError,
    EvidenceInvalid,
    VerifiedEvidence,
    decode_envelope,
    read_evidence,
    verify_envelope,
    verify_subjects,
)
from tensafe.security.keys import Keystore, default_root
from tensafe.verbs.parsing import KEYSTORE_HELP, verb_parser


def _parser() -> argparse.ArgumentParser:
    parser, sub, common = verb_parser(
        "tensafe evidence", "Verify or show signed evidence (in-toto statements in DSSE envelopes) for "
        "training runs and serving sessions.", EvidenceError,
        {"--keystore": {"metavar": "DIR", "help": KEYSTORE_HELP + "; its trust store is used"}},
    )
    ver = sub.add_parser("verify", parents=[common], help="check the signature against the trust store",
                         description="Check an evidence file: signature by a trusted key, statement shape, "
                         "attestation; with --subjects, recompute the subject files' digests. Exit 0 when "
                         "it verifies, 1 when it does not, 2 when the file cannot be read.")
    ver.add_argument("file", metavar="FILE", type=Path, help="evidence envelope (JSON)")
    ver.add_argument("--subjects", metavar="DIR", type=Path, default=None,
                     help="folder the subject names are relative to (e.g. the training run folder)")
    show = sub.add_parser("show", parents=[common], help="print the statement WITHOUT verifying it",
                          description="Decode and print the statement; nothing is verified (UNVERIFIED).")
    show.add_argument("file", metavar="FILE", type=Path, help="evidence envelope (JSON)")
    return parser


def _print_verified(path: Path, verified: VerifiedEvidence) -> None:
    predicate = verified.statement["predicate"]
    print(f"ok: {path} verifies")
    print(f"signer: trusted key {verified.signer_key_id}")
    print(f"predicate type: {verified.predicate_type}")
    print("subjects:")
    for subject in verified.subjects:
        print(f"  {subject['digest']['sha256']}  {subject['name']}")
    code = predicate.get("code") or {}
    if code:
        commit = f", git {code['git_commit']}" if code.get("git_commit") else ""
        print(f"code: {code.get('name', 'tensafe')} {code.get('version')}{commit}")
    attestation = verified.attestation
    print(f"attestation: provider {attestation['provider']}, hardware root of trust: "
          f"{'yes' if attestation['hardware_root_of_trust'] else 'no'}")
    print(f"  {attestation['note']}")


def _cmd_verify(args: argparse.Namespace) -> int:
    envelope = read_evidence(args.file)
    trusted = Keystore(Path(args.keystore) if args.keystore else default_root()).trusted()
    try:
        verified = verify_envelope(envelope, trusted)
    except EvidenceInvalid as err:
        print(f"tensafe evidence: FAILED: {args.file}: {err}", file=sys.stderr)
        return 1
    _print_verified(args.file, verified)
    if args.subjects is None:
        return 0
    report = verify_subjects(verified.statement, args.subjects)
    for check in report.checks:
        detail = f" (file has {check.actual})" if check.status == "mismatch" else ""
        print(f"  subject {check.status}: {check.name}{detail}")
    if report.mismatched:
        names = ", ".join(c.name for c in report.mismatched)
        print(f"tensafe evidence: FAILED: {args.file}: subject digest mismatch under {args.subjects}: "
              f"{names}", file=sys.stderr)
        return 1
    if not report.matched:
        print(f"tensafe evidence: FAILED: {args.file}: no subject file found under {args.subjects}; "
              "nothing was checked", file=sys.stderr)
        return 1
    return 0


def _cmd_show(args: argparse.Namespace) -> int:
    envelope = read_evidence(args.file)
    try:
        statement, _, signatures = decode_envelope(envelope)
    except EvidenceInvalid as err:
        raise EvidenceError(f"{args.file}: cannot decode: {err}") from None
    print(f"UNVERIFIED: {args.file} decoded without checking any signature (use `tensafe evidence verify`)")
    print(f"signatures claim key ids: {', '.join(s.key_id for s in signatures)}")
    print(json.dumps(statement, indent=2, sort_keys=True, ensure_ascii=False))
    return 0


def cli(argv: list[str]) -> int:
    """`tensafe evidence ...`: verify exits 0 (verified), 1 (does not verify); unreadable files and
    usage errors raise EvidenceError (one line, exit status 2)."""
    args = _parser().parse_args(argv)
    try:
        return _cmd_verify(args) if args.command == "verify" else _cmd_show(args)
    except BrokenPipeError:  # `tensafe evidence show FILE | head`: the reader left
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)
        return 0
