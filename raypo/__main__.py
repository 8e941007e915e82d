"""``python -m raypo`` runs the ``raypo`` command line."""

import sys

from raypo.cli import main

if __name__ == "__main__":
    sys.exit(main())
