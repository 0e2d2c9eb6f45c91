"""`tensafe package`: build, verify, inspect and open TSSP packages."""

from __future__ import annotations

import json
from pathlib import Path

from tensafe.security.crypto import CryptoError, RecipientPublicKey, SigningPublicKey
from tensafe.security.keys import Keystore, default_root
from tensafe.security.package import (
    PackageError,
    build_package,
    inspect_bytes,
    open_to,
    run_manifest,
    verify_bytes,
)
from tensafe.verbs.parsing import KEYSTORE_HELP, verb_parser


def cli(argv: list[str]) -> int:
    parser, sub, common = verb_parser(
        "tensafe package", "Build, verify, inspect and open TSSP packages.", PackageError,
        {"--keystore": {"type": Path, "metavar": "DIR", "help": KEYSTORE_HELP}},
    )
    build = sub.add_parser("build", parents=[common],
                           help="package a training run (or an adapter folder)")
    build.add_argument("run_dir", type=Path)
    build.add_argument("--key", required=True, help="signing key (id, prefix or name)")
    build.add_argument("--recipient", action="append", default=[],
                       help="encrypt for this recipient public key file (repeatable)")
    build.add_argument("--out", type=Path, required=True)
    verify_cmd = sub.add_parser("verify", parents=[common], help="check signatures (trust store) and digests")
    verify_cmd.add_argument("package", type=Path)
    inspect_cmd = sub.add_parser("inspect", parents=[common], help="print the header without trusting it")
    inspect_cmd.add_argument("package", type=Path)
    open_cmd = sub.add_parser("open", parents=[common],
                              help="verify, decrypt and write the members to a new folder")
    open_cmd.add_argument("package", type=Path)
    open_cmd.add_argument("--out", type=Path, required=True)
    open_cmd.add_argument("--recipient-key", default=None, help="your recipient key (id, prefix or name)")
    args = parser.parse_args(argv)
    store = Keystore(args.keystore or default_root())
    if args.command == "build":
        members, fields = run_manifest(args.run_dir)
        recipients = [_recipient_file(p) for p in args.recipient]
        manifest = build_package(args.out, members, fields, store.signer(args.key), recipients)
        how = f"encrypted for {len(recipients)} recipient(s)" if recipients else "not encrypted"
        print(f"wrote {args.out} (package {manifest['package_id']}, {len(members)} members, {how})")
    elif args.command == "verify":
        _, signer, _ = _verify_file(args.package, store.trusted())
        print(f"ok: {args.package} signed by trusted key {signer.key_id[:16]}; payload digest matches")
    elif args.command == "inspect":
        print(json.dumps(inspect_bytes(_read(args.package)), indent=2))
    else:
        recipient = store.recipient(args.recipient_key) if args.recipient_key else None
        opened = open_to(args.package, args.out, store.trusted(), recipient)
        print(f"opened {args.package} into {args.out} ({len(opened.members)} members, signer "
              f"{opened.signer.key_id[:16]})")
    return 0


def _read(path: Path) -> bytes:
    try:
        return Path(path).read_bytes()
    except OSError as err:
        raise PackageError(f"cannot read {path}: {err.strerror}") from None


def _verify_file(path: Path, trusted) -> tuple[dict, SigningPublicKey, bytes]:
    return verify_bytes(_read(path), trusted)


def _recipient_file(path: str) -> RecipientPublicKey:
    try:
        return RecipientPublicKey.from_json(json.loads(Path(path).read_text()))
    except (OSError, json.JSONDecodeError, CryptoError) as err:
        raise PackageError(f"{path} is not a recipient public key (tensafe keys export): {err}") from None
