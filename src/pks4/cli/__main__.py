"""``python -m pks4.cli``: the ``pks4`` command (what ``torchrun -m pks4.cli`` starts on every rank)."""
import sys

from pks4.cli import main

sys.exit(main())
