"""Regenerate the Python stubs of protos/ into tandem_protocol/proto/ (committed; a test checks they are current).

    python scripts/gen_protos.py [--out DIR]

The stubs are flattened into one package, and the generated gRPC module's import of its message module is rewritten
to that package, so `tandem_protocol.proto` imports like any other package (and never shadows `tandem`).
"""

from __future__ import annotations

import argparse
import tempfile
from importlib import resources
from pathlib import Path

from grpc_tools import protoc

ROOT = Path(__file__).resolve().parent.parent
PROTO_ROOT = ROOT / "protos"
PROTOS = ["tandem/v1/verifier.proto"]
PACKAGE = "tandem_protocol.proto"
DEFAULT_OUT = ROOT / "tandem_protocol" / "proto"


def generate(out: Path) -> list[Path]:
    """Write the generated files into `out`; returns their paths."""
    well_known = str(resources.files("grpc_tools") / "_proto")
    written = []
    with tempfile.TemporaryDirectory() as tmp:
        args = ["grpc_tools.protoc", f"-I{PROTO_ROOT}", f"-I{well_known}",
                f"--python_out={tmp}", f"--pyi_out={tmp}", f"--grpc_python_out={tmp}", *PROTOS]
        # protoc names files relative to -I, so the output does not depend on where the checkout lives
        if protoc.main(args) != 0:
            raise SystemExit("protoc failed")
        out.mkdir(parents=True, exist_ok=True)
        for proto in PROTOS:
            stem = Path(proto).with_suffix("")
            for suffix in ("_pb2.py", "_pb2.pyi", "_pb2_grpc.py"):
                src = Path(tmp) / f"{stem}{suffix}"
                text = src.read_text()
                module_path = ".".join(stem.parent.parts)
                text = text.replace(f"from {module_path} import", f"from {PACKAGE} import")
                dst = out / f"{stem.name}{suffix}"
                dst.write_text(text)
                written.append(dst)
    return written


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    generate(parser.parse_args().out)


if __name__ == "__main__":
    main()
