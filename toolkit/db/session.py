"""One long psql session inside a container, driven over the Docker exec API: the container-mode twin of a
psycopg connection holding an exported snapshot (what pg_dump --snapshot and a salvage read share).

Invariants:
- one psql process, one transaction: REPEATABLE READ READ ONLY, its snapshot exported, held until close();
- each request ends with a marker line carrying a per-session random nonce and the request's number, so
  rows, COPY data and the end of a request are never confused; the verdict comes from psql's own ERROR
  and LAST_ERROR_MESSAGE variables, not from parsing stderr;
- attempt() and copy_out() run under a savepoint: a failed read (a damaged page) costs that read only;
- a psql that dies ends the session with an error (SessionLost), not a wait for output that cannot come;
  a query the server takes long over is waited for, as psql itself would; close() kills what is left, at
  once when a request's marker has not come back (psql is still in a query: an interrupted dump whose count
  waits on a lock must not wait for it).
"""
from __future__ import annotations

import csv
import io
import secrets
import socket
import threading
from typing import List, Optional, Tuple

from toolkit.db.server import ReadFailed, read_exec_frames
from toolkit.errors import EnvironmentProblem


class SessionLost(EnvironmentProblem):
    """psql in the container went away in the middle of the session."""


class PsqlSession:
    def __init__(self, server, dbname: str) -> None:
        api = server._client.api
        argv = ["psql", "-X", "-q", "--csv", "-P", "pager=off", "-v", "ON_ERROR_STOP=0", "-U", server.user, "-d",
                dbname]
        self._api = api
        self._server = server
        self._exec_id = api.exec_create(server._container.id, argv, stdout=True, stderr=True, stdin=True, tty=False,
                                        environment=server._environment(), user=server.user)["Id"]
        raw = api.exec_start(self._exec_id, socket=True)
        self._raw = raw
        self._sock = getattr(raw, "_sock", raw)
        self._nonce = secrets.token_hex(12)
        self._serial = 0
        self._out = bytearray()
        self._ended = False
        self._unanswered = 0  # requests sent whose marker has not been read back
        self._ready = threading.Condition()
        self._lock = threading.Lock()  # one request at a time
        self._reader = threading.Thread(target=self._read_frames, daemon=True)
        self._reader.start()

    def _read_frames(self) -> None:
        def deliver(payload: bytes) -> None:
            with self._ready:
                self._out += payload
                self._ready.notify_all()

        try:
            read_exec_frames(self._sock, deliver, lambda payload: None)  # errors: psql's ERROR variables say them
        except OSError:
            pass
        finally:
            with self._ready:
                self._ended = True
                self._ready.notify_all()

    def _request(self, script: str) -> Tuple[bytes, str]:
        """Send script (which must print the marker line last); return what it printed before the marker,
        and the rest of the marker's line (its status word and message)."""
        self._serial += 1
        marker = ("__bookgen_kit_%s_%d__" % (self._nonce, self._serial)).encode()
        self._unanswered += 1
        try:
            self._sock.sendall(script.replace("@MARKER@", marker.decode()).encode("utf-8"))
        except OSError as error:
            raise SessionLost("psql in %s went away: %s" % (self._server.container_name, error)) from None
        with self._ready:
            while True:
                at = self._out.find(marker)
                if at >= 0:
                    end = self._out.find(b"\n", at)
                    if end >= 0:
                        break
                if self._ended:
                    raise SessionLost("psql in %s ended in the middle of the session" % self._server.container_name)
                self._ready.wait(1.0)
            output, line = bytes(self._out[:at]), bytes(self._out[at + len(marker):end])
            del self._out[:end + 1]
        self._unanswered -= 1
        return output, line.decode("utf-8", "replace")

    def _run(self, sql: str, savepoint: bool) -> bytes:
        statement = sql.strip().rstrip(";") + ";\n"
        if savepoint:
            script = ("SAVEPOINT bookgen_kit_read;\n" + statement +
                      "\\if :ERROR\nROLLBACK TO SAVEPOINT bookgen_kit_read;\n\\echo @MARKER@FAIL :LAST_ERROR_MESSAGE\n"
                      "\\else\nRELEASE SAVEPOINT bookgen_kit_read;\n\\echo @MARKER@OK\n\\endif\n")
        else:
            script = (statement + "\\if :ERROR\n\\echo @MARKER@FAIL :LAST_ERROR_MESSAGE\n\\else\n\\echo @MARKER@OK\n"
                      "\\endif\n")
        with self._lock:
            output, status = self._request(script)
        if status.startswith("FAIL"):
            raise ReadFailed(status[4:].strip() or "the query failed")
        return output

    def query(self, sql: str) -> List[List[Optional[str]]]:
        return self.rows(sql)

    def rows(self, sql: str, savepoint: bool = False) -> List[List[Optional[str]]]:
        text = self._run(sql, savepoint).decode("utf-8")
        parsed = list(csv.reader(io.StringIO(text)))
        return [[v if v != "" else None for v in row] for row in parsed[1:]]

    def close(self) -> None:
        if self._unanswered and not self._ended:  # psql is in a query: a ROLLBACK would wait for it to end
            self._server._kill(self._api, self._exec_id)
        try:
            self._sock.sendall(b"ROLLBACK;\n\\q\n")
            self._sock.shutdown(socket.SHUT_WR)
        except OSError:
            pass
        self._reader.join(30)
        try:
            self._sock.close()
        except OSError:
            pass
        if self._reader.is_alive():
            self._server._kill(self._api, self._exec_id)


class ContainerSnapshot:
    """The Snapshot of container mode: query/attempt/copy_out in one exported REPEATABLE READ snapshot."""

    def __init__(self, server, dbname: str) -> None:
        self.session = PsqlSession(server, dbname)
        try:
            self.session.rows("BEGIN ISOLATION LEVEL REPEATABLE READ READ ONLY")
            self.name = self.session.rows("SELECT pg_export_snapshot()")[0][0]
        except BaseException:
            self.session.close()
            raise

    def query(self, sql: str) -> List[List[Optional[str]]]:
        return self.session.rows(sql)

    def attempt(self, sql: str) -> List[List[Optional[str]]]:
        return self.session.rows(sql, savepoint=True)

    def copy_out(self, sql: str) -> bytes:
        return self.session._run(sql, savepoint=True)

    def close(self) -> None:
        self.session.close()
