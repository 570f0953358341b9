"""Per-process counters: what serverhooks did to this process's connections.

They are plain integers in this process's state (serverhooks._process), so reading them
costs nothing, and a forked child starts from zero. Each worker logs them when it exits.
"""

from __future__ import annotations

import dataclasses

from serverhooks._process import Counters, state

__all__ = ["Counters", "counters", "stats"]


def counters() -> Counters:
    """The live counters of this process (mutated by serverhooks)."""
    return state().counters


def stats() -> dict[str, float]:
    """A snapshot of this process's counters, as a plain dict: `serverhooks.stats()`."""
    return dataclasses.asdict(counters())
