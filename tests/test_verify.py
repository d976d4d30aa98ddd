"""The verification rule on hand-built logits, and its distribution under sampling."""

from __future__ import annotations

import pytest
import torch

from tandem.blocks import cut_at_finish
from tandem.errors import InvalidRequestError
from tandem.sampling import SamplingParams
from tandem.verify import SparseQ, checked_q, verify_greedy, verify_stochastic, verify_tree_stochastic

V = 10


def full(q: torch.Tensor) -> SparseQ:
    """A dense q [gamma, V] in the rule's form: its support is every token."""
    return SparseQ(torch.arange(q.shape[-1]).expand(q.shape[0], -1), q)


def logits_spelling(tokens: list[int]) -> torch.Tensor:
    """[len(tokens), V] logits whose argmax at row i is tokens[i]."""
    out = torch.randn(len(tokens), V, generator=torch.Generator().manual_seed(0))
    out[torch.arange(len(tokens)), tokens] = 50.0
    return out


def test_greedy_first_token_rejected() -> None:
    v = verify_greedy(torch.tensor([3, 5, 7]), logits_spelling([4, 5, 7, 9]))
    assert (v.num_accepted, v.next_token, v.kind) == (0, 4, "recovered")


def test_greedy_mismatch_in_the_middle() -> None:
    v = verify_greedy(torch.tensor([3, 5, 7]), logits_spelling([3, 5, 8, 9]))
    assert (v.num_accepted, v.next_token, v.kind) == (2, 8, "recovered")


def test_greedy_all_accepted_plus_bonus() -> None:
    v = verify_greedy(torch.tensor([3, 5, 7]), logits_spelling([3, 5, 7, 9]))
    assert (v.num_accepted, v.next_token, v.kind) == (3, 9, "bonus")


def test_greedy_empty_block_is_the_target_step() -> None:
    v = verify_greedy(torch.tensor([], dtype=torch.long), logits_spelling([6]))
    assert (v.num_accepted, v.next_token, v.kind) == (0, 6, "bonus")


def test_eos_inside_the_block_ends_the_output() -> None:
    params = SamplingParams(max_tokens=10)
    out, finish = cut_at_finish([3, 0, 7, 9], generated=0, total=5, max_tokens=params.max_tokens,
                                  stop_ids=(0,), context=64)
    assert (out, finish) == ([3, 0], "stop")


def test_max_tokens_reached_mid_block() -> None:
    params = SamplingParams(max_tokens=6)
    out, finish = cut_at_finish([3, 5, 7, 9], generated=4, total=9, max_tokens=params.max_tokens,
                                  stop_ids=(0,), context=64)
    assert (out, finish) == ([3, 5], "length")


def test_context_end_reached_mid_block() -> None:
    params = SamplingParams(max_tokens=60)
    out, finish = cut_at_finish([3, 5, 7, 9], generated=0, total=61, max_tokens=params.max_tokens,
                                  stop_ids=(), context=64)
    assert (out, finish) == ([3, 5, 7], "length")


def test_stochastic_identical_p_q_accepts_everything() -> None:
    p = torch.softmax(torch.randn(4, V, generator=torch.Generator().manual_seed(1)), -1)
    v = verify_stochastic(torch.tensor([1, 2, 3]), full(p[:3]), p, torch.Generator().manual_seed(0))
    assert (v.num_accepted, v.kind) == (3, "bonus")


def test_stochastic_zero_p_rejects_and_recovers_elsewhere() -> None:
    p = torch.full((3, V), 1 / (V - 1))
    p[0, 4] = 0.0  # the target never emits 4 first
    q = torch.full((2, V), 1 / V)
    for seed in range(20):
        v = verify_stochastic(torch.tensor([4, 4]), full(q), p, torch.Generator().manual_seed(seed))
        assert v.num_accepted == 0 and v.next_token != 4 and v.kind == "recovered"


def test_q_zero_at_drafted_token_is_rejected_as_bad_input() -> None:
    p = torch.full((2, V), 1 / V)
    q = torch.zeros(1, V)
    q[0, 2] = 1.0
    with pytest.raises(InvalidRequestError):
        verify_stochastic(torch.tensor([5]), full(q), p, None)


def test_sparse_q_reads_its_support_and_checks_what_was_sent() -> None:
    x = torch.tensor([2, 7])
    assert checked_q(x, V, None, None) is None  # a point mass at each drafted token
    ids, probs = torch.tensor([[2, 3], [7, 1]]), torch.tensor([[1.2, 0.8], [0.9, 0.1]])
    q = checked_q(x, V, ids, probs)
    assert q is not None
    assert q.at(x).tolist() == pytest.approx([0.6, 0.9])  # each row normalised
    assert q.row(1, V)[1] == pytest.approx(0.1) and q.row(1, V).sum() == pytest.approx(1.0)
    with pytest.raises(InvalidRequestError, match="out-of-vocabulary"):
        checked_q(x, V, torch.tensor([[2, 99], [7, 1]]), torch.ones(2, 2) / 2)
    with pytest.raises(InvalidRequestError, match="zero probability"):
        checked_q(x, V, torch.tensor([[3, 4], [7, 1]]), torch.ones(2, 2) / 2)
    with pytest.raises(InvalidRequestError, match=r"\[gamma, k\]"):
        checked_q(x, V, torch.arange(V).expand(3, -1), torch.ones(3, V))


# --- the distribution test -------------------------------------------------------------------------------------------
# Fixed per-position distributions (independent of context) make the target's law at each position known exactly:
# token j of a round must follow p[j], given that the round reached position j.

VS = 5
P = torch.tensor([[0.5, 0.2, 0.15, 0.1, 0.05], [0.05, 0.1, 0.2, 0.25, 0.4], [0.3, 0.3, 0.2, 0.1, 0.1]])
Q_DRAFT = torch.tensor([[0.1, 0.4, 0.2, 0.2, 0.1], [0.3, 0.3, 0.2, 0.1, 0.1]])
CHI2_CRIT_DF4 = 18.47  # p = 0.001


def _round(form: str, gen: torch.Generator, wrong_rule: bool = False) -> list[int]:
    gamma = 2
    if form == "sparse":  # the draft samples from its top-3 q, renormalised, and sends exactly that
        top = torch.topk(Q_DRAFT, 3, dim=-1)
        probs = top.values / top.values.sum(-1, keepdim=True)
        pick = torch.multinomial(probs, 1, generator=gen)[:, 0]
        x = top.indices[torch.arange(gamma), pick]
        q: SparseQ | None = SparseQ(top.indices, probs)
    else:
        x = torch.multinomial(Q_DRAFT, 1, generator=gen)[:, 0]
        q = full(Q_DRAFT) if form == "full" else None  # "none": point mass at the drafted token
    if wrong_rule:  # a plausible bug: forget the draft's q and accept with p(x) as if q were uniform
        q = full(torch.full((gamma, VS), 1.0 / VS))
    v = verify_stochastic(x, q, P, gen)
    return [*x[:v.num_accepted].tolist(), v.next_token]


def _chi2(samples: list[int], probs: torch.Tensor) -> float:
    counts = torch.bincount(torch.tensor(samples), minlength=VS).double()
    expected = probs.double() * len(samples)
    return float(((counts - expected) ** 2 / expected).sum())


def _position_samples(form: str, trials: int, wrong_rule: bool = False) -> list[list[int]]:
    gen = torch.Generator().manual_seed(1234)
    by_pos: list[list[int]] = [[], [], []]
    for _ in range(trials):
        for j, tok in enumerate(_round(form, gen, wrong_rule)):
            by_pos[j].append(tok)
    return by_pos


@pytest.mark.parametrize("form", ["full", "sparse", "none"])
def test_emitted_tokens_follow_p(form: str) -> None:
    by_pos = _position_samples(form, trials=12000)
    for j in range(3):
        assert len(by_pos[j]) * float(P[j].min()) >= 10, f"position {j} reached too rarely to test"
        assert _chi2(by_pos[j], P[j]) < CHI2_CRIT_DF4, f"position {j} does not follow p ({form} q)"


def test_a_wrong_rule_fails_the_distribution_test() -> None:
    by_pos = _position_samples("full", trials=12000, wrong_rule=True)
    assert max(_chi2(by_pos[j], P[j]) for j in range(2)) > CHI2_CRIT_DF4


def test_seeded_verification_is_deterministic() -> None:
    a = [_round("full", torch.Generator().manual_seed(s)) for s in range(50)]
    b = [_round("full", torch.Generator().manual_seed(s)) for s in range(50)]
    assert a == b


# --- trees under sampling --------------------------------------------------------------------------------------------
# A main chain x1, x2 with siblings drawn without replacement from the same q: two at the root, one beside x2. The
# target's law after a node depends on its token at depth 1 (P_AFTER[token]), so a rule that reads the wrong row fails.

P_AFTER = torch.tensor([[0.4, 0.1, 0.1, 0.2, 0.2], [0.1, 0.5, 0.1, 0.1, 0.2], [0.2, 0.2, 0.2, 0.2, 0.2],
                        [0.05, 0.15, 0.3, 0.3, 0.2], [0.3, 0.1, 0.1, 0.1, 0.4]])
TREE_PARENTS = [-1, 0, -1, -1, 0]  # x1, x2, two siblings of x1, a sibling of x2


def _without(probs: torch.Tensor, drawn: list[int]) -> torch.Tensor:
    out = probs.clone()
    out[drawn] = 0
    return out / out.sum()


def _tree_round(form: str, gen: torch.Generator, wrong: bool = False) -> list[int]:
    rows = []  # per depth: (support ids, probabilities) the draft samples from
    for d in range(2):
        if form == "sparse":
            top = torch.topk(Q_DRAFT[d], 4)
            rows.append((top.indices, top.values / top.values.sum()))
        else:
            rows.append((torch.arange(VS), Q_DRAFT[d]))
    drawn: list[list[int]] = [[], []]  # per depth, in drawing order: the main token, then its siblings
    for d, k in ((0, 3), (1, 2)):
        ids, probs = rows[d]
        for s in range(k):
            left = _without(probs, [int((ids == t).nonzero()) for t in drawn[d]])
            # a plausible bug: the greedy sibling (the most likely token left), not a draw
            j = int(left.argmax()) if wrong and s else int(torch.multinomial(left, 1, generator=gen))
            drawn[d].append(int(ids[j]))
    tokens = [drawn[0][0], drawn[1][0], drawn[0][1], drawn[0][2], drawn[1][1]]
    depth_of = [0, 1, 0, 0, 1]
    q = None
    if form != "none":
        q = SparseQ(torch.stack([rows[d][0] for d in depth_of]), torch.stack([rows[d][1] for d in depth_of]))
    after = [P[0], P_AFTER[tokens[0]], P[2], P_AFTER[tokens[2]], P_AFTER[tokens[3]], P[2]]
    v = verify_tree_stochastic(TREE_PARENTS, tokens, q, torch.stack(after), gen)
    return [*(tokens[i] for i in v.path), v.next_token]


def _tree_samples(form: str, trials: int, wrong: bool = False) -> tuple[list[int], dict[int, list[int]], list[int]]:
    gen = torch.Generator().manual_seed(99)
    first, second, third = [], {t: [] for t in range(VS)}, []  # second: by the first token
    for _ in range(trials):
        out = _tree_round(form, gen, wrong)
        first.append(out[0])
        if len(out) > 1:
            second[out[0]].append(out[1])
        if len(out) > 2:
            third.append(out[2])
    return first, second, third


@pytest.mark.parametrize("form", ["full", "sparse", "none"])
def test_tree_emitted_tokens_follow_p(form: str) -> None:
    first, second, third = _tree_samples(form, trials=12000)
    assert _chi2(first, P[0]) < CHI2_CRIT_DF4, f"the first token does not follow p ({form} q)"
    for tok, after in second.items():
        if form == "sparse" and tok == 4:  # outside the draft's top 4: never drafted, so never followed
            assert not after
            continue
        assert len(after) * float(P_AFTER[tok].min()) >= 10, f"the path through {tok} is reached too rarely to test"
        assert _chi2(after, P_AFTER[tok]) < CHI2_CRIT_DF4, f"the token after {tok} does not follow p ({form} q)"
    assert len(third) * float(P[2].min()) >= 10 and _chi2(third, P[2]) < CHI2_CRIT_DF4


def test_greedy_siblings_under_sampling_fail_the_tree_distribution_test() -> None:
    first, second, _ = _tree_samples("full", trials=12000, wrong=True)
    assert max(_chi2(first, P[0]), *(_chi2(after, P_AFTER[tok]) for tok, after in second.items())) > CHI2_CRIT_DF4


def test_a_tree_of_one_chain_is_the_chain_rule_in_law_and_siblings_must_be_sampleable() -> None:
    gen = torch.Generator().manual_seed(5)
    q = full(Q_DRAFT)
    x = [1, 3]
    v = verify_tree_stochastic([-1, 0], x, q, P, gen)
    assert v.kind == ("bonus" if len(v.path) == 2 else "recovered") and v.path == list(range(len(v.path)))
    dup = SparseQ(torch.arange(VS).expand(3, -1), torch.stack([Q_DRAFT[0], Q_DRAFT[1], Q_DRAFT[0]]))
    always_reject = torch.stack([torch.tensor([0.0, 0.0, 1.0, 0.0, 0.0])] + [P[1]] * 3)
    with pytest.raises(InvalidRequestError, match="zero probability"):  # the same token twice: not without replacement
        verify_tree_stochastic([-1, 0, -1], [1, 3, 1], dup, always_reject, gen)
