"""`tandem bench local`: the target alone, our speculative loop (with or without its draft trees and phrase pool)
and HF transformers' assisted generation, on the same held-out prompts, pair and process, interleaved prompt by
prompt. Greedy. Prints figures and ratios; `warm` adds a cold-vs-warm phrase pool comparison on a second pass over
similar prompts."""

from __future__ import annotations

import json
import platform
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from rich.console import Console
from rich.table import Table

from tandem.adaptive import AdaptiveGamma
from tandem.config import CoreSettings
from tandem.costs import CostCurve
from tandem.drafting import ModelDrafter
from tandem.local import LocalVerifier
from tandem.models import LoadedModel, check_pair, load_draft, load_model, load_target
from tandem.pool import PhrasePool
from tandem.sampling import SamplingParams
from tandem.session import generate_autoregressive
from tandem.speculate import generate_speculative
from tandem.stats import GenerationResult
from tandem.tree import PoolBranches
from tandem.value import BlockValue, Calibration
from tandem_tools import llama_server, roofline
from tandem_tools.replay_summary import CHAT_TRACE, load_trace
from tandem_tools.train.data import heldout_prompts

# ar-eager: the target alone in float32 through HF's eager forward, the exactly-lossless reference: with it, every
# mode's output is also compared with it (the match rate of a reduced precision or compiled setting)
# spec: blocks of up to gamma tokens, ended where the draft is unsure (its p-min); spec-value: ended where the next
# token is not worth its cost (tandem.value, learnt over the run as the edge does); spec-tree: + siblings (tandem.tree),
# the edge's default; spec-pool: + a phrase pool's chains, one pool across the prompts as the edge keeps one per client
# llama-server, llama-server-spec: the peer, llama.cpp's server, alone and with the draft GGUF (llama_server.py)
MODES = ("ar", "ar-eager", "spec", "spec-value", "spec-tree", "spec-pool", "hf-assisted", *llama_server.MODES)
WARM_SHIFTS = {"repeat": 0, "shifted": 32}  # the warm start's second passes: each prompt again, or its window moved on


@dataclass
class ModeFigures:
    tokens: int = 0
    wall_s: float = 0.0
    target_passes: int = 0
    drafted: int = 0
    accepted: int = 0
    matches_ar: int = 0
    matches_exact: int = 0
    runs: int = 0
    per_prompt_tps: list[float] = field(default_factory=list)
    accepted_per_position: list[int] = field(default_factory=list)
    rounds: int = 0
    pool_tokens: int = 0  # emitted tokens a phrase pool proposed

    def add(self, tokens: list[int], wall: float, stats: dict[str, Any]) -> None:
        self.tokens += len(tokens)
        self.wall_s += wall
        self.runs += 1
        self.per_prompt_tps.append(len(tokens) / wall)
        self.target_passes += int(stats.get("target_passes", 0))
        self.drafted += int(stats.get("drafted", 0))
        self.accepted += int(stats.get("accepted", 0))
        self.rounds += int(stats.get("rounds", 0))
        per_pos = self.accepted_per_position
        for j, a in enumerate(stats.get("accepted_per_position", [])):
            if j >= len(per_pos):
                per_pos.append(0)
            per_pos[j] += a
        self.pool_tokens += int(stats.get("pool_tokens", 0))

    def as_dict(self) -> dict[str, object]:
        return {
            "tokens_per_s": self.tokens / self.wall_s if self.wall_s else 0.0, "tokens": self.tokens,
            "wall_s": self.wall_s,
            "target_passes_per_token": self.target_passes / self.tokens if self.tokens and self.target_passes else None,
            "acceptance_rate": self.accepted / self.drafted if self.drafted else None,
            "acceptance_per_position": [a / self.rounds for a in self.accepted_per_position] if self.rounds else None,
            "greedy_equal_to_target": f"{self.matches_ar}/{self.runs}",
            "greedy_equal_to_fp32_eager": f"{self.matches_exact}/{self.runs}",
            "median_prompt_tokens_per_s": statistics.median(self.per_prompt_tps) if self.per_prompt_tps else 0.0,
            "pool_share": self.pool_tokens / self.tokens if self.tokens else 0.0,
        }


def _hf_assisted(target: LoadedModel, assistant: Any, prompt: list[int], params: SamplingParams
                 ) -> tuple[list[int], float]:
    kwargs: dict[str, object] = {"min_new_tokens": params.max_tokens} if params.ignore_eos else {}  # as ours runs
    ids = torch.tensor([prompt])
    t0 = time.perf_counter()
    with torch.inference_mode():
        out = target.torch_model.generate(  # type: ignore[operator]
            ids, attention_mask=torch.ones_like(ids), assistant_model=assistant, do_sample=False,
            max_new_tokens=params.max_tokens, pad_token_id=target.tokenizer.pad_token_id, **kwargs)
    return out[0, len(prompt) :].tolist(), time.perf_counter() - t0


def run_bench_local(settings: CoreSettings, modes: list[str], n_prompts: int, prompt_tokens: int, max_tokens: int,
                    json_out: Path | None, console: Console | None = None, warm: bool = False,
                    trace: Path | None = None) -> dict[str, object]:
    """`trace`: its first `n_prompts` requests (chat messages through the chat template) instead of held-out code,
    each generating up to `max_tokens`; a target with a chat template takes the chat trace by default."""
    console = console or Console()
    if unknown := set(modes) - set(MODES):
        raise SystemExit(f"unknown modes {sorted(unknown)}; choose from {MODES}")
    if not isinstance(settings.gamma, int):
        raise SystemExit("bench local compares fixed block lengths: pass --gamma N")
    modes = ["ar", *[m for m in modes if m != "ar"]]  # the baseline always runs: every ratio needs it
    torch.set_num_threads(settings.threads)
    target = load_target(settings.target, settings, settings.threads)  # TANDEM_BACKEND, TANDEM_DRAFT_BACKEND
    draft = load_draft(settings.draft, settings, settings.threads)
    check_pair(draft, target)
    assistant = draft.torch_model if any(m.startswith("hf-") for m in modes) else None
    exact = load_model(settings.target, "float32", settings.device) if "ar-eager" in modes else None
    if trace is None and getattr(target.tokenizer, "chat_template", None) and CHAT_TRACE.is_file():
        trace = CHAT_TRACE  # a chat model gets chat requests unless told otherwise
    if trace is not None:
        prompts = [r.ids(target.tokenizer) for r in load_trace(trace, n_prompts)]
    else:
        prompts = heldout_prompts(n_prompts, prompt_tokens, target.tokenizer)
    # held-out code runs to max_tokens; a chat answer ends where the target ends it
    params = SamplingParams(max_tokens=max_tokens, ignore_eos=trace is None)
    gamma = settings.gamma
    console.print(f"target {target.name} ({target.n_params / 1e6:.1f}M params), draft {draft.name} "
                  f"({draft.n_params / 1e6:.1f}M), gamma {gamma}, {len(prompts)} "
                  + (f"requests of {trace.name}, " if trace else f"held-out prompts x {prompt_tokens} tokens, ")
                  + f"{max_tokens} new tokens each, greedy, torch threads {torch.get_num_threads()}, one process")
    console.print(f"target {target.describe()}; draft {draft.describe()}")
    # blocks by value, and trees, are sized on the target's whole cost curve: measured once, with the roofline
    valued = {"spec-value", "spec-tree", "spec-pool"} & set(modes)
    roof = roofline.pair_roofline(target, draft, gamma, positions=range(1, 2 * gamma + 2) if valued else ())
    for line in roofline.describe(roof):
        console.print(line)
    pass_ms: dict[int, float] = roof["target"]["pass_ms"]  # type: ignore[index]
    curve = {n: ms / 1e3 for n, ms in pass_ms.items()}
    # the peer: llama-server on the GGUF files, same prompt ids and threads; started for the loop below
    peers = llama_server.Peers(modes, settings.target, settings.draft, torch.get_num_threads(),
                               llama_server.context_size(prompts, max_tokens), warn=console.print)
    modes = [m for m in modes if m not in peers.skipped]
    figs = {m: ModeFigures(accepted_per_position=[0] * gamma) for m in modes}
    value = BlockValue(AdaptiveGamma(max_gamma=gamma, costs=CostCurve(curve)), Calibration(), False)
    tree = tree_drafter(draft, gamma, curve, None)  # one across prompts, as the edge keeps it
    pooled = tree_drafter(draft, gamma, curve, PhrasePool())
    runners: dict[str, Callable[[list[int]], tuple[list[int], float, dict]]] = {
        "ar": lambda p: _ours(generate_autoregressive(target, p, params)),
        "ar-eager": lambda p: _ours(generate_autoregressive(exact, p, params)),  # type: ignore[arg-type]
        "spec": lambda p: _ours(generate_speculative(ModelDrafter(draft, p_min=settings.draft_p_min),
                                                     LocalVerifier(target), p, params, gamma)),
        "spec-value": lambda p: _ours(generate_speculative(ModelDrafter(draft, value=value), LocalVerifier(target), p,
                                                           params, gamma)),
        "spec-tree": lambda p: _ours(generate_speculative(tree, LocalVerifier(target), p, params, gamma)),
        "spec-pool": lambda p: _ours(generate_speculative(pooled, LocalVerifier(target), p, params, gamma)),
        "hf-assisted": lambda p: (*_hf_assisted(target, assistant, p, params), {}),
        **peers.runners(max_tokens, params.ignore_eos),
    }
    runners["ar"](prompts[0][:16])  # warm-up: first-call allocations would land on one mode only
    with peers:
        for i, prompt in enumerate(prompts):
            order = modes[i % len(modes) :] + modes[: i % len(modes)]  # rotate who goes first
            outputs: dict[str, list[int]] = {}
            for mode in order:
                tokens, wall, stats = runners[mode](prompt)
                outputs[mode] = tokens
                figs[mode].add(tokens, wall, stats)
            for mode in modes:
                figs[mode].matches_ar += outputs[mode] == outputs["ar"]
                figs[mode].matches_exact += outputs[mode] == outputs.get("ar-eager")
            peers.compare(outputs, "ar")
            console.print(f"  prompt {i + 1}/{len(prompts)} done", style="dim")

    base = figs["ar"].tokens / figs["ar"].wall_s
    table = Table(title=f"bench local (greedy, {trace.name if trace else 'held-out stdlib prompts'})")
    columns = ["mode", "tok/s", "vs target alone", "acceptance", "target passes/token", "== target alone"]
    peer = figs[llama_server.BASE].tokens / figs[llama_server.BASE].wall_s if llama_server.BASE in figs else None
    for col in columns + (["vs fp32 eager", "== fp32 eager"] if exact is not None else []) + (
            ["vs llama-server"] if peer else []):
        table.add_column(col)
    results = {}
    for mode in modes:
        results[mode] = d = figs[mode].as_dict()
        tps = float(d["tokens_per_s"])  # type: ignore[arg-type]
        acc, tpt = d["acceptance_rate"], d["target_passes_per_token"]
        row = [mode, f"{tps:.1f}", f"{tps / base:.2f}x", "-" if acc is None else f"{acc:.3f}",
               "-" if tpt is None else f"{tpt:.3f}", str(d["greedy_equal_to_target"])]
        if exact is not None:
            eager = figs["ar-eager"].tokens / figs["ar-eager"].wall_s
            row += [f"{tps / eager:.2f}x", str(d["greedy_equal_to_fp32_eager"])]
        table.add_row(*row, *([f"{tps / peer:.2f}x"] if peer else []))
    console.print(table)
    for line in llama_server.local_report(peers, results):
        console.print(line, highlight=False)
    for m in ("spec", "spec-tree"):
        if m in results and results[m]["acceptance_per_position"]:
            per_pos = ", ".join(f"{a:.2f}" for a in results[m]["acceptance_per_position"])  # type: ignore[attr-defined]
            console.print(f"{m} acceptance per position (gamma {gamma}): {per_pos}")
    if "spec-pool" in results:
        share = results["spec-pool"]["pool_share"]
        console.print(f"spec-pool: {share:.1%} of its tokens from the phrase pool")
    if "hf-assisted" in results and "spec" in results:
        ratio = float(results["spec"]["tokens_per_s"]) / float(results["hf-assisted"]["tokens_per_s"])  # type: ignore[arg-type]
        console.print(f"spec / hf-assisted: {ratio:.2f}x")
    report = {
        "settings": {"target": target.describe(), "draft": draft.describe(), "gamma": gamma, "prompts": len(prompts),
                     "prompt_tokens": prompt_tokens, "max_tokens": max_tokens, "threads": torch.get_num_threads()},
        "roofline": roof,
        "machine": {"platform": platform.platform(), "python": platform.python_version(), "torch": torch.__version__},
        "results": results,
        **({"llama_server": peers.info} if peers.modes else {})}
    if warm:
        report["warm_start"] = _warm_start(target, draft, n_prompts, prompt_tokens, params, gamma, curve, console)
    if json_out is not None:
        json_out.write_text(json.dumps(report, indent=2) + "\n")
    return report


def _ours(result: GenerationResult) -> tuple[list[int], float, dict[str, Any]]:
    stats = {**result.stats.as_dict(), "pool_tokens": result.stats.origins.count("p")}
    return result.tokens, result.stats.wall_s, stats


def tree_drafter(draft: LoadedModel, gamma: int, curve: dict[int, float] | None,
                 pool: PhrasePool | None) -> ModelDrafter:
    """The edge's default drafter: blocks by value on the target's cost curve (`curve`: measured; None: learnt from
    the passes), siblings, and with `pool` its chains."""
    policy = AdaptiveGamma(max_gamma=gamma, costs=CostCurve(curve) if curve else CostCurve())
    return ModelDrafter(draft, value=BlockValue(policy, Calibration(), False), tree=True,
                        pool=None if pool is None else PoolBranches(pool))


def _warm_start(target: LoadedModel, draft: LoadedModel, n: int, prompt_tokens: int, params: SamplingParams,
                gamma: int, curve: dict[int, float], console: Console) -> dict[str, object]:
    """A first pass over n prompts fills one pool (one client's); second passes over the same prompts again
    ("repeat") and over similar ones (each window moved on by 32 tokens of its file: "shifted") run with that pool
    carried over (warm; it keeps learning) and with a fresh pool each (cold). Every output is checked."""
    shift = max(WARM_SHIFTS.values())
    windows = heldout_prompts(n, prompt_tokens + shift, target.tokenizer)
    out: dict[str, object] = {}
    for name, at in WARM_SHIFTS.items():
        pool = PhrasePool()
        for w in windows:
            generate_speculative(tree_drafter(draft, gamma, curve, pool), LocalVerifier(target), w[:prompt_tokens],
                                 params, gamma)
        figs = {"cold": ModeFigures(), "warm": ModeFigures()}
        for i, w in enumerate(windows):
            prompt = w[at : at + prompt_tokens]
            ar = generate_autoregressive(target, prompt, params).tokens
            for kind in (("cold", "warm") if i % 2 == 0 else ("warm", "cold")):
                drafter = tree_drafter(draft, gamma, curve, pool if kind == "warm" else PhrasePool())
                tokens, wall, stats = _ours(generate_speculative(drafter, LocalVerifier(target), prompt, params, gamma))
                figs[kind].add(tokens, wall, stats)
                figs[kind].matches_ar += tokens == ar
        out[name] = {k: f.as_dict() for k, f in figs.items()}
        for k, f in figs.items():
            d: dict[str, Any] = f.as_dict()
            console.print(f"spec-pool second pass ({name}, +{at} tokens), {k} pool: {float(d['tokens_per_s']):.1f} "
                          f"tok/s, acceptance {float(d['acceptance_rate'] or 0):.3f}, target passes/token "
                          f"{float(d['target_passes_per_token'] or 0):.3f}, == target alone "
                          f"{d['greedy_equal_to_target']}")
    return out
