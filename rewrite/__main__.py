"""``python -m rewrite``: the command line (see :mod:`rewrite.cli`)."""
import sys

from .cli import main

sys.exit(main())
