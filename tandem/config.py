"""Settings for the in-process commands (demo, bench). Built at start-up from the environment and the CLI."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import AfterValidator, BeforeValidator, Field
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

# the pair every command uses unless told otherwise (names `tandem.models.load_model` resolves): Qwen2.5-Coder-1.5B-
# Instruct in the cloud and Qwen2.5-Coder-0.5B-Instruct on the device, Q4_K_M GGUF files from PyPI data packages
# (`requirements-models.txt`), assembled and converted once
DEFAULT_TARGET = "qwen2.5-coder-1.5b-instruct"
DEFAULT_DRAFT = "qwen2.5-coder-0.5b-instruct"
# the test pair: small code models trained on the standard library for the tests and code benchmarks (fast, no chat
# template); its weights live in a source checkout (tests/fixtures/test_pair), not in the package
TEST_TARGET = "test-target"
TEST_DRAFT = "test-draft"


def _parse_gamma(v: object) -> object:
    return int(v) if isinstance(v, str) and v != "adaptive" else v


def _check_gamma(v: int | str) -> int | str:
    if isinstance(v, int) and not 0 <= v <= 64:
        raise ValueError("gamma must be in [0, 64] or 'adaptive'")
    return v


# a draft block length, or "adaptive"; from the CLI and the environment alike (TANDEM_GAMMA=4 or =adaptive)
Gamma = Annotated[int | Literal["adaptive"], BeforeValidator(_parse_gamma), AfterValidator(_check_gamma)]


Mode = Literal["spec", "cloud", "edge", "auto"]
DtypeName = Literal["auto", "float32", "bfloat16", "float16"]
ExactSetting = Literal["auto", "on", "off"]
Backend = Literal["auto", "torch", "llama"]
BACKEND_HELP = ("the model runtime: torch (any HF model, GPUs, the float32 reference), llama (llama.cpp: a GGUF file "
                "as published, on the CPU; pip install \"tandem[llama]\") or auto (llama.cpp for a GGUF file where "
                "it is installed, else torch)")
DEVICE_HELP = "auto (CUDA, else MPS, else CPU), cpu, cuda[:N] or mps"
DTYPE_HELP = ("auto: bfloat16 where the hardware computes it natively (CUDA, a CPU with AVX-512 BF16 or AMX), else "
              "float32; float32 is the bit-exact reference")
EXACT_HELP = ("exact passes: a position's logits independent of its pass's shape, so that speculative greedy output "
              "equals the target alone's in any dtype; auto: on below float32")
COMPILE_HELP = "the fast path: compiled decode and verify steps over a preallocated cache (Llama and Qwen2 models)"
SIZES_HELP = "pass lengths compiled at start-up (a pass pads up to the next; longer ones run eager); comma-separated"


# the pass lengths the fast path compiles by default (`tandem.fastlm.BUCKETS`)
COMPILE_SIZES = (1, 2, 3, 4, 5, 6, 8, 12, 16)


def _parse_sizes(v: object) -> object:
    if isinstance(v, str):
        v = [int(x) for x in v.split(",") if x.strip()]
    if isinstance(v, list | tuple):
        if not v or any(not isinstance(x, int) or not 1 <= x <= 256 for x in v):
            raise ValueError("compile sizes are pass lengths in [1, 256]")
        return tuple(sorted(set(v)))
    return v


class TargetPlacement(BaseSettings):
    """Where and how the target runs (TANDEM_BACKEND, TANDEM_DEVICE, TANDEM_DTYPE, TANDEM_COMPILE)."""

    model_config = SettingsConfigDict(env_prefix="TANDEM_", extra="ignore")

    backend: Backend = Field(default="torch", description=BACKEND_HELP)

    device: str = Field(default="auto", description=DEVICE_HELP)
    dtype: DtypeName = Field(default="auto", description=DTYPE_HELP)
    exact_passes: ExactSetting = Field(default="auto", description=EXACT_HELP)
    compile: bool = Field(default=False, description=COMPILE_HELP)
    compile_sizes: Annotated[tuple[int, ...], NoDecode, BeforeValidator(_parse_sizes)] = Field(
        default=COMPILE_SIZES, description=SIZES_HELP)


class DraftPlacement(BaseSettings):
    """Where and how the draft runs (TANDEM_DRAFT_BACKEND, TANDEM_DRAFT_DEVICE, TANDEM_DRAFT_DTYPE, ...)."""

    model_config = SettingsConfigDict(env_prefix="TANDEM_", extra="ignore")

    draft_backend: Backend = Field(default="auto", description=BACKEND_HELP)

    draft_device: str = Field(default="auto", description=DEVICE_HELP)
    draft_dtype: DtypeName = Field(default="auto", description=DTYPE_HELP)
    draft_compile: bool = Field(default=False, description=COMPILE_HELP)


class SpeculationSettings(BaseSettings):
    """How the speculative loop drafts and talks to its verifier (the edge's settings extend these)."""

    model_config = SettingsConfigDict(env_prefix="TANDEM_", extra="ignore")

    cloud: str = Field(default="127.0.0.1:50051", description="HOST:PORT of the cloud (gRPC or HTTP per transport)")
    mode: Mode = "spec"
    gamma: Gamma = Field(default="adaptive", description="draft block length, or adaptive")
    max_gamma: int = Field(default=16, ge=1, description="the largest block adaptive gamma may choose")
    draft_p_min: float = Field(default=0.75, ge=0.0, le=1.0, description="a block ends before a token the draft "
                               "gives less than this probability (after one; 0: blocks of gamma tokens)")
    block_value: bool = Field(default=True, description="blocks end where the next token is not worth its cost")
    draft_tree: bool = Field(default=True, description="by value: siblings beside the chain where they pay "
                             "(greedy: the second choice; sampling: drawn without replacement)")
    draft_pool: bool = Field(default=False, description="with a tree: a phrase pool's chains in it, kept per client "
                             "id (the prompt's, the output's and the target's phrases); off: on the default pair "
                             "they do not pay (docs/performance.md)")
    pool_extend: int = Field(default=8, ge=1, description="tokens of a pool chain, at most")
    pipeline: bool = Field(default=True, description="draft the next block while the current one is verified")
    q_top_k: int = Field(default=16, ge=1, description="sampling: the draft samples from its top-k and sends them")
    fallback: Literal["none", "edge"] = "none"
    retries: int = Field(default=5, ge=0, description="reconnect attempts after a lost cloud, per loss")
    backoff_s: float = Field(default=0.2, gt=0, description="first reconnect delay; doubles each attempt")
    backoff_max_s: float = Field(default=5.0, gt=0)
    auto_probe_rounds: int = Field(default=3, ge=1, description="auto mode: speculative rounds measured first")
    auto_margin: float = Field(default=1.1, ge=1.0, description="auto: speculate only when its rate beats cloud x this")
    client_id: str = "tandem-edge"
    pool_max_clients: int = Field(default=64, ge=1, description="phrase pools kept (one per client id), LRU")
    pool_max_tokens: int = Field(default=2_000_000, ge=1, description="tokens all phrase pools hold together")


class CoreSettings(TargetPlacement, DraftPlacement):
    model_config = SettingsConfigDict(env_prefix="TANDEM_", extra="ignore")

    target: str = DEFAULT_TARGET
    draft: str = DEFAULT_DRAFT
    threads: int = Field(default=2, ge=1, description="torch intra-op threads for this process")
    gamma: Gamma = Field(default=4, description="draft block length, or 'adaptive' (edge path)")
    draft_p_min: float = Field(default=0.75, ge=0.0, le=1.0, description="a block ends before a token the draft "
                               "gives less than this probability (bench local's spec mode)")


# API keys, shared by the cloud's and the edge endpoint's settings
def split_keys(v: Any) -> Any:
    """A comma-separated string of keys as a list; anything else unchanged."""
    return [k.strip() for k in v.split(",") if k.strip()] if isinstance(v, str) else v


def read_keys_file(path: Path) -> list[str]:
    """One key a line; blank lines and lines starting with '#' are skipped. Read once, at start-up."""
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except OSError as e:
        raise ValueError(f"cannot read the API keys file {str(path)!r}: {e.strerror or e}") from None
    return [line.strip() for line in lines if line.strip() and not line.strip().startswith("#")]


def merge_keys(*lists: list[str]) -> list[str]:
    return list(dict.fromkeys(k for keys in lists for k in keys))
