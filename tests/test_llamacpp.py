"""The llama.cpp runtime behind the core's seam: the backend rules, rows independent of the pass's shape, rollback,
and speculation with a llama.cpp draft, or a llama.cpp target, equal to that target alone, token for token."""

from __future__ import annotations

import ctypes
import importlib.util
import logging
import platform
from collections.abc import Iterator
from types import SimpleNamespace

import pytest
import torch

from tandem import llama_lib, llamacpp, models
from tandem.config import DEFAULT_DRAFT, DEFAULT_TARGET
from tandem.drafting import ModelDrafter
from tandem.errors import CacheRollbackError, ModelLoadError
from tandem.gguf import PARTS
from tandem.local import LocalVerifier
from tandem.models import LoadedModel, check_pair, load_model, pick_backend
from tandem.sampling import SamplingParams
from tandem.session import generate_autoregressive
from tandem.speculate import generate_speculative
from tandem_protocol.openai_api.text import chat_prompt

INSTALLED = all(importlib.util.find_spec(f"{p.package}{i}") is not None
                for p in PARTS.values() for i in range(1, p.count + 1))
needs_llama = pytest.mark.skipif(bool(llama_lib.problem()) or not INSTALLED,
                                 reason=f"{llama_lib.problem() or 'the llama.cpp library loads'}; the pair's parts "
                                        "from requirements-models.txt")
QUESTION = "Write a Python function that checks whether a string is a palindrome."


@pytest.fixture
def failed_load(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """As on a machine whose CPU cannot run the wheel's build: the library is never loaded."""
    monkeypatch.setattr(llama_lib, "_loaded", None)
    monkeypatch.setattr(llama_lib, "_error", None)
    monkeypatch.setattr(llama_lib, "cpu_flags", lambda: {"sse2", "avx"})
    monkeypatch.setattr(models, "_warned", set())
    yield


def test_the_backend_rules(monkeypatch: pytest.MonkeyPatch) -> None:
    cpu = torch.device("cpu")
    assert pick_backend("torch", DEFAULT_DRAFT, cpu)[0] == "torch"
    assert pick_backend("auto", "test-draft", cpu)[0] == "torch"  # not a GGUF file
    monkeypatch.setattr(llama_lib, "problem", lambda: "llama.cpp runtime: no such library (pip install it)")
    assert pick_backend("auto", DEFAULT_DRAFT, cpu)[0] == "torch"
    with pytest.raises(ModelLoadError, match="pip install it"):
        pick_backend("llama", DEFAULT_DRAFT, cpu)
    monkeypatch.setattr(llama_lib, "problem", lambda: "")
    assert pick_backend("auto", DEFAULT_DRAFT, cpu) == ("llama", "auto: llama.cpp loads here and the model is a "
                                                        "GGUF file")
    assert pick_backend("auto", "my/model.gguf", torch.device("cuda"))[0] == "torch"
    with pytest.raises(ModelLoadError, match="GGUF"):
        pick_backend("llama", "test-draft", cpu)
    with pytest.raises(ModelLoadError, match="unknown backend"):
        pick_backend("onnx", DEFAULT_DRAFT, cpu)


@pytest.mark.skipif(platform.machine() != "x86_64", reason="the wheel's x86-64 build needs AVX2, FMA and F16C")
def test_a_cpu_that_cannot_run_the_build_gets_one_clear_line_and_torch(
        failed_load: None, caplog: pytest.LogCaptureFixture) -> None:
    cpu = torch.device("cpu")
    with caplog.at_level(logging.WARNING):
        assert pick_backend("auto", DEFAULT_DRAFT, cpu)[0] == "torch"
        assert pick_backend("auto", DEFAULT_DRAFT, cpu)[0] == "torch"
    lines = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    assert len(lines) == 1 and "lacks AVX2, FMA, F16C" in lines[0] and "torch" in lines[0], lines
    with pytest.raises(ModelLoadError, match="lacks AVX2"):
        pick_backend("llama", DEFAULT_DRAFT, cpu)
    assert llama_lib._loaded is None  # the build's code was never loaded on that CPU


@pytest.mark.skipif(not INSTALLED, reason="the pair's parts from requirements-models.txt")
@pytest.mark.slow
def test_after_a_failed_load_the_default_draft_runs_on_torch(failed_load: None) -> None:
    draft = load_model(DEFAULT_DRAFT, "float32", backend="auto")
    assert draft.backend == "torch"
    state = draft.state(draft.tokenizer.encode("def add(a, b):"))
    assert state.forward().shape == (1, draft.vocab_size)


def test_each_check_says_what_is_missing(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(llama_lib.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(llama_lib.LlamaLibError, match=r"not installed \(pip install .xllamacpp==2026\.10\.11549.\)"):
        llama_lib.shared_object()
    monkeypatch.undo()
    monkeypatch.setattr(llama_lib.ctypes.util, "find_library", lambda name: None)
    monkeypatch.setattr(llama_lib, "cpu_flags", lambda: {"avx2", "fma", "f16c", "asimd"})
    if platform.system() == "Linux":
        with pytest.raises(llama_lib.LlamaLibError, match="libgomp"):
            llama_lib.check_machine()
    monkeypatch.setattr(llama_lib.importlib.metadata, "version", lambda name: "2026.1.1")
    monkeypatch.setattr(llama_lib.importlib.util, "find_spec",
                        lambda name: SimpleNamespace(submodule_search_locations=["."]))
    with pytest.raises(llama_lib.LlamaLibError, match=r"2026\.1\.1 is installed.*written for 2026\.10\.11549"):
        llama_lib.shared_object()


@needs_llama
def test_the_declarations_match_the_library() -> None:
    lib = llama_lib.library()
    llama_lib.check_layouts(lib)
    assert "AMX" not in llama_lib.system_info()  # this build has no AMX kernels: nothing to guard against

    class Shifted(ctypes.Structure):  # llama-cpp-python 0.3.36's layout: no moe_cache_size, 160 bytes
        _fields_ = [f for f in llama_lib.ContextParams._fields_ if f[0] != "moe_cache_size"]

    Shifted.__name__ = "ContextParams"
    with pytest.raises(llama_lib.LlamaLibError, match=r"160 bytes, not 168.*offload_kqv reads False"):
        llama_lib.check_layouts(lib, context=Shifted)

    class Absent(ctypes.CDLL):
        def __getattr__(self, name: str) -> object:
            if name == "llama_memory_seq_rm":
                raise AttributeError(name)
            return super().__getattr__(name)

    with pytest.raises(llama_lib.LlamaLibError, match="lacks llama_memory_seq_rm"):
        llama_lib.declare(Absent(str(llama_lib.shared_object())))


@pytest.fixture(scope="module")
def llama_draft() -> LoadedModel:
    return load_model(DEFAULT_DRAFT, backend="llama", threads=2)


@needs_llama
def test_rows_match_across_pass_shapes_and_rollback_is_one_operation(llama_draft: LoadedModel) -> None:
    assert llama_draft.backend == "llama.cpp" and llama_draft.vocab_size == 151936
    assert llama_draft.model.min_rows == 1  # type: ignore[union-attr]  # a draft is not padded
    exact = load_model(DEFAULT_DRAFT, backend="llama", threads=2, exact_passes="on")  # as a target is loaded
    assert "exact passes" in exact.describe() and exact.model.min_rows >= 2  # type: ignore[union-attr]
    assert llamacpp.probe(exact.model, seed=7)  # type: ignore[arg-type]
    ids = [int(t) for t in torch.randint(100, 30000, (20,), generator=torch.Generator().manual_seed(0))]
    seq = exact.state(ids[:12])
    first = seq.forward(ids[12:])  # [9, V]
    assert first.shape == (9, 151936) and seq.cached == 20
    seq.rollback(15)
    again = seq.run(ids[15:])  # [5, V]: positions 15.. fed again, in a pass of another shape
    assert torch.equal(again, first[4:]) and seq.cached == 20
    with pytest.raises(CacheRollbackError):
        seq.rollback(21)
    seq.commit(ids[12:15], keep_cached=15)
    assert seq.tokens == ids[:15] and seq.cached == 15


@needs_llama
@pytest.mark.slow
def test_a_llama_draft_with_the_torch_target_equals_the_target_alone(llama_draft: LoadedModel) -> None:
    target = load_model(DEFAULT_TARGET, "auto", exact_passes="auto")
    check_pair(llama_draft, target)
    params = SamplingParams(max_tokens=24)
    prompt = chat_prompt(target.tokenizer, [{"role": "user", "content": QUESTION}])
    want = generate_autoregressive(target, prompt, params).tokens
    spec = generate_speculative(ModelDrafter(llama_draft, p_min=0.75), LocalVerifier(target), prompt, params, 12)
    assert spec.tokens == want and spec.stats.accepted > len(want) / 3


@needs_llama
@pytest.mark.slow
def test_a_llama_target_speculates_equal_to_itself_alone(llama_draft: LoadedModel) -> None:
    # the 0.5B as its own target: the padded passes and their probe are what is tested, and the 1.5B's cost 3x more
    target = load_model(DEFAULT_DRAFT, backend="llama", threads=2, exact_passes="auto")
    check_pair(llama_draft, target)
    params = SamplingParams(max_tokens=32)
    prompt = chat_prompt(target.tokenizer, [{"role": "user", "content": QUESTION}])
    want = generate_autoregressive(target, prompt, params).tokens
    for gamma in (4, 12):
        spec = generate_speculative(ModelDrafter(llama_draft, p_min=0.75), LocalVerifier(target), prompt, params,
                                    gamma)
        assert spec.tokens == want and spec.stats.target_passes < len(want)
    sampled = SamplingParams(max_tokens=16, temperature=0.8, seed=3)
    assert generate_speculative(ModelDrafter(llama_draft, q_form="sparse"), LocalVerifier(target), prompt, sampled,
                                4).tokens


@needs_llama
def test_the_roofline_reads_a_llama_model_without_torch(llama_draft: LoadedModel) -> None:
    from tandem_tools import roofline

    assert roofline.step_bytes(llama_draft) == llama_draft.weight_bytes > 0
    assert roofline.matmul_params(llama_draft) == llama_draft.n_params
