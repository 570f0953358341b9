"""Unix sockets and their peers, from the kernel's sock_diag netlink (what `ss -x` reads).

/proc/<pid>/net/unix lists a socket's inode and bound path but not its peer, so it cannot say
which client socket is connected to a database server's socket; UNIX_DIAG with
UDIAG_SHOW_PEER and UDIAG_SHOW_NAME can. Pure Python: one AF_NETLINK socket and struct packing.

sock_diag answers for the network namespace of the socket that asks. A process in another
namespace (a container seen from the host) is read by a forked child that joins its
namespace (os.setns, Python 3.12+) and sends the table back through a pipe.
"""

from __future__ import annotations

import dataclasses
import json
import os
import select
import socket
import struct
import time

__all__ = ["NamespaceError", "UnixSocket", "dump", "dump_for", "same_namespace"]

NETLINK_SOCK_DIAG = 4
SOCK_DIAG_BY_FAMILY = 20
NLM_F_REQUEST = 0x1
NLM_F_DUMP = 0x300
NLMSG_ERROR = 2
NLMSG_DONE = 3
UDIAG_SHOW_NAME = 0x1
UDIAG_SHOW_PEER = 0x4
UNIX_DIAG_NAME = 0
UNIX_DIAG_PEER = 2

_NLMSGHDR = struct.Struct("=IHHII")  # len, type, flags, seq, pid
_REQUEST = struct.Struct("=BBHIIIII")  # family, protocol, pad, states, ino, show, cookie[2]
_MESSAGE = struct.Struct("=BBBBIII")  # family, type, state, pad, ino, cookie[2]
_RTATTR = struct.Struct("=HH")  # len, type
_MAX_MESSAGES = 1_000_000  # a bound on the loop, far above any real table


@dataclasses.dataclass(frozen=True)
class UnixSocket:
    inode: int
    name: str  # the bound path ("@..." abstract), or "" for an unbound client socket
    peer: int  # the peer's inode, 0 when unconnected


class NamespaceError(OSError):
    """A process's network namespace could not be read; the message says why."""


def _align(length: int) -> int:
    return (length + 3) & ~3


def _decode_name(raw: bytes) -> str:
    if raw.startswith(b"\0"):
        return "@" + raw[1:].rstrip(b"\0").decode(errors="replace")
    return raw.rstrip(b"\0").decode(errors="replace")


def dump(timeout: float = 5.0) -> dict[int, UnixSocket]:
    """Every Unix socket of this network namespace: {inode: UnixSocket}."""
    request = _REQUEST.pack(
        socket.AF_UNIX, 0, 0, 0xFFFFFFFF, 0, UDIAG_SHOW_NAME | UDIAG_SHOW_PEER, 0xFFFFFFFF, 0xFFFFFFFF
    )
    header = _NLMSGHDR.pack(_NLMSGHDR.size + len(request), SOCK_DIAG_BY_FAMILY, NLM_F_REQUEST | NLM_F_DUMP, 1, 0)
    found: dict[int, UnixSocket] = {}
    with socket.socket(socket.AF_NETLINK, socket.SOCK_RAW | socket.SOCK_CLOEXEC, NETLINK_SOCK_DIAG) as nl:
        nl.settimeout(timeout)
        nl.sendto(header + request, (0, 0))
        messages = 0
        while messages < _MAX_MESSAGES:
            data = nl.recv(1 << 16)
            offset = 0
            while offset + _NLMSGHDR.size <= len(data):
                length, kind, _flags, _seq, _pid = _NLMSGHDR.unpack_from(data, offset)
                if length < _NLMSGHDR.size:
                    return found
                messages += 1
                if kind == NLMSG_DONE:
                    return found
                if kind == NLMSG_ERROR:
                    (errno,) = struct.unpack_from("=i", data, offset + _NLMSGHDR.size)
                    raise OSError(-errno, f"sock_diag refused the request: {os.strerror(-errno)}")
                if kind == SOCK_DIAG_BY_FAMILY:
                    found.update(_parse(data[offset + _NLMSGHDR.size : offset + length]))
                offset += _align(length)
    return found


def _parse(payload: bytes) -> dict[int, UnixSocket]:
    _family, _type, _state, _pad, inode, _c0, _c1 = _MESSAGE.unpack_from(payload)
    name, peer = "", 0
    offset = _MESSAGE.size
    while offset + _RTATTR.size <= len(payload):
        length, kind = _RTATTR.unpack_from(payload, offset)
        if length < _RTATTR.size:
            break
        value = payload[offset + _RTATTR.size : offset + length]
        if kind == UNIX_DIAG_NAME:
            name = _decode_name(value)
        elif kind == UNIX_DIAG_PEER and len(value) >= 4:
            (peer,) = struct.unpack_from("=I", value)
        offset += _align(length)
    return {inode: UnixSocket(inode, name, peer)}


def _namespace(pid: int | str) -> int:
    return os.stat(f"/proc/{pid}/ns/net").st_ino


def same_namespace(pid: int) -> bool:
    """Whether `pid` shares this process's network namespace (True when that cannot be told)."""
    try:
        return _namespace(pid) == _namespace("self")
    except OSError:
        return True


def dump_for(pid: int, timeout: float = 10.0) -> dict[int, UnixSocket]:
    """The Unix sockets of `pid`'s network namespace, joining it in a forked child when it is not ours.

    Raises NamespaceError, saying why, when the namespace cannot be joined (not root, no os.setns).
    """
    if same_namespace(pid):
        return dump()
    if not hasattr(os, "setns"):
        raise NamespaceError(f"process {pid} is in another network namespace; reading it needs Python 3.12+")
    try:
        ns_fd = os.open(f"/proc/{pid}/ns/net", os.O_RDONLY | os.O_CLOEXEC)
    except OSError as exc:
        raise NamespaceError(f"cannot open process {pid}'s network namespace: {exc.strerror}") from None
    read_end, write_end = os.pipe()
    child = os.fork()
    if child == 0:  # pragma: no cover - runs in the forked child, which reports through the pipe
        status = 0
        try:
            os.close(read_end)
            try:
                os.setns(ns_fd, getattr(os, "CLONE_NEWNET", 0x40000000))
                answer: object = [[s.inode, s.name, s.peer] for s in dump().values()]
            except OSError as exc:
                answer = {"error": exc.strerror or str(exc)}
            with os.fdopen(write_end, "w") as pipe:
                json.dump(answer, pipe)
        except BaseException:
            status = 1
        os._exit(status)
    os.close(ns_fd)
    os.close(write_end)
    chunks: list[bytes] = []
    deadline = time.monotonic() + timeout
    try:
        while time.monotonic() < deadline:
            ready, _, _ = select.select([read_end], [], [], max(0.0, deadline - time.monotonic()))
            if not ready:
                break
            chunk = os.read(read_end, 1 << 16)
            if not chunk:
                break
            chunks.append(chunk)
    finally:
        os.close(read_end)
        try:
            os.kill(child, 9)
        except ProcessLookupError:
            pass
        os.waitpid(child, 0)
    try:
        answer = json.loads(b"".join(chunks) or b"null")
    except ValueError:
        answer = None
    if isinstance(answer, dict):
        raise NamespaceError(f"cannot join process {pid}'s network namespace: {answer.get('error')}")
    if not isinstance(answer, list):
        raise NamespaceError(f"reading process {pid}'s network namespace gave no answer within {timeout:g} s")
    return {int(i): UnixSocket(int(i), str(n), int(p)) for i, n, p in answer}
