"""``python -m parity``: see parity/cli.py."""

import sys

from parity.cli import main

sys.exit(main())
