"""`python -m serverhooks doctor ...`, the same as the `serverhooks` console script."""

from __future__ import annotations

import sys


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] != "doctor":
        print("usage: serverhooks doctor [--help]", file=sys.stderr)
        return 2
    from serverhooks.doctor.cli import main as doctor

    return doctor(argv[1:])


if __name__ == "__main__":
    sys.exit(main())
