"""The image's HEALTHCHECK: GET /ping on the address Gunicorn was told to bind.

It reads GUNICORN_BIND as gunicorn.conf.py does ("host:port", "[::]:port" or
"unix:/path", several separated by commas) and asks the first one, so a container
started with another bind, on host networking say, still reports healthy. A
wildcard address (0.0.0.0, ::) is asked on loopback. Exit status 0 means healthy.
"""

from __future__ import annotations

import http.client
import os
import socket
import sys

DEFAULT_BIND = "127.0.0.1:8000"  # gunicorn.conf.py's default


class UnixHTTPConnection(http.client.HTTPConnection):
    def __init__(self, path: str, timeout: float) -> None:
        super().__init__("localhost", timeout=timeout)
        self.unix_path = path

    def connect(self) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(self.timeout)
        self.sock.connect(self.unix_path)


def connection_for(bind: str, timeout: float) -> http.client.HTTPConnection:
    if bind.startswith("unix:"):
        return UnixHTTPConnection(bind[len("unix:") :], timeout)
    host, _, port = bind.rpartition(":")
    host = host.strip("[]") or "127.0.0.1"
    host = {"0.0.0.0": "127.0.0.1", "::": "::1"}.get(host, host)
    return http.client.HTTPConnection(host, int(port or 8000), timeout=timeout)


def main() -> int:
    bind = (os.environ.get("GUNICORN_BIND") or DEFAULT_BIND).split(",")[0].strip()
    path = os.environ.get("HEALTHCHECK_PATH", "/ping")
    try:
        conn = connection_for(bind, timeout=2.0)
        conn.request("GET", path, headers={"Host": "localhost"})
        status = conn.getresponse().status
    except (OSError, ValueError, http.client.HTTPException) as exc:
        print(f"unhealthy: GET {path} on {bind}: {exc}", file=sys.stderr)
        return 1
    if status != 200:
        print(f"unhealthy: GET {path} on {bind} answered {status}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
