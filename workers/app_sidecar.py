"""The API relay of an `app` task: run by python3 in the task's sidecar container, never imported.

    python3 -I -S -B -u /sly-relay.py HOST PORT SOCKET

Listens on HOST:PORT (127.0.0.1 of the sidecar's network namespace, which the App's container
shares) and copies bytes both ways between each connection and a new connection to SOCKET (the
agent's forwarder, workers/app_proxy.py, through a read-only bind of its folder). It reads no
byte of what it relays: every check is the forwarder's, outside the container. Standard library
only, and Python 3.6+ syntax: it runs with whatever python3 the App's image has.

At most MAX_CONNECTIONS relays at once (more wait in the listen backlog), two threads each with
small stacks, so the sidecar's pid and memory limits hold. The line `sly-relay: listening` on
stdout tells the agent it may start the App.
"""

import signal
import socket
import sys
import threading
import time

MAX_CONNECTIONS = 128
CHUNK = 64 * 1024


def pump(src, dst):
    """src -> dst until src ends; then end dst's writing half (its peer sees the end of the request)."""
    try:
        while True:
            data = src.recv(CHUNK)
            if not data:
                break
            dst.sendall(data)
    except OSError:
        pass
    finally:
        try:
            dst.shutdown(socket.SHUT_WR)
        except OSError:
            pass


def relay(conn, path, slots):
    up = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        up.connect(path)
    except OSError:  # the agent's task process is not serving (restarting): the App retries
        up.close()
        conn.close()
        slots.release()
        return
    back = threading.Thread(target=pump, args=(up, conn), daemon=True)
    back.start()
    pump(conn, up)
    back.join()
    up.close()
    conn.close()
    slots.release()


def main(argv):
    host, port, path = argv[1], int(argv[2]), argv[3]
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))  # PID 1 ignores SIGTERM without a handler
    threading.stack_size(256 * 1024)
    srv = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    srv.bind((host, port))
    srv.listen(128)
    print(f"sly-relay: listening on {host}:{port}", flush=True)
    slots = threading.BoundedSemaphore(MAX_CONNECTIONS)
    while True:
        slots.acquire()
        try:
            conn, _ = srv.accept()
        except OSError:  # e.g. out of file descriptors: wait a little rather than spin
            slots.release()
            time.sleep(0.05)
            continue
        try:
            threading.Thread(target=relay, args=(conn, path, slots), daemon=True).start()
        except RuntimeError:  # no thread to be had (pid limit): drop this one, keep serving
            conn.close()
            slots.release()


if __name__ == "__main__":
    main(sys.argv)
