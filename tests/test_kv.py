"""Rollback: after a crop, the cache length and the next logits equal a fresh forward over the same prefix."""

from __future__ import annotations

import pytest
import torch

from tandem.errors import CacheRollbackError
from tandem.kv import SequenceState
from tandem.models import LoadedModel


def test_rollback_equals_fresh_prefix(tiny_target: LoadedModel) -> None:
    prefix = [5, 9, 14, 3, 22, 40, 41]
    state = SequenceState(tiny_target.model, prefix)
    state.forward([60, 61, 62, 63])  # cache covers prefix + 4 speculative tokens
    assert state.cached == len(prefix) + 4
    state.rollback(len(prefix) - 1)
    assert state.cached == len(prefix) - 1
    after_rollback = state.forward()[-1]

    fresh = SequenceState(tiny_target.model, prefix)
    expected = fresh.forward()[-1]
    assert state.cached == fresh.cached == len(prefix)
    torch.testing.assert_close(after_rollback, expected, rtol=1e-4, atol=1e-4)


def test_commit_keeps_only_the_accepted_prefix(tiny_target: LoadedModel) -> None:
    state = SequenceState(tiny_target.model, [5, 9, 14])
    state.forward([20, 21, 22])  # cache: 5 9 14 20 21 22
    state.commit([20, 30], keep_cached=4)  # accepted 20, then the target said 30
    assert state.tokens == [5, 9, 14, 20, 30] and state.cached == 4
    got = state.forward()[-1]
    want = SequenceState(tiny_target.model, [5, 9, 14, 20, 30]).forward()[-1]
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)


def test_rollback_past_the_cache_is_an_error(tiny_target: LoadedModel) -> None:
    state = SequenceState(tiny_target.model, [5, 9])
    state.forward()
    with pytest.raises(CacheRollbackError):
        state.rollback(10)


def test_a_cache_that_does_not_shrink_is_caught(tiny_target: LoadedModel, monkeypatch: pytest.MonkeyPatch) -> None:
    state = SequenceState(tiny_target.model, [5, 9, 14, 3])
    state.forward([7, 8])
    monkeypatch.setattr(state.cache, "crop", lambda n: None)  # a cache kind that silently cannot crop
    with pytest.raises(CacheRollbackError):
        state.rollback(3)
