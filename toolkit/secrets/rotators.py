"""One rotator per kind of secret: how to set a new value on its live service, and prove it works."""
from __future__ import annotations

import base64
import hashlib
import hmac
import os
import secrets
import string
from dataclasses import dataclass
from typing import Dict, List, Optional
from urllib.parse import quote, unquote, urlparse, urlunparse

from toolkit.errors import EnvironmentProblem

# letters and digits only: safe in dotenv (any quoting), compose interpolation (no $), shell and URLs
ALPHABET = string.ascii_letters + string.digits
PROVIDER_SUFFIXES = ("_KEY", "_TOKEN", "_SECRET", "_PASSWORD")


def new_password(length: int = 40) -> str:
    return "".join(secrets.choice(ALPHABET) for _ in range(length))


def scram_sha256_verifier(password: str, iterations: int = 4096) -> str:
    """The verifier PostgreSQL stores for SCRAM-SHA-256, computed here so the server never sees the password."""
    salt = os.urandom(16)
    salted = hashlib.pbkdf2_hmac("sha256", password.encode("utf-8"), salt, iterations)
    client_key = hmac.new(salted, b"Client Key", hashlib.sha256).digest()
    stored_key = hashlib.sha256(client_key).digest()
    server_key = hmac.new(salted, b"Server Key", hashlib.sha256).digest()
    b64 = lambda data: base64.b64encode(data).decode("ascii")  # noqa: E731
    return "SCRAM-SHA-256$%d:%s$%s:%s" % (iterations, b64(salt), b64(stored_key), b64(server_key))


def url_with_password(url: str, password: str) -> str:
    parsed = urlparse(url)
    user = parsed.username or ""
    host = parsed.hostname or ""
    netloc = "%s:%s@%s" % (quote(unquote(user), safe=""), quote(password, safe=""), host)
    if parsed.port:
        netloc += ":%d" % parsed.port
    return urlunparse(parsed._replace(netloc=netloc))


def url_password(url: Optional[str]) -> Optional[str]:
    if not url:
        return None
    parsed = urlparse(url)
    return unquote(parsed.password) if parsed.password else None


@dataclass
class Endpoint:
    host: str
    port: int


class Rotator:
    name = "?"
    keys: tuple = ()
    service = "?"
    warning = ""

    def __init__(self, env: Dict[str, str], options) -> None:
        self.env = env
        self.options = options

    def applies(self) -> bool:
        return any(k in self.env for k in self.keys)

    def current(self) -> Optional[str]:
        raise NotImplementedError

    def generate(self) -> str:
        return new_password()

    def changes(self, new: str) -> Dict[str, str]:
        """The .env keys and values that carry this secret."""
        raise NotImplementedError

    def set(self, old: Optional[str], new: str) -> str:
        raise NotImplementedError

    def works(self, value: str) -> bool:
        raise NotImplementedError

    def describe(self) -> Dict[str, str]:
        return {"name": self.name, "service": self.service, "keys": [k for k in self.keys if k in self.env],
                "warning": self.warning}


def _resolve_host(host: str, options) -> str:
    """An address for a host that may be a compose service name (no DNS is asked)."""
    import ipaddress

    if host in ("localhost",):
        return "127.0.0.1"
    try:
        ipaddress.ip_address(host)
        return host
    except ValueError:
        pass
    from toolkit.containers.engine import client, container_address

    address = container_address(client(timeout=5), host, options.compose_project)
    if address is None:
        raise EnvironmentProblem("%r is neither an address nor a running compose service" % host)
    return address


class DatabasePassword(Rotator):
    name = "DATABASE_PASSWORD"
    keys = ("DATABASE_PASSWORD", "DATABASE_URL", "POSTGRES_PASSWORD")
    service = "PostgreSQL role"
    warning = ("POSTGRES_PASSWORD is updated too, but an existing data volume ignores it: the role's password "
               "is changed on the server itself")

    def _url(self):
        return urlparse(self.env.get("DATABASE_URL") or "postgresql://bookgen@db:5432/bookgen")

    @property
    def role(self) -> str:
        return unquote(self._url().username or "bookgen")

    def endpoint(self) -> Endpoint:
        url = self._url()
        return Endpoint(_resolve_host(url.hostname or "db", self.options), url.port or 5432)

    def current(self) -> Optional[str]:
        return self.env.get("DATABASE_PASSWORD") or url_password(self.env.get("DATABASE_URL"))

    def changes(self, new: str) -> Dict[str, str]:
        result = {}
        if "DATABASE_PASSWORD" in self.env or "DATABASE_URL" not in self.env:
            result["DATABASE_PASSWORD"] = new
        if "DATABASE_URL" in self.env:
            result["DATABASE_URL"] = url_with_password(self.env["DATABASE_URL"], new)
        if "POSTGRES_PASSWORD" in self.env:
            result["POSTGRES_PASSWORD"] = new
        return result

    def works(self, value: str) -> bool:
        import psycopg

        endpoint = self.endpoint()
        url = self._url()
        try:
            with psycopg.connect(host=endpoint.host, port=endpoint.port, dbname=(url.path or "/bookgen").lstrip("/"),
                                 user=self.role, password=value, connect_timeout=5):
                return True
        except psycopg.OperationalError as error:
            if "password authentication failed" in str(error) or "authentication" in str(error):
                return False
            raise EnvironmentProblem("PostgreSQL at %s:%d does not answer: %s" % (
                endpoint.host, endpoint.port, str(error).strip().splitlines()[0])) from None

    def set(self, old: Optional[str], new: str) -> str:
        from psycopg import sql as psql

        statement = psql.SQL("ALTER ROLE {} PASSWORD {}").format(psql.Identifier(self.role),
                                                                   psql.Literal(scram_sha256_verifier(new)))
        if self.options.db_container:
            from toolkit.db.server import ContainerServer, check_tool

            server = ContainerServer(self.options.db_container)
            text = statement.as_string(None) if hasattr(statement, "as_string") else str(statement)
            result = server.run_tool("psql", ["-X", "-q", "-v", "ON_ERROR_STOP=1"], stdin=[text.encode() + b";\n"],
                                     dbname="postgres", capture=True)
            check_tool(result, "psql (ALTER ROLE)")
            return "ALTER ROLE with a SCRAM verifier, via psql as postgres in %s (SQL on stdin)" % \
                self.options.db_container
        import psycopg

        endpoint = self.endpoint()
        url = self._url()
        if self.options.admin_dsn:
            from psycopg.conninfo import conninfo_to_dict

            admin = conninfo_to_dict(self.options.admin_dsn)
            connect = dict(host=admin.get("host") or endpoint.host, port=admin.get("port") or endpoint.port,
                           dbname=admin.get("dbname") or "postgres", user=admin.get("user") or "postgres",
                           password=admin.get("password") or os.environ.get("PGPASSWORD"))
            how = "as the admin role"
        else:
            connect = dict(host=endpoint.host, port=endpoint.port, dbname=(url.path or "/bookgen").lstrip("/"),
                           user=self.role, password=old)
            how = "as the role itself, with its current password"
        with psycopg.connect(connect_timeout=5, autocommit=True, **connect) as conn:
            conn.execute(statement)
        return "ALTER ROLE with a SCRAM verifier computed here, %s" % how


class RedisPassword(Rotator):
    name = "REDIS_PASSWORD"
    keys = ("REDIS_PASSWORD", "REDIS_URL")
    service = "Redis requirepass"

    def endpoint(self) -> Endpoint:
        if self.env.get("REDIS_URL"):
            url = urlparse(self.env["REDIS_URL"])
            return Endpoint(_resolve_host(url.hostname or "redis", self.options), url.port or 6379)
        return Endpoint(_resolve_host(self.env.get("REDIS_HOST", "redis"), self.options),
                        int(self.env.get("REDIS_PORT", "6379")))

    def current(self) -> Optional[str]:
        return self.env.get("REDIS_PASSWORD") or url_password(self.env.get("REDIS_URL"))

    def changes(self, new: str) -> Dict[str, str]:
        result = {}
        if "REDIS_PASSWORD" in self.env:
            result["REDIS_PASSWORD"] = new
        if "REDIS_URL" in self.env and urlparse(self.env["REDIS_URL"]).password is not None:
            result["REDIS_URL"] = url_with_password(self.env["REDIS_URL"], new)
        return result

    def _client(self, password: Optional[str]):
        import redis

        endpoint = self.endpoint()
        return redis.Redis(host=endpoint.host, port=endpoint.port, password=password, socket_timeout=5,
                           socket_connect_timeout=5)

    def works(self, value: str) -> bool:
        import redis

        try:
            return bool(self._client(value).ping())
        except (redis.AuthenticationError, redis.ResponseError):
            return False
        except redis.ConnectionError as error:
            raise EnvironmentProblem("Redis does not answer: %s" % error) from None

    def set(self, old: Optional[str], new: str) -> str:
        client = self._client(old)
        client.config_set("requirepass", new)
        notes = ["CONFIG SET requirepass"]
        fresh = self._client(new)
        killed = fresh.client_kill_filter(_type="normal", skipme=True)
        notes.append("killed %s clients still on the old password" % killed)
        config_file = fresh.info("server").get("config_file")
        if config_file:
            try:
                fresh.config_rewrite()
                notes.append("persisted with CONFIG REWRITE to %s" % config_file)
            except Exception as error:
                notes.append("CONFIG REWRITE failed (%s): update %s by hand" % (str(error).splitlines()[0],
                                                                               config_file))
        else:
            notes.append("no config file: the password comes from Redis's command line (compose `command:`), "
                         "which reads it from the .env on recreate")
        return "; ".join(notes)


class SecretKey(Rotator):
    name = "SECRET_KEY"
    keys = ("SECRET_KEY",)
    service = "the API's signing key (in the .env only)"
    warning = "sessions and tokens signed with the old SECRET_KEY stop working"

    def current(self) -> Optional[str]:
        return self.env.get("SECRET_KEY")

    def generate(self) -> str:
        return secrets.token_hex(32)

    def changes(self, new: str) -> Dict[str, str]:
        return {"SECRET_KEY": new}

    def works(self, value: str) -> bool:
        return True  # nothing to ask: it takes effect when the api container is recreated

    def set(self, old: Optional[str], new: str) -> str:
        return "nothing to set on a service: the api reads it from the .env when recreated"


ROTATORS = (DatabasePassword, RedisPassword, SecretKey)


def provider_keys(env: Dict[str, str]) -> List[str]:
    """Secrets that only their provider can revoke (OPENROUTER_API_KEY and the like)."""
    handled = {k for r in ROTATORS for k in r.keys}
    return sorted(k for k in env if k.endswith(PROVIDER_SUFFIXES) and k not in handled and env[k])
