"""Ouroboros-style drafting (Zhao et al. 2024): a phrase pool that lengthens drafts at no draft-model cost.

- `PhrasePool`: bounded n-grams keyed by the one or two tokens before them, fed by the prompt, the accepted output
  and the target's feedback (its tokens over a rejected tail, its outputs on candidate continuations); each phrase
  tagged with that origin, so that accepted pool tokens can be counted by it (`SourceCounts`).
- `PoolRegistry`: one pool per client id, kept across requests (a warm start), bounded in total size.
- `draft_greedy`: the draft model's greedy steps, each reading a pool phrase in the same pass and keeping the part it
  agrees with (its own tokens, several per pass); the parts it disagreed with become candidates.
- `ouroboros_block`: that block lengthened by pool phrases that continue it (the main path), plus up to k
  candidate branches verified in the same target pass; `learn` files every verdict into the pool. The drafter that
  puts them together is `tandem.ouroboros.OuroborosDrafter`.

Lossless: greedy blocks carry candidates (the target takes the longest verified path). Under sampling no candidates
are sent; pool tokens on the main path go with a point-mass q (accept with p(x), recover from p without x), which is
exact because the pool chose them deterministically from the tokens before them.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Literal

import torch

from tandem.blocks import Candidate, DraftBlock, VerifyResult
from tandem.models import State

Key = tuple[int, ...]
Phrase = tuple[int, ...]
Origin = Literal["prompt", "output", "feedback"]  # what fed a phrase into the pool
ORIGINS: tuple[Origin, ...] = ("prompt", "output", "feedback")


class PhrasePool:
    """n-grams keyed by the 1..key_len tokens before them; LRU over keys and over the phrases of a key.

    Each phrase carries its origin (a tag, not counted in `size`): "prompt" (the prompt's seeding, and the default for
    text fed from outside a generation), "output" (emitted tokens), "feedback" (the target's tokens over a rejected
    tail, its corrections of candidates). A phrase keeps the origin that first introduced it: refreshing it, or
    extending it with a longer phrase under the same key, keeps that origin, since that is what made it available.
    """

    def __init__(self, max_keys: int = 16384, phrases_per_key: int = 4, phrase_len: int = 8, key_len: int = 3) -> None:
        self.max_keys = max_keys
        self.key_len = key_len
        self.phrases_per_key = phrases_per_key
        self.phrase_len = phrase_len
        self._map: OrderedDict[Key, list[tuple[Phrase, Origin]]] = OrderedDict()  # each list: most recent first

    def __len__(self) -> int:
        return len(self._map)

    @property
    def size(self) -> int:
        """Tokens held (keys and phrases): the memory bound's unit."""
        return sum(len(k) + sum(len(p) for p, _ in ps) for k, ps in self._map.items())

    def add(self, context: list[int] | tuple[int, ...], phrase: list[int] | tuple[int, ...], *,
            origin: Origin = "prompt") -> None:
        """`phrase` followed `context`: file it under the context's last 1..key_len tokens."""
        phrase = tuple(phrase[: self.phrase_len])
        if not phrase or not context:
            return
        for n in range(1, self.key_len + 1):
            if len(context) >= n:
                self._put(tuple(context[-n:]), phrase, origin)

    def _put(self, key: Key, phrase: Phrase, origin: Origin) -> None:
        entries = self._map.pop(key, [])
        # a phrase already held whole is refreshed; one that a new phrase extends is replaced; either way the held
        # phrase's origin stays (the first that introduced these tokens here)
        keep = next((e for e in entries if e[0][: len(phrase)] == phrase), None)
        if keep is None:
            shorter = next((o for p, o in entries if p == phrase[: len(p)]), None)
            keep = (phrase, origin if shorter is None else shorter)
        entries = [keep, *(e for e in entries if e is not keep and e[0] != phrase[: len(e[0])])]
        self._map[key] = entries[: self.phrases_per_key]
        while len(self._map) > self.max_keys:
            self._map.popitem(last=False)

    def feed(self, tokens: list[int], start: int = 0, *, origin: Origin = "prompt") -> None:
        """Add the n-grams of a sequence that begin at `start` or later (their keys may reach back before it)."""
        for i in range(max(start, 1), len(tokens)):
            self.add(tokens[max(0, i - self.key_len) : i], tokens[i : i + self.phrase_len], origin=origin)

    def lookup(self, context: list[int], max_len: int, k: int = 1) -> list[list[int]]:
        """Up to k distinct phrases continuing `context`, best first (longest key first; recent first)."""
        return [p for p, _ in self.lookup_tagged(context, max_len, k)]

    def lookup_tagged(self, context: list[int], max_len: int, k: int = 1) -> list[tuple[list[int], Origin]]:
        """`lookup`, each phrase with its origin."""
        out: list[tuple[list[int], Origin]] = []
        for n in range(self.key_len, 0, -1):
            if len(context) < n or max_len <= 0:
                continue
            key = tuple(context[-n:])
            for p, origin in self._map.get(key, ()):
                cut = list(p[:max_len])
                if all(o[: len(cut)] != cut for o, _ in out):
                    out.append((cut, origin))
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


@dataclass
class BlockOrigins:
    """Where a block's pool tokens came from, filled in place by `draft_greedy`, `plan_block` and `ouroboros_block`
    when passed one: per main-path token its phrase's origin (None: a draft-model step's own token), per candidate
    its phrase's origin. Kept beside the block so that the block (and the wire) stay as they are."""

    main: list[Origin | None] = field(default_factory=list)
    candidates: list[Origin] = field(default_factory=list)


@dataclass(frozen=True)
class OuroborosConfig:
    extend: int = 4  # pool tokens appended to the draft model's block, at most
    candidates: int = 1  # candidate branches per block (greedy only)
    candidate_len: int = 4
    max_draft: int = 8  # greedy: draft-model tokens per block when pool phrases let its gamma steps go further
    seed_prompt: bool = True  # feed the prompt's own n-grams into the pool


def plan_block(
    pool: PhrasePool, context: list[int], draft_tokens: list[int], cfg: OuroborosConfig, greedy: bool, room: int,
    tags: BlockOrigins | None = None,
) -> tuple[list[int], list[Candidate]]:
    """The pool's part of a block: tokens lengthening the draft model's, and candidate branches.

    `room`: block tokens allowed in all (main path; a candidate may not reach further either). Candidates come from
    the pool at the block's end (alternatives to the lengthening), after the committed context and after each draft
    token, skipping any that begin like the main path there. `tags`: if given, its `main` (per draft token on entry;
    missing entries read as draft-model tokens) gets the lengthening's origins, its `candidates` are set to theirs.
    """
    main = list(draft_tokens[:room])
    origins: list[Origin | None] = [] if tags is None else tags.main[: len(main)]
    origins += [None] * (len(main) - len(origins))
    while len(main) - len(draft_tokens) < cfg.extend and len(main) < room:
        found = pool.lookup_tagged(context + main, min(cfg.extend - (len(main) - len(draft_tokens)), room - len(main)))
        if not found:
            break
        main += found[0][0]
        origins += [found[0][1]] * len(found[0][0])
    cands: list[Candidate] = []
    cand_origins: list[Origin] = []
    if tags is not None:
        tags.main, tags.candidates = origins, cand_origins
    if not greedy or cfg.candidates <= 0:
        return main, cands
    anchors = [len(draft_tokens) - 1, -1, *range(len(draft_tokens) - 2, -1, -1)]
    for parent in dict.fromkeys(a for a in anchors if a < len(main)):
        limit = min(cfg.candidate_len, room - parent - 1)
        for phrase, origin in pool.lookup_tagged(context + main[: parent + 1], limit, k=cfg.candidates):
            s = 0  # a phrase that begins like the main path branches off where they part
            while s < len(phrase) and parent + 1 + s < len(main) and phrase[s] == main[parent + 1 + s]:
                s += 1
            c = Candidate(parent + s, phrase[s:])
            if c.tokens and c not in cands:
                cands.append(c)
                cand_origins.append(origin)
            if len(cands) >= cfg.candidates:
                return main, cands
    return main, cands


def learn(pool: PhrasePool, context: list[int], block: DraftBlock, result: VerifyResult) -> None:
    """Feed a verdict into the pool. `context`: the committed sequence before the block.

    The emitted tokens (with a short tail of context for their keys); the target's own tokens over the rejected main
    tail, filed under the draft tokens they followed; each candidate corrected by the target: its tokens up to where
    the target disagreed, then the target's token there.
    """
    if result.stale:
        return
    seq = context + result.tokens
    pool.feed(seq, start=len(context) - pool.phrase_len + 1, origin="output")  # phrases cut at the old end grow too
    main, n_main = block.tokens, result.num_accepted
    if result.candidate is not None:
        n_main = block.candidates[result.candidate].parent + 1

    def target_after(j: int) -> int | None:  # the target's token after main[:j + 1]
        i = j + 1 - n_main
        return main[j + 1] if i < 0 else (result.target_tokens[i] if i < len(result.target_tokens) else None)

    # target_tokens[i] follows main[:n_main + i]: after the first (emitted already) they follow rejected draft tokens
    for i, tok in enumerate(result.target_tokens[1:], start=1):
        at = n_main + i
        pool.add(context + main[:at], [tok, *result.target_tokens[i + 1 :]], origin="feedback")
    for c, outs in zip(block.candidates, result.candidate_target_tokens, strict=False):
        if not outs or c.parent >= len(main) or target_after(c.parent) != c.tokens[0]:
            continue  # a candidate wrong from its first token: the target's token there is filed already
        m = next((i for i in range(len(outs) - 1) if outs[i] != c.tokens[i + 1]), len(outs) - 1)
        pool.add(context + main[: c.parent + 1], [*c.tokens[: m + 1], outs[m]], origin="feedback")


def draft_greedy(
    state: State, pool: PhrasePool, steps: int, limit: int, tags: BlockOrigins | None = None
) -> tuple[list[int], list[str], list[Candidate], int]:
    """The draft model's greedy tokens after `state.tokens`, up to `limit` of them in `steps` passes: where the pool
    has a phrase, the draft model reads it in the same pass and keeps the part it agrees with (its own argmax each
    time), so the tokens are exactly those of one-token steps. `state.tokens` is left as it was; the cache covers at
    most it plus the tokens but the last.

    Returns (tokens, each one's source "draft" or "vetted", the pool phrases' parts the draft model disagreed with as
    candidates branching where they parted, passes run). `tags`: if given, set to the tokens' phrase origins (None
    for the draft model's own steps) and the parted candidates' origins.
    """
    context = state.tokens
    logits = state.forward()[-1:]  # [1, V]
    tokens: list[int] = []
    origin: list[str] = []
    parted: list[Candidate] = []
    main_tags: list[Origin | None] = []
    parted_tags: list[Origin] = []
    passes = 1
    while True:
        tokens.append(int(logits[-1].argmax()))
        origin.append("draft")
        main_tags.append(None)
        if len(tokens) >= limit or passes >= steps:
            break
        found = pool.lookup_tagged(context + tokens, limit - len(tokens) - 1)  # room for the draft's own next token
        phrase, phrase_origin = found[0] if found else ([], "prompt")
        rows = state.run([tokens[-1], *phrase])  # [1 + len(phrase), V]
        passes += 1
        agree = 0
        while agree < len(phrase) and int(rows[agree].argmax()) == phrase[agree]:
            agree += 1
        tokens += phrase[:agree]
        origin += ["vetted"] * agree
        main_tags += [phrase_origin] * agree
        if agree < len(phrase):  # the pool and the draft model part here: the target will choose
            parted.append(Candidate(len(tokens) - 1, phrase[agree:]))
            parted_tags.append(phrase_origin)
        state.rollback(len(context) + len(tokens))
        logits = rows[agree : agree + 1]
    if tags is not None:
        tags.main, tags.candidates = main_tags, parted_tags
    return tokens, origin, parted, passes


def ouroboros_block(
    pool: PhrasePool, context: list[int], block: DraftBlock, parted: list[Candidate], cfg: OuroborosConfig,
    greedy: bool, room: int, vocab: int, tags: BlockOrigins | None = None,
) -> DraftBlock:
    """The draft model's block made an Ouroboros block: lengthened from the pool, and (greedy) with candidates, the
    phrases the draft model parted from first. `room`: block tokens allowed in all. `tags`: if given, on entry the
    block's tokens' and the parted candidates' origins (as `draft_greedy` leaves them); on return the new block's."""
    parted_tags: list[Origin] = list(tags.candidates) if tags is not None else []
    parted_tags += ["prompt"] * (len(parted) - len(parted_tags))  # untagged (no `tags`): a placeholder, never read
    plan_tags = tags if tags is not None else BlockOrigins()
    main, cands = plan_block(pool, context, block.tokens, cfg, greedy, room, plan_tags)
    if greedy:
        merged: list[Candidate] = []
        merged_tags: list[Origin] = []
        trimmed = [Candidate(c.parent, c.tokens[: min(cfg.candidate_len, room - c.parent - 1)]) for c in parted]
        for c, o in zip([*trimmed, *cands], [*parted_tags, *plan_tags.candidates], strict=True):
            if c.tokens and c.parent < len(main) and c not in merged:
                merged.append(c)
                merged_tags.append(o)
        cands = merged[: cfg.candidates]
        plan_tags.candidates = merged_tags[: cfg.candidates]
    out = lengthen(block, main, vocab)
    out.candidates = cands
    return out


def lengthen(block: DraftBlock, main: list[int], vocab: int) -> DraftBlock:
    """The block with pool tokens appended; their q rows (under sampling) are point masses at the token."""
    extra = main[len(block.tokens) :]
    if not extra:
        return DraftBlock(main, block.q_ids, block.q_probs)
    x = torch.tensor(extra, dtype=torch.long)  # [e]
    q_ids = q_probs = None
    if block.q_ids is not None and block.q_probs is not None:
        k = block.q_ids.shape[-1]
        ids = (x[:, None] + torch.arange(k)[None]) % vocab  # [e, k] the token, then distinct ids at probability 0
        probs = torch.zeros(len(extra), k)
        probs[:, 0] = 1.0
        q_ids, q_probs = torch.cat([block.q_ids, ids]), torch.cat([block.q_probs, probs])
    return DraftBlock(main, q_ids, q_probs)
