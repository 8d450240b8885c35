"""`python -m uff_port` is the same program as the `uff-port` console script."""

from __future__ import annotations

import sys

from uff_port.cli import main

if __name__ == "__main__":
    sys.exit(main())
