"""A phrase pool (Ouroboros, Zhao et al. 2024): n-grams that continue a context at no draft-model cost, offered as
chains of the draft tree (`tandem.tree.PoolBranches`).

- `PhrasePool`: bounded n-grams keyed by the one to three tokens before them, fed by the prompt, the accepted output
  and the target's feedback (its tokens over a rejected tail, its outputs on a candidate's tokens), through `learn`.
- `PoolRegistry`: one pool per client id, kept across requests (a warm start), bounded in total size.
"""

from __future__ import annotations

from collections import OrderedDict

from tandem.blocks import DraftBlock, VerifyResult

Key = tuple[int, ...]
Phrase = tuple[int, ...]


class PhrasePool:
    """n-grams keyed by the 1..key_len tokens before them; LRU over keys and over the phrases of a key."""

    def __init__(self, max_keys: int = 16384, phrases_per_key: int = 4, phrase_len: int = 8, key_len: int = 3) -> None:
        self.max_keys = max_keys
        self.key_len = key_len
        self.phrases_per_key = phrases_per_key
        self.phrase_len = phrase_len
        self._map: OrderedDict[Key, list[Phrase]] = OrderedDict()  # each list: most recent first

    def __len__(self) -> int:
        return len(self._map)

    @property
    def size(self) -> int:
        """Tokens held (keys and phrases): the memory bound's unit."""
        return sum(len(k) + sum(len(p) for p in ps) for k, ps in self._map.items())

    def add(self, context: list[int] | tuple[int, ...], phrase: list[int] | tuple[int, ...]) -> None:
        """`phrase` followed `context`: file it under the context's last 1..key_len tokens."""
        phrase = tuple(phrase[: self.phrase_len])
        if not phrase or not context:
            return
        for n in range(1, self.key_len + 1):
            if len(context) >= n:
                self._put(tuple(context[-n:]), phrase)

    def _put(self, key: Key, phrase: Phrase) -> None:
        entries = self._map.pop(key, [])
        # a phrase already held whole is refreshed; one that the new phrase extends is replaced by it
        keep = next((p for p in entries if p[: len(phrase)] == phrase), phrase)
        entries = [keep, *(p for p in entries if p is not keep and p != phrase[: len(p)])]
        self._map[key] = entries[: self.phrases_per_key]
        while len(self._map) > self.max_keys:
            self._map.popitem(last=False)

    def feed(self, tokens: list[int], start: int = 0) -> None:
        """Add the n-grams of a sequence that begin at `start` or later (their keys may reach back before it)."""
        for i in range(max(start, 1), len(tokens)):
            self.add(tokens[max(0, i - self.key_len) : i], tokens[i : i + self.phrase_len])

    def lookup(self, context: list[int], max_len: int, k: int = 1) -> list[list[int]]:
        """Up to k distinct phrases continuing `context`, best first (longest key first; recent first)."""
        out: list[list[int]] = []
        for n in range(self.key_len, 0, -1):
            if len(context) < n or max_len <= 0:
                continue
            key = tuple(context[-n:])
            for p in self._map.get(key, ()):
                cut = list(p[:max_len])
                if all(o[: len(cut)] != cut for o in out):
                    out.append(cut)
                if len(out) >= k:
                    break
            if key in self._map:
                self._map.move_to_end(key)
            if len(out) >= k:
                break
        return out


class PoolRegistry:
    """One pool per client id, LRU over clients, bounded in the tokens all pools hold together."""

    def __init__(self, max_clients: int = 64, max_total_tokens: int = 2_000_000, **pool_kw: int) -> None:
        self.max_clients = max_clients
        self.max_total_tokens = max_total_tokens
        self.pool_kw = pool_kw
        self._pools: OrderedDict[str, PhrasePool] = OrderedDict()

    def __len__(self) -> int:
        return len(self._pools)

    def get(self, client_id: str) -> PhrasePool:
        pool = self._pools.pop(client_id, None) or PhrasePool(**self.pool_kw)
        self._pools[client_id] = pool
        self.trim()
        return pool

    def trim(self) -> None:
        """Drop the least recently used clients' pools over either bound (never the most recent one)."""
        while len(self._pools) > 1 and (
            len(self._pools) > self.max_clients or sum(p.size for p in self._pools.values()) > self.max_total_tokens
        ):
            self._pools.popitem(last=False)


def learn(pool: PhrasePool, context: list[int], block: DraftBlock, result: VerifyResult) -> None:
    """Feed a verdict into the pool. `context`: the committed sequence before the block.

    The emitted tokens (with a short tail of context for their keys); the target's own tokens over the rejected main
    tail, filed under the draft tokens they followed; each candidate corrected by the target: its tokens up to where
    the target disagreed, then the target's token there.
    """
    if result.stale:
        return
    seq = context + result.tokens
    pool.feed(seq, start=len(context) - pool.phrase_len + 1)  # phrases cut at the old end grow too
    main, n_main = block.tokens, result.num_accepted
    if result.candidate is not None:
        n_main = block.candidates[result.candidate].parent + 1

    def target_after(j: int) -> int | None:  # the target's token after main[:j + 1]
        i = j + 1 - n_main
        return main[j + 1] if i < 0 else (result.target_tokens[i] if i < len(result.target_tokens) else None)

    # target_tokens[i] follows main[:n_main + i]: after the first (emitted already) they follow rejected draft tokens
    for i, tok in enumerate(result.target_tokens[1:], start=1):
        at = n_main + i
        pool.add(context + main[:at], [tok, *result.target_tokens[i + 1 :]])
    for c, outs in zip(block.candidates, result.candidate_target_tokens, strict=False):
        if not outs or c.parent >= len(main) or target_after(c.parent) != c.tokens[0]:
            continue  # a candidate wrong from its first token: the target's token there is filed already
        m = next((i for i in range(len(outs) - 1) if outs[i] != c.tokens[i + 1]), len(outs) - 1)
        pool.add(context + main[: c.parent + 1], [*c.tokens[: m + 1], outs[m]])
