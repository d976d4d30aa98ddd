"""Exact passes (`tandem.exact`): in bfloat16 a position's logits and cache entries do not depend on how many
positions share its pass, so speculative greedy output equals the target alone's token for token: in line, tree and
batched passes, after a resume, and on the probe's word for this machine."""

from __future__ import annotations

import random

import pytest
import torch
import torch.nn.functional as F
from conftest import TINY_VOCAB, noisy_copy, tree_drafter, wrap
from transformers import Qwen2Config, Qwen2ForCausalLM

from tandem import exact
from tandem.batch import forward_batch
from tandem.blocks import DraftBlock
from tandem.drafting import ModelDrafter
from tandem.kv import SequenceState
from tandem.local import LocalVerifier
from tandem.models import LoadedModel, auto_dtype, cpu_bf16_flags, exact_default
from tandem.pool import PhrasePool
from tandem.sampling import SamplingParams
from tandem.session import TargetSession, generate_autoregressive
from tandem.speculate import generate_speculative


def tiny_qwen(seed: int, dtype: torch.dtype = torch.bfloat16) -> Qwen2ForCausalLM:
    """Qwen2's shape in small: q/k/v biases, grouped KV heads, head dim 64 (attention over more than one key chunk)."""
    torch.manual_seed(seed)
    cfg = Qwen2Config(vocab_size=TINY_VOCAB, hidden_size=256, intermediate_size=512, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                      initializer_range=0.3, eos_token_id=0, pad_token_id=1, bos_token_id=0, tie_word_embeddings=True)
    return Qwen2ForCausalLM(cfg).eval().requires_grad_(False).to(dtype)


@pytest.fixture(scope="module")
def exact_target() -> LoadedModel:
    model = tiny_qwen(0)
    exact.enable(model)
    return wrap(model, "tiny-qwen-exact")  # type: ignore[arg-type]


def rows(model: torch.nn.Module, context: list[int], seq: list[int], split: list[int]) -> torch.Tensor:
    """The logits predicting each token of `seq` after `context`, fed in blocks of `split` (a verifier accepting every
    block whole): [len(seq), V]."""
    state = SequenceState(model, context)  # type: ignore[arg-type]
    state.catch_up(bulk=len(context) - 1)
    out, pos = [], 0
    for g in split:
        logits = state.forward(seq[pos : pos + g])
        out.append(logits[:g])
        state.commit(seq[pos : pos + g], keep_cached=len(state.tokens) + g)
        pos += g
    return torch.cat(out)


def splits(total: int, rng: random.Random, most: int = 12) -> list[int]:
    out: list[int] = []
    while sum(out) < total:
        out.append(min(rng.randint(1, most), total - sum(out)))
    return out


def test_a_positions_logits_are_the_same_in_every_shape_of_pass(exact_target: LoadedModel) -> None:
    rng = random.Random(0)
    context = [rng.randrange(2, TINY_VOCAB) for _ in range(90)]  # past a key chunk
    seq = [rng.randrange(2, TINY_VOCAB) for _ in range(40)]
    one_by_one = rows(exact_target.model, context, seq, [1] * len(seq))
    for _ in range(4):
        split = splits(len(seq), rng)
        assert torch.equal(rows(exact_target.model, context, seq, split), one_by_one), split


def test_the_fallback_attention_is_exact_too() -> None:
    """Where `attend` fails its probe, each query goes through SDPA alone: the same equality, through the seam."""
    model = tiny_qwen(0)
    exact.enable(model, exact.ExactPasses(2, False, True, "each query alone"))
    assert model.config._attn_implementation == exact.ATTENTION_ALONE
    rng = random.Random(3)
    context = [rng.randrange(2, TINY_VOCAB) for _ in range(70)]
    seq = [rng.randrange(2, TINY_VOCAB) for _ in range(20)]
    assert torch.equal(rows(model, context, seq, splits(len(seq), rng)), rows(model, context, seq, [1] * len(seq)))


def test_without_exact_passes_the_shapes_do_differ() -> None:
    """The equality above is not for free: the same model's plain bfloat16 passes disagree between shapes (on a CPU
    that computes bfloat16 natively, where oneDNN's kernels are measured to; emulated bfloat16 may not)."""
    if not cpu_bf16_flags():
        pytest.skip("no native bfloat16 on this CPU")
    model = tiny_qwen(0)
    rng = random.Random(0)
    context = [rng.randrange(2, TINY_VOCAB) for _ in range(90)]
    seq = [rng.randrange(2, TINY_VOCAB) for _ in range(40)]
    one_by_one = rows(model, context, seq, [1] * len(seq))
    assert any(not torch.equal(rows(model, context, seq, splits(len(seq), rng)), one_by_one) for _ in range(4))


def test_exact_attention_is_attention_and_shape_free() -> None:
    gen = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, h, 150, 64, generator=gen).to(torch.bfloat16) for h in (6, 2, 2))
    for start, n in ((0, 5), (60, 17), (130, 20)):
        causal = torch.ones(n, start + n, dtype=torch.bool).tril(start)
        want = F.scaled_dot_product_attention(q[:, :, start : start + n].float(), k[:, :, : start + n].float(),
                                              v[:, :, : start + n].float(), attn_mask=causal, enable_gqa=True)
        got = exact.attend(q[:, :, start : start + n], k[:, :, : start + n], v[:, :, : start + n], None)
        assert torch.allclose(got.float(), want, atol=2e-2), (start, n)
        alone = exact.attend_alone(q[:, :, start : start + n], k[:, :, : start + n], v[:, :, : start + n], None)
        assert torch.allclose(alone.float(), want, atol=2e-2)
        # a query's result: the same in a 1-row pass at its own position
        for i in (0, n - 1):
            t = start + i
            solo = exact.attend(q[:, :, t : t + 1], k[:, :, : t + 1], v[:, :, : t + 1], None)
            assert torch.equal(got[:, :, i], solo[:, :, 0])
    assert exact._attend_invariant(6, 2, 64, torch.bfloat16, torch.device("cpu"), exact.FIXED_ROWS)


def test_tree_and_batched_passes_give_the_rows_of_a_line(exact_target: LoadedModel) -> None:
    model = exact_target.model
    rng = random.Random(1)
    ctx_a = [rng.randrange(2, TINY_VOCAB) for _ in range(70)]
    ctx_b = [rng.randrange(2, TINY_VOCAB) for _ in range(30)]
    block = [rng.randrange(2, TINY_VOCAB) for _ in range(5)]
    line = SequenceState(model, ctx_a)  # type: ignore[arg-type]
    line.catch_up(len(ctx_a) - 1)
    want = line.forward(block)  # [6, V]
    tree = SequenceState(model, ctx_a)  # type: ignore[arg-type]
    tree.catch_up(len(ctx_a) - 1)
    # the block as the main path, then a branch off its second token
    got = tree.forward_tree([-1, 0, 1, 2, 3, 1, 5], [*block, 7, 8])
    assert torch.equal(got[:6], want)
    a, b = SequenceState(model, ctx_a), SequenceState(model, ctx_b)  # type: ignore[arg-type]
    a.catch_up(len(ctx_a) - 1)
    b.catch_up(len(ctx_b) - 1)
    solo_b = SequenceState(model, ctx_b)  # type: ignore[arg-type]
    solo_b.catch_up(len(ctx_b) - 1)
    batched = forward_batch([a, b], [block, []])
    assert torch.equal(batched[0], want)
    assert torch.equal(batched[1], solo_b.forward([]))  # a cloud-only step beside a block: one row, as alone


def test_a_resume_refeeds_the_output_as_it_was_computed(exact_target: LoadedModel) -> None:
    rng = random.Random(2)
    prompt = [rng.randrange(2, TINY_VOCAB) for _ in range(80)]
    params = SamplingParams(max_tokens=30, ignore_eos=True)
    alone = generate_autoregressive(exact_target, prompt, params).tokens
    half = alone[:12]
    resumed = TargetSession(exact_target, prompt + half,
                            SamplingParams(max_tokens=18, ignore_eos=True, emitted=len(half)))
    resumed.prefill()
    out: list[int] = []
    while resumed.finish_reason is None:
        out += resumed.verify(DraftBlock([])).tokens
    assert half + out == alone


@pytest.mark.parametrize("gamma", [1, 3, 8])
def test_speculation_in_bfloat16_equals_the_target_alone(exact_target: LoadedModel, gamma: int) -> None:
    draft = wrap(noisy_copy(tiny_qwen(0), 0.05, seed=3), "tiny-qwen-draft")  # type: ignore[arg-type]
    params = SamplingParams(max_tokens=40, ignore_eos=True)
    rng = random.Random(gamma)
    for _ in range(3):
        prompt = [rng.randrange(2, TINY_VOCAB) for _ in range(rng.randint(3, 100))]
        want = generate_autoregressive(exact_target, prompt, params).tokens
        plain = generate_speculative(ModelDrafter(draft, p_min=0.5), LocalVerifier(exact_target), prompt, params,
                                     gamma)
        assert plain.tokens == want and plain.stats.accepted > 0
        pool = PhrasePool()
        pool.feed(prompt + want)
        tree = generate_speculative(tree_drafter(draft, pool), LocalVerifier(exact_target), prompt, params, 2 * gamma)
        assert tree.tokens == want


def test_the_probe_and_the_dtype_choice() -> None:
    passes = exact.probe(tiny_qwen(0))
    assert passes.min_rows >= 2 and passes.why
    assert passes.fixed == (passes.min_rows == exact.FIXED_ROWS)
    dtype, why = auto_dtype(torch.device("cpu"))
    assert (dtype == torch.bfloat16) == bool(cpu_bf16_flags()) and why.startswith("auto: ")
    assert exact_default("auto", torch.bfloat16) and not exact_default("auto", torch.float32)
    assert exact_default("on", torch.float32) and not exact_default("off", torch.bfloat16)


def test_p_min_ends_blocks_where_the_draft_is_unsure(exact_target: LoadedModel) -> None:
    draft = wrap(noisy_copy(tiny_qwen(0), 0.05, seed=3), "tiny-qwen-draft")  # type: ignore[arg-type]
    prompt = list(range(2, 40))
    params = SamplingParams(max_tokens=8)
    sure = ModelDrafter(draft, p_min=0.0)
    sure.start(prompt, params)
    assert len(sure.propose(prompt, 8).tokens) == 8 and sure.cut == 0
    never = ModelDrafter(draft, p_min=1.0)  # no token is certain: every block is its first token
    never.start(prompt, params)
    block = never.propose(prompt, 8)
    assert len(block.tokens) == 1 and never.cut == 1
    assert block.tokens == sure.propose(prompt, 1).tokens
    _ = wrap  # the module's models are wrapped LoadedModels
