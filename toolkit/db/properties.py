"""What a database is beyond its tables: owner, encoding and locale, connection limit, grants, settings of the
database and of roles in it, comment, and the versions of its extensions.

pg_dump without --create keeps none of the database-level ones, and a restore into a new database would
quietly lose a `REVOKE CONNECT ... FROM PUBLIC`. So a set records them (read), a restore creates the new
database with them and gives the rest back before the swap (apply), and the comparison includes them (compare).

Invariants: read through catalog queries that return one JSON text (the same in host and container mode);
applied with CREATE/ALTER/GRANT/REVOKE/COMMENT only, never by writing catalogs; grants compared as the
effective privileges (aclexplode of the ACL or its default), so "no ACL" and "the default ACL" are equal.
"""
from __future__ import annotations

import json
from typing import Any, Dict, List, Optional, Tuple

from toolkit.db.server import Server, quote_ident, quote_literal
from toolkit.errors import BadInputError, KitError

# settings whose value is a list of names, each quoted on its own (pg_dump's variable_is_guc_list_quote)
LIST_SETTINGS = {"search_path", "temp_tablespaces", "session_preload_libraries", "local_preload_libraries",
                 "shared_preload_libraries", "unix_socket_directories"}
PROPERTIES_SQL = """
SELECT json_build_object(
  'owner', pg_get_userbyid(d.datdba),
  'encoding', pg_encoding_to_char(d.encoding),
  'collate', d.datcollate, 'ctype', d.datctype, %(locale)s,
  'connection_limit', d.datconnlimit,
  'comment', shobj_description(d.oid, 'pg_database'),
  'grants', (SELECT coalesce(json_agg(json_build_array(
                CASE WHEN a.grantee = 0 THEN 'PUBLIC' ELSE pg_get_userbyid(a.grantee) END,
                a.privilege_type, a.is_grantable) ORDER BY 1, 2, 3), '[]')
               FROM aclexplode(coalesce(d.datacl, acldefault('d', d.datdba))) a),
  'settings', (SELECT coalesce(json_agg(json_build_array(
                CASE WHEN s.setrole = 0 THEN NULL ELSE pg_get_userbyid(s.setrole) END, s.setconfig)
                ORDER BY s.setrole), '[]')
               FROM pg_db_role_setting s WHERE s.setdatabase = d.oid)
)::text FROM pg_database d WHERE d.datname = %(name)s
"""


def _locale_columns(major: int) -> str:
    if major >= 17:
        return "'locale_provider', d.datlocprovider, 'locale', d.datlocale"
    if major >= 15:
        return "'locale_provider', d.datlocprovider, 'locale', d.daticulocale"
    return "'locale_provider', 'c', 'locale', NULL"


def read(server: Server, database: str) -> Dict[str, Any]:
    rows = server.query(PROPERTIES_SQL % {"locale": _locale_columns(server.server_major()),
                                          "name": quote_literal(database)}, server.admin_database)
    if not rows:
        raise BadInputError("no database %s" % database)
    found = json.loads(rows[0][0])
    found["grants"] = sorted([list(g) for g in found["grants"]])
    found["settings"] = sorted([[role, sorted(config or [])] for role, config in found["settings"]],
                               key=lambda s: (s[0] is not None, s[0] or ""))
    extensions = server.query("SELECT coalesce(json_object_agg(extname, extversion), '{}')::text FROM pg_extension",
                              database)
    found["extensions"] = json.loads(extensions[0][0])
    return found


def create_options(recorded: Optional[Dict[str, Any]], owner: Optional[str]) -> str:
    """The CREATE DATABASE options that give the new database the set's owner, encoding and locale."""
    parts = []
    if owner:
        parts.append("OWNER %s" % quote_ident(owner))
    if recorded:
        parts.append("ENCODING %s LC_COLLATE %s LC_CTYPE %s" % (
            quote_literal(recorded["encoding"]), quote_literal(recorded["collate"]), quote_literal(recorded["ctype"])))
        if recorded.get("locale_provider") == "i" and recorded.get("locale"):
            parts.append("LOCALE_PROVIDER icu ICU_LOCALE %s" % quote_literal(recorded["locale"]))
    return (" " + " ".join(parts)) if parts else ""


def split_list_setting(value: str) -> List[str]:
    """`public, "$user"` -> ['public', '$user'] (SplitGUCList: commas outside double quotes; "" is a quote)."""
    items, current, quoted, index = [], [], False, 0
    while index < len(value):
        char = value[index]
        if char == '"':
            if quoted and index + 1 < len(value) and value[index + 1] == '"':
                current.append('"')
                index += 1
            else:
                quoted = not quoted
        elif char == "," and not quoted:
            items.append("".join(current).strip())
            current = []
        else:
            current.append(char)
        index += 1
    items.append("".join(current).strip())
    return [item for item in items if item]


def _set_statement(database: str, role: Optional[str], item: str) -> str:
    name, _, value = item.partition("=")
    values = split_list_setting(value) if name.lower() in LIST_SETTINGS else [value]
    target = ("ROLE %s IN DATABASE %s" % (quote_ident(role), quote_ident(database))) if role else \
        "DATABASE %s" % quote_ident(database)
    return "ALTER %s SET %s TO %s" % (target, quote_ident(name), ", ".join(quote_literal(v) for v in values))


def _grantee(name: str) -> str:
    return "PUBLIC" if name == "PUBLIC" else quote_ident(name)


def apply(server: Server, database: str, recorded: Dict[str, Any]) -> List[str]:
    """Give `database` the recorded owner, limit, comment, settings, grants and extension versions.
    Returns what could not be given back (a role that does not exist here, an extension version not
    installable); the comparison that follows fails on those."""
    problems: List[str] = []
    admin = server.admin_database
    roles = {row[0] for row in server.query("SELECT rolname FROM pg_roles", admin)}

    def run(statement: str, what: str, dbname: str = admin) -> None:
        try:
            server.query(statement, dbname)
        except KitError as error:
            problems.append("%s: %s" % (what, error.message))

    name = quote_ident(database)
    if recorded.get("owner") in roles:
        run("ALTER DATABASE %s OWNER TO %s" % (name, quote_ident(recorded["owner"])), "owner")
    else:
        problems.append("owner %s is not a role on this server" % recorded.get("owner"))
    run("ALTER DATABASE %s CONNECTION LIMIT %d" % (name, int(recorded.get("connection_limit", -1))),
        "connection limit")
    comment = recorded.get("comment")
    run("COMMENT ON DATABASE %s IS %s" % (name, quote_literal(comment) if comment is not None else "NULL"), "comment")
    for role, config in recorded.get("settings", []):
        if role is not None and role not in roles:
            problems.append("settings of role %s in the database: no such role on this server" % role)
            continue
        for item in config:
            run(_set_statement(database, role, item), "setting %s%s" % (item.partition("=")[0], (
                " of role %s" % role) if role else ""))
    current = read(server, database)
    wanted = {tuple(g) for g in recorded.get("grants", [])}
    have = {tuple(g) for g in current["grants"]}
    for grantee, privilege, grantable in sorted(have - wanted):
        if (grantee, privilege, not grantable) in wanted:  # only the grant option differs
            continue
        run("REVOKE %s ON DATABASE %s FROM %s" % (privilege, name, _grantee(grantee)), "revoke %s" % privilege)
    for grantee, privilege, grantable in sorted(wanted - have):
        if grantee != "PUBLIC" and grantee not in roles:
            problems.append("grant of %s to %s: no such role on this server" % (privilege, grantee))
            continue
        if not grantable and (grantee, privilege, True) in have:
            run("REVOKE GRANT OPTION FOR %s ON DATABASE %s FROM %s" % (privilege, name, _grantee(grantee)),
                "grant option")
        else:
            run("GRANT %s ON DATABASE %s TO %s%s" % (privilege, name, _grantee(grantee),
                                                      " WITH GRANT OPTION" if grantable else ""), "grant")
    for extension, version in sorted((recorded.get("extensions") or {}).items()):
        now = current["extensions"].get(extension)
        if now is not None and now != version:
            run("ALTER EXTENSION %s UPDATE TO %s" % (quote_ident(extension), quote_literal(version)),
                "extension %s %s" % (extension, version), database)
    return problems


LABELS: Tuple[Tuple[str, str], ...] = (
    ("owner", "owner"), ("encoding", "encoding"), ("collate", "LC_COLLATE"), ("ctype", "LC_CTYPE"),
    ("locale_provider", "locale provider"), ("locale", "locale"), ("connection_limit", "connection limit"),
    ("comment", "comment"), ("grants", "database grants"), ("settings", "database and role-in-database settings"),
    ("extensions", "extension versions"))


def compare(recorded: Dict[str, Any], actual: Dict[str, Any]) -> List[str]:
    """One line per property that differs, naming both values."""
    problems = []
    for key, label in LABELS:
        if key not in recorded:
            continue
        if recorded[key] != actual.get(key):
            problems.append("%s: %s, the set says %s" % (label, json.dumps(actual.get(key)), json.dumps(recorded[key])))
    return problems
