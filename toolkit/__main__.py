"""`python -m toolkit`: the same CLI as the bookgen-kit console script."""
import sys

from toolkit.cli import main

sys.exit(main())
