"""Spot a session the server ended, before a request uses it, without a round trip.

A persistent connection can die while idle: `KILL` / `pg_terminate_backend`, the server's
idle timeout (`wait_timeout`, `idle_session_timeout`), a restart. Django finds out only
when the next request's first query fails, and `CONN_HEALTH_CHECKS=True` avoids that
with a round trip to the database on every request.

An idle session's socket tells the same for one `poll()`: a healthy idle session has
nothing to read. Readable means the server closed it, sent an error before closing, or
sent something a healthy session can receive too, which only PostgreSQL does
(`NOTIFY` to a session that `LISTEN`s, `ParameterStatus`, a notice). MySQL never sends
anything to an idle session, so for MySQL readable means ended.

A server that shut its side of the stream (its FIN) ended the session whatever waits
before the FIN: the same `poll()` asks for POLLRDHUP (Linux), which reports the FIN even
while data is still queued, where a peek sees only the data. This matters for
PostgreSQL's crash-restart ("terminating connection because of crash of another server
process", after the OOM killer took one backend) and immediate shutdown (failover tools):
every backend then sends a NoticeResponse, not an ErrorResponse, and exits.

For PostgreSQL the waiting bytes are otherwise peeked at, not read (the driver still gets
them): only asynchronous messages mean a healthy session, and a notice of class 57
(operator intervention: 57P01 admin_shutdown, 57P02 crash_shutdown, 57P03
cannot_connect_now) or of severity FATAL or PANIC does not, so the notice counts even in
the instant before its FIN arrives. Under TLS the bytes cannot be parsed, so the
driver's own non-blocking read takes them in (a notification waits in its queue for the
app; an EOF fails the read); POLLRDHUP applies there too.

Not seen: a peer that vanished without a FIN (a network partition, a host that lost
power). Only a round trip or TCP keepalives find those.
"""

from __future__ import annotations

import _socket
import functools
import select
import sys
from collections.abc import Callable
from typing import Any

from serverhooks import conf, sockets, transactions
from serverhooks._log import describe_error, logger
from serverhooks.counters import counters

__all__ = ["close_ended_in_this_thread", "close_if_ended", "session_ended", "unwatch", "watch"]

# The peer shut its side (POLLRDHUP, Linux only: 0 elsewhere), hung up, or the socket failed.
# Nothing more will come, so the session is over whatever still waits to be read: no database
# server half-closes a session that goes on. The tests' control arm
# (tests/support/health_control.py) sets this to 0, which is the judgement before POLLRDHUP.
_HUNG_UP = getattr(select, "POLLRDHUP", 0) | select.POLLHUP | select.POLLERR | select.POLLNVAL
# What the poll objects ask for. Asking for POLLRDHUP costs nothing on the healthy path: it is
# still one poll() that finds nothing. (A FIN always brings POLLIN too.)
_EVENTS = select.POLLIN | select.POLLPRI | _HUNG_UP
_PSYCOPG_CONNECTION_OK = 0  # libpq's CONNECTION_OK
_PEEK_BYTES = 4096
_ASYNC_MESSAGES = (b"A", b"S", b"N")  # NotificationResponse, ParameterStatus, NoticeResponse
# What a backend's last notice carries: SQLSTATE class 57 (operator intervention), or a
# severity that means the backend is going away. Severity from the V field (never translated).
_ENDING_CLASS = b"57"
_ENDING_SEVERITIES = (b"FATAL", b"PANIC")


def _real_poll() -> Callable[[], Any]:
    """select.poll as the OS gives it: a zero-timeout check must not yield to gevent's hub."""
    monkey = sys.modules.get("gevent.monkey")
    if monkey is not None:
        try:
            original: Callable[[], Any] = monkey.get_original("select", "poll")
            return original
        except Exception:
            pass
    return select.poll


def _events(fd: int) -> int:
    """The poll() events waiting on `fd` now (0: none), with a poll object made for this call."""
    poller = _real_poll()()
    poller.register(fd, _EVENTS)
    ready = poller.poll(0)
    return int(ready[0][1]) if ready else 0


def _readable(fd: int) -> bool:
    return bool(_events(fd))


class _Watch:
    """A poll object kept per connection and socket: the check is then one poll() syscall."""

    __slots__ = ("fd", "poller")

    def __init__(self, fd: int) -> None:
        self.fd = fd
        self.poller = _real_poll()()
        self.poller.register(fd, _EVENTS)


def _events_cached(owner: Any, fd: int) -> int:
    watch = owner.__dict__.get("_serverhooks_watch")
    if watch is None or watch.fd != fd:
        watch = owner._serverhooks_watch = _Watch(fd)
    ready = watch.poller.poll(0)
    return int(ready[0][1]) if ready else 0


def session_ended(raw: Any, owner: Any = None) -> bool:
    """Has the server ended this idle DB-API connection's session? One poll(); more only if readable.

    `owner` (its Django wrapper) keeps the poll object between checks.
    """
    fd = sockets.socket_fd(raw)
    if fd is None or fd < 0:
        return False
    events = _events_cached(owner, fd) if owner is not None else _events(fd)
    if not events:
        return False
    if events & _HUNG_UP:
        return True  # the server shut its side: whatever waits before its FIN, nothing follows
    driver = sockets.driver_name(raw)
    if driver not in ("psycopg", "psycopg2"):
        return True  # MySQL sends nothing to a healthy idle session
    if not _tls_in_use(raw, driver):
        waiting = _peek(fd)
        return waiting is not None and not _only_async_messages(waiting)
    # Under TLS the bytes are encrypted: let the driver read them until the socket is quiet.
    # A notification is then queued for the app; an EOF makes the read fail.
    for _ in range(3):
        try:
            if driver == "psycopg":
                raw.pgconn.consume_input()
                if int(raw.pgconn.status) != _PSYCOPG_CONNECTION_OK:
                    return True
            else:
                raw.poll()
        except Exception:
            return True
        events = _events(fd)
        if not events:
            return False
        if events & _HUNG_UP:
            return True  # a FIN behind what the driver just read (a backend's last notice)
    return True


def _tls_in_use(raw: Any, driver: str) -> bool:
    try:
        return bool(raw.pgconn.ssl_in_use if driver == "psycopg" else raw.info.ssl_in_use)
    except Exception:
        return True  # unknown: take the path that does not parse bytes


def _peek(fd: int) -> bytes | None:
    """What waits on the socket, left where it is; b"" at EOF, None if nothing after all."""
    # The C-level socket: gevent's would wait for data instead of returning at once.
    sock = _socket.socket(fileno=fd)
    try:
        data: bytes = sock.recv(_PEEK_BYTES, _socket.MSG_PEEK | _socket.MSG_DONTWAIT)
        return data
    except BlockingIOError:
        return None
    except OSError:
        return b""
    finally:
        sock.detach()  # the fd stays the driver's


def _only_async_messages(data: bytes) -> bool:
    """PostgreSQL's wire protocol: is every message waiting one a healthy idle session can get?

    NotificationResponse (A), ParameterStatus (S) and NoticeResponse (N) can arrive at any
    time. Anything else, notably an ErrorResponse (E, "terminating connection"), an EOF
    (no bytes), or a notice that a backend sends as it exits (see `_notice_ends_session`),
    means the session is over. A message cut short by the peek's size, or still on its way,
    is judged on what has arrived.
    """
    if not data:
        return False
    at = 0
    while at < len(data):
        if data[at : at + 1] not in _ASYNC_MESSAGES:
            return False
        if at + 5 > len(data):
            return True  # the rest of its header is on its way
        length = int.from_bytes(data[at + 1 : at + 5], "big")
        if length < 4:
            return False  # not PostgreSQL's framing: the stream is out of step, unusable
        if data[at : at + 1] == b"N" and _notice_ends_session(data[at + 5 : at + 1 + length]):
            return False
        at += 1 + length
    return True


def _notice_ends_session(body: bytes) -> bool:
    """Is this NoticeResponse body the one a backend sends as it exits?

    A crash-restart or an immediate shutdown makes every backend send a WARNING, not an
    error, and exit (quickdie(), on SIGQUIT from the postmaster): SQLSTATE 57P02
    crash_shutdown ("terminating connection because of crash of another server process"),
    or 57P01 admin_shutdown ("... due to immediate shutdown command", "... because of
    unexpected SIGQUIT signal") since PostgreSQL 14; older servers sent 57P02 for all of
    them. Its FIN follows within a millisecond (0.7 ms measured on loopback), and POLLRDHUP
    catches that; the notice settles the instant before it. Class 57 is "operator
    intervention": no notice of that class reaches a session that goes on.
    The fields are a code letter, text and NUL each, then a final NUL.
    """
    code = severity = b""
    for field in body.split(b"\x00"):
        kind = field[:1]
        if kind == b"C":
            code = field[1:]
        elif kind == b"V" or (kind == b"S" and not severity):  # S is translated; V (9.6+) is not
            severity = field[1:]
    return code.startswith(_ENDING_CLASS) or severity in _ENDING_SEVERITIES


def close_if_ended(wrapper: Any) -> bool:
    """Close a Django connection whose session the server ended; Django reconnects on first use.

    Not inside a transaction (atomic(), or autocommit off by hand): a reconnect there would
    carry on in autocommit on a new session, and the writes before it would vanish in silence.
    Left alone, the transaction's next query fails loudly, as without serverhooks.
    """
    raw = wrapper.connection
    if raw is None or transactions.in_transaction(wrapper) or not session_ended(raw, wrapper):
        return False
    counters().add("closed_unhealthy", wrapper.alias)
    logger.debug("serverhooks: the server ended an idle %r session; reconnecting on first use", wrapper.alias)
    try:
        wrapper.close()
    except Exception as exc:  # saying goodbye on a dead socket may fail: it is gone either way
        logger.debug("serverhooks: closing an ended session: %s", describe_error(exc))
    wrapper.connection = None
    return True


def close_ended_in_this_thread() -> int:
    """`close_if_ended` for every initialised connection of this thread; how many were closed."""
    db = sys.modules.get("django.db")
    if db is None:
        return 0
    closed = 0
    for wrapper in db.connections.all(initialized_only=True):
        try:
            closed += close_if_ended(wrapper)
        except Exception as exc:
            logger.debug("serverhooks: checking %r: %s", wrapper.alias, describe_error(exc))
    return closed


def _close_if_unusable_obsolete_or_ended(wrapper: Any, django_own: Callable[[Any], None]) -> None:
    if "_serverhooks_pool" in wrapper.__dict__ and not wrapper.in_atomic_block:
        # A pooled connection: the pool cleans it when it comes back and checks it (this same
        # poll, the age cap) when it goes out again; checking here too would only do it twice.
        return
    if wrapper.in_atomic_block and not wrapper.atomic_blocks:
        _unwedge(wrapper)
    django_own(wrapper)
    if wrapper.connection is not None and conf.get("CHECK_IDLE_SESSIONS"):
        try:
            close_if_ended(wrapper)
        except Exception as exc:  # never fail a request over the check itself
            logger.debug("serverhooks: checking %r: %s", wrapper.alias, describe_error(exc))


def _unwedge(wrapper: Any) -> None:
    """Reset a connection that says it is inside atomic() when no block is open, at a unit's edge.

    Django leaves one so when the session dies inside a block: the block's exit fails to turn
    autocommit back on, so the next `atomic()` takes the connection for a hand-managed
    transaction and fails halfway in, with `in_atomic_block` set and no block to clear it.
    Django's own close() then marks it closed in a transaction, and every later request on that
    thread fails ("You can't execute queries until the end of the 'atomic' block") for good. No
    block can end there, so nothing is lost by resetting it: the next use connects anew.
    """
    counters().add("closed_unhealthy", wrapper.alias)
    logger.warning(
        "serverhooks: %r was left inside an atomic() block that no longer exists (its session died in a "
        "transaction); closing it, so the next request gets a new session",
        wrapper.alias,
    )
    raw, wrapper.connection = wrapper.connection, None
    if raw is not None:
        try:
            raw.close()
        except Exception as exc:  # a dead session: nothing to say goodbye to
            logger.debug("serverhooks: closing a wedged connection: %s", describe_error(exc))
    # What Django's connect() resets, so that get_autocommit() and atomic() start from scratch.
    wrapper.in_atomic_block = False
    wrapper.savepoint_ids = []
    wrapper.atomic_blocks = []
    wrapper.needs_rollback = False
    wrapper.closed_in_transaction = False
    wrapper.run_on_commit = []


def watch(wrapper: Any) -> None:
    """Check this connection wherever Django checks it: at each request's start and end
    (`close_old_connections` calls `close_if_unusable_or_obsolete`). Idempotent."""
    if "close_if_unusable_or_obsolete" in vars(wrapper):
        return
    own = type(wrapper).close_if_unusable_or_obsolete
    wrapper.close_if_unusable_or_obsolete = functools.partial(_close_if_unusable_obsolete_or_ended, wrapper, own)


def unwatch(wrapper: Any) -> None:
    """Undo `watch` (tests)."""
    vars(wrapper).pop("close_if_unusable_or_obsolete", None)
    vars(wrapper).pop("_serverhooks_watch", None)
