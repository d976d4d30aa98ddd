"""`tandem generate` as a user runs it: the test pair, a cloud server on loopback, one JSON object out."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
from servers import BackgroundServer
from typer.testing import CliRunner

from cloud_server.settings import ServerSettings
from tandem.models import load_model
from tandem.sampling import SamplingParams
from tandem.session import generate_autoregressive
from tandem_tools.cli import app

PROMPT = "def fibonacci(n):\n    "


@pytest.mark.slow
def test_generate_json_streams_the_targets_output() -> None:
    target = load_model("test-target")
    ids = target.tokenizer.encode(PROMPT, add_special_tokens=False)
    expected = generate_autoregressive(target, ids, SamplingParams(max_tokens=24)).tokens
    env = os.environ | {"HF_HUB_OFFLINE": "1"}
    with BackgroundServer(ServerSettings(http_port=0, grpc_port=0, threads=1), target) as h:
        cmd = [sys.executable, "-m", "tandem_tools.cli", "generate", "--cloud", f"127.0.0.1:{h.grpc_port}",
               "--max-tokens", "24", "--threads", "1", "--json", "--gamma", "adaptive", "--draft", "test-draft", PROMPT]
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=120, env=env)
        assert done.returncode == 0, done.stderr
        out = json.loads(done.stdout)
        assert out["token_ids"] == expected and not out["lossy"]
        stats = out["stats"]
        for key in ("rounds", "drafted", "accepted", "acceptance_rate", "target_passes", "tokens_per_s", "ttft_s",
                    "wall_s", "bytes_sent", "bytes_received", "rtt_ms_mean", "mode", "gamma_mean", "gamma_last"):
            assert key in stats, key
        assert stats["mode"] == "spec" and stats["target_passes"] < len(expected)

        # the same command in process (no interpreter start-up): text streamed, the figures on stderr
        args = ["generate", "--cloud", f"127.0.0.1:{h.grpc_port}", "--max-tokens", "24", "--threads", "1", "--draft",
                "test-draft"]
        streamed = CliRunner().invoke(app, [*args, "--mode", "cloud", PROMPT])
        assert streamed.exit_code == 0, streamed.output
        assert streamed.stdout.rstrip("\n") == out["text"]
        assert "[cloud: 24 tokens" in streamed.stderr

    # the server is gone: a clear error, no traceback
    lost = CliRunner().invoke(app, [*args, "--json", PROMPT], env={"TANDEM_RETRIES": "1", "TANDEM_BACKOFF_S": "0.05"})
    assert lost.exit_code == 1 and "unreachable" in lost.stderr
    assert lost.exception is None or isinstance(lost.exception, SystemExit)
