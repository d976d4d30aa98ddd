"""llama.cpp's C library, declared here with ctypes: only what the runtime (`tandem.llamacpp`) calls, loaded from the
shared object of one pinned prebuilt wheel (`xllamacpp`, llama.cpp build b11549), found by its package path.
`library()` checks the wheel's version, the CPU, libgomp, every symbol and the struct layouts first
(docs/llama-cpp.md); any failure is one `LlamaLibError` saying what is missing and what to install.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import importlib.metadata
import importlib.util
import os
import platform
import threading
from pathlib import Path
from typing import Any

from tandem.errors import ModelLoadError

WHEEL, VERSION, BUILD = "xllamacpp", "2026.10.11549", "b11549"  # BUILD: the llama.cpp it carries
INSTALL = f'pip install "{WHEEL}=={VERSION}"'
SHARED_OBJECT = "xllamacpp.abi3.so"
# what this build was compiled for: its kernels run unguarded, so a CPU without them dies of SIGILL mid-decode
CPU_FLAGS = {"x86_64": ("avx2", "fma", "f16c")}

c_float_p = ctypes.POINTER(ctypes.c_float)
LOG_CALLBACK = ctypes.CFUNCTYPE(None, ctypes.c_int, ctypes.c_char_p, ctypes.c_void_p)


class LlamaLibError(ModelLoadError):
    """The llama.cpp library cannot be used here; the message says why and what to install."""


class ModelParams(ctypes.Structure):
    """`struct llama_model_params` (80 bytes)."""

    _fields_ = [
        ("devices", ctypes.c_void_p),
        ("tensor_buft_overrides", ctypes.c_void_p),
        ("n_gpu_layers", ctypes.c_int32),
        ("split_mode", ctypes.c_int),
        ("load_mode", ctypes.c_int),
        ("lazy_mode", ctypes.c_int),
        ("main_gpu", ctypes.c_int32),
        ("tensor_split", c_float_p),
        ("progress_callback", ctypes.c_void_p),
        ("progress_callback_user_data", ctypes.c_void_p),
        ("kv_overrides", ctypes.c_void_p),
        ("vocab_only", ctypes.c_bool),
        ("check_tensors", ctypes.c_bool),
        ("use_extra_bufts", ctypes.c_bool),
        ("no_host", ctypes.c_bool),
        ("no_alloc", ctypes.c_bool),
        ("load_mtp", ctypes.c_bool),
    ]


class ContextParams(ctypes.Structure):
    """`struct llama_context_params` (168 bytes: `moe_cache_size` after `type_v` is new in this build)."""

    _fields_ = [
        ("n_ctx", ctypes.c_uint32),
        ("n_batch", ctypes.c_uint32),
        ("n_ubatch", ctypes.c_uint32),
        ("n_seq_max", ctypes.c_uint32),
        ("n_rs_seq", ctypes.c_uint32),
        ("n_outputs_max", ctypes.c_uint32),
        ("n_outputs_max_per_seq", ctypes.c_uint32),
        ("n_threads", ctypes.c_int32),
        ("n_threads_batch", ctypes.c_int32),
        ("ctx_type", ctypes.c_int),
        ("rope_scaling_type", ctypes.c_int),
        ("pooling_type", ctypes.c_int),
        ("attention_type", ctypes.c_int),
        ("flash_attn_type", ctypes.c_int),
        ("rope_freq_base", ctypes.c_float),
        ("rope_freq_scale", ctypes.c_float),
        ("yarn_ext_factor", ctypes.c_float),
        ("yarn_attn_factor", ctypes.c_float),
        ("yarn_beta_fast", ctypes.c_float),
        ("yarn_beta_slow", ctypes.c_float),
        ("yarn_orig_ctx", ctypes.c_uint32),
        ("defrag_thold", ctypes.c_float),
        ("cb_eval", ctypes.c_void_p),
        ("cb_eval_user_data", ctypes.c_void_p),
        ("type_k", ctypes.c_int),
        ("type_v", ctypes.c_int),
        ("moe_cache_size", ctypes.c_size_t),
        ("abort_callback", ctypes.c_void_p),
        ("abort_callback_data", ctypes.c_void_p),
        ("embeddings", ctypes.c_bool),
        ("offload_kqv", ctypes.c_bool),
        ("no_perf", ctypes.c_bool),
        ("op_offload", ctypes.c_bool),
        ("swa_full", ctypes.c_bool),
        ("kv_unified", ctypes.c_bool),
        ("samplers", ctypes.c_void_p),
        ("n_samplers", ctypes.c_size_t),
        ("ctx_other", ctypes.c_void_p),
    ]


class Batch(ctypes.Structure):
    """`struct llama_batch` (56 bytes)."""

    _fields_ = [
        ("n_tokens", ctypes.c_int32),
        ("token", ctypes.POINTER(ctypes.c_int32)),
        ("embd", c_float_p),
        ("pos", ctypes.POINTER(ctypes.c_int32)),
        ("n_seq_id", ctypes.POINTER(ctypes.c_int32)),
        ("seq_id", ctypes.POINTER(ctypes.POINTER(ctypes.c_int32))),
        ("logits", ctypes.POINTER(ctypes.c_int8)),
    ]


class _Probe(ctypes.Structure):
    """A buffer larger than any params struct: the library writes its defaults into it (a struct this large is
    returned through memory, so a layout mismatch here reads wrong bytes instead of corrupting the stack)."""

    _fields_ = [("raw", ctypes.c_uint8 * 512)]


_p, _i32, _u32, _bool = ctypes.c_void_p, ctypes.c_int32, ctypes.c_uint32, ctypes.c_bool
SIGNATURES: dict[str, tuple[Any, list[Any]]] = {  # name: (restype, argtypes)
    "llama_backend_init": (None, []),
    "llama_log_set": (None, [LOG_CALLBACK, _p]),
    "llama_print_system_info": (ctypes.c_char_p, []),
    "llama_model_default_params": (ModelParams, []),
    "llama_context_default_params": (ContextParams, []),
    "llama_model_load_from_file": (_p, [ctypes.c_char_p, ModelParams]),
    "llama_model_free": (None, [_p]),
    "llama_model_get_vocab": (_p, [_p]),
    "llama_vocab_n_tokens": (_i32, [_p]),
    "llama_model_n_ctx_train": (_i32, [_p]),
    "llama_model_n_embd": (_i32, [_p]),
    "llama_model_n_layer": (_i32, [_p]),
    "llama_model_n_head": (_i32, [_p]),
    "llama_model_n_head_kv": (_i32, [_p]),
    "llama_model_n_params": (ctypes.c_uint64, [_p]),
    "llama_model_size": (ctypes.c_uint64, [_p]),
    "llama_init_from_model": (_p, [_p, ContextParams]),
    "llama_free": (None, [_p]),
    "llama_get_memory": (_p, [_p]),
    "llama_memory_clear": (None, [_p, _bool]),
    "llama_memory_seq_rm": (_bool, [_p, _i32, _i32, _i32]),
    "llama_batch_init": (Batch, [_i32, _i32, _i32]),
    "llama_batch_free": (None, [Batch]),
    "llama_decode": (_i32, [_p, Batch]),
    "llama_get_logits": (c_float_p, [_p]),
}

# (struct, field, the value llama.cpp b11549's default params hold there): a shifted layout reads other values
DEFAULTS: dict[str, dict[str, object]] = {
    "llama_model_default_params": {"n_gpu_layers": -1, "split_mode": 1, "use_extra_bufts": True, "no_alloc": False,
                                   "load_mtp": False},
    "llama_context_default_params": {
        "n_ctx": 512, "n_batch": 2048, "n_ubatch": 512, "n_seq_max": 1, "n_outputs_max_per_seq": 1,
        "yarn_ext_factor": -1.0, "defrag_thold": -1.0, "type_k": 1, "type_v": 1, "moe_cache_size": 0,
        "abort_callback": None, "offload_kqv": True, "no_perf": True, "op_offload": True, "swa_full": True,
        "kv_unified": False, "samplers": None, "n_samplers": 0, "ctx_other": None},
}
SIZES = {"ModelParams": 80, "ContextParams": 168, "Batch": 56}


def shared_object() -> Path:
    """The wheel's shared object, by package path (the package itself is not imported: it starts a server module)."""
    spec = importlib.util.find_spec(WHEEL)
    version = installed_version()
    if spec is None or not spec.submodule_search_locations or version is None:
        raise LlamaLibError(f"llama.cpp runtime: the {WHEEL} wheel is not installed ({INSTALL})")
    if version != VERSION:
        raise LlamaLibError(f"llama.cpp runtime: {WHEEL} {version} is installed, but tandem's declarations are "
                            f"written for {VERSION} ({INSTALL})")
    path = Path(next(iter(spec.submodule_search_locations))) / SHARED_OBJECT
    if not path.is_file():
        raise LlamaLibError(f"llama.cpp runtime: {WHEEL} has no {SHARED_OBJECT} (a build for another platform?)")
    return path


def installed_version() -> str | None:
    """The installed wheel's version ('unknown' without metadata), None where it is not installed."""
    if importlib.util.find_spec(WHEEL) is None:
        return None
    try:
        return importlib.metadata.version(WHEEL)
    except importlib.metadata.PackageNotFoundError:
        return "unknown"


def cpu_flags() -> set[str]:
    """The CPU's feature flags (Linux `/proc/cpuinfo`); empty where unknown."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return set()
    return next((set(line.split(":", 1)[1].split()) for line in text.splitlines()
                 if line.startswith(("flags", "Features"))), set())


def check_machine() -> None:
    """The CPU features and system libraries the build needs, before its code is loaded."""
    if platform.system() != "Linux":
        raise LlamaLibError(f"llama.cpp runtime: tandem loads the {WHEEL} wheel on Linux only "
                            f"(this is {platform.system()})")
    missing = [f for f in CPU_FLAGS.get(platform.machine(), ()) if f not in cpu_flags()]
    if missing:
        raise LlamaLibError(f"llama.cpp runtime: this CPU lacks {', '.join(missing).upper()}, which the {WHEEL} "
                            "build needs (use the torch backend)")
    if ctypes.util.find_library("gomp") is None:
        raise LlamaLibError("llama.cpp runtime: libgomp (GNU OpenMP) is missing: install it "
                            "(Debian/Ubuntu: apt-get install libgomp1)")


def declare(lib: ctypes.CDLL) -> None:
    """Every function's signature; an absent symbol is an error naming it."""
    absent = [name for name in SIGNATURES if not hasattr(lib, name)]
    if absent:
        raise LlamaLibError(f"llama.cpp runtime: the library lacks {', '.join(absent)} (not the b11549 build "
                            f"tandem declares; {INSTALL})")
    for name, (restype, argtypes) in SIGNATURES.items():
        fn = getattr(lib, name)
        fn.restype, fn.argtypes = restype, argtypes


def check_layouts(lib: ctypes.CDLL, model: type[ctypes.Structure] = ModelParams,
                  context: type[ctypes.Structure] = ContextParams) -> None:
    """Read the library's own default parameters at the offsets declared here: each must hold its known value."""
    wrong = [f"{struct.__name__} is {ctypes.sizeof(struct)} bytes, not {SIZES[struct.__name__]}"
             for struct in (model, context, Batch) if ctypes.sizeof(struct) != SIZES[struct.__name__]]
    for fn, struct in (("llama_model_default_params", model), ("llama_context_default_params", context)):
        raw = ctypes.CFUNCTYPE(_Probe)((fn, lib))()  # into a large buffer: see _Probe
        view = struct.from_buffer_copy(bytes(raw.raw)[: ctypes.sizeof(struct)])
        wrong += [f"{struct.__name__}.{name} reads {getattr(view, name)!r}, expected {want!r}"
                  for name, want in DEFAULTS[fn].items() if getattr(view, name, want) != want]
    if wrong:
        raise LlamaLibError(f"llama.cpp runtime: the library's struct layouts differ from tandem's declarations "
                            f"({'; '.join(wrong)}); {INSTALL}")


_lock = threading.Lock()
_loaded: ctypes.CDLL | None = None
_error: LlamaLibError | None = None


def _quiet(level: int, text: bytes, user_data: ctypes.c_void_p) -> None:
    return None


_QUIET = LOG_CALLBACK(_quiet)  # kept alive here: llama.cpp holds the pointer


def library() -> ctypes.CDLL:
    """The checked library, its backend initialised (once per process); `LlamaLibError` where it cannot be used."""
    global _loaded, _error
    with _lock:
        if _loaded is None and _error is None:
            try:
                _loaded = _open()
            except LlamaLibError as e:
                _error = e
        if _error is not None:
            raise _error
        assert _loaded is not None
        return _loaded


def _open() -> ctypes.CDLL:
    check_machine()
    path = shared_object()
    try:
        lib = ctypes.CDLL(str(path))
    except OSError as e:
        raise LlamaLibError(f"llama.cpp runtime: {path.name} does not load here ({e})") from e
    declare(lib)
    check_layouts(lib)
    lib.llama_backend_init()
    if os.environ.get("TANDEM_LLAMA_LOG", "0") != "1":  # llama.cpp logs every load at length on stderr
        lib.llama_log_set(_QUIET, None)
    return lib


def problem() -> str:
    """Why the llama.cpp runtime cannot be used here, in one sentence; '' where it can."""
    try:
        library()
    except LlamaLibError as e:
        return str(e)
    return ""


def system_info() -> str:
    """llama.cpp's own account of the build (`llama_print_system_info`): the CPU kernels it was compiled with."""
    return bytes(library().llama_print_system_info()).decode(errors="replace").strip()
