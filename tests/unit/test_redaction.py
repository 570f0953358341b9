"""No password reaches a log: the patterns, and what real code paths write through a real handler.

The control arm is the redaction as it was (its URL pattern, and no filter on the logger):
tests/unit/test_conf_and_log.py keeps the older, simpler cases.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from serverhooks import _log
from tests.support import procs

pytestmark = pytest.mark.core

#: The URL pattern before the fix: credentials stopped at the FIRST '@'.
OLD_URL_PATTERN = r"(?i)([a-z][a-z0-9+.-]*://[^:/@\s]*:)[^@\s]*@"
SECRET = "Zq@secret@42"


@pytest.mark.parametrize(
    ("text", "kept"),
    [
        (f"dsn: postgres://app:{SECRET}@db.internal:5432/app?sslmode=require", "@db.internal:5432/app?sslmode"),
        (f"{{'url': 'mysql://app:{SECRET}@db:3306/app', 'note': 'a@b'}}", "@db:3306/app"),
        (f"postgres://app@server:{SECRET}@db/app", "postgres://app@server:***@db/app"),
        (f"DATABASES = {{'default': {{'PASSWORD': '{SECRET}', 'HOST': 'db'}}}}", "'HOST': 'db'"),
        (f'{{"password": "{SECRET}", "user": "app"}}', '"user": "app"'),
        (f"PGPASSWORD={SECRET} psql -h db", "psql -h db"),
        (f"connection to 'host=db password='{SECRET}' dbname=app' failed", "dbname=app"),
    ],
)
def test_every_form_of_a_password_is_redacted_whole(text: str, kept: str) -> None:
    redacted = _log.redact(text)
    assert "secret" not in redacted and "42" not in redacted, redacted
    assert kept in redacted, redacted  # what says where stays


def test_control_the_old_url_pattern_leaks_what_follows_an_at_sign() -> None:
    text = f"dsn: postgres://app:{SECRET}@db.internal:5432/app"
    leaked = re.sub(OLD_URL_PATTERN, r"\1***@", text)
    assert leaked == "dsn: postgres://app:***@secret@42@db.internal:5432/app"


@pytest.mark.parametrize(
    "text",
    [
        "(1045, \"Access denied for user 'root'@'localhost' (using password: YES)\")",
        "postgres://app@db.internal:5432/app",
        "user@example.com wrote to https://example.com/a@b",
    ],
)
def test_text_without_a_password_is_left_as_it_is(text: str) -> None:
    assert _log.redact(text) == text


BROKEN_SETTINGS = """
'''A settings module that fails to import, quoting its DSN (as URL parsers do).'''


def parse(url):
    raise ValueError(f"unsupported DATABASE_URL {url}")


DATABASES = {"default": {"PASSWORD": "%(secret)s", **parse("postgres://app:%(secret)s@db.internal:5432/app")}}
"""

REAL_PATHS = r"""
import logging, os, re
logging.basicConfig(level=logging.DEBUG, format="%(levelname)s %(name)s %(message)s")
from serverhooks import _log
if os.environ["ARM"] == "reverted":
    _log._SECRET_PATTERNS = (*_log._SECRET_PATTERNS[:-1], (re.compile(os.environ["OLD_URL_PATTERN"]), r"\1***@"))
    for existing in list(_log.logger.filters):
        _log.logger.removeFilter(existing)
import serverhooks
from serverhooks import _adapter

serverhooks.prepare_worker()  # a worker whose settings module does not load: one WARNING
with _adapter.never_raise("post_fork", "Gunicorn"):  # a hook meets the same error: its DEBUG traceback
    from django.conf import settings

    settings.DATABASES
print("ok")
"""


@pytest.mark.parametrize("arm", ["reverted", "fixed"])
def test_a_broken_settings_module_and_its_traceback_never_log_the_password(arm: str, tmp_path: Path) -> None:
    """Before: the WARNING kept what followed the password's first '@' ("secret@42"), and the DEBUG
    traceback of never_raise() went out as it was, the settings line with the password in it."""
    (tmp_path / "broken_settings.py").write_text(BROKEN_SETTINGS % {"secret": SECRET})
    env = {key: value for key, value in os.environ.items() if not key.startswith("SERVERHOOKS_")}
    env.update(
        ARM=arm,
        OLD_URL_PATTERN=OLD_URL_PATTERN,
        DJANGO_SETTINGS_MODULE="broken_settings",
        PYTHONPATH=os.pathsep.join([str(tmp_path), str(procs.REPO)]),
    )
    out = subprocess.run(
        [sys.executable, "-c", REAL_PATHS], cwd=procs.REPO, env=env, capture_output=True, text=True, timeout=60
    )
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stdout + out.stderr
    log = out.stderr
    print(log)
    assert "WARNING serverhooks serverhooks: cannot load Django settings" in log, log
    assert "DEBUG serverhooks serverhooks: post_fork traceback\nTraceback (most recent call last):" in log, log
    if arm == "reverted":
        assert "secret@42@db.internal" in log and f'"PASSWORD": "{SECRET}"' in log, log
        return
    assert "secret" not in log, log
    assert "postgres://app:***@db.internal:5432/app" in log and '"PASSWORD": ***' in log, log
    assert "ValueError: unsupported DATABASE_URL" in log, log
