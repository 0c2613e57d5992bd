"""`python -m fxinplace run train.py ...` / `python -m fxinplace show report.json`: see `fxinplace.cli`."""

from __future__ import annotations

import sys

from .cli import main

if __name__ == "__main__":
    sys.exit(main())
