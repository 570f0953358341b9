"""HTTP over a unix socket (no TCP port to collide on), and a bounded marker load."""

from __future__ import annotations

import http.client
import json
import socket
import threading
import time
import uuid
from dataclasses import dataclass, field
from typing import Any


class UnixHTTPConnection(http.client.HTTPConnection):
    def __init__(self, path: str, timeout: float = 10.0) -> None:
        super().__init__("localhost", timeout=timeout)
        self.unix_path = path

    def connect(self) -> None:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(self.timeout)
        sock.connect(self.unix_path)
        self.sock = sock


def get(path: str, url: str, timeout: float = 10.0) -> tuple[int, bytes]:
    """One request on a fresh connection: (status, body)."""
    conn = UnixHTTPConnection(path, timeout)
    try:
        conn.request("GET", url, headers={"Connection": "close"})
        response = conn.getresponse()
        return response.status, response.read()
    finally:
        conn.close()


def get_json(path: str, url: str, timeout: float = 10.0) -> Any:
    status, body = get(path, url, timeout)
    if status != 200:
        raise AssertionError(f"GET {url} -> {status}: {body[:300]!r}")
    return json.loads(body)


def answers(path: str) -> bool:
    try:
        return get(path, "/ping", timeout=2)[0] == 200
    except OSError:
        return False


@dataclass
class MarkerRun:
    """What a marker load saw, request by request."""

    sent: list[str] = field(default_factory=list)
    ok: int = 0
    http_errors: list[str] = field(default_factory=list)
    wrong: list[tuple[str, str]] = field(default_factory=list)
    failures: list[str] = field(default_factory=list)
    pids: set[int] = field(default_factory=set)
    sessions: set[tuple[int, Any]] = field(default_factory=set)
    inherited: int = 0
    requests_by_pid: dict[int, int] = field(default_factory=dict)
    inherited_by_pid: dict[int, int] = field(default_factory=dict)
    seconds: float = 0.0


def marker_load(
    path: str,
    clients: int = 8,
    per_client: int = 250,
    deadline_s: float = 180.0,
    timeout: float = 10.0,
    endpoint: str = "/echo",
) -> MarkerRun:
    """`clients` threads x `per_client` requests to `endpoint` (/echo, or a view that answers as it
    does), each with a fresh marker (each waited for `timeout`)."""
    run = MarkerRun()
    lock = threading.Lock()
    stop_at = time.monotonic() + deadline_s

    def client() -> None:
        for _ in range(per_client):
            if time.monotonic() > stop_at:
                with lock:
                    run.failures.append("deadline reached")
                return
            marker = uuid.uuid4().hex
            with lock:
                run.sent.append(marker)
            try:
                status, body = get(path, f"{endpoint}?m={marker}", timeout=timeout)
            except Exception as exc:
                with lock:
                    run.failures.append(f"{type(exc).__name__}: {exc}")
                continue
            with lock:
                if status != 200:
                    run.http_errors.append(f"{status}: {body[:200]!r}")
                    continue
                data = json.loads(body)
                pid = data["pid"]
                run.requests_by_pid[pid] = run.requests_by_pid.get(pid, 0) + 1
                if data["inherited"]:
                    run.inherited_by_pid[pid] = run.inherited_by_pid.get(pid, 0) + 1
                if data["m"] != marker:
                    run.wrong.append((marker, data["m"]))
                    continue
                run.ok += 1
                run.pids.add(data["pid"])
                run.sessions.add((data["pid"], data["session"]))
                run.inherited += bool(data["inherited"])

    started = time.monotonic()
    threads = [threading.Thread(target=client) for _ in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(deadline_s + 30)
    run.seconds = time.monotonic() - started
    return run


def concurrent_gets(
    path: str, url: str, clients: int, per_client: int, timeout: float = 30.0, retry_full_backlog: bool = False
) -> dict[int, int]:
    """`clients` threads each GET `url` `per_client` times at once; {status: count} (0: no answer).

    `retry_full_backlog`: a connect refused because the listen queue is full (EAGAIN on a unix
    socket) is tried again, for up to `timeout`, as a client behind a retrying proxy would.
    """
    statuses: dict[int, int] = {}
    lock = threading.Lock()
    start = threading.Barrier(clients, timeout=30)

    def client() -> None:
        try:
            start.wait()
        except threading.BrokenBarrierError:
            pass
        for _ in range(per_client):
            give_up_at = time.monotonic() + timeout
            while True:
                try:
                    status = get(path, url, timeout=timeout)[0]
                except BlockingIOError:
                    if retry_full_backlog and time.monotonic() < give_up_at:
                        time.sleep(0.05)
                        continue
                    status = 0
                except Exception:
                    status = 0
                break
            with lock:
                statuses[status] = statuses.get(status, 0) + 1

    threads = [threading.Thread(target=client) for _ in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout * per_client + 30)
    return statuses


def worker_stats(path: str, workers: int, tries: int = 200) -> list[dict[str, Any]]:
    """serverhooks.stats() of every worker, by asking /whoami until `workers` pids answered (bounded)."""
    found: dict[int, dict[str, Any]] = {}
    for _ in range(tries):
        data = get_json(path, "/whoami")
        found[data["pid"]] = data["serverhooks"]
        if len(found) == workers:
            break
    return list(found.values())
