"""bookgen-kit's stand-in for certifi.

requests imports certifi and asks it for a CA bundle path at import time; the real
certifi would extract its bundle from the zipapp into a temporary file. bookgen-kit
never makes a TLS connection (offline by construction: only local PostgreSQL,
Redis, the Docker socket and loopback health URLs), so it ships no CA bundle and
points at the host's, which nothing in the kit reads.
"""

__version__ = "0+bookgen-kit-stub"


def where() -> str:
    return "/etc/ssl/certs/ca-certificates.crt"


def contents() -> str:
    with open(where(), encoding="ascii") as bundle:
        return bundle.read()
