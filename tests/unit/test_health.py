"""The idle-session check's parts that need no database: the peek, PostgreSQL's message types,
and the verdict on a socket whose peer sends what PostgreSQL sends (a socketpair stands in for
the server's end; tests/integration/test_faults_crash.py does the same against real servers)."""

from __future__ import annotations

import select
import socket
from collections.abc import Iterator
from types import SimpleNamespace
from typing import Any

import pytest

from serverhooks import health
from tests.support import health_control

pytestmark = pytest.mark.core


def message(kind: bytes, body: bytes = b"") -> bytes:
    return kind + (4 + len(body)).to_bytes(4, "big") + body


def notice(*fields: tuple[str, str]) -> bytes:
    """A NoticeResponse: a code letter, text and NUL per field, then a final NUL."""
    return message(b"N", b"".join(code.encode() + text.encode() + b"\x00" for code, text in fields) + b"\x00")


# The bytes PostgreSQL 15.20 sent to an idle session, captured from a real server: every other
# backend's last message in a crash-restart (a backend was killed with SIGKILL), and each
# backend's in `pg_ctl stop -m immediate`. Both are followed by the backend's FIN.
CRASH_NOTICE = notice(
    ("S", "WARNING"),
    ("V", "WARNING"),
    ("C", "57P02"),
    ("M", "terminating connection because of crash of another server process"),
    (
        "D",
        "The postmaster has commanded this server process to roll back the current transaction and exit, "
        "because another server process exited abnormally and possibly corrupted shared memory.",
    ),
    ("H", "In a moment you should be able to reconnect to the database and repeat your command."),
    ("F", "postgres.c"),
    ("L", "2895"),
    ("R", "quickdie"),
)
IMMEDIATE_NOTICE = notice(
    ("S", "WARNING"),
    ("V", "WARNING"),
    ("C", "57P01"),
    ("M", "terminating connection due to immediate shutdown command"),
    ("F", "postgres.c"),
    ("L", "2907"),
    ("R", "quickdie"),
)
# A notice a session that goes on may get (a RAISE WARNING in some other session's trigger does
# not reach it, but a server may send warnings of its own): healthy.
OTHER_NOTICE = notice(("S", "WARNING"), ("V", "WARNING"), ("C", "01000"), ("M", "something to know"))
NOTIFICATION = message(b"A", b"\x00\x00\x00\x01news\x00hello\x00")
PARAMETER = message(b"S", b"TimeZone\x00UTC\x00")
TERMINATED = message(
    b"E", b"SFATAL\x00VFATAL\x00C57P01\x00Mterminating connection due to administrator command\x00\x00"
)


def test_the_captured_notices_have_the_lengths_postgresql_sent() -> None:
    assert CRASH_NOTICE[1:5] == b"\x00\x00\x01\x8b" and IMMEDIATE_NOTICE[1:5] == b"\x00\x00\x00\x74"


@pytest.mark.parametrize(
    ("waiting", "healthy"),
    [
        (NOTIFICATION, True),
        (PARAMETER + notice(("S", "NOTICE"), ("V", "NOTICE"), ("C", "00000")), True),
        (OTHER_NOTICE, True),
        (message(b"A", b"x") + message(b"E", b"SFATAL\x00"), False),  # then "terminating connection"
        (TERMINATED, False),
        (b"", False),  # EOF
        (CRASH_NOTICE, False),
        (IMMEDIATE_NOTICE, False),
        (NOTIFICATION + CRASH_NOTICE, False),
        (notice(("S", "WARNING"), ("V", "WARNING"), ("C", "57P03")), False),  # cannot_connect_now
        (notice(("S", "FATAL"), ("V", "FATAL"), ("C", "XX000")), False),
        (notice(("S", "PANIK"), ("V", "PANIC"), ("C", "XX000")), False),  # S is translated, V is not
        (CRASH_NOTICE[:40], False),  # cut short after its code: judged on what arrived
        (CRASH_NOTICE[:20], True),  # cut short before its code: nothing says ended yet
        (NOTIFICATION + b"E\x00", False),  # an error whose header is still on its way
        (NOTIFICATION + b"N\x00", True),
        (b"N\x00\x00\x00\x02", False),  # a length no message has: the stream is out of step
    ],
)
def test_only_asynchronous_messages_mean_a_healthy_session(waiting: bytes, healthy: bool) -> None:
    assert health._only_async_messages(waiting) is healthy


def test_the_control_takes_a_backends_last_notice_for_a_healthy_session() -> None:
    """What the check judged before the fix (the integration tests' control arm)."""
    with health_control.reverted():
        assert health._only_async_messages(CRASH_NOTICE)
        assert health._only_async_messages(IMMEDIATE_NOTICE)
    assert not health._only_async_messages(CRASH_NOTICE)


def test_peek_leaves_the_bytes_for_the_driver() -> None:
    ours, peer = socket.socketpair()
    with ours, peer:
        assert not health._readable(ours.fileno())
        assert health._peek(ours.fileno()) is None
        peer.sendall(b"hello")
        assert health._readable(ours.fileno())
        assert health._peek(ours.fileno()) == b"hello"
        assert ours.recv(5) == b"hello", "the peek consumed nothing"
        peer.shutdown(socket.SHUT_WR)
        assert health._readable(ours.fileno()) and health._peek(ours.fileno()) == b""
        ours.fileno()  # still open: the peek borrowed the fd and gave it back


class _Psycopg:
    """Just enough of a psycopg 3 connection for serverhooks.sockets to find its fd and driver."""

    def __init__(self, fd: int, tls: bool = False) -> None:
        self.closed = False
        self.pgconn = SimpleNamespace(socket=fd, ssl_in_use=tls)


_Psycopg.__module__ = "psycopg"


class _Owner:
    """Stands in for the Django wrapper that keeps the poll object between checks."""


@pytest.fixture
def pair() -> Iterator[tuple[socket.socket, socket.socket]]:
    """(our end, the server's end) of a connected stream, as a TCP session to PostgreSQL is."""
    ours, peer = socket.socketpair()
    with ours, peer:
        peer.settimeout(5.0)  # nothing here may wait longer (our end is read with MSG_DONTWAIT)
        yield ours, peer


def left_for_driver(ours: socket.socket) -> bytes:
    """What waits for the driver to read, without waiting for more."""
    try:
        return ours.recv(4096, socket.MSG_DONTWAIT)
    except BlockingIOError:
        return b""


def ended(ours: socket.socket) -> dict[str, bool]:
    """The verdict, with a poll object made for the call and with one kept on an owner."""
    raw = _Psycopg(ours.fileno())
    owner: Any = _Owner()
    return {"fresh": health.session_ended(raw), "cached": health.session_ended(raw, owner)}


BOTH_ENDED = {"fresh": True, "cached": True}
BOTH_HEALTHY = {"fresh": False, "cached": False}


@pytest.mark.parametrize(
    ("sent", "then_close", "verdict"),
    [
        (b"", False, BOTH_HEALTHY),  # nothing waits: the healthy path, one poll()
        (NOTIFICATION, False, BOTH_HEALTHY),
        (PARAMETER, False, BOTH_HEALTHY),
        (OTHER_NOTICE, False, BOTH_HEALTHY),
        (TERMINATED, False, BOTH_ENDED),
        (TERMINATED, True, BOTH_ENDED),
        (b"", True, BOTH_ENDED),  # EOF
        (CRASH_NOTICE, True, BOTH_ENDED),  # a crash-restart, as it reaches an idle session
        (IMMEDIATE_NOTICE, True, BOTH_ENDED),  # an immediate shutdown
        (CRASH_NOTICE, False, BOTH_ENDED),  # the instant before the FIN: the notice alone
        (OTHER_NOTICE, True, BOTH_ENDED),  # a FIN behind a harmless notice: only POLLRDHUP sees it
        (NOTIFICATION, True, BOTH_ENDED),
    ],
)
def test_the_verdict_on_what_postgresql_sends(
    pair: tuple[socket.socket, socket.socket], sent: bytes, then_close: bool, verdict: dict[str, bool]
) -> None:
    ours, peer = pair
    peer.sendall(sent)
    if then_close:
        peer.shutdown(socket.SHUT_WR)  # the backend exits: its FIN follows what it sent
    assert ended(ours) == verdict
    assert left_for_driver(ours) == sent, "the check read nothing the driver should get"


@pytest.mark.parametrize("last_words", [CRASH_NOTICE, IMMEDIATE_NOTICE], ids=["crash", "immediate"])
def test_the_control_keeps_a_session_its_backend_left(
    pair: tuple[socket.socket, socket.socket], last_words: bytes
) -> None:
    """The bug, shown with the fix reverted: a notice and a FIN pass for a healthy session."""
    ours, peer = pair
    peer.sendall(last_words)
    peer.shutdown(socket.SHUT_WR)
    with health_control.reverted():
        assert ended(ours) == BOTH_HEALTHY
    assert ended(ours) == BOTH_ENDED


def test_a_kept_poll_object_asks_for_the_peers_fin(pair: tuple[socket.socket, socket.socket]) -> None:
    """POLLRDHUP is registered once, where the poll object is made: the healthy path stays one poll()."""
    ours, peer = pair
    owner: Any = _Owner()
    assert not health.session_ended(_Psycopg(ours.fileno()), owner)
    kept = owner._serverhooks_watch
    peer.sendall(OTHER_NOTICE)
    peer.shutdown(socket.SHUT_WR)
    assert health.session_ended(_Psycopg(ours.fileno()), owner)
    assert owner._serverhooks_watch is kept
    ((fd, events),) = kept.poller.poll(0)
    assert fd == ours.fileno() and events & select.POLLRDHUP


def test_under_tls_a_fin_ends_the_session_before_the_driver_reads(pair: tuple[socket.socket, socket.socket]) -> None:
    """Under TLS the bytes are not parsed: a FIN behind them settles it without the driver's read
    (which finds the EOF too, but only once it has read everything before it)."""
    ours, peer = pair
    raw = _Psycopg(ours.fileno(), tls=True)
    reads: list[int] = []
    raw.pgconn.consume_input = lambda: reads.append(1)
    raw.pgconn.status = 0  # CONNECTION_OK
    peer.sendall(b"\x17\x03\x03\x00\x10" + bytes(16))  # an encrypted record, then the FIN
    peer.shutdown(socket.SHUT_WR)
    assert health.session_ended(raw)
    assert reads == [], "the FIN settled it: the driver was not asked to read"
    assert left_for_driver(ours)[:1] == b"\x17"
    quiet_ours, quiet_peer = socket.socketpair()
    with quiet_ours, quiet_peer:
        assert not health.session_ended(_Psycopg(quiet_ours.fileno(), tls=True)), "nothing waits: healthy"
