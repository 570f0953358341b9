"""Live mode: which processes of a running server hold the same database socket.

Read from /proc and the kernel's sock_diag, so it works whether or not serverhooks is
installed in that server: the same socket inode in two processes is the failure itself.

The whole process tree is read (Gunicorn's dirty workers are the master's grandchildren).
A database socket is a TCP socket to a database port, read from the process's own table
(/proc/<pid>/net/tcp: a container's, when the doctor runs on the host), or a Unix socket
whose peer is bound to a database server's path (PostgreSQL's .s.PGSQL.<port>, MySQL's
mysqld.sock or mysql.sock, or a HOST path in the settings): /proc shows no Unix peers, so
those come from sock_diag (unix_diag), read in the process's network namespace. Other
sockets a server shares on purpose (listening sockets, the dirty arbiter's) never count.
"""

from __future__ import annotations

import dataclasses
import os
import re
from pathlib import Path

from serverhooks.doctor import unix_diag
from serverhooks.doctor.findings import DoctorError, Finding, Severity

DATABASE_PORTS = {3306: "mysql", 5432: "postgresql", 6432: "pgbouncer"}
DATABASE_SOCKET_NAMES = {"mysqld.sock": "mysql", "mysql.sock": "mysql"}
_PG_SOCKET = re.compile(r"/\.s\.PGSQL\.(\d+)$")
_MAX_PROCESSES = 4096  # a bound on the tree walk


@dataclasses.dataclass
class ProcessSockets:
    pid: int
    role: str  # master | worker (a child of the master) | child (deeper: dirty workers, ...)
    db_sockets: dict[int, str]  # inode -> "127.0.0.1:3306 (mysql)" or "/run/mysqld/mysqld.sock (mysql)"
    parent: int = 0


def _cmdline(pid: int) -> str:
    try:
        raw = Path(f"/proc/{pid}/cmdline").read_bytes()
    except FileNotFoundError:
        raise DoctorError(f"no process {pid}: it has gone, or never was") from None
    except PermissionError:
        raise DoctorError(f"cannot read process {pid}: run the doctor as its user or as root") from None
    return raw.replace(b"\0", b" ").decode(errors="replace").strip()


def server_kind(pid: int) -> str:
    cmdline = _cmdline(pid)
    for kind in ("gunicorn", "uwsgi", "celery"):
        if kind in cmdline:
            return kind
    shown = cmdline[:120] or "a kernel thread or zombie"
    raise DoctorError(f"process {pid} is not a Gunicorn, uWSGI or Celery master (it runs: {shown})")


def children(pid: int) -> list[int]:
    """A process's direct children, from /proc."""
    found: list[int] = []
    try:
        for tid in os.listdir(f"/proc/{pid}/task"):
            found += [int(c) for c in Path(f"/proc/{pid}/task/{tid}/children").read_text().split()]
    except OSError:
        pass
    return sorted(set(found))


def descendants(pid: int) -> list[tuple[int, int, int]]:
    """(pid, depth, parent) of every process under `pid`, breadth first: children, grandchildren, ..."""
    found: list[tuple[int, int, int]] = []
    seen = {pid}
    level = [pid]
    depth = 0
    while level and len(found) < _MAX_PROCESSES:
        depth += 1
        following = []
        for parent in level:
            for child in children(parent):
                if child not in seen and len(found) < _MAX_PROCESSES:
                    seen.add(child)
                    found.append((child, depth, parent))
                    following.append(child)
        level = following
    return found


def tcp_peers(ports: dict[int, str], pid: int | None = None) -> dict[int, str]:
    """inode -> peer description, for TCP sockets connected to a database port.

    `pid`: read that process's own table (its network namespace), not the doctor's.
    """
    peers: dict[int, str] = {}
    base = "/proc/net" if pid is None else f"/proc/{pid}/net"
    for table, width in ((f"{base}/tcp", 8), (f"{base}/tcp6", 32)):
        try:
            lines = Path(table).read_text().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            cols = line.split()
            address, port_hex = cols[2].rsplit(":", 1)
            port = int(port_hex, 16)
            if port in ports and cols[9] != "0":
                host = _ip(address) if len(address) == width else address
                peers[int(cols[9])] = f"{host}:{port} ({ports[port]})"
    return peers


def socket_inodes(pid: int) -> set[int]:
    """The inodes of every socket a process holds (PermissionError, FileNotFoundError as /proc says)."""
    inodes: set[int] = set()
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            target = os.readlink(f"/proc/{pid}/fd/{fd}")
        except OSError:
            continue
        if target.startswith("socket:["):
            inodes.add(int(target[8:-1]))
    return inodes


def _ip(hex_address: str) -> str:
    if len(hex_address) == 8:
        return ".".join(str(int(hex_address[i : i + 2], 16)) for i in (6, 4, 2, 0))
    return "[ipv6]"


def socket_path_vendor(path: str, extra_paths: dict[str, str] | None = None) -> str | None:
    """The database a Unix socket path belongs to, or None: "postgresql", "mysql", "pgbouncer"."""
    if extra_paths and path in extra_paths:
        return extra_paths[path]
    match = _PG_SOCKET.search(path)
    if match:
        return DATABASE_PORTS.get(int(match.group(1)), "postgresql")
    return DATABASE_SOCKET_NAMES.get(os.path.basename(path))


def unix_peers(
    table: dict[int, unix_diag.UnixSocket],
    extra_paths: dict[str, str] | None = None,
    elsewhere: dict[int, unix_diag.UnixSocket] | None = None,
) -> dict[int, str]:
    """inode -> peer description, for Unix sockets whose peer is bound to a database server's path.

    `elsewhere`: another namespace's table (the doctor's own), for a peer across namespaces: a
    container that reaches the host's server through a mounted socket.
    """
    peers: dict[int, str] = {}
    for sock in table.values():
        peer = (table.get(sock.peer) or (elsewhere or {}).get(sock.peer)) if sock.peer else None
        if peer is None or not peer.name or sock.name:
            continue  # unconnected, a peer in another namespace, or a server's own (bound) end
        vendor = socket_path_vendor(peer.name, extra_paths)
        if vendor:
            peers[sock.inode] = f"{peer.name} ({vendor})"
    return peers


def _namespace_key(pid: int) -> str:
    try:
        return os.readlink(f"/proc/{pid}/ns/net")
    except OSError:
        return f"pid {pid}"


@dataclasses.dataclass
class Inspection:
    kind: str
    processes: list[ProcessSockets]
    notes: list[str]  # what could not be read, said plainly

    @property
    def workers(self) -> int:
        return sum(1 for p in self.processes if p.role == "worker")


def inspect(
    pid: int, extra_ports: dict[int, str] | None = None, extra_paths: dict[str, str] | None = None
) -> Inspection:
    kind = server_kind(pid)
    ports = {**DATABASE_PORTS, **(extra_ports or {})}
    tree = [(pid, 0, 0), *descendants(pid)]
    # One reading per network namespace: a container's processes share theirs.
    tcp: dict[str, dict[int, str]] = {}
    unix: dict[str, dict[int, str]] = {}
    notes: list[str] = []
    own: dict[int, unix_diag.UnixSocket] | None = None
    result = []
    for process, depth, parent in tree:
        try:
            inodes = socket_inodes(process)
        except PermissionError:
            raise DoctorError(f"cannot read the fds of process {process}: run the doctor as root") from None
        except FileNotFoundError:
            continue  # a worker that just exited
        namespace = _namespace_key(process)
        if namespace not in tcp:
            tcp[namespace] = tcp_peers(ports, process)
            try:
                if own is None:
                    own = unix_diag.dump()
                table = own if unix_diag.same_namespace(process) else unix_diag.dump_for(process)
                unix[namespace] = unix_peers(table, extra_paths, own)
            except OSError as exc:
                unix[namespace] = {}
                notes.append(
                    f"Unix sockets of process {process} ({namespace}) not read: {exc.strerror or exc}; "
                    "its TCP sockets were."
                )
        peers = {**tcp[namespace], **unix[namespace]}
        role = ("master", "worker")[depth] if depth < 2 else "child"
        result.append(
            ProcessSockets(process, role, {inode: peers[inode] for inode in inodes if inode in peers}, parent)
        )
    return Inspection(kind, result, notes)


def shared_socket_findings(kind: str, processes: list[ProcessSockets]) -> list[Finding]:
    owners: dict[int, list[int]] = {}
    for process in processes:
        for inode in process.db_sockets:
            owners.setdefault(inode, []).append(process.pid)
    findings = []
    for inode, pids in sorted(owners.items()):
        if len(pids) > 1:
            peer = next(p.db_sockets[inode] for p in processes if inode in p.db_sockets)
            findings.append(
                Finding(
                    "serverhooks.W101",
                    Severity.ERROR,
                    f"processes {', '.join(map(str, pids))} hold the same database socket (inode {inode}, {peer}): "
                    "their queries interleave on one session and replies reach the wrong process.",
                    {
                        "gunicorn": "add `from serverhooks.gunicorn import *` to gunicorn.conf.py",
                        "uwsgi": "add `import = serverhooks.uwsgi` to uwsgi.ini",
                        "celery": "add `import serverhooks.celery` where the Celery app is defined",
                    }[kind]
                    + ".",
                    f"{kind} master {processes[0].pid}",
                )
            )
    return findings
