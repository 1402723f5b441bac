"""`rotate`: create -> set -> test -> finish, journaled on local disk so that any interrupted run can be
resumed or rolled back. At every moment either the .env or the .env.pending matches what each service accepts.

State on disk (secrets only in the two .env files, both 0600):
  <app>/.env.pending                         the .env with the new values
  <app>/.bookgen-kit/rotation/<id>.json       states and fingerprints (0700 directory)
  <app>/.env.previous-<UTC>                  the old .env, kept after finish
All of it is state, written and read through toolkit.host.atomic's state functions: a symlink, a hard link or a
directory that others can write anywhere on the way is refused (exit 4) before anything is changed.
"""
from __future__ import annotations

import json
import dataclasses
import os
import signal
import socket
import uuid
from dataclasses import dataclass
from typing import Any, Dict, List, Optional

from toolkit import utc
from toolkit.errors import BadInputError, EnvironmentProblem, UsageError, VerificationFailed
from toolkit.host.atomic import check_state_path, chmod_state, read_state, state_dir, write_state
from toolkit.host.hashing import fingerprint
from toolkit.host.hostfs import read_host_file
from toolkit.secrets import dotenv
from toolkit.secrets.rotators import ROTATORS, provider_keys

STATES = ("created", "set", "tested", "finished", "rolled_back")


@dataclass
class RotationOptions:
    env_file: str
    app_dir: str
    only: List[str]
    db_container: Optional[str] = None
    admin_dsn: Optional[str] = None
    compose_project: str = "bookgen"


def _fault(point: str) -> None:
    """Fault injection for the tests' SIGKILL between steps (BOOKGEN_KIT_FAULT=after:<point>)."""
    if os.environ.get("BOOKGEN_KIT_FAULT") == "after:" + point:
        os.kill(os.getpid(), signal.SIGKILL)




class Journal:
    def __init__(self, app_dir: str) -> None:
        self.base = os.path.join(app_dir, ".bookgen-kit")
        self.directory = os.path.join(self.base, "rotation")

    def path(self, run_id: str) -> str:
        return os.path.join(self.directory, run_id + ".json")

    def prepare(self) -> None:
        """The journal's directories, made (0700) or checked, and kept 0700 (fchmod, never chmod by path)."""
        state_dir(os.path.dirname(self.base))  # the app directory, checked before anything is made in it
        for directory in (self.base, self.directory):
            state_dir(directory, create=True)
            chmod_state(directory, 0o700)

    def save(self, document: Dict[str, Any]) -> None:
        self.prepare()
        write_state(self.path(document["id"]),
                    (json.dumps(document, indent=2, sort_keys=True) + "\n").encode("utf-8"), 0o600)

    def runs(self) -> List[Dict[str, Any]]:
        if not os.path.lexists(self.directory):
            return []
        state_dir(self.base)  # the runs decide what resume and rollback do: a planted journal is refused
        state_dir(self.directory)
        documents = []
        for name in sorted(os.listdir(self.directory)):
            if name.endswith(".json"):
                path = os.path.join(self.directory, name)
                try:
                    documents.append(json.loads((read_state(path, strict=True) or b"").decode("utf-8")))
                except ValueError:
                    raise BadInputError("%s is not a rotation journal (not JSON)" % path) from None
        return sorted(documents, key=lambda d: d["created"])

    def open_run(self) -> Optional[Dict[str, Any]]:
        unfinished = [d for d in self.runs() if d["state"] not in ("finished", "rolled_back")]
        return unfinished[-1] if unfinished else None


def _rotators(env: Dict[str, str], options: RotationOptions):
    chosen = [cls(env, options) for cls in ROTATORS]
    chosen = [r for r in chosen if r.applies()]
    if options.only:
        unknown = set(options.only) - {r.name for r in chosen}
        if unknown:
            raise UsageError("nothing to rotate called %s (known here: %s)" % (", ".join(sorted(unknown)),
                                                                              ", ".join(r.name for r in chosen)))
        chosen = [r for r in chosen if r.name in options.only]
    return chosen


def plan(options: RotationOptions) -> Dict[str, Any]:
    env = dotenv.read(options.env_file)  # an unparseable line stops everything here (exit 3)
    values = env.values()
    rotators = _rotators(values, options)
    return {
        "env_file": options.env_file,
        "rotate": [dict(r.describe(), current_fingerprint=fingerprint(r.current() or "")) for r in rotators],
        "revoke_at_provider": [{"name": k, "fingerprint": fingerprint(values[k])} for k in provider_keys(values)],
        "note": "nothing offline can rotate the keys listed under revoke_at_provider: revoke and reissue them "
                "at their provider, then set them in the .env",
        "open_run": (Journal(options.app_dir).open_run() or {}).get("id"),
    }


def outcome_notes(options: RotationOptions) -> Dict[str, Any]:
    """What a rotation outcome must also say, so that nothing is taken for done: every secret this .env has a
    rotator for (`rotatable`; a run with --only covers some), and the keys no rotation here can change (only
    their provider can revoke them), with fingerprints."""
    values = dotenv.read(options.env_file).values()
    return {"rotatable": sorted(r.name for r in _rotators(values, dataclasses.replace(options, only=[]))),
            "revoke_at_provider": [{"name": k, "fingerprint": fingerprint(values[k])} for k in provider_keys(values)],
            "provider_note": "nothing offline can rotate these: revoke and reissue them at their provider, set them "
                             "in the .env, then `bookgen-kit case check \"Change all credentials\"`"}


def _pending_path(options: RotationOptions) -> str:
    return options.env_file + ".pending"


def _env_owner(options: RotationOptions):
    """The .env's owner, given to its copies (.env.pending, .env.previous-*) as the copies always had it."""
    info = os.stat(options.env_file)
    return (info.st_uid, info.st_gid) if os.geteuid() == 0 else None


def _read_pending(options: RotationOptions) -> dotenv.DotEnv:
    """The new values, read as state: they are what gets set on the services."""
    path = _pending_path(options)
    data = read_state(path, limit=1 << 20, strict=True)
    if data is None:
        raise EnvironmentProblem("%s is missing: the new values of this run are gone" % path,
                                 hint="`rotate rollback` restores the old values on the services")
    try:
        return dotenv.parse(data.decode("utf-8"), path)
    except UnicodeDecodeError:
        raise dotenv.DotEnvError("%s is not UTF-8 text" % path) from None


def run(options: RotationOptions) -> Dict[str, Any]:
    journal = Journal(options.app_dir)
    if journal.open_run():
        raise UsageError("an interrupted rotation (%s) is open" % journal.open_run()["id"],
                         hint="`rotate resume` or `rotate rollback` first")
    env = dotenv.read(options.env_file)
    values = env.values()
    rotators = _rotators(values, options)
    if not rotators:
        raise UsageError("nothing to rotate in %s" % options.env_file)
    # every refusal before the first write: each service can be found, every state location is usable
    for rotator in rotators:
        if hasattr(rotator, "endpoint"):
            rotator.endpoint()
    journal.prepare()
    check_state_path(_pending_path(options))
    # 1. create: new values into .env.pending (0600), states and fingerprints into the journal
    new_values = {r.name: r.generate() for r in rotators}
    changes: Dict[str, str] = {}
    for rotator in rotators:
        changes.update(rotator.changes(new_values[rotator.name]))
    pending_text = dotenv.with_values(env, changes)
    write_state(_pending_path(options), pending_text.encode("utf-8"), 0o600, owner=_env_owner(options))
    document = {"id": utc.stamp() + "-" + uuid.uuid4().hex[:6],
                "created": utc.iso(), "host": socket.gethostname(), "env_file": options.env_file, "state": "created",
                "db_container": options.db_container, "secrets": {}, "events": []}
    for rotator in rotators:
        document["secrets"][rotator.name] = {
            "state": "created", "keys": sorted(rotator.changes("x")), "service": rotator.service,
            "old_fingerprint": fingerprint(rotator.current() or ""), "new_fingerprint": fingerprint(
                new_values[rotator.name]), "method": None, "warning": rotator.warning}
    document["events"].append({"time": utc.iso(), "event": "created"})
    journal.save(document)
    _fault("create")
    return _continue(document, options, journal)


def _load_values(options: RotationOptions):
    old = dotenv.read(options.env_file).values()
    new = _read_pending(options).values()
    return old, new


def _continue(document: Dict[str, Any], options: RotationOptions, journal: Journal) -> Dict[str, Any]:
    options.db_container = options.db_container or document.get("db_container")
    old_env, new_env = _load_values(options)
    rotators = {r.name: r for r in _rotators(old_env, RotationOptions(**dict(options.__dict__, only=list(
        document["secrets"]))))}
    # 2. set, each idempotent: a value that already works is not set again
    for name, entry in document["secrets"].items():
        if entry["state"] != "created":
            continue
        rotator = rotators[name]
        new = type(rotator)(new_env, options).current()
        if rotator.works(new):
            entry["method"] = "already in effect"
        else:
            entry["method"] = rotator.set(rotator.current(), new)
        entry["state"] = "set"
        document["events"].append({"time": utc.iso(), "event": "set %s" % name})
        journal.save(document)
        _fault("set:" + name)
    # 3. test with fresh connections: the new works (and, where a service checks it, the old does not)
    for name, entry in document["secrets"].items():
        if entry["state"] != "set":
            continue
        rotator = rotators[name]
        new = type(rotator)(new_env, options).current()
        if not rotator.works(new):
            raise VerificationFailed("%s: the new value does not work on %s" % (name, rotator.service),
                                     hint="`rotate rollback` restores the old value")
        old = rotator.current()
        if name != "SECRET_KEY" and old and old != new and rotator.works(old):
            raise VerificationFailed("%s: the old value still works on %s" % (name, rotator.service))
        entry["state"] = "tested"
        document["events"].append({"time": utc.iso(), "event": "tested %s" % name})
        journal.save(document)
        _fault("test:" + name)
    # 4. finish: the .env becomes the pending one, atomically; the previous is kept
    previous = "%s.previous-%s" % (options.env_file, utc.stamp())
    old_bytes = read_host_file(options.env_file, dotenv.ENV_READ_LIMIT)  # never a FIFO or device
    write_state(previous, old_bytes, 0o600, owner=_env_owner(options))
    new_text = _read_pending(options).text  # strict: the .env's directory is checked again before it changes
    dotenv.write_atomically(options.env_file, new_text)
    _fault("finish-env")
    os.unlink(_pending_path(options))
    for entry in document["secrets"].values():
        entry["state"] = "finished"
    document["state"] = "finished"
    document["previous_env"] = previous
    document["events"].append({"time": utc.iso(), "event": "finished"})
    journal.save(document)
    return document


def resume(options: RotationOptions) -> Dict[str, Any]:
    journal = Journal(options.app_dir)
    document = journal.open_run()
    if document is None:
        raise UsageError("no interrupted rotation to resume")
    if not os.path.lexists(_pending_path(options)):
        # killed between writing the new .env and removing .env.pending is impossible to reach here,
        # since the .env is written before .env.pending is removed; a missing pending file means finish ran
        document["state"] = "finished"
        for entry in document["secrets"].values():
            entry["state"] = "finished"
        document["events"].append({"time": utc.iso(), "event": "resumed: found finished"})
        journal.save(document)
        return document
    document["events"].append({"time": utc.iso(), "event": "resumed"})
    return _continue(document, options, journal)


def rollback(options: RotationOptions) -> Dict[str, Any]:
    journal = Journal(options.app_dir)
    document = journal.open_run()
    if document is None:
        raise UsageError("no open rotation to roll back (a finished one is undone by rotating again)")
    options.db_container = options.db_container or document.get("db_container")
    old_env = dotenv.read(options.env_file).values()
    new_env = _read_pending(options).values() if os.path.lexists(_pending_path(options)) else {}
    if dotenv.read(options.env_file).values() == new_env:
        raise UsageError("the .env already holds the new values: this run finished its .env step",
                         hint="`rotate resume` completes it")
    for name, entry in document["secrets"].items():
        cls = next(c for c in ROTATORS if c.name == name)
        rotator = cls(old_env, options)
        old = rotator.current()
        if entry["state"] in ("set", "tested") or (new_env and not rotator.works(old)):
            new = cls(new_env, options).current() if new_env else None
            if not rotator.works(old):
                entry["method"] = "rolled back: " + rotator.set(new, old)
        entry["state"] = "rolled_back"
    if os.path.exists(_pending_path(options)):
        os.unlink(_pending_path(options))
    document["state"] = "rolled_back"
    document["events"].append({"time": utc.iso(), "event": "rolled back"})
    journal.save(document)
    return document


def recreate_command(app_dir: str) -> Dict[str, Any]:
    """Containers read the .env only when created: compose up --force-recreate, when the compose CLI exists."""
    from toolkit.host.programs import find_program, run_program

    compose_file = os.path.join(app_dir, "docker-compose.yml")
    args = ["compose", "-f", compose_file, "up", "-d", "--force-recreate", "api", "worker"]
    docker = find_program("docker")
    if docker is None:
        return {"ran": False, "command": "docker " + " ".join(args),
                "note": "no docker CLI on this host: run this command; a plain restart does not re-read the .env"}
    run_result = run_program("docker", args, timeout=300)
    return {"ran": True, "command": " ".join(run_result.argv), "binary": run_result.record(),
            "exit_code": run_result.returncode,
            "stderr": run_result.stderr.decode("utf-8", "replace")[-2000:]}
