"""The phrase pool in the draft tree end to end: greedy output equal to the target alone in process and over the wire
(gRPC and HTTP, synchronous and pipelined), its tokens taken, and point-mass rows under sampling."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import torch
from conftest import tree_drafter
from servers import BackgroundServer

from cloud_server.main import ServerHandle
from cloud_server.settings import ServerSettings
from edge_client.client import edge_decoder
from edge_client.settings import EdgeSettings
from tandem.blocks import DraftBlock, VerifyResult
from tandem.drafting import ModelDrafter
from tandem.local import LocalVerifier
from tandem.models import LoadedModel
from tandem.pool import PhrasePool
from tandem.sampling import SamplingParams
from tandem.session import TargetSession, generate_autoregressive
from tandem.speculate import generate_speculative
from tandem.verify import SparseQ, verify_stochastic

PROMPTS = [[10, 20, 30, 40, 50, 60, 70], [5, 9, 14, 3, 22, 40, 41, 5, 9, 14], [33] * 6 + [34, 35]]
GREEDY = SamplingParams(max_tokens=40, ignore_eos=True)


class Spy(ModelDrafter):
    """`tree_drafter` with a pool, keeping the blocks it proposed."""

    def __init__(self, draft: LoadedModel, pool: PhrasePool) -> None:
        made = tree_drafter(draft, pool)
        super().__init__(draft, value=made.value, tree=True, pool=made.pool)
        self.blocks: list[DraftBlock] = []

    def start(self, context: list[int], params: SamplingParams) -> None:
        super().start(context, params)
        self.sizer = self.value  # a seeded sample too (the edge keeps one to the floor): the test's times are fixed

    def propose(self, *args, **kw):  # type: ignore[no-untyped-def]
        block = super().propose(*args, **kw)
        self.blocks.append(block)
        return block


def test_the_targets_phrases_are_taken_and_stay_lossless(tiny_target: LoadedModel, tiny_draft: LoadedModel) -> None:
    """A pool holding the target's own continuation: its tokens lengthen the blocks and the target takes them."""
    for prompt in PROMPTS:
        want = generate_autoregressive(tiny_target, prompt, GREEDY).tokens
        pool = PhrasePool()
        pool.feed(prompt + want)
        got = generate_speculative(Spy(tiny_draft, pool), LocalVerifier(tiny_target), prompt, GREEDY, 4)
        assert got.tokens == want
        assert got.stats.origins.count("p") > len(want) / 4
        assert got.stats.target_passes < len(want) / 3


def test_sampling_lengthens_the_chain_with_point_mass_rows_and_no_branches(tiny_target: LoadedModel,
                                                                           tiny_draft: LoadedModel) -> None:
    params = SamplingParams(max_tokens=24, temperature=0.9, seed=5, ignore_eos=True)
    runs = []
    for _ in range(2):
        pool = PhrasePool()
        pool.feed(PROMPTS[2] * 3)
        drafter = Spy(tiny_draft, pool)
        runs.append(generate_speculative(drafter, LocalVerifier(tiny_target), PROMPTS[2], params, 3).tokens)
    assert runs[0] == runs[1] and len(runs[0]) == 24  # seeded, and blocks independent of timings: reproducible
    assert all(len(c.tokens) == 1 for b in drafter.blocks for c in b.candidates)  # siblings only
    lengthened = [b for b in drafter.blocks if b.sources and "pool" in b.sources]
    assert lengthened
    for b in lengthened:
        own = b.sources.index("pool")  # type: ignore[union-attr]
        assert b.q_ids is not None and b.q_probs is not None
        assert b.q_ids[own:, 0].tolist() == b.tokens[own:]
        assert b.q_probs[own:, 0].tolist() == [1.0] * (len(b.tokens) - own) and float(b.q_probs[own:, 1:].sum()) == 0


def test_point_mass_rows_keep_the_targets_distribution() -> None:
    """A pool token x under sampling: accept with p(x), else recover from p without x. The emitted token is ~ p."""
    p = torch.tensor([0.05, 0.4, 0.25, 0.2, 0.1])
    x = torch.tensor([1])
    q = SparseQ(torch.arange(5)[None], torch.zeros(1, 5).scatter_(1, x[:, None], 1.0))  # one-hot at the pool's token
    gen = torch.Generator().manual_seed(0)
    n = 8000
    counts = torch.zeros(5)
    for _ in range(n):
        v = verify_stochastic(x, q, torch.stack([p, p]), gen)
        counts[1 if v.num_accepted else v.next_token] += 1
    expected = p * n
    chi2 = float(((counts - expected) ** 2 / expected).sum())
    assert chi2 < 18.5  # 4 degrees of freedom, p = 0.001


# --- over the wire


@pytest.fixture(scope="module")
def server(tiny_target: LoadedModel) -> Iterator[ServerHandle]:
    settings = ServerSettings(target="tiny-target", model_name="tiny", http_port=0, grpc_port=0, max_prompt_tokens=64,
                              max_draft_tokens=16, max_tokens_limit=64, max_body_bytes=64 * 1024,
                              shutdown_grace_s=0.5)
    with BackgroundServer(settings, tiny_target) as handle:
        yield handle


@pytest.mark.parametrize("transport", ["grpc", "http"])
@pytest.mark.parametrize("pipeline", [False, True], ids=["sync", "pipelined"])
def test_greedy_equals_the_target_alone_over_the_wire(
    server: ServerHandle, tiny_target: LoadedModel, tiny_draft: LoadedModel, transport: str, pipeline: bool,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    taken: list[int | None] = []  # the server runs in this process: watch its tree verdicts
    finish_tree = TargetSession._finish_tree

    def spy(self: TargetSession, *args: object) -> VerifyResult:
        result = finish_tree(self, *args)  # type: ignore[arg-type]
        taken.append(result.candidate)
        return result

    monkeypatch.setattr(TargetSession, "_finish_tree", spy)
    port = server.http_port if transport == "http" else server.grpc_port
    settings = EdgeSettings(cloud=f"127.0.0.1:{port}", transport=transport, timeout_s=10, retries=0,
                            pipeline=pipeline, client_id="t", draft_pool=True)
    client = edge_decoder(settings, tiny_draft)
    for prompt in PROMPTS[:2]:
        want = generate_autoregressive(tiny_target, prompt, GREEDY).tokens
        for _ in range(2):  # the second time with the pool the first one filled: a warm start
            assert client.generate(prompt, GREEDY).tokens == want
    assert len(client.pools) == 1 and len(client.pools.get("t")) > 0
    assert taken and any(c is not None for c in taken)  # candidates crossed the wire, and some were taken
    sampled = SamplingParams(max_tokens=12, temperature=0.8, ignore_eos=True)
    assert len(client.generate(PROMPTS[0], sampled).tokens) == 12  # sampled trees and pool rows: accepted


@pytest.mark.slow
def test_the_test_pair_greedy_equals_the_target_alone() -> None:
    from tandem.models import load_model
    from tandem_tools.bench_local import tree_drafter
    from tandem_tools.train.data import heldout_prompts

    target, draft = load_model("test-target"), load_model("test-draft")
    params = SamplingParams(max_tokens=48, ignore_eos=True)
    for prompt in heldout_prompts(2, 64, target.tokenizer):
        want = generate_autoregressive(target, prompt, params).tokens
        drafter = tree_drafter(draft, 8, None, PhrasePool())
        got = generate_speculative(drafter, LocalVerifier(target), prompt, params, 8)
        assert got.tokens == want
        assert got.stats.target_passes < len(want) / 2


def test_candidates_and_feedback_cross_the_wire_and_old_messages_carry_none() -> None:
    from tandem.blocks import Candidate, DraftBlock, VerifyResult
    from tandem_protocol import pb as wire

    block = DraftBlock([4, 5, 6], candidates=[Candidate(-1, [7]), Candidate(1, [8, 9])])
    back = wire.block_from_pb(wire.block_to_pb(block, seq=3, base_len=10))
    assert back.tokens == block.tokens and back.candidates == block.candidates
    assert wire.block_from_pb(wire.block_to_pb(DraftBlock([4]), seq=0)).candidates == []
    result = VerifyResult(3, [4, 5, 8, 2], None, [6, 1], candidate=1, candidate_target_tokens=[[3], [9, 2]], seq=3,
                          generated=4)
    assert wire.verdict_from_pb(wire.verdict_to_pb(result)) == result
    plain = VerifyResult(1, [4, 2], None, [2, 0], generated=2)
    msg = wire.verdict_to_pb(plain)
    assert not msg.HasField("candidate") and not msg.candidate_target_tokens
    assert wire.verdict_from_pb(msg) == plain
