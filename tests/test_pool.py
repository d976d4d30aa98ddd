"""The phrase pool: lookups, bounds, per-client registry and learning a verdict."""

from __future__ import annotations

from tandem.blocks import Candidate, DraftBlock, VerifyResult
from tandem.pool import PhrasePool, PoolRegistry, learn


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
