"""Replay edges for `tandem bench capacity`: the draft's real proposals and real pace, at no cost to the cloud's CPU
(docs/capacity.md, "replay edges"). A `ReplayTable` holds, per prompt, the target's greedy output T and the draft's
greedy continuation of `max_gamma + 1` tokens after prompt + T[:k] for every k, with the measured draft step time;
a `ReplayDrafter` answers from it and sleeps that time per step. A context off prompt + T is a block sent ahead on a
wrong guess, answered stale whatever it holds.
"""

from __future__ import annotations

import functools
import json
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from tandem.blocks import DraftBlock, VerifyResult
from tandem.errors import InvalidRequestError
from tandem.models import LoadedModel
from tandem.sampling import SamplingParams
from tandem.tree import calibrate, siblings
from tandem.value import BlockValue, Calibration
from tandem_tools.bench_common import common_prefix

EXTRA_TOKENS = 4  # T runs a few tokens past max_tokens
TABLE_FILE = "replay-table.json"


@dataclass
class ReplayTable:
    target: str
    draft: str
    max_tokens: int
    max_gamma: int
    draft_threads: int  # torch threads the draft step was timed with
    prompts: list[list[int]]
    outputs: list[list[int]]  # the target's greedy output per prompt: max_tokens + EXTRA_TOKENS tokens
    continuations: list[list[list[int]]]  # [prompt][k]: the draft's max_gamma + 1 tokens after prompt + T[:k]
    draft_step_s: float  # mean seconds per draft forward pass, this process alone
    record_s: dict[str, float] = field(default_factory=dict)  # what recording took: target, draft
    # [prompt][k][i]: continuation token i's confidence and the draft's second choice there (token, q2 / (1 - q1)),
    # for blocks sized by value and draft trees
    confidences: list[list[list[float]]] = field(default_factory=list)
    alternatives: list[list[list[tuple[int, float]]]] = field(default_factory=list)

    @property
    def width(self) -> int:
        return self.max_gamma + 1

    def key(self) -> dict[str, Any]:
        """What makes two tables interchangeable."""
        return {"target": self.target, "draft": self.draft, "prompts": self.prompts, "max_tokens": self.max_tokens,
                "max_gamma": self.max_gamma, "draft_threads": self.draft_threads}

    @functools.cached_property
    def _index(self) -> dict[tuple[int, ...], int]:
        return {tuple(p): i for i, p in enumerate(self.prompts)}

    def find(self, context: list[int]) -> int | None:
        """The entry whose prompt starts `context` (the longest such prompt), or None."""
        hit = self._index.get(tuple(context))
        if hit is not None:
            return hit
        starts = [i for i, p in enumerate(self.prompts) if len(p) <= len(context) and context[: len(p)] == p]
        return max(starts, key=lambda i: len(self.prompts[i]), default=None)  # the first of the longest

    def summary(self) -> dict[str, Any]:
        return self.key() | {"prompts": len(self.prompts), "draft_step_s": self.draft_step_s, "record_s": self.record_s}

    def save(self, path: Path) -> None:
        path.write_text(json.dumps(asdict(self), separators=(",", ":")) + "\n")

    @classmethod
    def load(cls, path: Path) -> ReplayTable:
        data = json.loads(path.read_text())
        return cls(**{k: data[k] for k in cls.__dataclass_fields__ if k in data})


def record_table(target: LoadedModel, draft: LoadedModel, prompts: list[list[int]], max_tokens: int,
                 max_gamma: int, draft_threads: int = 1, target_threads: int = 1,
                 names: tuple[str, str] | None = None) -> ReplayTable:
    """The target's greedy outputs and the draft's proposals along them, in this process (keep the machine quiet
    meanwhile: the draft step is timed). `names`: (target, draft) as the table records them."""
    import torch

    from tandem.drafting import ModelDrafter
    from tandem.session import generate_autoregressive

    params = SamplingParams(max_tokens=max_tokens + EXTRA_TOKENS, ignore_eos=True)
    threads = torch.get_num_threads()
    try:
        # trap: torch's default (every core) can run a small model many times slower on a small, busy machine
        torch.set_num_threads(target_threads)
        t0 = time.perf_counter()
        outputs = [generate_autoregressive(target, p, params).tokens for p in prompts]
        target_s = time.perf_counter() - t0
        for p, out in zip(prompts, outputs, strict=True):
            if len(out) < max_tokens:
                raise ValueError(f"a {len(p)}-token prompt leaves room for {len(out)} of the {max_tokens} tokens")
        width = max_gamma + 1
        torch.set_num_threads(draft_threads)
        sure = 1e-9  # a p-min no token misses: full blocks, each token's confidence and second choice read
        warm = ModelDrafter(draft, "sparse", p_min=sure)  # first-call allocations, out of the timing
        warm.start(prompts[0], params)
        warm.propose(prompts[0], width)
        continuations: list[list[list[int]]] = []
        confidences: list[list[list[float]]] = []
        alternatives: list[list[list[tuple[int, float]]]] = []
        spent, steps = 0.0, 0
        t1 = time.perf_counter()
        for p, out in zip(prompts, outputs, strict=True):
            drafter = ModelDrafter(draft, "sparse", p_min=sure)  # one per prompt: its cache follows the prefix
            drafter.start(p, params)
            blocks = []
            for k in range(max_tokens + 1):
                t = time.perf_counter()
                blocks.append(drafter.propose(p + out[:k], width))
                spent += time.perf_counter() - t
            steps += drafter.steps
            continuations.append([b.tokens for b in blocks])
            confidences.append([b.confidence for b in blocks])
            alternatives.append([b.alternatives for b in blocks])
        draft_s = time.perf_counter() - t1
    finally:
        torch.set_num_threads(threads)
    target_name, draft_name = names or (target.name, draft.name)
    return ReplayTable(target_name, draft_name, max_tokens, max_gamma, draft_threads, [list(p) for p in prompts],
                       outputs, continuations, spent / steps, {"target": target_s, "draft": draft_s}, confidences,
                       alternatives)


def ensure_table(path: Path, target: str, draft: str, prompts: list[list[int]], max_tokens: int, max_gamma: int,
                 draft_threads: int = 1, target_threads: int = 1) -> tuple[ReplayTable, bool]:
    """The table at `path` if it was recorded for exactly these settings, else a new one recorded and saved there.
    Returns (table, reused)."""
    key = {"target": target, "draft": draft, "max_tokens": max_tokens, "max_gamma": max_gamma,
           "draft_threads": draft_threads, "prompts": [list(p) for p in prompts]}
    if path.is_file():
        try:
            old = ReplayTable.load(path)
        except (ValueError, TypeError, KeyError):
            old = None  # unreadable (an interrupted write): record again
        if old is not None and old.key() == key and old.confidences:
            return old, True
    from tandem.config import DraftPlacement, TargetPlacement
    from tandem.models import load_draft, load_target

    # as the cloud and the edges load them (dtype, exact passes, runtime): the same outputs, the same proposals
    table = record_table(load_target(target, TargetPlacement()), load_draft(draft, DraftPlacement(), draft_threads),
                         prompts, max_tokens, max_gamma, draft_threads,
                         target_threads, names=(target, draft))
    tmp = path.with_suffix(".tmp")
    table.save(tmp)
    tmp.replace(path)
    return table, False


class ReplayDrafter:
    """A `Drafter` answering from a `ReplayTable`: the recorded greedy proposals, after sleeping the recorded draft
    time per step. `draft` is the draft model, loaded only for its vocabulary, stop tokens and context length.
    `value`, `tree`: blocks ended by value and siblings beside them, by the recorded confidences and second choices,
    as `tandem.drafting.ModelDrafter` makes them (the step that ends a block is slept too)."""

    def __init__(self, table: ReplayTable, draft: LoadedModel, sleep: Callable[[float], None] = time.sleep,
                 value: BlockValue | None = None, tree: bool = False) -> None:
        self.table, self.draft = table, draft
        self.value, self.tree, self.branch = value, tree, Calibration()
        self.steps = 0
        self.misses = 0  # proposals on a context off prompt + T (blocks sent ahead on a wrong guess)
        self._sleep = sleep
        self._entry: int | None = None

    def start(self, context: list[int], params: SamplingParams) -> None:
        if not params.greedy:
            raise InvalidRequestError("a replay edge replays greedy proposals: a sampled request needs a real draft")
        entry = self.table.find(context)
        if entry is None:
            raise InvalidRequestError(f"the replay table holds no prompt starting this {len(context)}-token context")
        self._entry = entry

    def propose(self, context: list[int], n: int, room: int | None = None, at_least: int = 1) -> DraftBlock:
        if self._entry is None:
            raise RuntimeError("propose before start")
        if n > self.table.width:
            raise ValueError(f"a block of {n} draft tokens was asked; the replay table holds {self.table.width} "
                             f"(max_gamma {self.table.max_gamma} + 1): record it with a larger max_gamma")
        prompt = self.table.prompts[self._entry]
        full = prompt + self.table.outputs[self._entry]
        rows = self.table.continuations[self._entry]
        common = common_prefix(context, full)
        k = common - len(prompt)
        if common < len(context):  # off prompt + T: stale whatever it holds, the continuation at the longest match
            self.misses += 1
        if k < 0:
            raise RuntimeError("the context does not continue the request's prompt")
        if k >= len(rows):  # past max_tokens: the loop never drafts there for a request within the table
            k = len(rows) - 1
            self.misses += 1
        # the loop times `propose`: this sleep is the draft time the edge measures and reports (adaptive gamma, the
        # cloud's advice), as a real draft's passes would be
        block, steps = DraftBlock(list(rows[k][:n])), n
        if self.value is not None:
            conf, alts = self.table.confidences[self._entry][k][:n], self.table.alternatives[self._entry][k][:n]
            self.value.start()
            while self.value.n < n and (self.value.n < at_least or self.value.worth(conf[self.value.n])):
                self.value.take(conf[self.value.n])
            kept, steps = self.value.n, min(n, self.value.n + 1)
            block = DraftBlock(block.tokens[:kept], confidence=conf[:kept],
                               alternatives=[(t, s) for t, s in alts[:kept]])  # JSON made them lists
            if self.tree:
                block.candidates, block.branch_confidence = siblings(self.value, self.branch, conf[:kept],
                                                                     block.alternatives)
        self._sleep(steps * self.table.draft_step_s)
        self.steps += steps
        return block

    def learn(self, context: list[int], block: DraftBlock, result: VerifyResult, skipped: int = 0) -> None:
        """The proposals are the recorded ones; by value, the verdicts calibrate the confidences."""
        if self.value is not None:
            calibrate(self.value.calibration, self.branch, block, result, skipped)
