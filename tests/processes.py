"""Helpers for tests that run real processes: a free TCP port for a rendezvous or a server, stopping a server, and
SIGKILL-ing a run the moment a checkpoint file appears (the exact-resume tests)."""
import signal
import socket
import subprocess
import time
from pathlib import Path


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on now (the OS picks it)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def stop(process: subprocess.Popen, timeout: float = 20) -> None:
    """SIGTERM, then SIGKILL if the process has not exited within `timeout` seconds."""
    process.terminate()
    try:
        process.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()


def sigkill_once_written(process: subprocess.Popen, path: Path) -> None:
    """Kill `process` with SIGKILL as soon as `path` exists; fails if the process ended first."""
    while process.poll() is None and not path.is_file():
        time.sleep(0.01)
    process.send_signal(signal.SIGKILL)
    assert process.wait(timeout=60) == -signal.SIGKILL, "the run finished before it could be killed"
