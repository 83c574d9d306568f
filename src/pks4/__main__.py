"""``python -m pks4``: the same command line as the ``pks4`` script (for environments without it on PATH)."""
import sys

from pks4.cli import main

sys.exit(main())
