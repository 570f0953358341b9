"""`python -m tests.support.integrity --help`."""

from __future__ import annotations

import sys

from tests.support.integrity.runner import main

if __name__ == "__main__":
    sys.exit(main())
