"""`tensafe keys`: create and list keys, export public keys, manage the trust store."""

from __future__ import annotations

import argparse
import json
import secrets
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from tensafe.security.audit import AuditChain, default_db
from tensafe.security.crypto import Recipient, Signer
from tensafe.security.events import KEY_CREATE
from tensafe.security.keys import KINDS, Keystore, KeystoreError, default_root
from tensafe.verbs.parsing import KEYSTORE_HELP, verb_parser


def _parser() -> argparse.ArgumentParser:
    parser, sub, common = verb_parser(
        "tensafe keys", "Create and list keys, export public keys and manage the trust store of signing "
        "keys.",
        KeystoreError, {"--keystore": {"metavar": "DIR", "help": KEYSTORE_HELP}},
    )

    gen = sub.add_parser("generate", parents=[common], help="create a signing or recipient key pair",
                         description="Create a key pair in the keystore (private file mode 0600).")
    gen.add_argument("kind", choices=KINDS, help="signing (Ed25519 + ML-DSA-65) or recipient (X-Wing)")
    gen.add_argument("--name", required=True, help="a label, unique among keys of this kind")
    gen.add_argument("--trust", action="store_true", help="also add a new signing key to the trust store")
    gen.set_defaults(run=_cmd_generate)

    lst = sub.add_parser("list", parents=[common], help="list keys and trusted public keys",
                         description="List keys (kind, name, key id, created, trusted); nothing private.")
    lst.add_argument("--json", action="store_true", help="print a JSON list")
    lst.set_defaults(run=_cmd_list)

    exp = sub.add_parser("export", parents=[common], help="write a public key as JSON",
                         description="Write a key's public key JSON (never the private key).")
    exp.add_argument("ref", metavar="REF", help="key id, key id prefix (8+ hex digits) or name")
    exp.add_argument("--kind", choices=KINDS, default=None, help="only look among keys of this kind")
    exp.add_argument("--out", metavar="FILE", default=None, help="write here instead of standard output")
    exp.set_defaults(run=_cmd_export)

    tr = sub.add_parser("trust", parents=[common], help="trust a signing public key",
                        description="Add a signing public key (a file from `tensafe keys export`, or - for "
                        "standard input) to the trust store. Check its key id out of band first.")
    tr.add_argument("file", metavar="FILE", help="public key JSON file, or - for standard input")
    tr.add_argument("--name", default=None, help="the name to trust it under (default: the name it carries)")
    tr.set_defaults(run=_cmd_trust)

    un = sub.add_parser("untrust", parents=[common], help="remove a key from the trust store",
                        description="Remove a signing public key from the trust store.")
    un.add_argument("ref", metavar="REF", help="key id, key id prefix (8+ hex digits) or name")
    un.set_defaults(run=_cmd_untrust)

    api = sub.add_parser("api-key", parents=[common], help="make an API key for a TenSafe HTTP service",
                         description="Print a fresh random API key and its SHA-256, the digest a "
                         "service's config stores (service.tenants.NAME.api_key_sha256). The key is shown "
                         "once and kept nowhere. Training-service keys start with tml-, as the tinker SDK "
                         "requires.")
    api.add_argument("--prefix", default="tml-", help="the key's prefix (default: tml-)")
    api.set_defaults(run=_cmd_api_key)
    return parser


def _cmd_api_key(store: Keystore, args: argparse.Namespace) -> None:
    from tensafe.serving.auth import hash_api_key

    key = args.prefix + secrets.token_urlsafe(32)
    print(f"api key: {key}\nsha256:  {hash_api_key(key)}")


def _cmd_generate(store: Keystore, args: argparse.Namespace) -> None:
    if args.trust and args.kind != "signing":
        raise KeystoreError("keys generate: --trust is for signing keys; recipient keys are not trusted")
    if args.kind == "signing":
        key: Signer | Recipient = store.generate_signing(args.name, trust=args.trust)
    else:
        key = store.generate_recipient(args.name)
    note = ", trusted" if args.trust else ""
    AuditChain(default_db()).append("default", KEY_CREATE, {"kind": args.kind, "key_id": key.key_id,
                                                            "name": args.name, "trusted": args.trust})
    print(f"generated {args.kind} key {key.key_id} ({args.name}{note}) in {store.root}")


def _cmd_list(store: Keystore, args: argparse.Namespace) -> None:
    infos = store.list()
    if args.json:
        print(json.dumps([info.to_json() for info in infos], indent=2))
        return
    if not infos:
        print(f"no keys in {store.root}")
        return
    for info in infos:
        flags = ", ".join(f for f, on in (("trusted", info.trusted), ("public only", not info.private)) if on)
        print(f"{info.kind:<9} {info.name or '-':<20} {info.key_id[:16]}  {info.created or '-':<20} {flags}"
              .rstrip())


def _cmd_export(store: Keystore, args: argparse.Namespace) -> None:
    public = store.export_public(args.ref, args.kind)
    text = json.dumps(public, indent=2, sort_keys=True) + "\n"
    line = f"exported {public['kind']} public key {public['key_id']} ({public['name']})"
    if args.out is None:
        sys.stdout.write(text)
        print(line, file=sys.stderr)
        return
    Path(args.out).write_text(text)
    print(f"{line} to {args.out}")


def _cmd_trust(store: Keystore, args: argparse.Namespace) -> None:
    if args.file == "-":
        try:
            source: Any = json.loads(sys.stdin.read())
        except ValueError:
            raise KeystoreError("keys trust: standard input is not JSON") from None
        if not isinstance(source, Mapping):
            raise KeystoreError("keys trust: standard input is not a signing public key")
    else:
        source = Path(args.file)
        if not source.exists():
            raise KeystoreError(f"keys trust: no file {source}; for a key in this keystore: "
                                f"`tensafe keys export REF | tensafe keys trust -`")
    key_id = store.trust(source, name=args.name)
    name = next((i.name for i in store.list() if i.key_id == key_id and i.kind == "signing"), "")
    print(f"trusted signing key {key_id} ({name or 'no name'})")


def _cmd_untrust(store: Keystore, args: argparse.Namespace) -> None:
    names = {info.key_id: info.name for info in store.list() if info.trusted}
    key_id = store.untrust(args.ref)
    print(f"untrusted signing key {key_id} ({names.get(key_id) or 'no name'})")


def cli(argv: list[str]) -> int:
    """`tensafe keys ...`; user errors raise KeystoreError (one line, exit status 2)."""
    args = _parser().parse_args(argv)
    store = Keystore(Path(args.keystore) if args.keystore else default_root())
    try:
        args.run(store, args)
    except BrokenPipeError:
        raise  # the entrypoint ends quietly when the reader leaves (`tensafe keys list | head`)
    except OSError as err:
        where = f"{err.filename}: " if err.filename else ""
        raise KeystoreError(f"keys {args.command}: {where}{err.strerror or err}") from None
    return 0
