"""``python -m <package>`` runs the same CLI as the console script."""

import sys

from .runtime.operate.cli import main

sys.exit(main())
