"""`tandem serve` as a user runs it: the test pair's target, the official openai client, a graceful SIGTERM."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import openai
import pytest

ROOT = Path(__file__).resolve().parent.parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.mark.slow
def test_tandem_serve_answers_openai_client_and_stops_gracefully() -> None:
    http_port, grpc_port = free_port(), free_port()
    env = os.environ | {"HF_HUB_OFFLINE": "1", "TANDEM_THREADS": "1", "TANDEM_SHUTDOWN_GRACE_S": "20"}
    proc = subprocess.Popen(
        [sys.executable, "-m", "tandem_tools.cli", "serve", "--target", "test-target", "--http-port", str(http_port),
         "--grpc-port", str(grpc_port)],
        cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )
    base = f"http://127.0.0.1:{http_port}"
    try:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            assert proc.poll() is None, proc.stdout.read() if proc.stdout else ""
            try:
                if httpx.get(base + "/ready", timeout=1).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            time.sleep(0.2)
        else:
            pytest.fail("the server did not become ready")

        client = openai.OpenAI(base_url=base + "/v1", api_key="unused", timeout=60, max_retries=0)
        assert client.models.list().data[0].id == "test-target"
        done = client.completions.create(model="test-target", prompt="def fib(n):", max_tokens=8, temperature=0)
        assert done.usage is not None and done.usage.completion_tokens >= 1
        chat = client.chat.completions.create(
            model="test-target", messages=[{"role": "user", "content": "import os"}], max_tokens=4, temperature=0
        )
        assert chat.choices[0].message.content is not None

        # SIGTERM mid-stream: the stream in flight still finishes, then the process exits cleanly
        stream = client.completions.create(model="test-target", prompt="class A:", max_tokens=48, temperature=0,
                                           stream=True, extra_body={"ignore_eos": True})
        chunks = iter(stream)
        first = next(chunks)
        proc.send_signal(signal.SIGTERM)
        rest = list(chunks)
        assert rest and rest[-1].choices[0].finish_reason == "length"
        assert "".join(c.choices[0].text for c in [first, *rest])
        assert proc.wait(timeout=30) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=10)
