"""The phrase pool: lookups, bounds, per-client registry, planning a block and learning a verdict."""

from __future__ import annotations

from tandem.blocks import Candidate, DraftBlock, VerifyResult
from tandem.pool import OuroborosConfig, PhrasePool, PoolRegistry, learn, plan_block


def test_feed_then_lookup_prefers_the_two_token_key() -> None:
    pool = PhrasePool(phrase_len=3)
    pool.feed([1, 2, 3, 4, 5, 9, 2, 7, 7])
    assert pool.lookup([1, 2], max_len=3) == [[3, 4, 5]]  # key (1, 2), not (9, 2)
    assert pool.lookup([9, 2], max_len=2) == [[7, 7]]
    assert pool.lookup([8, 2], max_len=3, k=2) == [[7, 7], [3, 4, 5]]  # key (2,): most recent first
    assert pool.lookup([42], max_len=3) == []
    assert pool.lookup([1, 2], max_len=0) == []


def test_a_phrase_extending_another_replaces_it() -> None:
    pool = PhrasePool(phrase_len=8)
    pool.add([1], [2, 3])
    pool.add([1], [2, 3, 4])
    pool.add([1], [2])  # already held whole: refreshed, not shortened
    assert pool.lookup([1], max_len=8, k=5) == [[2, 3, 4]]
    pool.add([1], [5])
    assert pool.lookup([1], max_len=8, k=5) == [[5], [2, 3, 4]]


def test_bounds_evict_the_least_recently_used() -> None:
    pool = PhrasePool(max_keys=4, phrases_per_key=2, phrase_len=2)
    for i in range(10):
        pool.add([100 + i], [i, i])
    assert len(pool) == 4
    assert pool.lookup([100], 2) == [] and pool.lookup([109], 2) == [[9, 9]]
    pool.lookup([106], 2)  # a lookup refreshes its key: 107 is now the least recently used
    pool.add([200], [1])
    assert pool.lookup([106], 2) == [[6, 6]] and pool.lookup([107], 2) == []
    for i in range(5):
        pool.add([7], [i])
    assert pool.lookup([7], 2, k=5) == [[4], [3]]


def test_registry_keeps_one_pool_per_client_within_bounds() -> None:
    reg = PoolRegistry(max_clients=2, max_total_tokens=1000)
    a = reg.get("a")
    a.feed(list(range(20)))
    assert reg.get("a") is a
    reg.get("b")
    reg.get("c")  # over max_clients: the least recently used ("a") goes
    assert len(reg) == 2 and reg.get("a") is not a
    small = PoolRegistry(max_clients=10, max_total_tokens=50)
    small.get("x").feed(list(range(40)))
    small.get("y").feed(list(range(40)))  # over the token bound: "x" goes, the newest stays even alone over it
    assert len(small) == 1 and len(small.get("y")) > 0


def test_plan_lengthens_the_draft_and_branches_candidates_where_they_part() -> None:
    pool = PhrasePool(phrase_len=4)
    pool.add([10, 11], [12, 13, 14])  # continues the draft's last tokens
    pool.add([11], [50, 51])  # an alternative there (one-token key)
    pool.add([9], [10, 20, 21])  # after the context: agrees with the draft's first token, then parts
    cfg = OuroborosConfig(extend=2, candidates=3, candidate_len=4)
    main, cands = plan_block(pool, [8, 9], [10, 11], cfg, greedy=True, room=10)
    assert main == [10, 11, 12, 13]
    assert Candidate(1, [50, 51]) in cands
    assert Candidate(0, [20, 21]) in cands  # branches off after the shared token 10
    assert all(c.parent + 1 + len(c.tokens) <= 10 for c in cands)
    main, cands = plan_block(pool, [8, 9], [10, 11], cfg, greedy=False, room=10)
    assert main == [10, 11, 12, 13] and cands == []  # no candidates under sampling
    main, _ = plan_block(pool, [8, 9], [10, 11], cfg, greedy=True, room=3)
    assert main == [10, 11, 12]


def test_learn_files_emitted_tokens_and_the_targets_feedback() -> None:
    pool = PhrasePool(phrase_len=4)
    context = [1, 2]
    block = DraftBlock([3, 4, 5], candidates=[Candidate(0, [7, 8]), Candidate(0, [9, 9])])
    # 3 accepted; the target said 6 after it (not 4), then 60 after the draft's 4 and 61 after its 5
    result = VerifyResult(1, [3, 6], None, [6, 60, 61],
                          candidate_target_tokens=[[8, 30], [0, 0]])
    learn(pool, context, block, result)
    assert pool.lookup([1, 2], 4) == [[3, 6]]  # the emitted tokens
    assert pool.lookup([3, 4], 4) == [[60, 61]]  # the target's tokens over the rejected tail
    assert pool.lookup([4, 5], 4) == [[61]]
    # candidate [7, 8] began wrong (the target said 6 after 3): not filed; the target's own 6 is
    assert [7, 8, 30] not in pool.lookup([2, 3], 4, k=4)
    stale = VerifyResult(0, [], None, [], stale=True)
    before = pool.size
    learn(pool, context, block, stale)
    assert pool.size == before


def test_reading_pool_phrases_gives_the_draft_models_own_greedy_tokens(tiny_draft) -> None:  # type: ignore[no-untyped-def]
    from tandem.kv import SequenceState
    from tandem.pool import draft_greedy
    from tandem.sampling import SamplingParams
    from tandem.session import generate_autoregressive

    context = [5, 9, 14, 3, 22]
    want = generate_autoregressive(tiny_draft, context, SamplingParams(max_tokens=10, ignore_eos=True)).tokens
    pool = PhrasePool()
    pool.add(context + want[:1], want[1:5])  # right for 4 tokens
    pool.add(context + want[:6], [want[6], (want[7] + 1) % 90, 3])  # right once, then wrong
    state = SequenceState(tiny_draft.model, context)
    tokens, origin, parted, passes = draft_greedy(state, pool, steps=4, limit=10)
    assert tokens == want[: len(tokens)] and len(tokens) > passes  # more tokens than draft-model passes
    assert origin.count("draft") == passes and origin[1:5] == ["vetted"] * 4
    assert state.tokens == context and state.cached <= len(context) + len(tokens)
    assert parted and parted[0].parent == 6 and parted[0].tokens[0] == (want[7] + 1) % 90


def test_an_ouroboros_block_keeps_only_candidates_that_fit() -> None:
    from tandem.pool import ouroboros_block

    cfg = OuroborosConfig(extend=0, candidates=4, candidate_len=4)
    parted = [Candidate(1, [7, 8, 9]), Candidate(5, [6]), Candidate(2, [4])]  # parent 5: beyond a 3-token block
    block = ouroboros_block(PhrasePool(), [1, 2], DraftBlock([3, 4, 5]), parted, cfg, True, room=4, vocab=96)
    assert block.tokens == [3, 4, 5]
    assert block.candidates == [Candidate(1, [7, 8]), Candidate(2, [4])]  # trimmed to the room, the stray one gone


def test_origins_are_kept_returned_and_the_first_one_stays() -> None:
    pool = PhrasePool(phrase_len=4)
    pool.add([1], [2, 3])  # default: "prompt" (text fed from outside a generation)
    pool.feed([8, 9, 10], origin="output")
    pool.add([5], [6, 7], origin="feedback")
    assert pool.lookup_tagged([1], 4) == [([2, 3], "prompt")]
    assert pool.lookup_tagged([8, 9], 4) == [([10], "output")]
    assert pool.lookup([5], 4) == [[6, 7]]  # the plain lookup is unchanged
    pool.add([5], [6], origin="output")  # held whole: refreshed, its origin kept
    pool.add([1], [2, 3, 4], origin="feedback")  # extends a held phrase: replaces it, the first origin kept
    assert pool.lookup_tagged([5], 4) == [([6, 7], "feedback")]
    assert pool.lookup_tagged([1], 4) == [([2, 3, 4], "prompt")]
    pool.add([1], [2, 9], origin="output")  # a different phrase: its own origin, most recent first
    assert pool.lookup_tagged([1], 4, k=2) == [([2, 9], "output"), ([2, 3, 4], "prompt")]
    size = pool.size
    pool.add([1], [2, 9], origin="feedback")
    assert pool.size == size  # the tag costs no tokens


def test_learn_tags_output_and_feedback() -> None:
    pool = PhrasePool(phrase_len=4)
    block = DraftBlock([3, 4, 5])
    learn(pool, [1, 2], block, VerifyResult(1, [3, 6], None, [6, 60, 61]))
    assert pool.lookup_tagged([1, 2], 4) == [([3, 6], "output")]
    assert pool.lookup_tagged([3, 4], 4) == [([60, 61], "feedback")]


def test_drafter_counts_by_origin_sum_to_the_pools_accepted_tokens(tiny_target, tiny_draft) -> None:  # type: ignore[no-untyped-def]
    from tandem.local import LocalVerifier
    from tandem.ouroboros import OuroborosDrafter
    from tandem.pool import ORIGINS
    from tandem.sampling import SamplingParams
    from tandem.session import generate_autoregressive
    from tandem.speculate import generate_speculative

    params = SamplingParams(max_tokens=40, ignore_eos=True)
    prompt = [5, 9, 14, 3, 22, 40, 41, 5, 9, 14]
    pool = PhrasePool()
    cfg = OuroborosConfig(extend=4, candidates=3, candidate_len=3, max_draft=6)
    totals = dict.fromkeys(ORIGINS, 0)
    for gamma in (3, 0, 3):  # the same pool throughout: later runs read output and feedback phrases too
        drafter = OuroborosDrafter(tiny_draft, pool, cfg)
        got = generate_speculative(drafter, LocalVerifier(tiny_target), prompt, params, gamma)
        assert got.tokens == generate_autoregressive(tiny_target, prompt, params).tokens
        src = drafter.sources
        from_pool = sum(src.accepted[k] for k in ("vetted", "pool", "candidate"))
        assert sum(src.accepted_by_origin.values()) == from_pool
        assert sum(src.drafted_by_origin.values()) == sum(src.drafted[k] for k in ("vetted", "pool", "candidate"))
        assert all(src.accepted_by_origin[k] <= src.drafted_by_origin[k] for k in ORIGINS)
        for k in ORIGINS:
            totals[k] += src.accepted_by_origin[k]
    assert sum(totals.values()) > 0 and totals["output"] + totals["feedback"] > 0
