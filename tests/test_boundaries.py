"""The house: four floors, each importing only from the floors below it, read from the source (AST), every import
statement included (those inside functions too); and the core stays transport-free at import time."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
# package -> its floor; a module may import its own floor's package and the floors below, never a sibling side
FLOORS = {"tandem": 0, "tandem_protocol": 1, "cloud_server": 2, "edge_client": 2, "tandem_tools": 3}
TRANSPORTS = {"grpc", "grpc_health", "grpc_reflection", "fastapi", "uvicorn", "starlette", "httpx"}

CORE = ["tandem.speculate", "tandem.session", "tandem.local", "tandem.drafting", "tandem.blocks", "tandem.messages",
        "tandem.verify", "tandem.kv", "tandem.models", "tandem.sampling", "tandem.config", "tandem.batch",
        "tandem.pool", "tandem.adaptive", "tandem.stats", "tandem_tools.bench_local", "tandem_tools.demo_run",
        "tandem_tools.cli", "tandem_tools.netem", "tandem_tools.procs",
        "tandem_tools.bench_load", "tandem_tools.bench_capacity", "tandem_tools.bench_replay", "tandem_tools.figures"]


def imported(path: Path) -> set[str]:
    """Top-level names of every module imported anywhere in the file (relative imports resolve to its package)."""
    out: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            out |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            out.add(path.relative_to(ROOT).parts[0] if node.level else (node.module or "").split(".")[0])
    return out


def violations() -> list[str]:
    bad = []
    for package, floor in FLOORS.items():
        for path in sorted((ROOT / package).rglob("*.py")):
            for name in imported(path):
                other = FLOORS.get(name)
                where = path.relative_to(ROOT)
                if other is not None and (other > floor or (other == floor and name != package)):
                    bad.append(f"{where} (floor {floor}) imports {name} (floor {other})")
                if floor == 0 and name in TRANSPORTS:
                    bad.append(f"{where} (the core) imports the transport {name}")
    return bad


def test_each_floor_imports_only_from_below() -> None:
    assert violations() == []


def test_the_layering_check_catches_an_upward_import(tmp_path: Path, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    fake = tmp_path / "tandem"
    fake.mkdir()
    (fake / "x.py").write_text("def f():\n    from edge_client.client import edge_decoder\n    import grpc\n")
    (tmp_path / "edge_client").mkdir()
    (tmp_path / "edge_client" / "y.py").write_text("from cloud_server import worker\n")
    monkeypatch.setattr(sys.modules[__name__], "ROOT", tmp_path)
    assert sorted(violations()) == [
        "edge_client/y.py (floor 2) imports cloud_server (floor 2)",
        "tandem/x.py (floor 0) imports edge_client (floor 2)",
        "tandem/x.py (the core) imports the transport grpc",
    ]


def test_core_imports_no_transport() -> None:
    code = (
        "import sys\n"
        + "".join(f"import {m}\n" for m in CORE)
        + "bad = [m for m in ('grpc', 'fastapi', 'uvicorn', 'starlette') if m in sys.modules]\n"
        + "assert not bad, bad\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)
