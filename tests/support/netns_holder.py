"""A process that holds database-looking sockets in its own network namespace, shared with a forked child.

Run inside `ip netns exec`: it listens on 127.0.0.1:<port> of that namespace's loopback and on a Unix
socket <dir>/.s.PGSQL.<port>, connects to both, forks (so the child holds the same client sockets),
prints "ready <tcp inode> <unix inode>" and sleeps until killed (at most `seconds`). Its command
line names gunicorn (this file is started as gunicorn_netns_holder.py), as the doctor asks of a master.
"""

from __future__ import annotations

import os
import socket
import sys
import time

port, directory, seconds = int(sys.argv[1]), sys.argv[2], float(sys.argv[3])
listener = socket.create_server(("127.0.0.1", port))
client = socket.create_connection(("127.0.0.1", port), timeout=5)
accepted, _ = listener.accept()
unix_listener = socket.socket(socket.AF_UNIX)
unix_listener.bind(os.path.join(directory, f".s.PGSQL.{port}"))
unix_listener.listen()
unix_client = socket.socket(socket.AF_UNIX)
unix_client.connect(os.path.join(directory, f".s.PGSQL.{port}"))
unix_accepted, _ = unix_listener.accept()
child = os.fork()
if child == 0:
    time.sleep(seconds)
    os._exit(0)
print("ready", os.fstat(client.fileno()).st_ino, os.fstat(unix_client.fileno()).st_ino, flush=True)
time.sleep(seconds)
os.kill(child, 9)
os.waitpid(child, 0)
