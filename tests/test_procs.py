"""A cloud started for a demo or a bench never outlives the process that started it, however that process dies."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pytest


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="PR_SET_PDEATHSIG is Linux's")
def test_a_child_that_asks_to_die_with_its_parent_goes_when_its_parent_is_killed() -> None:
    parent = subprocess.Popen(
        [sys.executable, "-c", "import subprocess, sys, time\n"
         "import os\n"
         "code = 'import time; from tandem_tools.procs import die_with_parent; die_with_parent(); time.sleep(120)'\n"
         "env = os.environ | {'TANDEM_DIE_WITH': str(os.getpid())}\n"
         "child = subprocess.Popen([sys.executable, '-c', code], env=env)\n"
         "print(child.pid, flush=True)\n"
         "time.sleep(120)\n"],
        stdout=subprocess.PIPE, text=True)
    try:
        assert parent.stdout is not None
        child = int(parent.stdout.readline())
        os.kill(parent.pid, signal.SIGKILL)  # no handler, no finally: only the kernel can tell the child
        parent.wait(timeout=30)
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline and _alive(child):
            time.sleep(0.05)
        assert not _alive(child)
    finally:
        if parent.poll() is None:
            parent.kill()


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(") ")[-1][:1] not in ("Z", "X")  # a zombie has already gone
    except FileNotFoundError:
        return False


def test_a_cloud_spawned_from_a_passing_thread_outlives_that_thread(monkeypatch: pytest.MonkeyPatch) -> None:
    """The death signal follows the forking thread: a replica started from a helper thread must not get it."""
    import threading

    from tandem_tools import procs

    seen: list[object] = []

    class Recorder:
        def __init__(self, *args: object, env: dict[str, str], **kwargs: object) -> None:
            seen.append(env.get(procs.DIE_WITH))
            assert "preexec_fn" not in kwargs  # no Python between fork and exec

    monkeypatch.setattr(procs.subprocess, "Popen", Recorder)
    procs.CloudProcess().spawn()
    t = threading.Thread(target=lambda: procs.CloudProcess().spawn())
    t.start()
    t.join()
    assert seen == [str(os.getpid()), None]
