"""A PostgreSQL server to back up and restore: through the host's client binaries and libpq, or through the
bookgen-db container's own binaries over the Docker exec API. Streams both ways; passwords only in the
child's environment."""
from __future__ import annotations

import glob
import os
import re
import socket
import struct
import subprocess
import threading
from dataclasses import dataclass
from typing import Any, Callable, Dict, Iterable, List, Optional, Tuple

from toolkit.db.target import ConnectionParams, DatabaseUnreachable, _first_line
from toolkit.errors import BadInputError, EnvironmentProblem, UsageError
from toolkit.host.hashing import sha256_path

CHUNK = 1 << 20
PG_BIN_GLOB = "/usr/lib/postgresql/*/bin"
VERSION = re.compile(r"\(PostgreSQL\)\s+(\d+)((?:\.\d+)*)")
SERVER_ERROR = re.compile(r"(?:ERROR|FATAL|PANIC):\s+(.*)")


def tool_version(output: str) -> Optional[str]:
    """`pg_dump (PostgreSQL) 15.18 (Debian 15.18-0+deb12u1)` -> `15.18`."""
    match = VERSION.search(output)
    return match.group(1) + match.group(2) if match else None


def quote_ident(name: str) -> str:
    return '"%s"' % name.replace('"', '""')


def quote_literal(text: str) -> str:
    return "'%s'" % text.replace("'", "''")


@dataclass
class Tool:
    name: str
    path: str
    major: int
    version: str
    sha256: Optional[str]

    def record(self) -> Dict[str, Any]:
        return {"name": self.name, "path": self.path, "version": self.version, "sha256": self.sha256}


def host_tools(name: str) -> List[Tool]:
    """Every host copy of a PostgreSQL client program, newest first (never $PATH; BOOKGEN_KIT_PG_BIN first)."""
    directories = [d for d in os.environ.get("BOOKGEN_KIT_PG_BIN", "").split(":") if d]
    if os.environ.get("BOOKGEN_KIT_PG_BIN_ONLY") != "1":
        directories += sorted(glob.glob(PG_BIN_GLOB), key=lambda d: int(d.split("/")[4]) if
                              d.split("/")[4].isdigit() else 0, reverse=True)
    found = []
    for directory in directories:
        path = os.path.join(directory, name)
        if not (os.path.isfile(path) and os.access(path, os.X_OK)):
            continue
        try:
            output = subprocess.run([path, "--version"], capture_output=True, text=True, timeout=10,
                                    env={"PATH": "/usr/bin:/bin", "LC_ALL": "C"}).stdout
        except (OSError, subprocess.TimeoutExpired):
            continue
        match = VERSION.search(output)
        if match:
            found.append(Tool(name, path, int(match.group(1)), tool_version(output) or "?", sha256_path(
                os.path.realpath(path))))
    return found


def choose_tool(name: str, server_major: int) -> Tool:
    tools = host_tools(name)
    suitable = [t for t in tools if t.major >= server_major]
    if not suitable:
        have = ", ".join("%s %s" % (t.path, t.version) for t in tools) or "none"
        raise EnvironmentProblem("%s %d or newer is needed for this PostgreSQL %d server (found: %s)" % (
            name, server_major, server_major, have), hint="install the PostgreSQL %d client on the host, or use "
                                                          "--container to run the server's own" % server_major)
    return sorted(suitable, key=lambda t: t.major)[-1]


class Server:
    """What backup and restore need from a server."""

    mode = "?"
    description = "?"

    def query(self, sql: str, dbname: Optional[str] = None) -> List[List[Optional[str]]]:
        raise NotImplementedError

    def server_major(self) -> int:
        return int(self.query("SHOW server_version_num")[0][0]) // 10000

    def server_version(self) -> str:
        return self.query("SHOW server_version")[0][0]

    def run_tool(self, tool: str, args: List[str], stdin: Optional[Iterable[bytes]] = None,
                 stdout: Optional[Callable[[bytes], None]] = None, dbname: Optional[str] = None) -> Dict[str, Any]:
        """Run pg_dump / pg_restore / psql against this server; stream stdin in and stdout out."""
        raise NotImplementedError

    def tool_record(self, tool: str) -> Dict[str, Any]:
        raise NotImplementedError

    def export_snapshot(self, dbname: str):
        """An open REPEATABLE READ transaction on dbname whose snapshot pg_dump --snapshot shares: name,
        query(), attempt() and copy_out() (the last two under a savepoint), close()."""
        raise NotImplementedError

    def session(self, dbname: str):
        """One connection to dbname for many statements (autocommit): query(sql) -> rows, raising ReadFailed
        with the server's words; close()."""
        raise NotImplementedError

    @property
    def admin_database(self) -> str:
        return "postgres"

    def description_of(self, database: str) -> str:
        """Where a database other than the default one is: the server, without the default's name."""
        return self.description


class HostServer(Server):
    mode = "host"

    def __init__(self, params: ConnectionParams) -> None:
        self.params = params
        self.description = params.describe()
        self._tools: Dict[str, Tool] = {}

    def description_of(self, database: str) -> str:
        return "%s@%s:%d/%s" % (self.params.user, self.params.host, self.params.port, database)

    def _connect(self, dbname: str, autocommit: bool):
        import psycopg

        return psycopg.connect(host=self.params.host, port=self.params.port, dbname=dbname, user=self.params.user,
                               password=self.params.password or None, connect_timeout=5,
                               application_name="bookgen-kit", autocommit=autocommit)

    def query(self, sql: str, dbname: Optional[str] = None) -> List[List[Optional[str]]]:
        import psycopg

        try:
            with self._connect(dbname or self.params.dbname, autocommit=True) as conn:
                with conn.cursor() as cur:
                    cur.execute(sql)
                    return [[None if v is None else str(v) for v in row] for row in cur.fetchall()] \
                        if cur.description else []
        except psycopg.OperationalError as error:
            raise DatabaseUnreachable("%s: %s" % (self.description, _first_line(error))) from None
        except psycopg.Error as error:
            raise BadInputError("%s: %s" % (self.description, _first_line(error))) from None

    def transaction(self, statements: List[str], dbname: Optional[str] = None) -> None:
        import psycopg

        try:
            with self._connect(dbname or self.admin_database, autocommit=False) as conn:
                with conn.transaction():
                    for statement in statements:
                        conn.execute(statement)
        except psycopg.Error as error:
            raise BadInputError("%s: %s" % (self.description, _first_line(error))) from None

    def session(self, dbname: str) -> "HostSession":
        import psycopg

        try:
            conn = self._connect(dbname, autocommit=True)
        except psycopg.Error as error:
            raise DatabaseUnreachable("%s: %s" % (self.description, _first_line(error))) from None
        return HostSession(conn)

    def export_snapshot(self, dbname: str) -> "Snapshot":
        """A REPEATABLE READ transaction whose snapshot pg_dump --snapshot shares."""
        import psycopg

        try:
            conn = self._connect(dbname, autocommit=False)
            conn.execute("BEGIN ISOLATION LEVEL REPEATABLE READ READ ONLY")
            name = conn.execute("SELECT pg_export_snapshot()").fetchone()[0]
        except psycopg.Error as error:
            raise DatabaseUnreachable("%s: %s" % (self.description, _first_line(error))) from None
        return Snapshot(conn, name)

    def tool(self, name: str) -> Tool:
        if name not in self._tools:
            self._tools[name] = choose_tool(name, self.server_major())
        return self._tools[name]

    def tool_record(self, tool: str) -> Dict[str, Any]:
        return self.tool(tool).record()

    def run_tool(self, tool: str, args: List[str], stdin: Optional[Iterable[bytes]] = None,
                 stdout: Optional[Callable[[bytes], None]] = None, dbname: Optional[str] = None) -> Dict[str, Any]:
        binary = self.tool(tool)
        if tool == "pg_restore" and "-f" not in args:
            args = list(args) + ["-d", dbname or self.params.dbname]
        env = {"PATH": "/usr/bin:/bin", "LC_ALL": "C", "PGHOST": self.params.host, "PGPORT": str(self.params.port),
               "PGUSER": self.params.user, "PGDATABASE": dbname or self.params.dbname, "PGCONNECT_TIMEOUT": "10",
               "PGAPPNAME": "bookgen-kit"}
        if self.params.password:
            env["PGPASSWORD"] = self.params.password  # the child's environment, never argv
        argv = [binary.path] + args + ["--no-password"] if tool != "psql" else [binary.path, "-w"] + args
        return run_binary(binary, argv, env, stdin, stdout)


class ClientTools(HostServer):
    """No server: this host's own client binaries, for what needs none (pg_restore -f / -l reading an archive,
    pg_verifybackup). The newest of each is chosen (it reads every older archive); nothing connects."""

    mode = "client"

    def __init__(self, major: Optional[int] = None) -> None:
        self.description = "this host's client binaries (no server)"
        self.major = major  # when given, that major's tool is chosen where the host has it
        self._tools = {}

    def tool(self, name: str) -> Tool:
        if name not in self._tools:
            found = sorted(host_tools(name), key=lambda t: (t.major == self.major, t.major))
            if not found:
                raise EnvironmentProblem("%s is needed and this host has none" % name,
                                         hint="install the PostgreSQL client (postgresql-client), or give "
                                              "--container NAME / --dsn DSN to use a server's own")
            self._tools[name] = found[-1]
        return self._tools[name]

    def run_tool(self, tool: str, args: List[str], stdin: Optional[Iterable[bytes]] = None,
                 stdout: Optional[Callable[[bytes], None]] = None, dbname: Optional[str] = None) -> Dict[str, Any]:
        if tool == "pg_restore" and "-f" not in args and "-l" not in args:
            raise UsageError("pg_restore without a server only reads (-f FILE or -l)")
        binary = self.tool(tool)
        return run_binary(binary, [binary.path] + list(args), {"PATH": "/usr/bin:/bin", "LC_ALL": "C"}, stdin,
                          stdout)

    def query(self, sql: str, dbname: Optional[str] = None) -> List[List[Optional[str]]]:
        raise EnvironmentProblem("no server was given (--dsn, --container): nothing can be asked of one")


def run_binary(binary: Tool, argv: List[str], env: Dict[str, str], stdin: Optional[Iterable[bytes]],
               stdout: Optional[Callable[[bytes], None]]) -> Dict[str, Any]:
    """A client binary with this environment only: stdin streamed in from an iterable on a thread, stdout handed
    to the callback as it comes, stderr kept. The exit code, stderr and the binary's record."""
    process = subprocess.Popen(argv, stdin=subprocess.PIPE if stdin is not None else
                               subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env)
    errors: List[bytes] = []
    feeder_error: List[BaseException] = []
    stderr_reader = threading.Thread(target=lambda: errors.append(process.stderr.read()), daemon=True)
    stderr_reader.start()
    feeder = None
    if stdin is not None:
        def feed() -> None:
            try:
                for chunk in stdin:
                    process.stdin.write(chunk)
            except BrokenPipeError:
                pass
            except BaseException as error:  # handed to the caller below
                feeder_error.append(error)
            finally:
                try:
                    process.stdin.close()
                except OSError:
                    pass

        feeder = threading.Thread(target=feed, daemon=True)
        feeder.start()
    try:
        while True:
            data = process.stdout.read(CHUNK)
            if not data:
                break
            if stdout is not None:
                stdout(data)
    except BaseException:
        process.kill()
        process.wait()
        raise
    code = process.wait()
    if feeder is not None:
        feeder.join()
    stderr_reader.join()
    if feeder_error:
        raise feeder_error[0]
    return {"exit_code": code, "stderr": b"".join(errors).decode("utf-8", "replace"), "tool": binary.record()}


class ReadFailed(BadInputError):
    """A statement in a session or snapshot failed; the message is the server's own words."""


class HostSession:
    def __init__(self, conn) -> None:
        self.conn = conn

    def query(self, sql: str) -> List[List[Optional[str]]]:
        import psycopg

        try:
            with self.conn.cursor() as cur:
                cur.execute(sql)
                return [[None if v is None else str(v) for v in row] for row in cur.fetchall()] \
                    if cur.description else []
        except psycopg.Error as error:
            raise ReadFailed(_first_line(error)) from None

    def close(self) -> None:
        self.conn.close()


class Snapshot(HostSession):
    """An open transaction holding an exported snapshot; query() runs in it."""

    def __init__(self, conn, name: str) -> None:
        super().__init__(conn)
        self.name = name

    def attempt(self, sql: str) -> List[List[Optional[str]]]:
        """query() under a savepoint: a read that fails (a damaged page) raises ReadFailed with the server's
        words and leaves the transaction, and its snapshot, as they were."""
        self.conn.execute("SAVEPOINT bookgen_kit_read")
        try:
            rows = self.query(sql)
        except ReadFailed:
            self.conn.execute("ROLLBACK TO SAVEPOINT bookgen_kit_read")
            raise
        self.conn.execute("RELEASE SAVEPOINT bookgen_kit_read")
        return rows

    def copy_out(self, sql: str) -> bytes:
        """`COPY (...) TO STDOUT` under a savepoint, whole or not at all (ReadFailed)."""
        import psycopg

        self.conn.execute("SAVEPOINT bookgen_kit_read")
        parts: List[bytes] = []
        try:
            with self.conn.cursor() as cur:
                with cur.copy(sql) as copy:
                    for data in copy:
                        parts.append(bytes(data))
        except psycopg.Error as error:
            self.conn.execute("ROLLBACK TO SAVEPOINT bookgen_kit_read")
            raise ReadFailed(_first_line(error)) from None
        self.conn.execute("RELEASE SAVEPOINT bookgen_kit_read")
        return b"".join(parts)

    def close(self) -> None:
        try:
            self.conn.rollback()
        finally:
            self.conn.close()


class ContainerServer(Server):
    """psql, pg_dump and pg_restore inside the container, as its postgres user over the local socket."""

    mode = "container"

    def __init__(self, container: str, user: str = "postgres", password: Optional[str] = None,
                 dbname: str = "postgres", socket_dir: Optional[str] = None) -> None:
        from toolkit.containers.engine import client

        self.container_name = container
        self.user = user
        self.password = password
        self.dbname = dbname
        self.socket_dir = socket_dir  # inside the container; None: the client's default
        self.description = "container %s" % container
        self._client = client(timeout=3600)
        try:
            self._container = self._client.containers.get(container)
        except Exception as error:
            from toolkit.containers.engine import explain

            raise DatabaseUnreachable("container %s: %s" % (container, explain(error))) from None

    def _environment(self) -> Dict[str, str]:
        env = {"PGCONNECT_TIMEOUT": "10", "PGAPPNAME": "bookgen-kit", "LC_ALL": "C"}
        if self.socket_dir:
            env["PGHOST"] = self.socket_dir
        if self.password:
            env["PGPASSWORD"] = self.password
        return env

    def query(self, sql: str, dbname: Optional[str] = None) -> List[List[Optional[str]]]:
        import csv
        import io

        result = self.run_tool("psql", ["-X", "-q", "--csv", "-v", "ON_ERROR_STOP=1", "-c", sql], dbname=dbname,
                               capture=True)
        if result["exit_code"] != 0:
            text = result["stderr"].strip().splitlines()
            message = text[-1] if text else "psql exited %s" % result["exit_code"]
            if result["exit_code"] == 2:
                raise DatabaseUnreachable("%s: %s" % (self.description, message))
            raise BadInputError("%s: %s" % (self.description, message))
        rows = list(csv.reader(io.StringIO(result["stdout"].decode("utf-8"))))
        return [[v if v != "" else None for v in row] for row in rows[1:]]

    def transaction(self, statements: List[str], dbname: Optional[str] = None) -> None:
        script = "BEGIN;\n" + "".join(s.rstrip(";") + ";\n" for s in statements) + "COMMIT;\n"
        result = self.run_tool("psql", ["-X", "-q", "-v", "ON_ERROR_STOP=1"], stdin=[script.encode()],
                               dbname=dbname or self.admin_database, capture=True)
        if result["exit_code"] != 0:
            raise BadInputError("%s: %s" % (self.description, result["stderr"].strip().splitlines()[-1:]))

    def export_snapshot(self, dbname: str):
        """A psql session in the container holding a REPEATABLE READ transaction whose snapshot pg_dump
        --snapshot shares (toolkit.db.session)."""
        from toolkit.db.session import ContainerSnapshot

        try:
            return ContainerSnapshot(self, dbname)
        except ReadFailed as error:
            raise DatabaseUnreachable("%s: %s" % (self.description, error)) from None

    def session(self, dbname: str):
        from toolkit.db.session import PsqlSession

        return PsqlSession(self, dbname)

    def host_path(self, path: str) -> Optional[str]:
        """Where a path inside the container is on this host, through its bind or volume mounts; None when it is
        in the container's own layer."""
        best = None
        for mount in self._container.attrs.get("Mounts") or []:
            inside = (mount.get("Destination") or "").rstrip("/") or "/"
            if path == inside or path.startswith(inside.rstrip("/") + "/"):
                if best is None or len(inside) > len(best[0]):
                    best = (inside, mount.get("Source") or "", mount.get("RW", True))
        if best is None or not best[1]:
            return None
        return os.path.join(best[1], os.path.relpath(path, best[0])) if path != best[0] else best[1]

    def container_path(self, host_path: str) -> Optional[str]:
        """Where a host path is seen inside the container (a writable mount holds it), or None."""
        host_path = os.path.abspath(host_path)
        best = None
        for mount in self._container.attrs.get("Mounts") or []:
            source = (mount.get("Source") or "").rstrip("/")
            if source and mount.get("RW", True) and (host_path == source or host_path.startswith(source + "/")):
                if best is None or len(source) > len(best[0]):
                    best = (source, mount.get("Destination") or "")
        if best is None:
            return None
        return best[1] if host_path == best[0] else os.path.join(best[1], os.path.relpath(host_path, best[0]))

    def can_write(self, path: str) -> bool:
        """Whether the container's user can write this directory (asked inside the container, as that user)."""
        return self.exec_argv(["test", "-d", path, "-a", "-w", path])[0] == 0

    def restart(self, timeout: int = 60) -> None:
        self._container.restart(timeout=timeout)

    def image_id(self) -> str:
        """The image the container runs (a scratch cluster runs the same binaries)."""
        return self._container.attrs["Image"]

    def engine(self):
        """The Docker client this server is reached through."""
        return self._client

    def mounts(self) -> List[Dict[str, Any]]:
        """The container's mounts as the engine lists them (Source on this host, Destination inside, RW)."""
        return list(self._container.attrs.get("Mounts") or [])

    def exec_argv(self, argv: List[str], env: Optional[Dict[str, str]] = None) -> Tuple[int, bytes, bytes]:
        """A command inside the container as its postgres user: exit code, stdout, stderr."""
        result = self._container.exec_run(argv, demux=True, environment=dict(self._environment(), **(env or {})),
                                          user=self.user)
        stdout, stderr = result.output
        return result.exit_code, stdout or b"", stderr or b""

    def tool_record(self, tool: str) -> Dict[str, Any]:
        result = self.exec_argv(["sh", "-c", 'p=$(command -v %s) && echo "$p" && "$p" --version && sha256sum "$p"' % tool])
        lines = result[1].decode("utf-8", "replace").splitlines()
        return {"name": tool, "path": lines[0] if lines else None, "version": tool_version(lines[1]) if len(lines) > 1
                else None, "sha256": lines[2].split()[0] if len(lines) > 2 else None,
                "inside_container": self.container_name}

    def run_tool(self, tool: str, args: List[str], stdin: Optional[Iterable[bytes]] = None,
                 stdout: Optional[Callable[[bytes], None]] = None, dbname: Optional[str] = None,
                 capture: bool = False) -> Dict[str, Any]:
        api = self._client.api
        argv = [tool] + args + ["-U", self.user, "-d", dbname or self.dbname] if tool != "pg_dump" else \
            [tool] + args + ["-U", self.user, dbname or self.dbname]
        if tool == "pg_restore" and "-f" in args:
            argv = [tool] + args  # reading only: no server
        elif tool == "pg_basebackup":
            argv = [tool] + args + ["-U", self.user]  # its -d is a connection string: the local socket's default
        exec_id = api.exec_create(self._container.id, argv, stdout=True, stderr=True, stdin=stdin is not None,
                                  tty=False, environment=self._environment(), user=self.user)["Id"]
        captured: List[bytes] = []
        errors: List[bytes] = []
        sink = stdout or (captured.append if capture else (lambda data: None))
        try:
            if stdin is None:
                for out, err in api.exec_start(exec_id, stream=True, demux=True):
                    if out:
                        sink(out)
                    if err:
                        errors.append(err)
            else:
                self._exec_with_stdin(api, exec_id, stdin, sink, errors)
        except BaseException:
            self._kill(api, exec_id)
            raise
        code = api.exec_inspect(exec_id).get("ExitCode")
        return {"exit_code": code, "stderr": b"".join(errors).decode("utf-8", "replace"),
                "stdout": b"".join(captured), "tool": {"name": tool, "inside_container": self.container_name}}

    @staticmethod
    def _exec_with_stdin(api, exec_id: str, stdin: Iterable[bytes], sink, errors: List[bytes]) -> None:
        """Stream stdin into the exec while a thread demultiplexes its output (8-byte frame headers)."""
        raw = api.exec_start(exec_id, socket=True)
        sock = getattr(raw, "_sock", raw)
        failure: List[BaseException] = []

        def read_frames() -> None:
            try:
                read_exec_frames(sock, sink, errors.append)
            except BaseException as error:
                failure.append(error)
            finally:
                # the output ended, so has the process: a writer still blocked on stdin nobody reads (pg_restore
                # --section reads only the part it needs) is woken up rather than left waiting on the engine
                ended.set()
                try:
                    sock.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass

        ended = threading.Event()
        reader = threading.Thread(target=read_frames, daemon=True)
        reader.start()
        try:
            for chunk in stdin:
                if ended.is_set():
                    break
                sock.sendall(chunk)
        except (BrokenPipeError, ConnectionResetError):
            pass
        except OSError:
            if not ended.is_set():
                raise
        finally:
            try:
                sock.shutdown(socket.SHUT_WR)
            except OSError:
                pass
        reader.join()
        try:
            sock.close()
        except OSError:
            pass
        if failure:
            raise failure[0]

    def _kill(self, api, exec_id: str) -> None:
        """exec has no kill call. Its Pid is the engine's, in the host's PID namespace. It gets SIGINT (psql and
        pg_dump then cancel their query on the server, and end): from here when this process shares that namespace
        and may signal it (the PID's cgroup names the container), else inside the container as root, by the PID
        it has there (the last NSpid of the host's /proc, or nothing when we cannot see it)."""
        import signal

        try:
            pid = int(api.exec_inspect(exec_id).get("Pid") or 0)
        except Exception:  # the engine is gone
            return
        if pid <= 1:
            return
        from toolkit.host.hostfs import kernel_bytes

        try:
            ours = self._container.id.encode() in kernel_bytes("/proc/%d/cgroup" % pid)
            nspid = [line.split()[1:] for line in kernel_bytes("/proc/%d/status" % pid).decode(
                "utf-8", "replace").splitlines() if line.startswith("NSpid:")]
        except OSError:
            return  # ended already, or not in our PID namespace: nothing we can name
        if not ours:
            return
        try:
            os.kill(pid, signal.SIGINT)
            return
        except OSError:  # not ours to signal (a docker-group user): the container's own kill, as root
            pass
        inside = nspid[0][-1] if nspid and nspid[0] else None
        if inside and inside != "1":
            try:
                self._container.exec_run(["kill", "-INT", inside], user="root")
            except Exception:  # the engine is gone
                pass


class ToolFailed(EnvironmentProblem):
    """pg_dump, pg_restore or psql exited non-zero. The message is the server's own error when there is one
    (`invalid page in block 40 of relation base/16386/16399`), else the tool's last line; server_error keeps it."""

    def __init__(self, message: str, hint: Optional[str] = None, server_error: Optional[str] = None) -> None:
        super().__init__(message, hint)
        self.server_error = server_error


def server_error(stderr: str) -> Optional[str]:
    """The first ERROR/FATAL the server sent, as pg_dump, pg_restore and psql print it."""
    for line in stderr.splitlines():
        match = SERVER_ERROR.search(line)
        if match:
            return match.group(1).strip()
    return None


def read_exec_frames(sock, stdout: Callable[[bytes], None], stderr: Callable[[bytes], None]) -> None:
    """Docker's multiplexed exec stream (an 8-byte header per frame: stream, size) until it ends."""
    buffer = b""
    while True:
        data = sock.recv(CHUNK)
        if not data:
            return
        buffer += data
        while len(buffer) >= 8:
            kind, size = buffer[0], struct.unpack(">I", buffer[4:8])[0]
            if len(buffer) < 8 + size:
                break
            payload, buffer = buffer[8:8 + size], buffer[8 + size:]
            (stdout if kind == 1 else stderr)(payload)


def check_tool(result: Dict[str, Any], what: str) -> None:
    if result["exit_code"] != 0:
        lines = [line for line in result["stderr"].strip().splitlines() if line.strip()]
        cause = server_error(result["stderr"])
        raise ToolFailed("%s failed (exit %s): %s" % (what, result["exit_code"], cause or (
            lines[-1] if lines else "no message")), server_error=cause)


def resolve_server(deployment, dsn: Optional[str], container: Optional[str]) -> Server:
    """--dsn (host binaries), --container NAME, else the deployment: its bookgen-db container when it runs,
    otherwise the .env's DATABASE_URL through the host's binaries."""
    from toolkit.db.target import resolve

    if container:
        return ContainerServer(container)
    if dsn:
        return HostServer(resolve(deployment, dsn=dsn).params)
    try:
        from toolkit.containers.engine import client

        names = [c.name for c in client(timeout=3).containers.list()]
        if deployment.containers["db"] in names:
            return ContainerServer(deployment.containers["db"])
    except Exception:
        pass
    return HostServer(resolve(deployment).params)
