"""Settings resolution and log redaction: pure functions, no server needed."""

from __future__ import annotations

import logging

import pytest

from serverhooks import _log, conf

pytestmark = pytest.mark.core


@pytest.mark.parametrize(
    ("text", "secret"),
    [
        ("connection to 'host=db password=hunter22 dbname=x' failed", "hunter22"),
        ("dsn: postgres://app:hunter22@db:5432/x", "hunter22"),
        ("password='hunter 22' user=x", "hunter 22"),
        ("(1045, \"Access denied for user 'root'@'localhost' (using password: YES)\")", None),
    ],
)
def test_redact_removes_passwords_and_url_credentials(text: str, secret: str | None) -> None:
    redacted = _log.redact(text)
    if secret:
        assert secret not in redacted and "***" in redacted
    else:
        assert redacted == text


def test_redact_removes_remembered_secrets() -> None:
    _log.remember_secret("Zx9-very-secret")
    assert "Zx9-very-secret" not in _log.redact("driver said: bad auth Zx9-very-secret")


def test_environment_overrides_and_bad_values_fall_back(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setenv("SERVERHOOKS_FORK_GUARD", "off")
    monkeypatch.setenv("SERVERHOOKS_STATS_LOG_LEVEL", "loud")
    conf.reload()
    with caplog.at_level(logging.WARNING, logger="serverhooks"):
        resolved, _complete = conf.load()
    assert resolved["FORK_GUARD"] is False
    assert resolved["STATS_LOG_LEVEL"] == "DEBUG"
    assert "SERVERHOOKS_STATS_LOG_LEVEL: expected DEBUG, INFO or WARNING, got 'loud'" in caplog.text
    conf.reload()


def test_every_setting_default_parses_to_itself() -> None:
    for setting in conf.SETTINGS:
        assert setting.parse(setting.default) == setting.default
