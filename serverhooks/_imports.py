"""Run a step right after a module is imported, by whoever imports it, without importing it ourselves.

Importing a driver or `django.db` early has costs serverhooks must not impose (Django's connection
storage made before gevent patches threading; psycopg's waiting functions bound before the patch),
and waiting for our next hook can be too late (the first connection is already made). The finder
below finds nothing itself: it wraps the real loader of one module only, runs the step after that
module's body, then leaves sys.meta_path.
"""

from __future__ import annotations

import contextlib
import importlib.abc
import importlib.machinery
import sys
from collections.abc import Callable, Sequence
from types import ModuleType

from serverhooks._log import describe_error, logger

__all__ = ["AfterImport", "after_import", "cancel"]


class AfterImport(importlib.abc.MetaPathFinder):
    """Runs `step` once, right after `fullname`'s body has run (the module is in sys.modules)."""

    def __init__(self, fullname: str, step: Callable[[], None], what: str) -> None:
        self.fullname = fullname
        self.step = step
        self.what = what  # for the log line, should the step fail

    def find_spec(
        self, fullname: str, path: Sequence[str] | None, target: ModuleType | None = None
    ) -> importlib.machinery.ModuleSpec | None:
        if fullname != self.fullname:
            return None
        spec: importlib.machinery.ModuleSpec | None = None
        for finder in [f for f in sys.meta_path if f is not self]:
            find_spec = getattr(finder, "find_spec", None)
            found = find_spec(fullname, path, target) if find_spec is not None else None
            spec = found if isinstance(found, importlib.machinery.ModuleSpec) else None
            if spec is not None:
                break
        else:
            return None
        loader = spec.loader
        exec_module = getattr(loader, "exec_module", None)
        if loader is None or exec_module is None:
            return None  # no loader we can wrap: the import goes on untouched

        def exec_then_step(module: ModuleType) -> None:
            exec_module(module)
            cancel(self)
            try:
                self.step()
            except Exception as exc:  # never fail the user's import
                logger.warning("serverhooks: %s, after %s was imported: %s", self.what, fullname, describe_error(exc))

        loader.exec_module = exec_then_step  # type: ignore[method-assign]
        return spec


def after_import(fullname: str, step: Callable[[], None], what: str) -> AfterImport:
    """Run `step` as soon as `fullname` is imported (the caller checks that it is not yet)."""
    finder = AfterImport(fullname, step, what)
    sys.meta_path.insert(0, finder)
    return finder


def cancel(finder: AfterImport | None) -> None:
    """Take a waiting finder out of sys.meta_path (a no-op once it has run)."""
    if finder is not None:
        with contextlib.suppress(ValueError):
            sys.meta_path.remove(finder)
