"""Live mode: which processes of a running server hold the same database socket.

Read from /proc only, so it works whether or not serverhooks is installed in that
server: the same socket inode in two processes is the failure itself.
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path

from serverhooks.doctor.findings import DoctorError, Finding, Severity

DATABASE_PORTS = {3306: "mysql", 5432: "postgresql", 6432: "pgbouncer"}


@dataclasses.dataclass
class ProcessSockets:
    pid: int
    role: str
    db_sockets: dict[int, str]  # inode -> "127.0.0.1:3306 (mysql)"


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


def tcp_peers(ports: dict[int, str]) -> dict[int, str]:
    """inode -> peer description, for TCP sockets connected to a database port."""
    peers: dict[int, str] = {}
    for table, width in (("/proc/net/tcp", 8), ("/proc/net/tcp6", 32)):
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


def inspect(pid: int, extra_ports: dict[int, str] | None = None) -> tuple[str, list[ProcessSockets]]:
    kind = server_kind(pid)
    ports = {**DATABASE_PORTS, **(extra_ports or {})}
    peers = tcp_peers(ports)
    processes = [(pid, "master"), *((child, "worker") for child in children(pid))]
    result = []
    for process, role in processes:
        try:
            inodes = socket_inodes(process)
        except PermissionError:
            raise DoctorError(f"cannot read the fds of process {process}: run the doctor as root") from None
        except FileNotFoundError:
            continue  # a worker that just exited
        result.append(ProcessSockets(process, role, {inode: peers[inode] for inode in inodes if inode in peers}))
    return kind, result


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
