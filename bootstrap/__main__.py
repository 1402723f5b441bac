# bookgen-kit zipapp entry point.
# This file must stay parseable by any Python (2.7 included), so that an unsupported
# interpreter gets one clear line instead of a SyntaxError: no f-strings, no annotations.
import sys

MINIMUM = (3, 8)  # filled in by build.py

if sys.version_info[:2] < MINIMUM:
    import _bkfind

    sys.exit(_bkfind.refuse_old(MINIMUM))

import os  # noqa: E402

# The bootstrap as bytecode of this very version when the build has it (no compile at
# start-up), else its source from the archive's root.
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "boot", "cp%d%d" % sys.version_info[:2]))
import _bkboot  # noqa: E402

sys.exit(_bkboot.main())
