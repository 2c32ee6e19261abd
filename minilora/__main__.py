"""``python -m minilora ...`` runs the ``minilora`` command (see minilora/cli.py)."""

import sys

from .cli import main

sys.exit(main())
