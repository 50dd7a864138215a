"""`python -m bench` (what `make bench` runs); `python -m bench --help` lists the knobs."""

from __future__ import annotations

import sys

from .cli import main

sys.exit(main(sys.argv[1:]))
