"""The `serverhooks` logger, with redaction and say-once helpers.

The contract is that no password or full DSN ever reaches a log, and driver errors, settings
modules that fail to import and tracebacks can all quote one. So every record of the
`serverhooks` logger passes a filter that redacts its message, its arguments and its traceback
text before any handler sees it. Log on this logger only: a child logger's records would reach
the handlers without this logger's filter.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Iterable

__all__ = ["describe_error", "logger", "redact", "remember_secret", "say_once"]

logger = logging.getLogger("serverhooks")

_VALUE = r"""('[^']*'|"[^"]*"|\S+)"""
# (pattern, replacement): each pattern's first group is kept, the secret becomes ***.
_SECRET_PATTERNS: tuple[tuple[re.Pattern[str], str], ...] = (
    # key=value, as libpq, mysqlclient, command lines and environments print it: password=...,
    # PGPASSWORD=..., DB_PASSWORD = '...'.
    (re.compile(rf"(?i)\b(\w*(?:password|passwd|pwd)\s*=\s*){_VALUE}"), r"\1***"),
    # A quoted key and a colon, as a dict, JSON or a settings module's source line shows it:
    # 'PASSWORD': '...'. Not a bare `password: YES` (MySQL's "using password: YES" holds none).
    (re.compile(rf"""(?i)((['"])\w*(?:password|passwd|pwd)\2\s*:\s*){_VALUE}"""), r"\1***"),
    # URL credentials: everything between the user's ':' and the LAST '@' before the host part
    # (a host holds no '@'), since a password may hold an unencoded '@' (or ':', or '/'). The
    # user part may hold an '@' too (user@server, as Azure spells it).
    (re.compile(r"(?i)([a-z][a-z0-9+.-]*://[^:/\s]*:)\S*@(?=[^@/\s]*(?:[/?#\s'\"),;]|$))"), r"\1***@"),
)
_known_secrets: set[str] = set()
_said: set[str] = set()


def remember_secret(secret: object) -> None:
    """Register a literal (a configured password) that must never be logged."""
    if isinstance(secret, str) and len(secret) >= 3:
        _known_secrets.add(secret)


def redact(text: object, secrets: Iterable[str] = ()) -> str:
    """`text` with passwords and URL credentials replaced by `***`."""
    out = str(text)
    # Longest first: a remembered secret that holds a shorter one is replaced whole.
    for secret in sorted({*_known_secrets, *secrets}, key=len, reverse=True):
        if secret:
            out = out.replace(secret, "***")
    for pattern, replacement in _SECRET_PATTERNS:
        out = pattern.sub(replacement, out)
    return out


class _Redacting(logging.Filter):
    """Redacts each record in place, before any handler (or formatter) sees it: the message with
    its arguments merged in, the traceback as text (the exception object itself is dropped: its
    args may hold the secret), and the stack text."""

    _formatter = logging.Formatter()

    def filter(self, record: logging.LogRecord) -> bool:
        try:
            message = record.getMessage()
        except Exception:  # arguments that do not fit: logging would report it; keep it redacted
            message = f"{record.msg} {record.args}"
        record.msg, record.args = redact(message), ()
        if record.exc_info:
            record.exc_text = self._formatter.formatException(record.exc_info)
            record.exc_info = None
        if record.exc_text:
            record.exc_text = redact(record.exc_text)
        if record.stack_info:
            record.stack_info = redact(record.stack_info)
        return True


if not any(isinstance(existing, _Redacting) for existing in logger.filters):
    logger.addFilter(_Redacting())


def describe_error(exc: BaseException) -> str:
    """`ExcType: message`, redacted, on one line."""
    message = " ".join(redact(exc).split())
    return f"{type(exc).__name__}: {message}" if message else type(exc).__name__


def say_once(key: str, level: int, message: str, *args: object) -> None:
    """Log `message` the first time `key` is seen in this process (and its forks)."""
    if key in _said:
        return
    _said.add(key)
    logger.log(level, message, *args)
