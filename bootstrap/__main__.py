# bookgen-kit zipapp entry point.
# This file must stay parseable by any Python, so that an unsupported interpreter
# gets one clear line instead of a SyntaxError: no f-strings, no annotations.
import os
import sys

if sys.version_info[0] != 3 or sys.version_info[1] < 9:
    sys.stderr.write(
        "bookgen-kit: error: unsupported interpreter: Python %d.%d; "
        "this build needs CPython 3.9 to 3.13 on Linux (glibc) x86_64 or aarch64\n"
        % (sys.version_info[0], sys.version_info[1])
    )
    sys.exit(4)

# Re-execute as `python3 -I -S` before anything else is imported: the host's
# site-packages, .pth files and PYTHON* variables take no part in the real run.
if not (sys.flags.isolated and sys.flags.no_site) and os.environ.get("BOOKGEN_KIT_REEXEC") != "1" \
        and os.environ.get("BOOKGEN_KIT_NO_REEXEC") != "1" and sys.executable and os.path.isfile(sys.executable):
    os.environ["BOOKGEN_KIT_REEXEC"] = "1"
    archive = os.path.dirname(os.path.abspath(__file__))
    try:
        os.execv(sys.executable, [sys.executable, "-I", "-S", archive] + sys.argv[1:])
    except OSError:
        pass  # carry on in this process; the bootstrap still cleans sys.path

import _bkboot  # noqa: E402  (after the version check on purpose)

sys.exit(_bkboot.main())
