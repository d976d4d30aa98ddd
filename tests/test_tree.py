"""Multi-candidate verification: the tree rule on hand-built argmax rows, the tree forward pass against linear
forwards, and a session's cache after a candidate path is taken."""

from __future__ import annotations

import pytest
import torch

from tandem.blocks import Candidate, DraftBlock, slice_block
from tandem.errors import InvalidRequestError
from tandem.kv import SequenceState
from tandem.models import LoadedModel
from tandem.sampling import SamplingParams
from tandem.session import TargetSession, generate_autoregressive
from tandem.verify import verify_greedy, verify_tree_greedy


def _argmax(*rows: int) -> torch.Tensor:
    return torch.tensor(rows)


def test_empty_tree_gives_the_targets_next_token() -> None:
    v = verify_tree_greedy([], [], _argmax(7))
    assert (v.path, v.next_token, v.kind) == ([], 7, "bonus")


def test_a_chain_matches_the_linear_rule() -> None:
    gen = torch.Generator().manual_seed(0)
    for _ in range(200):
        g = int(torch.randint(0, 6, (1,), generator=gen))
        draft = torch.randint(0, 3, (g,), generator=gen)
        logits = torch.randn(g + 1, 3, generator=gen)
        lin = verify_greedy(draft, logits)
        tree = verify_tree_greedy(list(range(-1, g - 1)), draft.tolist(), logits.argmax(-1))
        assert (len(tree.path), tree.next_token, tree.kind) == (lin.num_accepted, lin.next_token, lin.kind)
        assert tree.path == list(range(lin.num_accepted))


def test_a_root_candidate_wins_when_the_main_path_fails_at_once() -> None:
    # main: nodes 0,1 = [5, 6]; candidate at the root: nodes 2,3 = [8, 9]. Rows: root, after each node.
    v = verify_tree_greedy([-1, 0, -1, 2], [5, 6, 8, 9], _argmax(8, 1, 1, 9, 4))
    assert (v.path, v.next_token, v.kind) == ([2, 3], 4, "bonus")


def test_the_main_path_wins_a_tie() -> None:
    # both main [5, 6] and the candidate [5, 7] off main node 0 are wrong after one token... make both length 2
    v = verify_tree_greedy([-1, 0, -1, 2], [5, 6, 5, 6], _argmax(5, 6, 3, 6, 3))
    assert v.path == [0, 1] and v.next_token == 3


def test_a_candidate_off_a_rejected_node_is_not_accepted() -> None:
    # main [5, 6]: 5 rejected (root says 4). Candidate [9] off node 0 matches node 0's row but node 0 is out.
    v = verify_tree_greedy([-1, 0, 0], [5, 6, 9], _argmax(4, 9, 0, 0))
    assert (v.path, v.next_token, v.kind) == ([], 4, "recovered")


def test_a_deeper_candidate_branch_is_taken() -> None:
    # main [1, 2, 3]: 1, 2 accepted, 3 rejected (row after 2 says 7); candidate [7, 8] off node 1 is right.
    parents, tokens = [-1, 0, 1, 1, 3], [1, 2, 3, 7, 8]
    v = verify_tree_greedy(parents, tokens, _argmax(1, 2, 7, 0, 8, 5))
    assert (v.path, v.next_token, v.kind) == ([0, 1, 3, 4], 5, "bonus")
    # the same candidate cut short by a wrong second token: 3 accepted tokens, then the recovered one
    v = verify_tree_greedy(parents, tokens, _argmax(1, 2, 7, 0, 6, 5))
    assert (v.path, v.next_token, v.kind) == ([0, 1, 3], 6, "recovered")


def _path(parents: list[int], nodes: list[int], i: int) -> list[int]:
    out = []
    while i >= 0:
        out.append(nodes[i])
        i = parents[i]
    return out[::-1]


@pytest.mark.parametrize("uncached", [1, 3])
def test_tree_forward_equals_linear_forwards(tiny_target: LoadedModel, uncached: int) -> None:
    context = [5, 9, 14, 3, 22, 40, 41]
    parents = [-1, 0, 1, -1, 3, 0, 5, 2]
    nodes = [10, 11, 12, 20, 21, 30, 31, 13]
    state = SequenceState(tiny_target.model, context)
    state.run(context[: len(context) - uncached])
    logits = state.forward_tree(parents, nodes)  # [1 + nodes, V]
    assert logits.shape == (1 + len(nodes), tiny_target.vocab_size)
    assert state.cached == len(context) + len(nodes)
    want = SequenceState(tiny_target.model, context).forward()[-1]
    torch.testing.assert_close(logits[0], want, rtol=1e-4, atol=1e-4)
    for i in range(len(nodes)):
        want = SequenceState(tiny_target.model, context + _path(parents, nodes, i)).forward()[-1]
        torch.testing.assert_close(logits[i + 1], want, rtol=1e-4, atol=1e-4)


def test_a_bad_parent_is_refused(tiny_target: LoadedModel) -> None:
    with pytest.raises(ValueError):
        SequenceState(tiny_target.model, [5, 9]).forward_tree([-1, 1], [3, 4])


def _target_continuation(target: LoadedModel, prompt: list[int], n: int) -> list[int]:
    return generate_autoregressive(target, prompt, SamplingParams(max_tokens=n, ignore_eos=True)).tokens


@pytest.mark.parametrize("branch_at", [-1, 1])
def test_a_taken_candidate_leaves_a_cache_that_continues_correctly(tiny_target: LoadedModel, branch_at: int) -> None:
    prompt = [5, 9, 14, 3, 22, 40, 41]
    truth = _target_continuation(tiny_target, prompt, 16)
    wrong = (truth[branch_at + 1] + 1) % tiny_target.vocab_size
    # main path right up to branch_at, then wrong; the candidate off branch_at carries on right for 4 tokens
    main = [*truth[: branch_at + 1], wrong, *truth[branch_at + 2 : branch_at + 4]]
    cand = truth[branch_at + 1 : branch_at + 5]
    session = TargetSession(tiny_target, prompt, SamplingParams(max_tokens=16, ignore_eos=True))
    session.prefill()
    decoy = Candidate(-1, [wrong, wrong])
    result = session.verify(DraftBlock(main, candidates=[decoy, Candidate(branch_at, cand)]))
    assert result.candidate == 1
    assert result.num_accepted == branch_at + 1 + len(cand)
    assert result.tokens == truth[: result.num_accepted + 1]
    assert len(result.candidate_target_tokens) == 2 and len(result.candidate_target_tokens[1]) == len(cand)
    assert result.candidate_target_tokens[1] == truth[branch_at + 2 : branch_at + 6]
    assert session.state.cached <= len(session.state.tokens)
    out = list(result.tokens)
    while session.finish_reason is None:
        out += session.verify(DraftBlock(truth[len(out) : len(out) + 2])).tokens
    assert out == truth


def test_under_sampling_a_candidate_is_one_token_beside_a_main_token(tiny_target: LoadedModel) -> None:
    params = SamplingParams(max_tokens=12, temperature=0.8, seed=1, ignore_eos=True)
    session = TargetSession(tiny_target, [5, 9], params)
    with pytest.raises(InvalidRequestError, match="one token"):
        session.verify(DraftBlock([3], candidates=[Candidate(-1, [4, 6])]))
    with pytest.raises(InvalidRequestError, match="zero probability"):  # drawn without replacement: never the same
        session.verify(DraftBlock([3], candidates=[Candidate(-1, [3])]))
    result = session.verify(DraftBlock([3, 7], candidates=[Candidate(-1, [4]), Candidate(1, [8])]))
    assert result.tokens  # the session is unharmed; a sibling past the main tokens has no q: it is dropped
    assert len(session.verify(DraftBlock([3], candidates=[Candidate(0, [8])])).candidate_target_tokens[0]) == 0


def test_slicing_a_block_reindexes_or_empties_candidates() -> None:
    block = DraftBlock([1, 2, 3, 4], candidates=[Candidate(-1, [9]), Candidate(1, [7, 8]), Candidate(3, [6, 5, 4])])
    cut = slice_block(block, 2, 4)  # tokens 1, 2 committed: a candidate off token 2 now starts at the root
    assert cut.tokens == [3, 4]
    assert cut.candidates == [Candidate(-1, []), Candidate(-1, [7, 8]), Candidate(1, [6, 5, 4])]
    room = slice_block(block, 0, 2, room=3)  # three positions left: main [1, 2], candidates trimmed to fit
    assert room.candidates == [Candidate(-1, [9]), Candidate(1, [7]), Candidate(-1, [])]
