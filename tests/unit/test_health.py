"""The idle-session check's parts that need no database: the peek, and PostgreSQL's message types."""

from __future__ import annotations

import socket

import pytest

from serverhooks import health

pytestmark = pytest.mark.core


def message(kind: bytes, body: bytes = b"") -> bytes:
    return kind + (4 + len(body)).to_bytes(4, "big") + body


@pytest.mark.parametrize(
    ("waiting", "healthy"),
    [
        (message(b"A", b"\x00\x00\x00\x01news\x00hello\x00"), True),  # NotificationResponse
        (message(b"S", b"TimeZone\x00UTC\x00") + message(b"N", b"SNOTICE\x00\x00"), True),
        (message(b"A", b"x") + message(b"E", b"SFATAL\x00"), False),  # then "terminating connection"
        (message(b"E", b"SFATAL\x00C57P01\x00"), False),
        (b"", False),  # EOF
    ],
)
def test_only_asynchronous_messages_mean_a_healthy_session(waiting: bytes, healthy: bool) -> None:
    assert health._only_async_messages(waiting) is healthy


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
