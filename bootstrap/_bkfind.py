"""Which interpreters on this host could run this build, for the one-line refusals.

Imported only when bookgen-kit refuses to run, also by interpreters it does not
support: it must stay valid Python 2.7 and 3.x (no f-strings, no annotations). It
runs nothing: an interpreter's version is read from its name (python3.11) or from
the name its symlinks resolve to (/usr/libexec/platform-python -> python3.9).
"""
import os
import re
import sys

KNOWN = ("3.8", "3.9", "3.10", "3.11", "3.12", "3.13", "3.14", "3.15")  # filled in by build.py
PLACES = ("/usr/local/bin", "/usr/bin", "/bin", "/opt/python3/bin")
SPECIAL = ("/usr/libexec/platform-python",)


def _key(version):
    return tuple(int(p) for p in version.split("."))


def _version_of(path):
    name = os.path.basename(os.path.realpath(path))
    match = re.match(r"^python(3\.\d+)$", name)
    return match.group(1) if match else None


def suitable(exclude=None):
    """[(path, version)] of CPython interpreters this build has a target for, newest first."""
    directories = [d for d in os.environ.get("PATH", "").split(os.pathsep) if d.startswith("/")]
    directories += [d for d in PLACES if d not in directories]
    found, seen = [], set()
    exclude_real = os.path.realpath(exclude) if exclude else None
    for directory in directories:
        for version in KNOWN:
            path = os.path.join(directory, "python" + version)
            if not os.path.isfile(path) or not os.access(path, os.X_OK):
                continue
            real = os.path.realpath(path)
            if real in seen or real == exclude_real:
                continue
            seen.add(real)
            found.append((path, version))
    for special in SPECIAL:
        version = _version_of(special) if os.path.exists(special) else None
        if version in KNOWN and os.access(special, os.X_OK):
            real = os.path.realpath(special)
            if real not in seen and real != exclude_real:
                seen.add(real)
                found.append((special, version))
    found.sort(key=lambda item: _key(item[1]), reverse=True)
    return found


def hint(pyz=None, exclude=None):
    """One sentence naming the interpreters that would work here."""
    pyz = pyz or (sys.argv[0] if sys.argv and sys.argv[0] else "bookgen-kit.pyz")
    found = suitable(exclude)
    if not found:
        return "no CPython %s to %s found on this host (PATH, %s, %s)" % (
            KNOWN[0], KNOWN[-1], ", ".join(PLACES), ", ".join(SPECIAL))
    names = ", ".join("%s (%s)" % (path, version) for path, version in found[:4])
    return "on this host %s would work: run `%s -I -S %s`, or `sh %s` to let the pyz choose" % (
        names, found[0][0], pyz, pyz)


def range_text():
    versions = KNOWN[0] if len(KNOWN) == 1 else "%s to %s" % (KNOWN[0], KNOWN[-1])
    return "CPython %s (a newer CPython runs with a warning)" % versions


def refuse_old(minimum):
    sys.stderr.write("bookgen-kit: error: unsupported interpreter: Python %d.%d; this build needs %s; %s\n" % (
        sys.version_info[0], sys.version_info[1], range_text(), hint(exclude=sys.executable)))
    return 4
