"""The `serverhooks` logger, with redaction and say-once helpers.

Every message that may carry driver text goes through `redact()`, because
driver errors can echo a DSN, and the contract is that no password or full
DSN ever reaches a log.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Iterable

__all__ = ["describe_error", "logger", "redact", "remember_secret", "say_once"]

logger = logging.getLogger("serverhooks")

# key=value and URL credentials, as libpq, mysqlclient and URL parsers print them.
_SECRET_PATTERNS = (
    re.compile(r"(?i)\b(password|passwd|pwd)\s*=\s*('[^']*'|\"[^\"]*\"|\S+)"),
    re.compile(r"(?i)([a-z][a-z0-9+.-]*://[^:/@\s]*:)[^@\s]*@"),
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
    for secret in (*_known_secrets, *secrets):
        if secret:
            out = out.replace(secret, "***")
    out = _SECRET_PATTERNS[0].sub(lambda m: f"{m.group(1)}=***", out)
    out = _SECRET_PATTERNS[1].sub(lambda m: f"{m.group(1)}***@", out)
    return out


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
