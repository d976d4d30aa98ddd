"""Weights stored as int8 with one scale per row: half the bytes of bfloat16.

A packed model folder (the test pair's target) holds `weights.int8.safetensors` in place of its weights file. On
first use it is unpacked into the cache (`unpacked`) as the bfloat16 file its loader reads, next to copies of the
folder's other files, and loaded from there like any folder. The int8 values are the model: each matrix of at least
`MIN_NUMEL` weights is w[r, :] = q[r, :] * scale[r], rounded once to bfloat16; smaller tensors (norms, biases, ids)
are stored as they are. Pack a folder with `python -m tandem.packed FOLDER WEIGHTS_FILE`.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import sys
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from tandem.gguf import publish_folder

PACKED = "weights.int8.safetensors"
MIN_NUMEL = 1 << 16
_Q, _S = ".int8", ".scale"


def pack(folder: Path, weights: str) -> Path:
    """Replace `folder/weights` by `folder/PACKED` (the original's metadata kept, plus the file name to unpack to)."""
    src = folder / weights
    with safe_open(str(src), "pt") as f:
        meta = dict(f.metadata() or {})
    out: dict[str, torch.Tensor] = {}
    for name, w in load_file(str(src)).items():
        if w.is_floating_point() and w.dim() == 2 and w.numel() >= MIN_NUMEL:
            w32 = w.float()  # [rows, cols]
            scale = (w32.abs().amax(1) / 127).clamp_min(1e-12)  # [rows]
            out[name + _Q] = (w32 / scale[:, None]).round().clamp(-127, 127).to(torch.int8)
            out[name + _S] = scale
        else:
            out[name] = w
    dest = folder / PACKED
    save_file(out, str(dest), metadata={**meta, "tandem_unpack_to": weights})
    src.unlink()
    return dest


def _unpack(packed: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    with safe_open(str(packed), "pt") as f:
        meta = dict(f.metadata() or {})
    raw = load_file(str(packed))
    state = {}
    for name, t in raw.items():
        if name.endswith(_Q):
            base = name.removesuffix(_Q)
            state[base] = (t.float() * raw[base + _S][:, None]).to(torch.bfloat16)
        elif not name.endswith(_S):
            state[name] = t
    return state, meta


def cache_dir() -> Path:
    explicit = os.environ.get("TANDEM_CACHE_DIR")
    root = Path(explicit) if explicit else Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "tandem"
    return root / "models"


def unpacked(folder: Path) -> Path:
    """`folder` itself if it holds no packed weights; else its unpacked copy in the cache, made on first use
    (atomically: a temp folder, then a rename)."""
    packed = folder / PACKED
    if not packed.is_file():
        return folder
    digest = hashlib.sha256(packed.read_bytes()).hexdigest()[:16]
    dest = cache_dir() / f"{folder.name}-{digest}-unpacked"
    if (dest / "config.json").is_file():
        return dest
    state, meta = _unpack(packed)
    target = meta.pop("tandem_unpack_to")

    def fill(tmp: Path) -> None:
        for f in folder.iterdir():
            if f.is_file() and f.name != PACKED:
                shutil.copy2(f, tmp / f.name)
        save_file(state, str(tmp / target), metadata=meta)

    return publish_folder(dest, fill)


if __name__ == "__main__":
    sys.stdout.write(f"{pack(Path(sys.argv[1]), sys.argv[2])}\n")
