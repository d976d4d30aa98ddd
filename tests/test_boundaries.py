"""The core stays transport-free: importing it loads neither grpc nor fastapi."""

from __future__ import annotations

import subprocess
import sys

CORE = ["tandem.engine", "tandem.verify", "tandem.kv", "tandem.models", "tandem.sampling", "tandem.bench_local",
        "tandem.demo_run", "tandem.cli", "tandem.config", "tandem.train.trainer", "tandem.netem",
        "tandem.procs", "tandem.bench_load", "tandem.bench_capacity", "tandem.batch",
        "tandem.bench_replay", "tandem.pool", "tandem.figures"]


def test_core_imports_no_transport() -> None:
    code = (
        "import sys\n"
        + "".join(f"import {m}\n" for m in CORE)
        + "bad = [m for m in ('grpc', 'fastapi', 'uvicorn', 'starlette') if m in sys.modules]\n"
        + "assert not bad, bad\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)
