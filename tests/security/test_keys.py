"""The keystore: key ids are the crypto fingerprints, private files are 0600 in 0700 folders and
refused when others can read them, exports are public only, trust only through the trust store,
and `tensafe keys` works through the real entrypoint with one-line errors."""

from __future__ import annotations

import base64
import json
import os
import stat
import subprocess
from pathlib import Path

import pytest

from tensafe.errors import UserError
from tensafe.security.crypto import Recipient, Signer, b64, fingerprint, verify
from tensafe.security.keys import Keystore, KeystoreError, UnknownKeyError, default_root
from tests.cli import run_tensafe


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


@pytest.fixture()
def store(tmp_path) -> Keystore:
    return Keystore(tmp_path / "ks")


def test_generated_keys_load_back_and_their_ids_are_the_crypto_fingerprints(store):
    signer = store.generate_signing("release")
    recipient = store.generate_recipient("alice")
    assert signer.key_id == fingerprint("tensafe-signing-key-v1", signer.public.ed25519,
                                        signer.public.ml_dsa_65)
    assert recipient.key_id == fingerprint("tensafe-recipient-key-v1", recipient.public.ml_kem_768,
                                           recipient.public.x25519)
    assert (store.root / "signing" / f"{signer.key_id}.json").is_file()
    assert (store.root / "recipient" / f"{recipient.key_id}.json").is_file()

    loaded = Keystore(store.root).signer("release")
    assert isinstance(loaded, Signer) and loaded.public == signer.public and loaded.seeds() == signer.seeds()
    sig = loaded.sign("application/test", b"payload")
    assert verify("application/test", b"payload", [sig], {signer.key_id: signer.public}) == signer.public

    opened = Keystore(store.root).recipient(recipient.key_id)
    assert isinstance(opened, Recipient) and opened.public == recipient.public
    assert opened.open(recipient.public.seal(b"data key", b"info"), b"info") == b"data key"

    infos = {(i.kind, i.name): i for i in store.list()}
    assert set(infos) == {("signing", "release"), ("recipient", "alice")}
    assert infos["signing", "release"].key_id == signer.key_id
    assert infos["recipient", "alice"].key_id == recipient.key_id
    assert not any(i.trusted for i in infos.values()) and all(i.private for i in infos.values())
    assert infos["signing", "release"].created.endswith("Z")
    record = json.loads((store.root / "signing" / f"{signer.key_id}.json").read_text())
    assert record["kind"] == "signing" and record["name"] == "release"
    assert record["public"] == signer.public.to_json()


def test_private_files_are_0600_in_0700_folders_whatever_the_umask(store):
    old = os.umask(0)  # the modes come from the create calls, not from a strict umask
    try:
        signer = store.generate_signing("release", trust=True)
        recipient = store.generate_recipient("alice")
    finally:
        os.umask(old)
    for folder in (store.root, store.root / "signing", store.root / "recipient", store.root / "trusted"):
        assert _mode(folder) == 0o700, folder
    assert _mode(store.root / "signing" / f"{signer.key_id}.json") == 0o600
    assert _mode(store.root / "recipient" / f"{recipient.key_id}.json") == 0o600
    assert _mode(store.root / "trusted" / f"{signer.key_id}.json") & 0o022 == 0
    assert not [p for p in store.root.rglob(".*")]  # no temporary files left behind


@pytest.mark.parametrize("mode", [0o644, 0o640, 0o604])
def test_a_private_key_file_others_can_read_is_refused(store, mode):
    signer = store.generate_signing("release")
    path = store.root / "signing" / f"{signer.key_id}.json"
    path.chmod(mode)
    with pytest.raises(KeystoreError, match=r"chmod 600") as err:
        store.signer("release")
    assert str(path) in str(err.value) and isinstance(err.value, UserError)
    with pytest.raises(KeystoreError, match=r"chmod 600"):
        store.list()
    path.chmod(0o600)
    assert store.signer("release").key_id == signer.key_id


def test_a_key_file_that_is_a_link_or_holds_another_key_is_refused(store, tmp_path):
    signer = store.generate_signing("release")
    path = store.root / "signing" / f"{signer.key_id}.json"
    moved = tmp_path / "elsewhere.json"
    path.rename(moved)
    path.symlink_to(moved)
    with pytest.raises(KeystoreError, match="symbolic link"):
        store.signer("release")
    path.unlink()
    moved.rename(store.root / "signing" / f"{'0' * 64}.json")
    with pytest.raises(KeystoreError, match="not the key its file name says"):
        store.list()


def test_seeds_that_do_not_match_the_public_key_are_refused(store):
    signer = store.generate_signing("release")
    path = store.root / "signing" / f"{signer.key_id}.json"
    record = json.loads(path.read_text())
    record["private"]["ed25519_seed"] = b64(Signer.generate().seeds()[0])
    path.unlink()
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as handle:
        json.dump(record, handle)
    with pytest.raises(KeystoreError, match="do not belong"):
        store.signer("release")


def test_export_holds_the_public_key_and_nothing_private(store):
    signer = store.generate_signing("release")
    recipient = store.generate_recipient("alice")
    for ref, key in (("release", signer), ("alice", recipient)):
        exported = store.export_public(ref)
        assert exported == {**key.public.to_json(), "name": ref}
        text = json.dumps(exported)
        kind = exported["kind"]
        private_file = (store.root / kind / f"{key.key_id}.json").read_text()
        for seed in key.seeds():
            assert b64(seed) in private_file  # the check below looks for something that exists
            for form in (b64(seed), seed.hex(), base64.urlsafe_b64encode(seed).decode(), b64(seed)[:16]):
                assert form not in text
        assert "private" not in exported and "seed" not in text


def test_trust_and_untrust_round_trip_and_feed_verify(store, tmp_path):
    signer = store.generate_signing("release")
    assert store.trusted() == {}  # a new signing key is not trusted by itself
    sig = signer.sign("application/test", b"payload")
    exported = store.export_public("release")

    assert store.trust(exported) == signer.key_id
    assert store.trusted() == {signer.key_id: signer.public}
    assert verify("application/test", b"payload", [sig], store.trusted()) == signer.public
    assert [i.trusted for i in store.list() if i.name == "release"] == [True]
    assert store.trust(exported) == signer.key_id  # trusting twice is harmless

    assert store.untrust("release") == signer.key_id
    assert store.trusted() == {}
    assert store.signer("release").key_id == signer.key_id  # the private key stays

    path = tmp_path / "release.pub.json"
    path.write_text(json.dumps(exported))
    assert store.trust(path) == signer.key_id and store.trust(str(path)) == signer.key_id
    assert store.untrust(signer.key_id[:12]) == signer.key_id

    # someone else's key: trusted without its private half, listed as such
    other = Signer.generate()
    assert store.trust({**other.public.to_json(), "name": "partner"}) == other.key_id
    listed = {i.key_id: i for i in store.list()}
    assert listed[other.key_id].private is False and listed[other.key_id].trusted
    assert listed[other.key_id].name == "partner"
    with pytest.raises(KeystoreError):
        store.signer("partner")  # a trusted public key is not a signing key held here
    assert store.untrust("partner") == other.key_id

    made_trusted = store.generate_signing("ci", trust=True)
    assert set(store.trusted()) == {made_trusted.key_id}


def test_trust_refuses_tampered_recipient_and_unidentified_keys(store, tmp_path):
    signer = store.generate_signing("release")
    recipient = store.generate_recipient("alice")
    exported = store.export_public("release")
    with pytest.raises(KeystoreError, match="does not match"):
        store.trust({**exported, "key_id": "0" * 64})
    forged = {**exported, "ed25519": b64(Signer.generate().public.ed25519)}  # key_id left as it was
    with pytest.raises(KeystoreError, match="does not match"):
        store.trust(forged)
    with pytest.raises(KeystoreError, match="only signing public keys"):
        store.trust(store.export_public("alice"))
    with pytest.raises(KeystoreError, match="key_id"):
        store.trust({k: v for k, v in exported.items() if k != "key_id"})
    bad = tmp_path / "bad.json"
    bad.write_text("not json")
    with pytest.raises(KeystoreError, match="not JSON"):
        store.trust(bad)
    with pytest.raises(KeystoreError, match="cannot read"):
        store.trust(tmp_path / "missing.json")
    assert store.trusted() == {} and recipient.key_id not in store.trusted()
    assert signer.key_id not in store.trusted()


def test_a_trust_store_file_others_can_write_or_that_lies_about_its_key_is_refused(store):
    signer = store.generate_signing("release", trust=True)
    path = store.root / "trusted" / f"{signer.key_id}.json"
    path.chmod(0o666)
    with pytest.raises(KeystoreError, match="group or others can write"):
        store.trusted()
    path.chmod(0o644)
    path.rename(store.root / "trusted" / f"{'1' * 64}.json")
    with pytest.raises(KeystoreError, match="not the key its file name says"):
        store.trusted()


def test_references_by_id_prefix_and_name_and_their_errors(store):
    first = store.generate_signing("release")
    assert store.signer(first.key_id).key_id == first.key_id
    assert store.signer(first.key_id.upper()).key_id == first.key_id
    assert store.signer(first.key_id[:8]).key_id == first.key_id
    assert store.signer("release").key_id == first.key_id

    with pytest.raises(UnknownKeyError, match="at least 8 hex digits"):
        store.signer(first.key_id[:7])
    existing = r"no signing key 'nope'.*release \(" + first.key_id[:16]
    with pytest.raises(UnknownKeyError, match=existing) as err:
        store.signer("nope")
    assert isinstance(err.value, LookupError) and isinstance(err.value, KeystoreError)
    with pytest.raises(UnknownKeyError, match="there are none"):
        store.recipient("release")

    # a name that is also another key's id prefix: the reference is ambiguous, not a guess
    second = store.generate_signing(first.key_id[:8])
    with pytest.raises(UnknownKeyError, match="ambiguous") as err:
        store.signer(first.key_id[:8])
    assert first.key_id[:16] in str(err.value) and second.key_id[:16] in str(err.value)
    assert store.signer(first.key_id[:9]).key_id == first.key_id  # more of the id settles it
    assert store.signer(second.key_id).key_id == second.key_id  # a full id always wins

    # the same name for a signing and a recipient key: export needs the kind
    store.generate_recipient("release")
    with pytest.raises(UnknownKeyError, match="ambiguous"):
        store.export_public("release")
    assert store.export_public("release", kind="recipient")["kind"] == "recipient"
    assert store.export_public("release", kind="signing")["key_id"] == first.key_id


def test_names_are_unique_per_kind_and_well_formed(store):
    store.generate_signing("release")
    with pytest.raises(KeystoreError, match="named 'release' already"):
        store.generate_signing("release")
    store.generate_recipient("release")  # another kind: allowed
    for bad in ("", "a/b", "../x", ".hidden", "x" * 65, "sp ace"):
        with pytest.raises(KeystoreError, match="key name"):
            store.generate_signing(bad)
    assert len(store.list()) == 2


def test_default_root_follows_the_environment(monkeypatch, tmp_path):
    monkeypatch.setenv("TENSAFE_KEYSTORE", str(tmp_path / "env-ks"))
    assert default_root() == tmp_path / "env-ks"
    monkeypatch.delenv("TENSAFE_KEYSTORE")
    monkeypatch.setenv("HOME", str(tmp_path))
    assert default_root() == tmp_path / ".tensafe" / "keys"


# --- the CLI through the real entrypoint ---------------------------------------------------------


def _keys(*args: str, keystore: Path, stdin: str | None = None) -> subprocess.CompletedProcess:
    env = {**os.environ, "TENSAFE_KEYSTORE": str(keystore.parent / "not-used")}
    return run_tensafe("keys", "--keystore", str(keystore), *args, input=stdin, timeout=60, env=env)


def test_cli_generate_list_export_trust_untrust(tmp_path):
    ks = tmp_path / "ks"
    made = _keys("generate", "signing", "--name", "release", keystore=ks)
    assert made.returncode == 0, made.stderr
    assert "release" in made.stdout and len(made.stdout.strip().splitlines()) == 1
    assert _keys("generate", "recipient", "--name", "alice", keystore=ks).returncode == 0

    listed = _keys("list", "--json", keystore=ks)
    assert listed.returncode == 0, listed.stderr
    infos = {i["name"]: i for i in json.loads(listed.stdout)}
    assert set(infos) == {"release", "alice"} and not infos["release"]["trusted"]
    key_id = infos["release"]["key_id"]
    assert key_id in made.stdout
    store = Keystore(ks)
    assert store.signer(key_id).key_id == key_id
    human = _keys("list", keystore=ks)
    assert human.returncode == 0 and key_id[:16] in human.stdout and "alice" in human.stdout

    out = tmp_path / "release.pub.json"
    exported = _keys("export", "release", "--out", str(out), keystore=ks)
    assert exported.returncode == 0, exported.stderr
    assert key_id in exported.stdout
    assert json.loads(out.read_text()) == store.export_public("release")
    to_stdout = _keys("export", infos["alice"]["key_id"][:10], keystore=ks)
    assert to_stdout.returncode == 0 and json.loads(to_stdout.stdout)["kind"] == "recipient"
    assert "private" not in to_stdout.stdout and "seed" not in to_stdout.stdout

    trusted = _keys("trust", str(out), keystore=ks)
    assert trusted.returncode == 0, trusted.stderr
    assert key_id in trusted.stdout and "release" in trusted.stdout
    assert json.loads(_keys("list", "--json", keystore=ks).stdout)[0]["trusted"] is True
    assert set(store.trusted()) == {key_id}

    untrusted = _keys("untrust", key_id[:8], keystore=ks)
    assert untrusted.returncode == 0 and key_id in untrusted.stdout
    assert store.trusted() == {}
    piped = _keys("trust", "-", keystore=ks, stdin=out.read_text())
    assert piped.returncode == 0 and set(store.trusted()) == {key_id}

    # --keystore is accepted after the subcommand as well
    after = run_tensafe("keys", "list", "--keystore", str(ks), timeout=60)
    assert after.returncode == 0 and key_id[:16] in after.stdout
    assert not (tmp_path / "not-used").exists()


@pytest.mark.parametrize("args", [
    ["export", "nope"],
    ["untrust", "nope"],
    ["generate", "signing"],
    ["generate", "other", "--name", "x"],
    ["trust", "missing.json"],
    [],
])
def test_cli_errors_are_one_line_with_status_2(tmp_path, args):
    done = _keys(*args, keystore=tmp_path / "ks")
    assert done.returncode == 2, (done.stdout, done.stderr)
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("tensafe: "), done.stderr
    assert "Traceback" not in done.stderr


@pytest.mark.parametrize("args", [[], ["generate"], ["list"], ["export"], ["trust"], ["untrust"]])
def test_cli_help(args, tmp_path):
    done = run_tensafe("keys", *args, "--help", timeout=60)
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith(f"usage: tensafe keys {' '.join(args)}".rstrip())


def _plant_rogue(store: Keystore, name: str) -> Path:
    """What another local user does to a writable trust store: a 0644 entry for their own key."""
    rogue = Signer.generate()
    record = {"format": "tensafe-trusted-key-v1", "name": name, "added": "2026-01-01T00:00:00Z",
              "public": rogue.public.to_json()}
    path = store.root / "trusted" / f"{rogue.key_id}.json"
    path.write_text(json.dumps(record))
    path.chmod(0o644)
    return path


def test_a_group_writable_trust_folder_is_refused_before_a_planted_key_is_trusted(store):
    store.generate_signing("release", trust=True)
    (store.root / "trusted").chmod(0o770)
    _plant_rogue(store, "release-2")
    with pytest.raises(KeystoreError, match="group or others can write it"):
        store.trusted()
    (store.root / "trusted").chmod(0o700)
    store.root.chmod(0o777)
    with pytest.raises(KeystoreError, match="chmod 700"):
        store.trusted()


def test_symlinked_keystore_folders_are_refused(store, tmp_path):
    store.generate_signing("release", trust=True)
    elsewhere = tmp_path / "elsewhere"
    (store.root / "trusted").rename(elsewhere)
    (store.root / "trusted").symlink_to(elsewhere)
    with pytest.raises(KeystoreError, match="symbolic link"):
        store.trusted()
    linked = Keystore(tmp_path / "linked-root")
    linked.root.symlink_to(store.root)
    with pytest.raises(KeystoreError, match="symbolic link"):
        linked.list()


@pytest.mark.skipif(os.geteuid() != 0, reason="changing a file's owner needs root")
def test_key_files_and_folders_of_another_user_are_refused(store):
    store.generate_signing("release", trust=True)
    planted = _plant_rogue(store, "partner")
    os.chown(planted, 65534, 65534)
    with pytest.raises(KeystoreError, match="belongs to user id 65534"):
        store.trusted()
    planted.unlink()
    os.chown(store.root / "trusted", 65534, 65534)
    with pytest.raises(KeystoreError, match="belongs to user id 65534"):
        store.trusted()


def test_one_name_means_one_key(store):
    store.generate_signing("release", trust=True)
    other = Signer.generate()
    with pytest.raises(KeystoreError, match="named 'release' exists already"):
        store.trust({**other.public.to_json(), "name": "release"})
    assert store.trust({**other.public.to_json(), "name": "release"}, name="partner") == other.key_id
    _plant_rogue(store, "release")  # a second "release" written behind the keystore's back
    with pytest.raises(KeystoreError, match="two keys named 'release'"):
        store.trusted()


def test_api_key_prints_a_fresh_tml_key_and_the_digest_a_config_stores(tmp_path):
    import hashlib

    shown = [run_tensafe("keys", "--keystore", str(tmp_path), "api-key") for _ in range(2)]
    keys = []
    for done in shown:
        assert done.returncode == 0, done.stderr
        lines = dict(line.split(":", 1) for line in done.stdout.strip().splitlines())
        key, digest = lines["api key"].strip(), lines["sha256"].strip()
        assert key.startswith("tml-") and len(key) > 40
        assert digest == hashlib.sha256(key.encode()).hexdigest()
        keys.append(key)
    assert keys[0] != keys[1]
    assert not any(tmp_path.iterdir())  # the key is kept nowhere
