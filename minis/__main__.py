"""``python -m minis ...``: the command line of :mod:`minis.cli`."""

import sys

from minis.cli import main

if __name__ == "__main__":
    sys.exit(main())
