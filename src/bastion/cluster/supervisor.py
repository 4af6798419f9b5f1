"""``bastion serve --workers N``: N worker processes sharing one listening socket.

The supervisor binds the socket, starts each worker as ``bastion serve --fd FD`` (the
ordinary server, given the inherited socket), restarts a worker that dies (kill -9, a
crash) after a short back-off, and on SIGTERM/SIGINT passes the signal on and waits for
the workers' graceful shutdown. The kernel spreads new connections over the workers;
a client whose worker died reconnects to another. A load balancer in front (nginx,
HAProxy; see deploy/) is only needed for several hosts.
"""

from __future__ import annotations

import logging
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

log = logging.getLogger(__name__)


def _bind(host: str, port: int) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, port))
    sock.listen(2048)
    sock.set_inheritable(True)
    return sock


def supervise(config_path: Path, host: str, port: int, workers: int, grace_s: float) -> int:
    sock = _bind(host, port)
    fd = sock.fileno()
    stopping = False
    procs: dict[int, subprocess.Popen[bytes]] = {}
    restarts: dict[int, list[float]] = {}

    def start(index: int) -> None:
        procs[index] = subprocess.Popen(
            [sys.executable, "-m", "bastion", "serve", "--config", str(config_path), "--fd", str(fd),
             "--worker-index", str(index)],
            pass_fds=(fd,),
        )
        log.info("worker %d started (pid %d)", index, procs[index].pid)

    def stop(signum: int, _frame: object) -> None:
        nonlocal stopping
        stopping = True
        for proc in procs.values():
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    for index in range(workers):
        start(index)
    log.info("serving on %s:%d with %d workers", host, port, workers)
    exit_code = 0
    while True:
        time.sleep(0.2)
        if stopping:
            deadline = time.monotonic() + grace_s + 10
            for proc in procs.values():
                try:
                    proc.wait(max(0.1, deadline - time.monotonic()))
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()
            break
        for index, proc in list(procs.items()):
            code = proc.poll()
            if code is None:
                continue
            recent = [t for t in restarts.get(index, []) if time.monotonic() - t < 60]
            if len(recent) >= 5:
                log.error("worker %d keeps failing (exit %s); stopping", index, code)
                exit_code = 1
                stop(signal.SIGTERM, None)
                break
            log.warning("worker %d exited with %s; restarting it", index, code)
            restarts[index] = [*recent, time.monotonic()]
            time.sleep(0.5)
            start(index)
    sock.close()
    return exit_code
