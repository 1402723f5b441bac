"""Forgeries of a real bundle (made by the CLI), each refused by `verify` / `custody verify` with exit 5, naming
what broke: signatures stripped, replaced and re-made; every detached-manifest field edited; the custody chain
rewritten, reordered, truncated, extended and transplanted; a schema-1 bundle under its own (older) rules."""
from __future__ import annotations

import hashlib
import io
import json
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path
from typing import Any, Dict, List

import pytest

ROOT = Path(__file__).resolve().parent.parent
AGE = "/usr/bin/age"
NAMESPACE = "bookgen-kit"


def kit(*args, timeout=300):
    environment = {"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "PYTHONPATH": str(ROOT), "HOME": "/nonexistent"}
    return subprocess.run([sys.executable, "-m", "toolkit", *args], capture_output=True, text=True,
                          env=environment, timeout=timeout, stdin=subprocess.DEVNULL)


def ssh_key(directory: Path, name: str) -> Path:
    key = directory / name
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", name, "-f", str(key)], check=True)
    return key


def public(key: Path) -> str:
    return key.with_suffix(".pub").read_text().strip()


def ssh_sign(key: Path, data: bytes) -> str:
    """A signature made by OpenSSH itself, as an attacker with their own key would."""
    return subprocess.run(["ssh-keygen", "-q", "-Y", "sign", "-f", str(key), "-n", NAMESPACE], input=data,
                          capture_output=True, check=True).stdout.decode()


class Bundle:
    def __init__(self, payload: Path) -> None:
        self.payload = payload
        self.manifest = Path(str(payload) + ".manifest.json")
        self.sig = Path(str(self.manifest) + ".sig")
        self.custody = Path(str(payload) + ".custody.jsonl")
        self.sums = payload.parent / "SHA256SUMS"

    def doc(self) -> Dict[str, Any]:
        return json.loads(self.manifest.read_text())

    def write_doc(self, doc: Dict[str, Any]) -> None:
        self.manifest.write_bytes(json.dumps(doc, indent=2, sort_keys=True).encode() + b"\n")

    def rewrite_sums(self) -> None:
        """What an attacker does after editing: SHA256SUMS made to match again."""
        self.sums.write_text("".join("%s  %s\n" % (hashlib.sha256(p.read_bytes()).hexdigest(), p.name)
                                     for p in sorted((self.payload, self.manifest))))

    def entries(self) -> List[Dict[str, Any]]:
        return [json.loads(line) for line in self.custody.read_bytes().splitlines()]

    def lines(self) -> List[bytes]:
        return self.custody.read_bytes().splitlines()

    def write_lines(self, lines: List[bytes]) -> None:
        self.custody.write_bytes(b"".join(line + b"\n" for line in lines))

    def sha(self, path: Path) -> str:
        return hashlib.sha256(path.read_bytes()).hexdigest()


def canonical(entry: Dict[str, Any]) -> bytes:
    return json.dumps(entry, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()


def rechain(bundle: Bundle, entries: List[Dict[str, Any]], strip: bool = True, zero_genesis: bool = False) -> None:
    """The attacker's rewrite: seq, prev_sha256 (from the genesis of the files as they are now) and the hashes each
    entry saw recomputed; signatures stripped unless told."""
    from toolkit.evidence.custody import genesis

    payload, manifest = bundle.sha(bundle.payload), bundle.sha(bundle.manifest)
    previous = "0" * 64 if zero_genesis else genesis(payload, manifest)
    lines = []
    for index, entry in enumerate(entries):
        entry = dict(entry, seq=index + 1, prev_sha256=previous, payload_sha256=payload, manifest_sha256=manifest)
        if strip:
            entry.pop("signature", None)
            entry.pop("signer", None)
        line = canonical(entry)
        lines.append(line)
        previous = hashlib.sha256(line).hexdigest()
    bundle.write_lines(lines)


def verify(bundle: Bundle, *args):
    done = kit("--json", "verify", *args, str(bundle.payload))
    assert "Traceback" not in done.stderr, done.stderr
    document = json.loads(done.stdout) if done.stdout.strip() else {}
    return done.returncode, document, done


def failed(document) -> Dict[str, str]:
    return {c["name"]: c["detail"] for c in document.get("checks", []) if not c["ok"]}


def custody_verify(bundle: Bundle, *args):
    done = kit("--json", "custody", "verify", *args, str(bundle.payload))
    assert "Traceback" not in done.stderr, done.stderr
    return done.returncode, json.loads(done.stdout) if done.stdout.strip() else {}, done


def problems(document) -> Dict[str, str]:
    found: Dict[str, str] = {}
    for problem in document.get("problems", []):
        found[problem["name"]] = found.get(problem["name"], "") + problem["detail"] + " | "
    return found


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """One honest bundle (signed by alice, custody received by bob, signed), the team key, allowed signers."""
    base = tmp_path_factory.mktemp("forgery")
    tree = base / "tree"
    (tree / "etc").mkdir(parents=True)
    (tree / "etc" / "hostname").write_text("breached\n")
    (tree / "etc" / "app.conf").write_text("SECRET=hunter2\n")
    (tree / "etc" / "motd-link").symlink_to("/etc/motd")
    team = base / "team.key"
    subprocess.run(["age-keygen", "-o", str(team)], check=True, capture_output=True)
    recipient = subprocess.run(["age-keygen", "-y", str(team)], capture_output=True, text=True,
                               check=True).stdout.strip()
    alice, bob, mallory = ssh_key(base, "alice"), ssh_key(base, "bob"), ssh_key(base, "mallory")
    allowed = base / "allowed_signers"
    allowed.write_text("alice %s\nbob %s\n" % (public(alice), public(bob)))

    def capture(out: Path, case: str) -> Bundle:
        done = kit("--json", "capture", "--out", str(out), "-r", recipient, "--root", str(tree), "--only", "system",
                   "--only", "include", "--include", "/etc", "--allow-same-disk", "--case", case, "--examiner",
                   "alice", "--sign-key", str(alice))
        assert done.returncode == 0, done.stdout + done.stderr
        return Bundle(Path(json.loads(done.stdout)["payload"]))

    master = capture(base / "master", "X")
    added = kit("custody", "add", str(master.payload), "--action", "received", "--actor", "bob", "--location",
                "lab", "--sign-key", str(bob))
    assert added.returncode == 0, added.stderr
    other = capture(base / "other", "Y")
    return {"base": base, "team": team, "recipient": recipient, "alice": alice, "bob": bob, "mallory": mallory,
            "allowed": allowed, "master": master, "other": other}


@pytest.fixture
def bundle(world, tmp_path) -> Bundle:
    copy = tmp_path / "bundle"
    shutil.copytree(world["master"].payload.parent, copy)
    return Bundle(copy / world["master"].payload.name)


def full(world):
    return ["-i", str(world["team"]), "--allowed-signers", str(world["allowed"])]


# --------------------------------------------------------------------------- the honest bundle
def test_the_honest_bundle_passes_everything(world, bundle):
    doc = bundle.doc()
    assert doc["schema"] == "bookgen-kit/evidence-manifest/3" and "artifacts" not in doc
    assert isinstance(doc["artifacts_count"], int) and doc["inner_manifest_sha256"]
    head = json.loads(kit("--json", "custody", "show", str(bundle.payload)).stdout)["head"]
    assert head == hashlib.sha256(bundle.lines()[-1]).hexdigest()
    rc, report, done = verify(bundle, *full(world), "--custody-head", head)
    assert rc == 0, done.stdout + done.stderr
    assert not failed(report) and report["content_checked"] and report["authorship_checked"]
    assert report["notes"] == []
    names = {c["name"] for c in report["checks"]}
    assert {"manifests agree", "members", "payload shape", "custody", "signature"} <= names
    rc, chain, _ = custody_verify(bundle, "--allowed-signers", str(world["allowed"]), "--head", head)
    assert rc == 0 and chain["entries"] == 2 and chain["signed_entries"] == 2
    # OpenSSH agrees about the manifest's signature
    judge = subprocess.run(["ssh-keygen", "-Y", "verify", "-f", str(world["allowed"]), "-I", "alice", "-n", NAMESPACE,
                            "-s", str(bundle.sig)], stdin=bundle.manifest.open("rb"), capture_output=True)
    assert judge.returncode == 0, judge.stderr


def test_without_key_or_signature_verify_says_nothing_is_proven(world, bundle):
    bundle.sig.unlink()
    rc, report, _ = verify(bundle)
    assert rc == 0 and not report["content_checked"] and not report["authorship_checked"]
    assert "authorship and content are UNPROVEN" in report["notes"][0]
    plain = kit("verify", str(bundle.payload))
    assert plain.returncode == 0 and "UNPROVEN" in plain.stdout


def test_no_collected_file_hash_travels_unencrypted(world, bundle):
    text = bundle.manifest.read_text()
    for name in ("hostname", "app.conf"):
        digest = hashlib.sha256((world["base"] / "tree" / "etc" / name).read_bytes()).hexdigest()
        assert digest not in text and digest not in bundle.custody.read_text()


# --------------------------------------------------------------------------- signatures
def test_stripped_signature_and_edited_manifest_fail_with_allowed_signers(world, bundle):
    doc = bundle.doc()
    doc["case"]["examiner"] = "mallory"
    bundle.write_doc(doc)
    bundle.rewrite_sums()
    bundle.sig.unlink()
    rc, report, done = verify(bundle, "--allowed-signers", str(world["allowed"]))
    assert rc == 5, done.stdout
    broken = failed(report)
    assert "requires the manifest to be signed" in broken["signature"]
    assert "custody genesis" in broken  # the chain is anchored in the manifest as it was
    rc, report, _ = verify(bundle, *full(world))
    assert rc == 5 and "case.examiner" in failed(report)["manifest field case"]
    assert "failed" in kit("verify", "--allowed-signers", str(world["allowed"]), str(bundle.payload)).stderr


def test_signature_by_a_key_not_allowed(world, bundle):
    bundle.sig.write_text(ssh_sign(world["mallory"], bundle.manifest.read_bytes()))
    rc, report, _ = verify(bundle, *full(world))
    assert rc == 5 and "does not allow" in failed(report)["signature"]
    rc, report, _ = verify(bundle)  # without allowed signers it holds, but says authorship is unproven
    assert rc == 0 and any("authorship UNPROVEN" in note for note in report["notes"])


@pytest.mark.parametrize("options", ['namespaces="git"', 'valid-before="20200101Z"', 'valid-after="29990101Z"'])
def test_allowed_signers_options_are_honoured(world, bundle, tmp_path, options):
    restricted = tmp_path / "allowed_restricted"
    restricted.write_text("alice %s %s\nbob %s\n" % (options, public(world["alice"]), public(world["bob"])))
    rc, report, _ = verify(bundle, "--allowed-signers", str(restricted))
    assert rc == 5 and "does not allow" in failed(report)["signature"]
    assert "custody entry 1" in failed(report)  # alice's custody entry: the same key, the same restriction


def test_resigned_by_the_attacker_after_editing(world, bundle):
    doc = bundle.doc()
    doc["host"]["hostname"] = "innocent"
    bundle.write_doc(doc)
    bundle.sig.write_text(ssh_sign(world["mallory"], bundle.manifest.read_bytes()))
    bundle.rewrite_sums()
    rechain(bundle, bundle.entries())  # and a custody chain anchored in the edited manifest, unsigned
    rc, report, _ = verify(bundle, *full(world))
    broken = failed(report)
    assert rc == 5 and "does not allow" in broken["signature"]
    assert "not signed" in broken["custody entry 1"] and "not signed" in broken["custody entry 2"]
    assert "host.hostname" in broken["manifest field host"]
    # without allowed signers and without the key, such a complete rewrite is consistent: verify says so plainly
    rc, report, _ = verify(bundle)
    assert rc == 0 and any("authorship UNPROVEN" in n for n in report["notes"]), failed(report)
    assert any("content UNPROVEN" in n for n in report["notes"])
    rc, report, _ = verify(bundle, "-i", str(world["team"]))
    assert rc == 5 and "manifest field host" in failed(report)


def test_a_signature_replaced_by_one_over_other_data(world, bundle):
    bundle.sig.write_text(world["other"].sig.read_text())  # alice's genuine signature, of another manifest
    rc, report, _ = verify(bundle, "--allowed-signers", str(world["allowed"]))
    assert rc == 5 and "does not verify" in failed(report)["signature"]


# --------------------------------------------------------------------------- every detached-manifest field
def _mutate(value):
    if isinstance(value, bool):
        return not value
    if isinstance(value, int):
        return value + 1
    if isinstance(value, str):
        return value[:-1] + ("0" if value[-1:] != "0" else "1") if value else "forged"
    if isinstance(value, list):
        return value + ["forged"]
    if isinstance(value, dict):
        return dict(value, forged=True)
    return "forged"


TOP_LEVEL = ["schema", "tool", "case", "host", "collection", "errors", "encryption", "findings_count",
             "artifacts_count", "inner_manifest_sha256", "payload"]
NESTED = ["case.examiner", "case.case_id", "case.evidence_id", "host.hostname", "collection.started_utc",
          "collection.profile", "tool.version", "encryption.recipients", "payload.file", "payload.size",
          "payload.sha256", "payload.container", "payload.compression", "payload.encrypted", "payload.tar_bytes",
          "payload.members"]


def test_the_field_list_covers_the_manifest(bundle):
    assert sorted(bundle.doc()) == sorted(TOP_LEVEL), "a new manifest field: add it to TOP_LEVEL"
    assert sorted(bundle.doc()["payload"]) == sorted(n.split(".", 1)[1] for n in NESTED if n.startswith("payload."))


def _expected_name(field: str) -> str:
    top, _, sub = field.partition(".")
    if top == "payload":
        return "payload %s" % sub if sub else "payload"
    if top == "inner_manifest_sha256":
        return "inner_manifest_sha256"
    return "manifest field %s" % top


@pytest.mark.parametrize("field", TOP_LEVEL + NESTED)
def test_each_detached_manifest_field_edited_is_named(world, bundle, field):
    doc = bundle.doc()
    parent, key = doc, field
    if "." in field:
        top, key = field.split(".", 1)
        parent = doc[top]
    parent[key] = _mutate(parent[key])
    if field == "payload":
        parent[key] = dict(parent[key], size=parent[key]["size"] + 1)
    bundle.write_doc(doc)
    bundle.rewrite_sums()  # so that only the comparison with the inner manifest (or the payload) can catch it
    bundle.sig.unlink()
    rc, report, done = verify(bundle, "-i", str(world["team"]))
    assert rc == 5, done.stdout
    broken = failed(report)
    expected = _expected_name(field)
    assert any(name == expected or name.startswith(expected + " ") for name in broken), (field, sorted(broken))
    if "." in field and not field.startswith("payload."):
        assert field in broken[expected], broken[expected]
    assert not any(name.startswith("SHA256SUMS") for name in broken)


def test_a_downgrade_to_schema_1_is_refused(world, bundle):
    doc = bundle.doc()
    doc["schema"] = "bookgen-kit/evidence-manifest/1"
    bundle.write_doc(doc)
    bundle.rewrite_sums()
    bundle.sig.unlink()
    rechain(bundle, bundle.entries(), zero_genesis=True)
    rc, report, _ = verify(bundle, "-i", str(world["team"]))
    broken = failed(report)
    assert rc == 5 and "manifest field schema" in broken and "manifest field artifacts" in broken


# --------------------------------------------------------------------------- the custody chain
def test_custody_entry_rewritten_with_the_chain_recomputed(world, bundle):
    head = hashlib.sha256(bundle.lines()[-1]).hexdigest()
    entries = bundle.entries()
    entries[1]["location"] = "somewhere else"
    rechain(bundle, entries)
    rc, chain, _ = custody_verify(bundle)
    assert rc == 0 and any("UNPROVEN" in n for n in chain["notes"])  # consistent, and said to prove no author
    rc, chain, _ = custody_verify(bundle, "--allowed-signers", str(world["allowed"]))
    assert rc == 5 and "not signed" in problems(chain)["custody entry 2"]
    rc, chain, _ = custody_verify(bundle, "--head", head)
    assert rc == 5 and "custody head" in problems(chain)
    rc, report, _ = verify(bundle, "--allowed-signers", str(world["allowed"]))
    assert rc == 5 and "custody entry 1" in failed(report) and "custody entry 2" in failed(report)


def test_custody_entry_edited_under_its_signature(world, bundle):
    lines = bundle.lines()
    lines[1] = lines[1].replace(b'"location":"lab"', b'"location":"bar"')
    bundle.write_lines(lines)
    rc, chain, _ = custody_verify(bundle)
    assert rc == 5 and "does not verify" in problems(chain)["custody entry 2"]


@pytest.mark.parametrize("recompute", [False, True])
def test_custody_reordered(world, bundle, recompute):
    added = kit("custody", "add", str(bundle.payload), "--action", "transferred", "--actor", "alice",
                "--sign-key", str(world["alice"]))
    assert added.returncode == 0, added.stderr
    if recompute:  # seq and prev_sha256 made consistent again, signatures kept: they cover seq and prev_sha256
        entries = bundle.entries()
        rechain(bundle, [entries[0], entries[2], entries[1]], strip=False)
    else:
        lines = bundle.lines()
        bundle.write_lines([lines[0], lines[2], lines[1]])
    rc, chain, done = custody_verify(bundle)
    assert rc == 5, done.stdout
    found = problems(chain)
    assert "custody entry 2" in found and "custody entry 3" in found
    if recompute:
        assert "does not verify" in found["custody entry 2"]
    else:
        assert "sequence number" in found["custody entry 2"] and "chain is broken" in found["custody entry 2"]
    rc, report, _ = verify(bundle)
    assert rc == 5 and "custody entry 2" in failed(report)


def test_custody_truncated_is_caught_by_the_recorded_head(world, bundle):
    added = kit("--json", "custody", "add", str(bundle.payload), "--action", "transferred", "--actor", "alice",
                "--sign-key", str(world["alice"]))
    head = json.loads(added.stdout)["head"]
    assert head == hashlib.sha256(bundle.lines()[-1]).hexdigest()
    assert "chain head: %s" % head in kit("custody", "show", str(bundle.payload)).stdout
    bundle.write_lines(bundle.lines()[:-1])
    rc, chain, _ = custody_verify(bundle, "--allowed-signers", str(world["allowed"]))
    assert rc == 0 and any("truncation not checked" in n for n in chain["notes"])  # why the head must be recorded
    rc, chain, done = custody_verify(bundle, "--head", head.upper())
    assert rc == 5 and "cut short" in problems(chain)["custody head"], done.stdout
    assert "custody head" in done.stderr
    rc, report, _ = verify(bundle, "--custody-head", head)
    assert rc == 5 and "cut short" in failed(report)["custody head"]
    assert kit("custody", "verify", "--head", "abc", str(bundle.payload)).returncode == 2


def test_custody_extended_by_a_forged_entry(world, bundle):
    head = hashlib.sha256(bundle.lines()[-1]).hexdigest()
    forged = {"seq": 3, "prev_sha256": head, "time": "2026-01-01T00:00:00Z", "action": "transferred",
              "actor": "bob", "location": "the attacker's", "purpose": "", "payload_sha256": bundle.sha(bundle.payload),
              "manifest_sha256": bundle.sha(bundle.manifest)}
    bundle.write_lines(bundle.lines() + [canonical(forged)])
    assert custody_verify(bundle)[0] == 0  # a correctly chained unsigned entry: only signatures or the head tell
    rc, chain, _ = custody_verify(bundle, "--allowed-signers", str(world["allowed"]))
    assert rc == 5 and "not signed" in problems(chain)["custody entry 3"]
    rc, chain, _ = custody_verify(bundle, "--head", head)
    assert rc == 5 and "extended" in problems(chain)["custody head"]
    rc, report, _ = verify(bundle, "--allowed-signers", str(world["allowed"]), "--custody-head", head)
    assert rc == 5 and {"custody entry 3", "custody head"} <= set(failed(report))
    # signed by a key the allowed signers do not give to the actor it names
    from toolkit.crypto import sshsig
    from toolkit.crypto.files import load_signing_key

    forged["signature"] = sshsig.sign(load_signing_key(str(world["mallory"]), None), io.BytesIO(canonical(forged)))
    bundle.write_lines(bundle.lines()[:-1] + [canonical(forged)])
    rc, chain, _ = custody_verify(bundle, "--allowed-signers", str(world["allowed"]))
    assert rc == 5 and "do not allow" in problems(chain)["custody entry 3"]


def test_custody_transplanted_from_another_bundle(world, bundle):
    shutil.copy(world["other"].custody, bundle.custody)
    rc, chain, _ = custody_verify(bundle)
    assert rc == 5 and "not anchored in this bundle" in problems(chain)["custody genesis"]
    # the attacker makes the transplanted entry name this bundle's hashes: its genesis still names the other one
    entry = bundle.entries()[0]
    entry.update(payload_sha256=bundle.sha(bundle.payload), manifest_sha256=bundle.sha(bundle.manifest))
    entry.pop("signature")
    entry.pop("signer")
    bundle.write_lines([canonical(entry)])
    rc, chain, _ = custody_verify(bundle)
    assert rc == 5 and list(problems(chain)) == ["custody genesis"]
    rc, report, _ = verify(bundle)
    assert rc == 5 and "custody genesis" in failed(report)


def test_custody_rewritten_from_zeros_on_a_schema_2_bundle(world, bundle):
    rechain(bundle, bundle.entries(), zero_genesis=True)
    rc, chain, _ = custody_verify(bundle)
    assert rc == 5 and "64 zeros" in problems(chain)["custody genesis"]


def test_custody_add_refuses_a_broken_chain_and_a_missing_log(world, bundle):
    lines = bundle.lines()
    bundle.write_lines([lines[1], lines[0]])
    added = kit("custody", "add", str(bundle.payload), "--action", "received", "--actor", "carol")
    assert added.returncode == 5
    bundle.custody.unlink()
    added = kit("custody", "add", str(bundle.payload), "--action", "received", "--actor", "carol")
    assert added.returncode == 3 and "begins at capture" in added.stderr


def test_verify_reports_every_failure_at_once(world, bundle):
    data = bytearray(bundle.payload.read_bytes())
    data[len(data) // 2] ^= 1
    bundle.payload.write_bytes(bytes(data))
    bundle.sig.unlink()
    bundle.write_lines(bundle.lines()[:1])
    doc = bundle.doc()
    doc["case"]["purpose"] = "forged"
    bundle.write_doc(doc)
    rc, report, done = verify(bundle, "--allowed-signers", str(world["allowed"]), "-i", str(world["team"]))
    broken = failed(report)
    assert rc == 5
    for name in ("payload sha256", "signature", "custody genesis", "custody entry 1", "members"):
        assert name in broken, (name, sorted(broken))
    assert any(name.startswith("SHA256SUMS") for name in broken)
    count = len([c for c in report["checks"] if not c["ok"]])
    assert count > len(broken) and "%d checks failed" % count in done.stderr  # custody entry 1: two problems


# --------------------------------------------------------------------------- schema 1 (the older, weaker rules)
def test_custody_zero_genesis_only_for_schema_1(world, tmp_path):
    from toolkit.evidence import custody

    log = tmp_path / "old.custody.jsonl"
    payload, manifest = "a" * 64, "b" * 64
    entry = custody.make_entry(custody.LEGACY_GENESIS, 1, "collected", "alice", "host", "", payload, manifest)
    log.write_bytes(custody.canonical(entry) + b"\n")
    old = custody.check_chain(str(log), payload, manifest, custody.SCHEMA_1)
    assert old.ok and old.legacy and any("older, weaker" in n for n in old.notes)
    new = custody.check_chain(str(log), payload, manifest, custody.SCHEMA_2)
    assert [p.name for p in new.problems] == ["custody genesis"]
    with pytest.raises(custody.VerificationFailed):
        custody.verify_chain(str(log), payload, manifest_sha256=manifest, schema=custody.SCHEMA_2)
    fresh = tmp_path / "new.custody.jsonl"
    first = custody.append(str(fresh), {"action": "collected", "actor": "alice", "location": "h", "purpose": "",
                                        "payload_sha256": payload, "manifest_sha256": manifest})
    assert first["prev_sha256"] == hashlib.sha256(b"bookgen-kit custody genesis v2\n" + payload.encode() + b"\n" +
                                                  manifest.encode() + b"\n").hexdigest()
    assert custody.check_chain(str(fresh), payload, manifest, custody.SCHEMA_2).ok
    assert not custody.check_chain(str(fresh), payload, manifest, custody.SCHEMA_1).ok


def _schema_1_bundle(world, directory: Path) -> Bundle:
    """A bundle as the kit wrote them before schema 2: the detached manifest is the inner one plus the payload
    record and the inner manifest's sha256; the custody chain starts from zeros."""
    import zstandard

    from toolkit.crypto.files import load_signing_key
    from toolkit.evidence import custody

    source = world["master"]
    plain = subprocess.run([AGE, "-d", "-i", str(world["team"]), str(source.payload)], capture_output=True,
                           check=True).stdout
    tar_in = tarfile.open(fileobj=io.BytesIO(zstandard.ZstdDecompressor().decompressobj().decompress(plain)))
    raw = io.BytesIO()
    members = 0
    with tarfile.open(fileobj=raw, mode="w", format=tarfile.PAX_FORMAT) as tar_out:
        for member in tar_in:
            data = tar_in.extractfile(member).read() if member.isreg() else None
            if member.name == "manifest.json":
                inner_doc = json.loads(data)
                inner_doc["schema"] = "bookgen-kit/evidence-manifest/1"
                data = json.dumps(inner_doc, indent=2, sort_keys=True).encode()
                member.size = len(data)
            tar_out.addfile(member, io.BytesIO(data) if data is not None else None)
            members += 1
    directory.mkdir()
    payload = directory / source.payload.name
    compressed = zstandard.ZstdCompressor().compress(raw.getvalue())
    subprocess.run([AGE, "-r", world["recipient"], "-o", str(payload)], input=compressed, check=True)
    old = Bundle(payload)
    detached = dict(inner_doc, inner_manifest_sha256=hashlib.sha256(data).hexdigest(),
                    payload=dict(source.doc()["payload"], size=payload.stat().st_size,
                                 sha256=old.sha(payload), tar_bytes=len(raw.getvalue()), members=members))
    old.write_doc(detached)
    old.sig.write_text(ssh_sign(world["alice"], old.manifest.read_bytes()))
    entry = custody.make_entry(custody.LEGACY_GENESIS, 1, "collected", "alice", "host", "", old.sha(payload),
                               old.sha(old.manifest), signer=load_signing_key(str(world["alice"]), None))
    old.write_lines([custody.canonical(entry)])
    old.rewrite_sums()
    return old


def test_a_schema_1_bundle_verifies_by_its_own_rules_and_says_so(world, tmp_path):
    old = _schema_1_bundle(world, tmp_path / "old")
    rc, report, done = verify(old, *full(world))
    assert rc == 0, done.stdout
    assert report["schema"] == "bookgen-kit/evidence-manifest/1"
    assert any("older and weaker" in note for note in report["notes"])
    assert "OLDER, WEAKER" in {c["name"]: c["detail"] for c in report["checks"]}["schema"]
    rc, chain, _ = custody_verify(old, "--allowed-signers", str(world["allowed"]))
    assert rc == 0 and any("schema-1" in n for n in chain["notes"])
    # its per-file entries are still checked against the inside
    doc = old.doc()
    doc["artifacts"][0]["size"] += 1
    old.write_doc(doc)
    old.rewrite_sums()
    rc, report, _ = verify(old, "-i", str(world["team"]))
    assert rc == 5 and "manifest field artifacts" in failed(report)
