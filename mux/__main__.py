"""``python -m mux``: see ``mux.cli``."""

from __future__ import annotations

import sys

if __name__ == "__main__":
    from .heap import early_jemalloc

    early_jemalloc(sys.argv[1:])  # serve: under jemalloc before the heavy imports
    from .cli import main

    sys.exit(main())
