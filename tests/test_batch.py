"""Batched verification: one forward pass over several sessions' caches equals their solo passes; the server's
continuous batcher keeps every session's greedy output token for token."""

from __future__ import annotations

import copy
import dataclasses
import threading
from collections.abc import Iterator

import httpx
import pytest
import torch
from servers import BackgroundServer

from cloud_server.main import ServerHandle
from cloud_server.settings import ServerSettings
from edge_client.remote import GrpcVerifier
from tandem import exact
from tandem.batch import forward_batch
from tandem.drafting import ModelDrafter
from tandem.errors import InvalidRequestError
from tandem.kv import SequenceState
from tandem.local import LocalVerifier
from tandem.models import LoadedModel
from tandem.sampling import SamplingParams
from tandem.session import TreeLayout, generate_autoregressive
from tandem.speculate import generate_speculative


def _ids(n: int, seed: int) -> list[int]:
    return torch.randint(2, 96, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


def _pair(model: torch.nn.Module, prompt: list[int], cached: int) -> tuple[SequenceState, SequenceState]:
    a, b = SequenceState(model, prompt), SequenceState(model, prompt)  # type: ignore[arg-type]
    if cached:
        a.run(prompt[:cached])
        b.run(prompt[:cached])
    return a, b


def test_batched_forward_equals_solo_forwards_and_leaves_the_same_caches(tiny_target: LoadedModel) -> None:
    model = tiny_target.model
    # very different lengths, cached prefixes (none, all, part) and blocks (empty, 1, long)
    shapes = [(1, 0, 0), (3, 3, 4), (60, 20, 1), (180, 179, 8), (9, 8, 0), (40, 0, 5)]
    solo, batched, blocks = [], [], []
    for i, (length, cached, gamma) in enumerate(shapes):
        a, b = _pair(model, _ids(length, i), cached)
        solo.append(a)
        batched.append(b)
        blocks.append(_ids(gamma, 100 + i))
    for rnd in range(3):
        expected = _batch_equals_solo(solo, batched, list(blocks))
        # commit a different number of each block's tokens (a verdict), roll back, then go again
        for i, (s, b, x, e) in enumerate(zip(solo, batched, blocks, expected, strict=True)):
            keep = (i + rnd) % (len(x) + 1)
            emitted = [*x[:keep], int(e[keep].argmax())]
            before = len(s.tokens)
            for st in (s, b):
                st.commit(emitted, keep_cached=before + keep)
            blocks[i] = _ids((i + rnd) % 6, 200 + 10 * rnd + i)
    # the next steps from the batched caches, run solo, are the solo ones
    for s, b in zip(solo, batched, strict=True):
        torch.testing.assert_close(b.forward([5, 6]), s.forward([5, 6]), rtol=1e-4, atol=1e-4)


def _layout(main: list[int], branches: list[tuple[int, list[int]]]) -> TreeLayout:
    """The main path, then each branch (parent: -1 or a main index) as `TargetSession` lays a block's candidates."""
    parents, nodes, spans = [*range(-1, len(main) - 1)], list(main), []
    for parent, tokens in branches:
        spans.append((len(nodes), len(tokens)))
        for i, tok in enumerate(tokens):
            parents.append(parent if i == 0 else len(nodes) - 1)
            nodes.append(tok)
    return TreeLayout(parents, nodes, spans)


def _solo(state: SequenceState, extra: list[int] | TreeLayout) -> torch.Tensor:
    return state.forward(extra) if isinstance(extra, list) else state.forward_tree(extra.parents, extra.nodes)


def _batch_equals_solo(solo: list[SequenceState], batched: list[SequenceState],
                       extras: list[list[int] | TreeLayout]) -> list[torch.Tensor]:
    """One batched pass against each solo pass: the same logits, and the same caches after; the solo logits."""
    expected = [_solo(s, x) for s, x in zip(solo, extras, strict=True)]
    got = forward_batch(batched, extras)
    for e, g in zip(expected, got, strict=True):
        assert e.shape == g.shape
        torch.testing.assert_close(g, e, rtol=1e-4, atol=1e-4)
    for s, b in zip(solo, batched, strict=True):
        assert s.cached == b.cached
        for ls, lb in zip(s.cache.layers, b.cache.layers, strict=True):
            torch.testing.assert_close(lb.keys, ls.keys, rtol=1e-4, atol=1e-4)
            torch.testing.assert_close(lb.values, ls.values, rtol=1e-4, atol=1e-4)
    return expected


def test_trees_and_lines_in_one_batch_equal_their_solo_passes(tiny_target: LoadedModel) -> None:
    """Tree rows (their own mask and depth positions) beside line rows: the solo `forward_tree` / `forward` logits
    and caches; then, after committing a path (the main line's prefix, or a candidate's), the same next passes."""
    model = tiny_target.model
    shapes = [(30, 10), (5, 5), (70, 69), (12, 0), (50, 40)]  # (length, cached): long and short pending tails
    solo, batched = [], []
    for i, (length, cached) in enumerate(shapes):
        a, b = _pair(model, _ids(length, 300 + i), cached)
        solo.append(a)
        batched.append(b)
    for rnd in range(3):
        extras: list[list[int] | TreeLayout] = [
            _layout(_ids(4, rnd), [(-1, _ids(3, 10 + rnd)), (1, _ids(2, 20 + rnd)), (1, _ids(1, 30 + rnd))]),
            _ids(3, 40 + rnd),
            _layout(_ids(2, 50 + rnd), [(0, _ids(4, 60 + rnd))]),
            _layout([], []) if rnd == 1 else _ids(rnd, 70),  # a tree without nodes: the plain next-token pass
            _layout(_ids(1, 80 + rnd), [(-1, _ids(1, 90 + rnd))]),
        ]
        expected = _batch_equals_solo(solo, batched, extras)
        for i, (s, b, x, e) in enumerate(zip(solo, batched, extras, expected, strict=True)):
            before = len(s.tokens)
            if isinstance(x, list) or not x.spans or (i + rnd) % 2:  # a prefix of the main line (in the cache)
                main = x if isinstance(x, list) else x.nodes[: len(x.nodes) - sum(n for _, n in x.spans)]
                keep = (i + rnd) % (len(main) + 1)
                emitted, keep_cached = [*main[:keep], int(e[keep].argmax())], before + keep
            else:  # the first candidate taken: its tokens are cached off the line, so they go in with the next pass
                start, n = x.spans[0]
                on_main = max(0, x.parents[start] + 1)
                path = [*x.nodes[:on_main], *x.nodes[start : start + n]]
                emitted, keep_cached = [*path, int(e[start + n].argmax())], before + on_main
            for st in (s, b):
                st.commit(emitted, keep_cached=keep_cached)
    for s, b in zip(solo, batched, strict=True):
        torch.testing.assert_close(b.forward([5, 6]), s.forward([5, 6]), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("fixed", [False, True])
def test_exact_tree_rows_in_a_batch_are_the_solo_rows(tiny_target: LoadedModel, fixed: bool) -> None:
    """bfloat16 with exact passes: a tree row and a line row batched are bit for bit the solo passes' (fixed-size
    passes, or where this machine's probe turns batching off: each state's own solo pass)."""
    model = copy.deepcopy(tiny_target.model).to(torch.bfloat16)
    exact.enable(model, exact.ExactPasses(exact.FIXED_ROWS, True, False, "fixed") if fixed else None)
    tree = _layout(_ids(3, 1), [(-1, _ids(2, 2)), (0, _ids(1, 3))])
    extras: list[list[int] | TreeLayout] = [tree, _ids(4, 4), tree]
    solo = [SequenceState(model, _ids(n, n)) for n in (40, 90, 7)]  # type: ignore[arg-type]
    batched = [SequenceState(model, _ids(n, n)) for n in (40, 90, 7)]  # type: ignore[arg-type]
    for st in (*solo, *batched):
        st.catch_up(len(st.tokens) - 1)
    expected = [_solo(s, x) for s, x in zip(solo, extras, strict=True)]
    for e, g in zip(expected, forward_batch(batched, extras), strict=True):
        assert torch.equal(g, e)


def test_a_batch_of_one_is_the_plain_forward_and_duplicates_are_refused(tiny_target: LoadedModel) -> None:
    a, b = _pair(tiny_target.model, _ids(12, 1), 5)
    assert torch.equal(forward_batch([b], [[3, 4]])[0], a.forward([3, 4]))
    with pytest.raises(ValueError, match="twice"):
        forward_batch([a, a], [[1], [2]])


def test_a_pass_cut_short_leaves_every_cache_as_it_was(tiny_target: LoadedModel) -> None:
    model = tiny_target.model
    states = [SequenceState(model, _ids(n, n)) for n in (5, 30)]  # type: ignore[arg-type]
    states[1].run(states[1].tokens[:20])
    before = [[layer.get_seq_length() for layer in s.cache.layers] for s in states]

    def boom(*_: object) -> None:
        raise RuntimeError("boom")

    hook = model.model.layers[1].register_forward_hook(boom)  # layer 0 has appended by then
    try:
        with pytest.raises(RuntimeError, match="boom"):
            forward_batch(states, [[1, 2], []])
    finally:
        hook.remove()
    assert [[layer.get_seq_length() for layer in s.cache.layers] for s in states] == before
    assert model.config._attn_implementation == "sdpa"


def test_a_plain_forward_on_another_thread_during_a_pass_stays_exact(tiny_target: LoadedModel) -> None:
    """While a pass has the model's attention switched, another thread's solo forward sees no packed batch."""
    model = tiny_target.model
    a, b = _pair(model, _ids(30, 7), 20)
    expected = a.forward([4, 5, 6])
    saved = model.config._attn_implementation
    model.config._attn_implementation = "tandem_packed"  # as during a pass on the model thread
    try:
        got = b.forward([4, 5, 6])
    finally:
        model.config._attn_implementation = saved
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)


# --- the continuous batcher


async def test_the_worker_batches_plain_blocks_and_candidate_trees_in_one_pass(tiny_target: LoadedModel) -> None:
    """The worker alone: concurrent blocks, one of them with candidates (a tree row in the same pass), a bad one
    (fails alone); every verdict is the one a solo TargetSession gives."""
    import asyncio

    from cloud_server.worker import ModelWorker, OpenRequest
    from tandem.blocks import Candidate, DraftBlock
    from tandem.session import TargetSession
    from tandem_protocol.metrics import Metrics

    params = SamplingParams(max_tokens=16, ignore_eos=True)
    prompts = [_ids(n, 50 + n) for n in (3, 40, 90)]
    blocks = [DraftBlock(_ids(4, 1)), DraftBlock(_ids(2, 2), candidates=[Candidate(-1, _ids(3, 3)),
                                                                         Candidate(0, _ids(2, 4))]),
              DraftBlock([])]
    expected = []
    for prompt, block in zip(prompts, blocks, strict=True):
        solo = TargetSession(tiny_target, prompt, params)
        solo.prefill()
        expected.append(solo.verify(block))
    s = ServerSettings(target="tiny-target", http_port=0, grpc_port=0, max_prompt_tokens=200, max_draft_tokens=8,
                       max_tokens_limit=64, batch_window_ms=500.0)  # ends once all 4 wait
    metrics = Metrics()
    worker = ModelWorker(tiny_target, s, metrics)
    await worker.start()
    try:
        ids = [(await worker.open_session(OpenRequest(p, params))).session_id for p in prompts]
        bad = await worker.open_session(OpenRequest(prompts[0], params))
        got = await asyncio.gather(
            *(worker.verify(i, 0, b) for i, b in zip(ids, blocks, strict=True)),
            worker.verify(bad.session_id, 0, DraftBlock([tiny_target.vocab_size + 5])), return_exceptions=True,
        )
    finally:
        await worker.shutdown()
    assert isinstance(got[3], InvalidRequestError)  # the bad block fails alone
    for verdict, want in zip(got[:3], expected, strict=True):
        assert not isinstance(verdict, BaseException), verdict
        assert dataclasses.replace(verdict, generated=0, server_ms=0.0, queue_ms=0.0, advice=None) == want
    sizes = metrics.batch_size.collect()[0].samples
    count = next(x.value for x in sizes if x.name.endswith("_count"))
    total = next(x.value for x in sizes if x.name.endswith("_sum"))
    assert (count, total) == (1, 3)  # the two plain blocks and the tree in one pass
    positions = next(x.value for x in metrics.batch_positions.collect()[0].samples if x.name.endswith("_sum"))
    assert positions == (4 + 1) + (2 + 3 + 2 + 1) + (0 + 1)  # a tree's nodes, each line's tokens, + 1 each


# --- the continuous batcher through the real servers

GRPC_KEY = "k"


@pytest.fixture(scope="module")
def server(tiny_target: LoadedModel) -> Iterator[ServerHandle]:
    # a generous window, so that concurrent clients surely share passes
    s = ServerSettings(target="tiny-target", model_name="tiny", http_port=0, grpc_port=0, api_keys=[GRPC_KEY],
                       max_prompt_tokens=200, max_draft_tokens=8, max_tokens_limit=64, batch_window_ms=25.0,
                       shutdown_grace_s=1.0)
    with BackgroundServer(s, tiny_target) as handle:
        yield handle


def _metric(h: ServerHandle, name: str) -> float:
    text = httpx.get(f"http://127.0.0.1:{h.http_port}/metrics", timeout=10).text
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines() if line.startswith(name + " "))


def test_concurrent_sessions_of_very_different_lengths_keep_their_outputs(
    server: ServerHandle, tiny_target: LoadedModel, tiny_draft: LoadedModel
) -> None:
    greedy = SamplingParams(max_tokens=24, ignore_eos=True)
    sampled = SamplingParams(max_tokens=16, temperature=0.8, top_k=20, seed=3, ignore_eos=True)
    prompts = [_ids(n, 10 + n) for n in (2, 17, 150, 60)]
    jobs: list[tuple[str, list[int], SamplingParams, int]] = [
        ("spec", prompts[0], greedy, 4), ("spec", prompts[1], greedy, 1), ("spec", prompts[2], greedy, 6),
        ("spec", prompts[3], sampled, 3), ("cloud", prompts[2], greedy, 0), ("cloud", prompts[0], greedy, 0),
    ]
    expected = []
    for _, prompt, params, gamma in jobs:
        if params.greedy:
            expected.append(generate_autoregressive(tiny_target, prompt, params).tokens)
        else:  # seeded sampling: the in-process speculative run is the reference
            local = generate_speculative(ModelDrafter(tiny_draft), LocalVerifier(tiny_target), prompt, params, gamma)
            expected.append(local.tokens)
    count0, sum0 = _metric(server, "tandem_batch_size_count"), _metric(server, "tandem_batch_size_sum")
    got: list[list[int] | BaseException] = [[] for _ in jobs]
    start = threading.Barrier(len(jobs))

    def run(i: int) -> None:
        mode, prompt, params, gamma = jobs[i]
        try:
            with GrpcVerifier(f"127.0.0.1:{server.grpc_port}", api_key=GRPC_KEY, timeout_s=60,
                              draft_fingerprint=tiny_draft.fingerprint) as verifier:
                start.wait(30)
                if mode == "cloud":
                    got[i] = [t for step in verifier.generate(prompt, params) for t in step.tokens]
                else:
                    got[i] = generate_speculative(ModelDrafter(tiny_draft), verifier, prompt, params, gamma).tokens
        except BaseException as e:  # reported below
            got[i] = e

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(jobs))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    for i, (out, want) in enumerate(zip(got, expected, strict=True)):
        assert not isinstance(out, BaseException), (jobs[i][0], out)
        assert out == want, f"job {i} ({jobs[i][0]}, prompt {len(jobs[i][1])} tokens) differs"
    passes = _metric(server, "tandem_batch_size_count") - count0
    sequences = _metric(server, "tandem_batch_size_sum") - sum0
    assert sequences > passes > 0, (sequences, passes)  # some passes verified several sessions at once
