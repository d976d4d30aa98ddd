"""The fast path (`tandem.fastlm` + `tandem.kv.StaticKV`): the same logits as the HF model, rollback as a position,
greedy equality with the target alone (linear blocks and trees, eager and compiled), devices and dtypes."""

from __future__ import annotations

import copy

import pytest
import torch
from conftest import noisy_copy, tiny_model, tree_drafter, wrap

from tandem import fastlm
from tandem.drafting import ModelDrafter
from tandem.errors import ModelLoadError
from tandem.kv import SequenceState, StaticKV
from tandem.local import LocalVerifier
from tandem.models import LoadedModel, load_model, parse_dtype, resolve_device
from tandem.pool import PhrasePool
from tandem.sampling import SamplingParams
from tandem.session import generate_autoregressive
from tandem.speculate import generate_speculative
from tandem_protocol.openai_api.text import chat_prompt

PROMPTS = [[(5 * i + 3 * j) % 90 + 2 for j in range(4 + i % 9)] for i in range(8)]
GREEDY = SamplingParams(max_tokens=30, ignore_eos=True)
CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def _fast_pair(compile: bool, buckets: tuple[int, ...] = fastlm.BUCKETS,
               device: str = "cpu") -> tuple[LoadedModel, LoadedModel]:
    """The conftest pair's architecture and weights, in fresh objects on `device` with the fast path on."""
    target = tiny_model(0, layers=3)
    draft = noisy_copy(target, 0.05, seed=1)
    for m in (target, draft):
        m.to(device)  # type: ignore[arg-type]
        fastlm.enable(m, compile=False)
        if compile:
            fastlm.fast_path_of(m).compile(buckets)  # type: ignore[union-attr]
    return wrap(target, "fast-target"), wrap(draft, "fast-draft")


@pytest.fixture(scope="module")
def fast_pair() -> tuple[LoadedModel, LoadedModel]:
    return _fast_pair(compile=False)


def test_fast_logits_equal_the_hf_model_and_rollback_is_a_position(tiny_target: LoadedModel) -> None:
    model = copy.deepcopy(tiny_target.model)
    fastlm.enable(model, compile=False)
    prompt = PROMPTS[3]
    slow, fast = SequenceState(tiny_target.model, prompt), SequenceState(model, prompt)
    assert isinstance(fast.cache, StaticKV)
    torch.testing.assert_close(fast.forward([7, 8, 9]), slow.forward([7, 8, 9]), rtol=1e-4, atol=1e-4)
    assert fast.cached == slow.cached == len(prompt) + 3
    fast.rollback(len(prompt) - 2)
    slow.rollback(len(prompt) - 2)
    assert fast.cache.length == len(prompt) - 2  # the rollback moved the length alone
    torch.testing.assert_close(fast.forward([11]), slow.forward([11]), rtol=1e-4, atol=1e-4)


def test_a_qwen2_draft_runs_on_the_fast_path() -> None:
    """Qwen2's block is Llama's with q/k/v biases (carried by its projections): the same logits as the HF model."""
    from test_exact import tiny_qwen

    hf = tiny_qwen(0, torch.float32)
    model = copy.deepcopy(hf)
    assert fastlm.supports(model)
    fastlm.enable(model, compile=False)
    prompt = PROMPTS[5]
    slow, fast = SequenceState(hf, prompt), SequenceState(model, prompt)  # type: ignore[arg-type]
    torch.testing.assert_close(fast.forward([7, 8, 9]), slow.forward([7, 8, 9]), rtol=1e-4, atol=1e-4)
    fast.rollback(len(prompt) - 1)
    slow.rollback(len(prompt) - 1)
    torch.testing.assert_close(fast.forward([11]), slow.forward([11]), rtol=1e-4, atol=1e-4)
    windowed = tiny_qwen(0, torch.float32)
    windowed.config.sliding_window = 16
    assert not fastlm.supports(windowed)


def test_the_cache_grows_past_its_first_capacity() -> None:
    hf = tiny_model(3, context=4 * fastlm.CACHE_STEP)
    model = copy.deepcopy(hf)
    fastlm.enable(model, compile=False)
    prompt = [(i * 7) % 90 + 2 for i in range(fastlm.CACHE_STEP - 8)]
    fast, slow = SequenceState(model, prompt), SequenceState(hf, prompt)
    first = fast.cache.capacity  # type: ignore[union-attr]
    torch.testing.assert_close(fast.forward(list(range(2, 20))), slow.forward(list(range(2, 20))), rtol=1e-4,
                               atol=1e-4)
    assert fast.cache.capacity > first  # type: ignore[union-attr]


def test_fast_tree_forward_equals_the_hf_tree_forward(tiny_target: LoadedModel) -> None:
    model = copy.deepcopy(tiny_target.model)
    fastlm.enable(model, compile=False)
    parents, nodes = [-1, 0, 1, -1, 3, 0], [12, 13, 14, 22, 23, 30]
    slow, fast = SequenceState(tiny_target.model, PROMPTS[5]), SequenceState(model, PROMPTS[5])
    slow.run(PROMPTS[5][:-2])
    fast.run(PROMPTS[5][:-2])
    torch.testing.assert_close(fast.forward_tree(parents, nodes), slow.forward_tree(parents, nodes), rtol=1e-4,
                               atol=1e-4)


def _check_equality(target: LoadedModel, draft: LoadedModel, reference: LoadedModel) -> None:
    accepted = 0
    for prompt in PROMPTS:
        want = generate_autoregressive(target, prompt, GREEDY).tokens
        assert want == generate_autoregressive(reference, prompt, GREEDY).tokens  # the fast target is the target
        for gamma in (1, 4):
            got = generate_speculative(ModelDrafter(draft), LocalVerifier(target), prompt, GREEDY, gamma)
            assert got.tokens == want, (prompt, gamma)
            accepted += got.stats.accepted
        pool = PhrasePool()
        pool.feed(prompt + want)
        got = generate_speculative(tree_drafter(draft, pool), LocalVerifier(target), prompt, GREEDY, 8)
        assert got.tokens == want, (prompt, "trees and the pool")
    assert accepted > 0


def test_greedy_equality_on_the_fast_path(fast_pair: tuple[LoadedModel, LoadedModel],
                                          tiny_target: LoadedModel) -> None:
    _check_equality(*fast_pair, reference=tiny_target)


def test_greedy_equality_compiled(tiny_target: LoadedModel) -> None:
    """The compiled graphs (buckets kept few: each costs seconds of compilation on a CPU)."""
    target, draft = _fast_pair(compile=True, buckets=(1, 2, 5))
    assert fastlm.fast_path_of(target.model).compiled is not None  # type: ignore[union-attr]
    _check_equality(target, draft, reference=tiny_target)


def test_two_models_of_different_shapes_compile_in_one_process() -> None:
    """Nothing compiles after start-up: not a pass padded to a compiled length, a grown cache, nor a tree."""
    models = [tiny_model(4, layers=2, hidden=64, context=1024), tiny_model(5, layers=1, hidden=32, context=1024)]
    fasts = [fastlm.enable(copy.deepcopy(m), compile=False) for m in models]
    for f in fasts:
        f.compile((1, 3))
        assert f.buckets == (1, 3)
    with torch._dynamo.config.patch(error_on_recompile=True):  # passes of 1..3 positions pad to a compiled length
        for hf, f in zip(models, fasts, strict=True):
            slow, fast = SequenceState(hf, PROMPTS[4]), SequenceState(f.hf, PROMPTS[4])  # type: ignore[arg-type]
            slow.run(PROMPTS[4])
            fast.run(PROMPTS[4])
            for extra in ([9], [9, 10], [9, 10, 11]):
                torch.testing.assert_close(fast.forward(extra), slow.forward(extra), rtol=1e-4, atol=1e-4)
                fast.rollback(len(PROMPTS[4]) - 1)
                slow.rollback(len(PROMPTS[4]) - 1)
            torch.testing.assert_close(fast.forward_tree([-1, 0, -1], [5, 6, 7]),
                                       slow.forward_tree([-1, 0, -1], [5, 6, 7]), rtol=1e-4, atol=1e-4)
            fast.rollback(len(PROMPTS[4]) - 1)
            slow.rollback(len(PROMPTS[4]) - 1)
            for i in range(fastlm.CACHE_STEP):  # one position at a time, past the first capacity
                fast.tokens.append(2 + i % 90)
                slow.tokens.append(2 + i % 90)
                if i % 40 == 0:
                    torch.testing.assert_close(fast.forward(), slow.forward(), rtol=1e-4, atol=1e-4)
                else:
                    fast.forward()
            assert fast.cache.capacity > fastlm.CACHE_STEP  # type: ignore[union-attr]


def test_seeded_sampling_on_the_fast_path_is_deterministic(fast_pair: tuple[LoadedModel, LoadedModel]) -> None:
    target, draft = fast_pair
    params = SamplingParams(max_tokens=25, temperature=0.9, top_p=0.95, seed=11, ignore_eos=True)
    runs = [generate_speculative(ModelDrafter(draft), LocalVerifier(target), PROMPTS[2], params, 3).tokens
            for _ in range(2)]
    assert runs[0] == runs[1] and len(runs[0]) == 25


def test_device_and_dtype_names() -> None:
    assert resolve_device("cpu") == torch.device("cpu")
    assert resolve_device("auto").type in ("cpu", "cuda", "mps")
    assert parse_dtype("bfloat16") is torch.bfloat16
    with pytest.raises(ModelLoadError, match="unknown dtype"):
        parse_dtype("float8")
    with pytest.raises(ModelLoadError):
        resolve_device("tpu")
    if not torch.cuda.is_available():
        with pytest.raises(ModelLoadError, match="no CUDA"):
            resolve_device("cuda:0")


def test_load_model_casts_and_compiles_the_shipped_draft() -> None:
    draft = load_model("test-draft", dtype="bfloat16")
    assert draft.dtype is torch.bfloat16 and not draft.compiled
    assert draft.weight_bytes == sum(p.numel() * 2 for p in {id(p): p for p in draft.model.parameters()}.values())
    assert "bfloat16, eager" in draft.describe()


@CUDA
def test_greedy_equality_on_cuda(tiny_target: LoadedModel) -> None:
    target, draft = _fast_pair(compile=False, device="cuda")
    state = SequenceState(target.model, PROMPTS[0])
    assert state.device.type == "cuda"
    _check_equality(target, draft, reference=tiny_target)


@CUDA
def test_hf_path_on_cuda_matches_cpu(tiny_target: LoadedModel) -> None:
    model = copy.deepcopy(tiny_target.model).to("cuda")
    on_gpu = wrap(model, "cuda-target")
    for prompt in PROMPTS[:3]:
        assert generate_autoregressive(on_gpu, prompt, GREEDY).tokens == \
            generate_autoregressive(tiny_target, prompt, GREEDY).tokens


def test_placement_settings_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    from cloud_server.settings import ServerSettings
    from edge_client.settings import EdgeSettings

    monkeypatch.setenv("TANDEM_DEVICE", "cpu")
    monkeypatch.setenv("TANDEM_DTYPE", "bfloat16")
    monkeypatch.setenv("TANDEM_COMPILE", "1")
    monkeypatch.setenv("TANDEM_COMPILE_SIZES", "4,1,2")
    monkeypatch.setenv("TANDEM_DRAFT_DTYPE", "float16")
    server = ServerSettings()
    assert (server.device, server.dtype, server.compile, server.compile_sizes) == ("cpu", "bfloat16", True, (1, 2, 4))
    edge = EdgeSettings()
    assert (edge.draft_device, edge.draft_dtype, edge.draft_compile) == ("auto", "float16", False)
    monkeypatch.setenv("TANDEM_COMPILE_SIZES", "0,3")
    with pytest.raises(ValueError, match="compile sizes"):
        ServerSettings()
    monkeypatch.setenv("TANDEM_COMPILE_SIZES", "3")
    monkeypatch.setenv("TANDEM_DTYPE", "int8")
    with pytest.raises(ValueError):
        ServerSettings()


@pytest.mark.slow
def test_a_converted_gguf_on_the_fast_path_equals_the_hf_path() -> None:
    """Qwen2.5-Coder-0.5B-Instruct (converted from its GGUF parts, float32), fast path eager: the target alone and
    speculation give the HF path's greedy tokens."""
    pytest.importorskip("gguf")
    from tandem.config import DEFAULT_DRAFT

    try:
        model = load_model(DEFAULT_DRAFT)
    except ModelLoadError as e:
        pytest.skip(f"the default draft is not installed: {e}")
    prompt = chat_prompt(model.tokenizer, [{"role": "user", "content": "Name three rivers in Europe."}])
    params = SamplingParams(max_tokens=24)
    want = generate_autoregressive(model, prompt, params).tokens  # before the fast path: HF's forward
    fastlm.enable(model.model, compile=False)
    assert generate_autoregressive(model, prompt, params).tokens == want
    assert generate_speculative(ModelDrafter(model), LocalVerifier(model), prompt, params, 3).tokens == want
