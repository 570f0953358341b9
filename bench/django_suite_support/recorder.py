"""A DiscoverRunner whose results also go, one JSON line per outcome, to $DJANGO_SUITE_OUTCOMES.

The text output (`--verbosity 2`) is unittest's own, unchanged; the JSON lines are what the
harness compares, because the text interleaves with whatever tests print and with docstrings.

Each line: {"id": test id, "outcome": "ok" | "FAIL" | "ERROR" | "skipped" | "expected failure" |
"unexpected success", "detail": traceback or skip reason, "seconds": duration,
"serverhooks": {counter: increase during the test}, "log": [serverhooks' log lines]}.
A subtest that fails is its own line (its id carries the parameters); errors outside a test
(setUpClass, tearDownClass, a module that does not import) are lines whose id says so. The last
line is {"summary": {...}}, written when the run ends.

The serverhooks counters and log lines exist only in the prepared arm, and only for tests that
ran in this process (--parallel 1): with parallel workers the parent only replays their results.
"""

from __future__ import annotations

import json
import logging
import os
import sys
import time
import unittest
from types import TracebackType
from typing import Any, cast

from django.test.runner import DiscoverRunner

ExcInfo = tuple[type[BaseException], BaseException, TracebackType] | tuple[None, None, None]

OUTCOMES_ENV = "DJANGO_SUITE_OUTCOMES"
# The serverhooks counters reported per test (when they changed).
COUNTERS = ("sessions_opened", "closed_interrupted", "closed_unhealthy", "abandoned_after_fork", "errors")
LOG_LINES_PER_TEST = 5

# serverhooks' log records of this process, drained by each outcome (the launcher collects them).
_log_lines: list[str] = []


class _Collect(logging.Handler):
    def emit(self, record: logging.LogRecord) -> None:
        try:
            _log_lines.append(f"{record.levelname} {record.getMessage()}")
        except Exception:
            self.handleError(record)


def collect_serverhooks_log() -> None:
    """Keep serverhooks' log records (DEBUG and up) for the outcome lines; idempotent."""
    log = logging.getLogger("serverhooks")
    if not any(isinstance(handler, _Collect) for handler in log.handlers):
        log.addHandler(_Collect(logging.DEBUG))
        log.setLevel(logging.DEBUG)


def _serverhooks_counters() -> dict[str, float]:
    module = sys.modules.get("serverhooks")
    if module is None:
        return {}
    try:
        stats: dict[str, Any] = module.stats()
    except Exception:
        return {}
    return {key: float(stats.get(key, 0)) for key in COUNTERS}


class RecordingResult(unittest.TextTestResult):
    """unittest's text result, plus one JSON line per outcome."""

    def __init__(self, stream: Any, descriptions: bool, verbosity: int, **kwargs: Any) -> None:
        super().__init__(stream, descriptions, verbosity, **kwargs)
        path = os.environ.get(OUTCOMES_ENV)
        self._sink = open(path, "a", encoding="utf-8") if path else None  # noqa: SIM115 - open for the run
        self._started: dict[str, float] = {}
        self._counters_at_start: dict[str, dict[str, float]] = {}
        self._counts: dict[str, int] = {}

    def _write(self, line: dict[str, Any]) -> None:
        if self._sink is not None:
            self._sink.write(json.dumps(line) + "\n")
            self._sink.flush()

    def startTest(self, test: unittest.TestCase) -> None:
        self._started[test.id()] = time.monotonic()
        self._counters_at_start[test.id()] = _serverhooks_counters()
        super().startTest(test)

    def _record(self, test: Any, outcome: str, detail: str = "", test_id: str | None = None) -> None:
        key = test_id or test.id()
        started = self._started.get(test.id())
        line: dict[str, Any] = {
            "id": key,
            "outcome": outcome,
            "detail": detail,
            "seconds": round(time.monotonic() - started, 3) if started is not None else None,
        }
        before = self._counters_at_start.get(test.id())
        if before:
            after = _serverhooks_counters()
            changed = {name: after[name] - before.get(name, 0) for name in after if after[name] != before.get(name, 0)}
            if changed:
                line["serverhooks"] = changed
        if _log_lines:
            line["log"] = _log_lines[:LOG_LINES_PER_TEST] + (
                [f"... and {len(_log_lines) - LOG_LINES_PER_TEST} more"] if len(_log_lines) > LOG_LINES_PER_TEST else []
            )
            _log_lines.clear()
        self._counts[outcome] = self._counts.get(outcome, 0) + 1
        self._write(line)

    def _describe(self, err: ExcInfo, test: unittest.TestCase) -> str:
        """The traceback as unittest prints it (its own frames left out)."""
        text: str = cast(Any, self)._exc_info_to_string(err, test)
        return text

    def addSuccess(self, test: unittest.TestCase) -> None:
        super().addSuccess(test)
        self._record(test, "ok")

    def addFailure(self, test: unittest.TestCase, err: ExcInfo) -> None:
        super().addFailure(test, err)
        self._record(test, "FAIL", self._describe(err, test))

    def addError(self, test: unittest.TestCase, err: ExcInfo) -> None:
        super().addError(test, err)
        self._record(test, "ERROR", self._describe(err, test))

    def addSkip(self, test: unittest.TestCase, reason: str) -> None:
        super().addSkip(test, reason)
        self._record(test, "skipped", reason)

    def addExpectedFailure(self, test: unittest.TestCase, err: ExcInfo) -> None:
        super().addExpectedFailure(test, err)
        self._record(test, "expected failure", self._describe(err, test))

    def addUnexpectedSuccess(self, test: unittest.TestCase) -> None:
        super().addUnexpectedSuccess(test)
        self._record(test, "unexpected success")

    def addSubTest(self, test: unittest.TestCase, subtest: unittest.TestCase, err: ExcInfo | None) -> None:
        super().addSubTest(test, subtest, err)
        if err is not None and err[0] is not None:
            outcome = "FAIL" if issubclass(err[0], test.failureException) else "ERROR"
            self._record(test, outcome, self._describe(err, subtest), test_id=subtest.id())

    def stopTestRun(self) -> None:
        super().stopTestRun()
        summary = {"testsRun": self.testsRun, "outcomes": self._counts, "pid": os.getpid()}
        self._write({"summary": {**summary, "serverhooks_imported": "serverhooks" in sys.modules}})
        if self._sink is not None:
            self._sink.close()
            self._sink = None


class RecordingRunner(DiscoverRunner):
    """Django's DiscoverRunner, with RecordingResult unless --debug-sql or --pdb asks for theirs."""

    def get_resultclass(self) -> type[unittest.TextTestResult] | None:
        own = super().get_resultclass()
        return own if own is not None else RecordingResult
