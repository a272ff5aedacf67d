"""``python -m tests.bench [SECTION ...]``: run benchmark sections and print one table."""

from __future__ import annotations

import sys
from collections.abc import Callable

from . import core, server

SECTIONS: dict[str, Callable[[], list[tuple[str, str]]]] = {"core": core.run, "server": server.run}


def main(argv: list[str]) -> int:
    """Run the named sections (default: all) and print their rows."""
    names = argv or list(SECTIONS)
    for name in names:
        if name not in SECTIONS:
            print(f"unknown section {name!r}; choose from {', '.join(SECTIONS)}", file=sys.stderr)
            return 2
    print(f"{'benchmark':<72} result")
    for name in names:
        for label, value in SECTIONS[name]():
            print(f"{label:<72} {value}")
            sys.stdout.flush()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
