"""The committed stubs are what the .proto generates, and they import as a normal package."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
STUBS = ROOT / "tandem_protocol" / "proto"


def test_regenerating_the_stubs_gives_identical_files(tmp_path: Path) -> None:
    subprocess.run([sys.executable, str(ROOT / "scripts" / "gen_protos.py"), "--out", str(tmp_path)],
                   check=True, timeout=60)
    generated = sorted(p.name for p in tmp_path.iterdir())
    assert generated == ["verifier_pb2.py", "verifier_pb2.pyi", "verifier_pb2_grpc.py"]
    for name in generated:
        stale = f"{name} is stale: run scripts/gen_protos.py"
        assert (tmp_path / name).read_bytes() == (STUBS / name).read_bytes(), stale


def test_stubs_import_as_a_package_and_describe_the_service() -> None:
    from tandem_protocol.proto import verifier_pb2 as pb
    from tandem_protocol.proto import verifier_pb2_grpc as pb_grpc

    service = pb.DESCRIPTOR.services_by_name["Verifier"]
    assert service.full_name == "tandem.v1.Verifier"
    assert {m.name for m in service.methods} == {"Session", "OpenSession", "Verify", "CloseSession", "Generate"}
    assert hasattr(pb_grpc, "VerifierStub")
    draft = pb.Draft(seq=3, tokens=[1, 2], q_k=1, q_ids=[1, 2], q_probs=[0.5, 1.0])
    assert pb.Draft.FromString(draft.SerializeToString()) == draft
