"""Starting an HTTP server in a child process (``vllm serve``): a free local port, and the wait
until its ``/health`` answers. Shared by benchmarks/serve.py and tests/test_vllm.py."""

from __future__ import annotations

import socket
import subprocess
import time
import urllib.request


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for_health(proc: subprocess.Popen, port: int, timeout: float, interval: float = 1.0) -> str | None:
    """Poll ``http://127.0.0.1:<port>/health`` until it answers 200: None then, else why not
    (``proc`` exited, or ``timeout`` seconds passed); the caller adds the server's log."""
    deadline = time.time() + timeout
    while True:
        code = proc.poll()
        if code is not None:
            return f"exited with code {code}"
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=5) as r:
                if r.status == 200:
                    return None
        except OSError:
            pass
        if time.time() > deadline:
            return f"did not answer on port {port} within {timeout:g} s"
        time.sleep(interval)
