"""Which PostgreSQL to talk to, and running SQL there: through libpq on the host, or psql in the container.

Resolution (shared by triage, jobs, backup and rotation):
  --dsn DSN             a libpq connection string or URL;
  --container NAME      psql inside the container, over its local socket, through the Docker exec API;
  default               DATABASE_URL / DATABASE_PASSWORD from the deployment's .env; a host that is a
                        compose service name (db) is replaced by that container's address.
Passwords never reach argv: libpq gets them as a connection parameter in memory, psql in
the container gets PGPASSWORD in the exec environment.
"""
from __future__ import annotations

import csv
import io
import ipaddress
import os
from dataclasses import dataclass
from typing import List, Optional
from urllib.parse import unquote, urlparse

from toolkit.config import Deployment
from toolkit.errors import BadInputError, EnvironmentProblem, UsageError

CONNECT_TIMEOUT = 3
STATEMENT_TIMEOUT_MS = 8000


class DatabaseUnreachable(EnvironmentProblem):
    """The server does not answer, refuses us, or the container cannot run psql."""


class AddressUnknown(DatabaseUnreachable):
    """The database's address is a compose service name and Docker, which knows it, does not answer: the
    database itself was not tried."""


@dataclass
class ConnectionParams:
    host: str
    port: int
    dbname: str
    user: str
    password: Optional[str]

    def describe(self) -> str:  # no password
        return "%s@%s:%d/%s" % (self.user, self.host, self.port, self.dbname)


def parse_database_url(url: str) -> ConnectionParams:
    parsed = urlparse(url)
    if parsed.scheme not in ("postgresql", "postgres", "postgresql+psycopg", "postgresql+psycopg2",
                             "postgresql+asyncpg"):
        raise BadInputError("DATABASE_URL is not a postgresql:// URL")
    return ConnectionParams(host=parsed.hostname or "localhost", port=parsed.port or 5432,
                            dbname=(parsed.path or "/").lstrip("/") or "postgres",
                            user=unquote(parsed.username or "postgres"),
                            password=unquote(parsed.password) if parsed.password else None)


def _is_local_literal(host: str) -> bool:
    if host in ("localhost",) or host.startswith("/"):
        return True
    try:
        ipaddress.ip_address(host)
        return True
    except ValueError:
        return False


class Target:
    description: str
    mode: str

    def query(self, sql: str) -> List[List[Optional[str]]]:
        """Rows of text values (None for NULL). One statement, run in its own transaction."""
        raise NotImplementedError


class HostTarget(Target):
    mode = "host"

    def __init__(self, params: ConnectionParams) -> None:
        self.params = params
        self.description = params.describe()

    def query(self, sql: str) -> List[List[Optional[str]]]:
        import psycopg

        try:
            with psycopg.connect(host=self.params.host, port=self.params.port, dbname=self.params.dbname,
                                 user=self.params.user, password=self.params.password or None,
                                 connect_timeout=CONNECT_TIMEOUT, application_name="bookgen-kit",
                                 options="-c statement_timeout=%d" % STATEMENT_TIMEOUT_MS) as conn:
                with conn.cursor() as cur:
                    cur.execute(sql)
                    rows = cur.fetchall() if cur.description else []
                conn.commit()
        except psycopg.OperationalError as error:
            raise DatabaseUnreachable("database %s unreachable: %s" % (self.description, _first_line(error))) from None
        except psycopg.Error as error:
            raise BadInputError("database %s: %s" % (self.description, _first_line(error))) from None
        return [[None if v is None else str(v) for v in row] for row in rows]


class ContainerTarget(Target):
    mode = "container"

    def __init__(self, container: str, dbname: str, user: str, password: Optional[str]) -> None:
        self.container = container
        self.dbname = dbname
        self.user = user
        self.password = password
        self.description = "%s in container %s" % (dbname, container)

    def query(self, sql: str) -> List[List[Optional[str]]]:
        from toolkit.containers.engine import client

        docker_client = client(timeout=STATEMENT_TIMEOUT_MS / 1000 + 5)
        try:
            container = docker_client.containers.get(self.container)
        except Exception as error:
            from toolkit.containers.engine import explain

            raise DatabaseUnreachable("container %s: %s" % (self.container, explain(error))) from None
        environment = {"PGCONNECT_TIMEOUT": str(CONNECT_TIMEOUT), "PGOPTIONS": "-c statement_timeout=%d"
                       % STATEMENT_TIMEOUT_MS, "PGAPPNAME": "bookgen-kit"}
        if self.password:
            environment["PGPASSWORD"] = self.password
        argv = ["psql", "-X", "-q", "--csv", "-v", "ON_ERROR_STOP=1", "-U", self.user, "-d", self.dbname, "-c", sql]
        try:
            result = container.exec_run(argv, environment=environment, demux=True, stdin=False, tty=False)
        except Exception as error:
            from toolkit.containers.engine import explain

            raise DatabaseUnreachable("cannot run psql in %s: %s" % (self.container, explain(error))) from None
        stdout, stderr = result.output
        if result.exit_code != 0:
            message = (stderr or b"").decode("utf-8", "replace").strip().splitlines()
            text = message[-1] if message else "psql exited %s" % result.exit_code
            if result.exit_code == 2 or "could not connect" in text or "connection to server" in text:
                raise DatabaseUnreachable("database %s unreachable: %s" % (self.description, text))
            raise BadInputError("database %s: %s" % (self.description, text))
        rows = list(csv.reader(io.StringIO((stdout or b"").decode("utf-8"))))
        return [[value if value != "" else None for value in row] for row in rows[1:]]  # header dropped


def _first_line(error: BaseException) -> str:
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__


def resolve(deployment: Deployment, dsn: Optional[str] = None, container: Optional[str] = None,
            database: Optional[str] = None) -> Target:
    """The target as the options, then the deployment's .env, say."""
    if dsn and container:
        raise UsageError("--dsn and --container do not go together")
    if dsn:
        from psycopg.conninfo import conninfo_to_dict

        try:
            values = conninfo_to_dict(dsn)
        except Exception:
            raise BadInputError("--dsn is not a valid connection string or URL") from None
        host = str(values.get("host") or "localhost")
        if not _is_local_literal(host):
            raise UsageError("--dsn host %r is not an IP address or localhost: bookgen-kit resolves no names" % host)
        # a password is best not in the DSN (argv): PGPASSWORD in the environment is used when it has none
        return HostTarget(ConnectionParams(host, int(values.get("port") or 5432),
                                           str(values.get("dbname") or database or deployment.database),
                                           str(values.get("user") or "postgres"),
                                           values.get("password") or os.environ.get("PGPASSWORD")))
    from toolkit.secrets import dotenv

    env = dotenv.read(deployment.env_path).values()
    params = parse_database_url(env["DATABASE_URL"]) if env.get("DATABASE_URL") else ConnectionParams(
        "db", 5432, deployment.database, "bookgen", None)
    if env.get("DATABASE_PASSWORD"):
        params.password = env["DATABASE_PASSWORD"]
    if database:
        params.dbname = database
    if container:
        return ContainerTarget(container, params.dbname, params.user, params.password)
    if not _is_local_literal(params.host):
        from toolkit.containers.engine import client, container_address, explain

        try:
            address = container_address(client(timeout=3), params.host, deployment.compose_project)
        except EnvironmentProblem as error:
            raise AddressUnknown("not checked: the database's host %r is a compose service, and %s" % (
                params.host, error.message), hint="give --dsn with its IP address, or --container NAME") from None
        except Exception as error:
            raise AddressUnknown("not checked: the database's host %r is a compose service, and %s" % (
                params.host, explain(error, 3)), hint="give --dsn with its IP address, or --container NAME") from None
        if address is None:
            raise DatabaseUnreachable("database host %r is neither an address nor a running compose service"
                                      % params.host, hint="give --dsn or --container")
        params.host = address
    return HostTarget(params)


def quote_interval_seconds(seconds: int) -> str:
    """An SQL interval for a number of seconds we computed ourselves (never user text)."""
    return "make_interval(secs => %d)" % int(seconds)
