"""Production Gunicorn configuration for a Django app, with serverhooks.

    gunicorn -c gunicorn.conf.py myproject.wsgi

Every value can be set from the environment, so the same file serves a laptop,
a container and a systemd unit. Only the first line is serverhooks; the rest is
a sane production baseline you may keep or change.
"""

import multiprocessing
import os

# serverhooks' hooks for every worker class. Keep this import above any hook you
# define, and wrap such hooks with @serverhooks.gunicorn.chain to keep both.
from serverhooks.gunicorn import *  # noqa: F403


def _env_bool(name: str, default: bool) -> bool:
    return os.environ.get(name, "1" if default else "0").strip().lower() in {"1", "true", "yes", "on"}


# Where to listen: "127.0.0.1:8000" or "unix:/run/gunicorn/gunicorn.sock". Under systemd socket
# activation leave it unset: Gunicorn takes the socket from LISTEN_FDS (deploy/systemd).
bind = os.environ.get("GUNICORN_BIND", "127.0.0.1:8000").split(",")
# Worker processes. WEB_CONCURRENCY is the de-facto standard variable (Heroku, buildpacks).
workers = int(os.environ.get("WEB_CONCURRENCY", multiprocessing.cpu_count() * 2 + 1))
# sync, gthread, gevent or asgi; serverhooks covers all four.
worker_class = os.environ.get("GUNICORN_WORKER_CLASS", "sync")
# Threads per worker (gthread). Each thread holds its own database session.
threads = int(os.environ.get("GUNICORN_THREADS", "1"))
# Simultaneous clients per worker (gevent).
worker_connections = int(os.environ.get("GUNICORN_WORKER_CONNECTIONS", "1000"))
# Load the app in the master before forking: faster boots, shared memory pages.
# This is what makes workers inherit the master's DB socket; serverhooks makes it safe.
preload_app = _env_bool("GUNICORN_PRELOAD", False)
# Seconds a worker may stay silent before the master kills and replaces it.
timeout = int(os.environ.get("GUNICORN_TIMEOUT", "30"))
# Seconds a worker gets to finish in-flight requests on SIGTERM/HUP.
graceful_timeout = int(os.environ.get("GUNICORN_GRACEFUL_TIMEOUT", "30"))
# Seconds to keep an idle client connection open (keep it above the load balancer's idle timeout only if it reuses).
keepalive = int(os.environ.get("GUNICORN_KEEPALIVE", "5"))
# Recycle a worker after this many requests (with jitter, so they do not all restart at once).
max_requests = int(os.environ.get("GUNICORN_MAX_REQUESTS", "1000"))
max_requests_jitter = int(os.environ.get("GUNICORN_MAX_REQUESTS_JITTER", "100"))
# Heartbeat files in memory: a disk-backed /tmp can stall workers in containers.
worker_tmp_dir = os.environ.get("GUNICORN_WORKER_TMP_DIR", "/dev/shm" if os.path.isdir("/dev/shm") else None)
# Only this proxy may set X-Forwarded-*; never "*".
forwarded_allow_ips = os.environ.get("GUNICORN_FORWARDED_ALLOW_IPS", "127.0.0.1,::1")
# Logging: errors to stderr; access log off unless asked for ("-" is stdout).
loglevel = os.environ.get("GUNICORN_LOGLEVEL", "info")
errorlog = os.environ.get("GUNICORN_ERRORLOG", "-")
accesslog = os.environ.get("GUNICORN_ACCESSLOG") or None
# The master's control socket (Gunicorn 25+): give each master its own path, or disable it.
if os.environ.get("GUNICORN_CONTROL_SOCKET"):
    control_socket = os.environ["GUNICORN_CONTROL_SOCKET"]
control_socket_disable = _env_bool("GUNICORN_CONTROL_SOCKET_DISABLE", False)
