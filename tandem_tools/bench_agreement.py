"""`tandem bench agreement`: how far a draft follows its target, before any timing. The target answers each request
of a trace alone (greedy); the draft reads that answer teacher-forced, one pass over it, and each position records
the rank of the target's token among the draft's logits (0: the draft's own greedy token). From the ranks, the
tokens a target pass would yield with greedy chains of at most gamma draft tokens, with and without one-token
siblings, replayed exactly over the answer: the ceiling speculation with this pair can reach, whatever the
hardware, the value rule or the network. With the target's pass and the draft's step timed here, what each of
those fixed blocks would run at in one process (drafting, then verifying): the best a fixed block can do on this
machine, against which the loop's own figures (`bench local`) can be read."""

from __future__ import annotations

import json
import statistics
from dataclasses import dataclass
from pathlib import Path

import torch
from rich.console import Console
from rich.table import Table

from tandem.config import CoreSettings
from tandem.costs import CostCurve
from tandem.models import LoadedModel, check_pair, load_draft, load_target
from tandem.pass_timing import pass_times
from tandem.sampling import SamplingParams
from tandem.session import generate_autoregressive
from tandem_tools.bench_common import fmt
from tandem_tools.replay_summary import CHAT_TRACE, load_trace

GAMMAS = (2, 4, 8, 16, 0)  # 0: no bound on the chain
RANKS = 8  # ranks from here on are counted as this one
TIMED = (1, 2, 3, 4, 5, 6, 8, 12, 16, 24, 33)  # target pass sizes timed (a block of 16 and its siblings: 33)


def passes(ranks: list[int], gamma: int, siblings: int = 0) -> int:
    """Target passes a greedy speculative loop needs over an answer whose tokens have these draft ranks. Each pass
    takes the run of tokens the draft predicts (at most `gamma`; 0: no bound) and adds the target's next token;
    with `siblings` s, a block also carries the draft's next s tokens at each drafted position, so a miss whose
    token ranks 1..s there is taken too and the target adds the token after it."""
    pos, count, n = 0, 0, len(ranks)
    bound = gamma or n
    while pos < n:
        run = 0
        while run < bound and pos + run < n and ranks[pos + run] == 0:
            run += 1
        took = run + 1
        if siblings and run < bound and pos + run < n and 0 < ranks[pos + run] <= siblings:
            took += 1
        pos += took
        count += 1
    return count


def share(ranks: list[int], below: int) -> float:
    """The share of tokens the draft ranks under `below` (1: its greedy token is the target's)."""
    return sum(r < below for r in ranks) / max(1, len(ranks))


@dataclass
class Answer:
    prompt_tokens: int
    ranks: list[int]  # per answer token: its rank among the draft's logits, capped at RANKS

    def share(self, below: int) -> float:
        return share(self.ranks, below)


def ranks_of(draft: LoadedModel, prompt: list[int], answer: list[int]) -> list[int]:
    """Teacher-forced: the rank of each answer token among the draft's logits after the prompt and the answer before
    it (ties count for the token)."""
    if not answer:
        return []
    state = draft.state(prompt)
    state.catch_up(len(prompt))
    try:
        logits = state.forward(answer[:-1])  # [len(answer), V]: row i predicts answer[i]
    finally:
        state.close()
    picked = logits.gather(1, torch.tensor(answer)[:, None])  # [n, 1]
    return [min(RANKS, int(r)) for r in (logits > picked).sum(dim=1).tolist()]


def in_process_s(tokens_per_pass: float, gamma: int, siblings: int, curve: CostCurve, draft_s: float) -> float:
    """Seconds per token of blocks of `gamma` draft tokens (each with `siblings` more) in one process: gamma draft
    steps, then one target pass over the block, its siblings and the row before them."""
    return (gamma * draft_s + curve.time(1 + gamma * (1 + siblings))) / tokens_per_pass


def summarize(answers: list[Answer], curve: CostCurve | None = None, draft_s: float | None = None
              ) -> dict[str, object]:
    """The figures of the answers; with the target's pass times (`curve`) and the draft's step, each fixed block's
    speed in one process against the target alone (a one-row pass a token)."""
    ranks = [r for a in answers for r in a.ranks]
    total = len(ranks)
    chains: dict[str, dict[str, float | None]] = {}
    for g in GAMMAS:
        chain = total / max(1, sum(passes(a.ranks, g) for a in answers))
        tree = total / max(1, sum(passes(a.ranks, g, siblings=1) for a in answers))
        row: dict[str, float | None] = {"tokens_per_pass": chain, "with_siblings": tree, "speedup": None,
                                        "speedup_with_siblings": None}
        if curve is not None and draft_s is not None and g:
            alone = curve.time(1)
            row["speedup"] = alone / in_process_s(chain, g, 0, curve, draft_s)
            row["speedup_with_siblings"] = alone / in_process_s(tree, g, 1, curve, draft_s)
        chains["unbounded" if g == 0 else str(g)] = row
    return {"tokens": total, "agreement": share(ranks, 1), "top2": share(ranks, 2), "top4": share(ranks, 4),
            "agreement_per_request": [a.share(1) for a in answers], "chains": chains}


def run_bench_agreement(settings: CoreSettings, n_prompts: int, max_tokens: int, trace: Path | None,
                        json_out: Path | None, timing: bool = True, console: Console | None = None
                        ) -> dict[str, object]:
    console = console or Console()
    torch.set_num_threads(settings.threads)
    target = load_target(settings.target, settings, settings.threads)
    draft = load_draft(settings.draft, settings, settings.threads)
    check_pair(draft, target)
    trace = trace or CHAT_TRACE
    rows = load_trace(trace, n_prompts)
    console.print(f"target {target.describe()}; draft {draft.describe()}; {len(rows)} requests of {trace.name}, "
                  f"at most {max_tokens} tokens each, greedy")
    answers: list[Answer] = []
    for i, row in enumerate(rows):
        prompt = row.ids(target.tokenizer)
        out = generate_autoregressive(target, prompt, SamplingParams(max_tokens=min(max_tokens, row.max_tokens)))
        answers.append(Answer(len(prompt), ranks_of(draft, prompt, out.tokens)))
        console.print(f"request {i}: {len(out.tokens)} tokens, agreement {answers[-1].share(1):.3f}, "
                      f"top-2 {answers[-1].share(2):.3f}")
    curve, draft_s, timed = None, None, {}
    if timing:
        timed = pass_times(target, TIMED, repeats=5)
        draft_s = pass_times(draft, [1], repeats=9)[1]
        curve = CostCurve(timed)
        console.print(f"timed here ({torch.get_num_threads()} threads): a target pass over "
                      + ", ".join(f"{n}: {t * 1e3:.0f}" for n, t in timed.items())
                      + f" positions (ms); a draft step {draft_s * 1e3:.1f} ms")
    summary = summarize(answers, curve, draft_s)
    _show(summary, console)
    settings_out = {"target": target.name, "draft": draft.name, "target_runtime": target.describe(),
                    "draft_runtime": draft.describe(), "trace": trace.name, "requests": len(rows),
                    "max_tokens": max_tokens, "threads": settings.threads,
                    "target_pass_ms": {n: t * 1e3 for n, t in timed.items()},
                    "draft_step_ms": None if draft_s is None else draft_s * 1e3}
    report: dict[str, object] = {"settings": settings_out, "summary": summary, "requests": [
        {"prompt_tokens": a.prompt_tokens, "ranks": a.ranks} for a in answers]}
    if json_out is not None:
        json_out.parent.mkdir(parents=True, exist_ok=True)
        json_out.write_text(json.dumps(report, indent=1) + "\n")
    return report


def _show(summary: dict[str, object], console: Console) -> None:
    per = summary["agreement_per_request"]
    assert isinstance(per, list)
    console.print(f"{summary['tokens']} tokens: the draft's greedy token is the target's {summary['agreement']:.3f} "
                  f"of the time (per request {min(per):.3f}-{max(per):.3f}, median {statistics.median(per):.3f}); "
                  f"in its top 2 {summary['top2']:.3f}, top 4 {summary['top4']:.3f}")
    table = Table(title="tokens per target pass, greedy chains replayed over the target's answers; in one process, "
                        "x the target alone, at the times measured here")
    for col in ("gamma", "a chain", "+ one-token siblings", "in process: a chain", "+ siblings"):
        table.add_column(col)
    chains = summary["chains"]
    assert isinstance(chains, dict)
    for g, v in chains.items():
        table.add_row(g, fmt(v["tokens_per_pass"], ".2f"), fmt(v["with_siblings"], ".2f"), fmt(v["speedup"], ".2f"),
                      fmt(v["speedup_with_siblings"], ".2f"))
    console.print(table)
