"""Real server processes for benchmarks: `tandem serve` as a child process on free loopback ports.

Benchmarks measure the real path, so the cloud runs in its own process with its own torch thread count, exactly as
a user starts it. Transport-free: the child is driven over plain HTTP (urllib) and signals.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any


def stop_process(proc: subprocess.Popen[bytes] | None, signum: int = signal.SIGTERM, timeout_s: float = 10.0) -> None:
    """Ask a child to stop (SIGTERM by default), and kill it if it has not within `timeout_s`."""
    if proc is None or proc.poll() is not None:
        return
    proc.send_signal(signum)
    try:
        proc.wait(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(timeout=timeout_s)


DIE_WITH = "TANDEM_DIE_WITH"  # set by a parent: `tandem serve` dies with that pid (`die_with_parent`)


def http_ok(url: str, timeout: float = 1.0) -> bool:
    """`url` answers 200 (a health or readiness check); False on any connection error."""
    try:
        with urllib.request.urlopen(url, timeout=timeout) as r:
            return bool(r.status == 200)
    except (urllib.error.URLError, OSError):
        return False


def popen_logged(args: list[str], log_path: Path | None, **kwargs: Any) -> subprocess.Popen[Any]:
    """`subprocess.Popen` with stdout (unless `kwargs` route it) and stderr appended to `log_path`, or discarded."""
    out = open(log_path, "ab") if log_path else subprocess.DEVNULL  # noqa: SIM115
    try:
        kwargs.setdefault("stdout", out)
        return subprocess.Popen(args, stderr=subprocess.STDOUT if kwargs["stdout"] is out else out, **kwargs)
    finally:
        if not isinstance(out, int):
            out.close()  # the child holds its own copy


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


class CloudProcess:
    """`tandem serve` in a child process. `env` adds TANDEM_* settings; `threads` is its torch thread count."""

    def __init__(self, threads: int = 1, env: dict[str, str] | None = None, host: str = "127.0.0.1",
                 log_path: Path | None = None, ready_timeout_s: float = 120.0) -> None:
        self.threads, self.host, self.log_path, self.ready_timeout_s = threads, host, log_path, ready_timeout_s
        self.http_port, self.grpc_port = free_port(host), free_port(host)
        self.extra_env = dict(env or {})
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def http_url(self) -> str:
        return f"http://{self.host}:{self.http_port}"

    @property
    def grpc_target(self) -> str:
        return f"{self.host}:{self.grpc_port}"

    def start(self) -> CloudProcess:
        return self.spawn().wait()

    def spawn(self) -> CloudProcess:
        """The child started, not yet ready: load something else meanwhile (its first load may convert a model for
        minutes), then `wait`."""
        env = os.environ | {"HF_HUB_OFFLINE": os.environ.get("HF_HUB_OFFLINE", "1"),
                            "TANDEM_THREADS": str(self.threads), "OMP_NUM_THREADS": str(self.threads)}
        self.proc = popen_logged(
            [sys.executable, "-m", "tandem_tools.cli", "serve", "--host", self.host,
             "--http-port", str(self.http_port), "--grpc-port", str(self.grpc_port)], self.log_path,
            # PR_SET_PDEATHSIG follows the forking *thread*: only the main thread's children ask for it, at their start
            # (a preexec_fn, Python between fork and exec in a threaded parent, can abort the child)
            env=env | self.extra_env | ({DIE_WITH: str(os.getpid())} if threading.current_thread() is
                                        threading.main_thread() else {}))
        return self

    def wait(self) -> CloudProcess:
        assert self.proc is not None, "spawn() first"
        wait_ready(self.proc, self.ready, self.ready_timeout_s, "the cloud process", self.stop)
        return self

    def ready(self) -> bool:
        return http_ok(self.http_url + "/ready")

    def metrics_text(self) -> str:
        with urllib.request.urlopen(self.http_url + "/metrics", timeout=5) as r:
            return str(r.read().decode())

    def kill(self) -> None:
        """Abrupt loss (SIGKILL): what a crashed machine looks like to the edge."""
        stop_process(self.proc, signal.SIGKILL, timeout_s=30)

    def stop(self, timeout_s: float = 30.0) -> None:
        stop_process(self.proc, timeout_s=timeout_s)

    def __enter__(self) -> CloudProcess:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def die_with_parent() -> None:
    """In a child started with `DIE_WITH` set: SIGTERM when the process that started it dies, however it dies (SIGKILL
    too), so no cloud outlives its demo or bench (Linux: PR_SET_PDEATHSIG; elsewhere nothing)."""
    parent = os.environ.pop(DIE_WITH, None)
    if parent and sys.platform.startswith("linux"):
        import ctypes

        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)  # 1: PR_SET_PDEATHSIG
        if os.getppid() != int(parent):  # it went before we asked
            os.kill(os.getpid(), signal.SIGTERM)


def wait_ready(proc: subprocess.Popen[bytes], ready: Callable[[], bool], timeout_s: float, what: str,
               stop: Callable[[], None], log: str = "") -> None:
    """Poll `ready` until it answers; an error if `proc` exits first, `stop()` and an error after `timeout_s`."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{what} exited with {proc.returncode} before it was ready{log}")
        if ready():
            return
        time.sleep(0.2)
    stop()
    raise TimeoutError(f"{what} was not ready within {timeout_s:.0f} s")
