"""`tandem bench local`: the target alone, our speculative loop and HF transformers' assisted generation,
on the same held-out prompts, pair and process, interleaved prompt by prompt. Greedy. Prints figures and ratios."""

from __future__ import annotations

import json
import platform
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
from rich.console import Console
from rich.table import Table

from tandem.config import CoreSettings
from tandem.engine import LocalVerifier, ModelDrafter, generate_autoregressive, generate_speculative
from tandem.models import LoadedModel, check_pair, load_model
from tandem.sampling import SamplingParams
from tandem.train.data import heldout_prompts

MODES = ("ar", "spec", "hf-assisted", "hf-assisted-constant")


@dataclass
class ModeFigures:
    tokens: int = 0
    wall_s: float = 0.0
    target_passes: int = 0
    drafted: int = 0
    accepted: int = 0
    matches_ar: int = 0
    runs: int = 0
    per_prompt_tps: list[float] = field(default_factory=list)
    accepted_per_position: list[int] = field(default_factory=list)
    rounds: int = 0

    def as_dict(self) -> dict[str, object]:
        return {
            "tokens_per_s": self.tokens / self.wall_s if self.wall_s else 0.0,
            "tokens": self.tokens,
            "wall_s": self.wall_s,
            "target_passes_per_token": self.target_passes / self.tokens if self.tokens and self.target_passes else None,
            "acceptance_rate": self.accepted / self.drafted if self.drafted else None,
            "acceptance_per_position": [a / self.rounds for a in self.accepted_per_position] if self.rounds else None,
            "greedy_equal_to_target": f"{self.matches_ar}/{self.runs}",
            "median_prompt_tokens_per_s": statistics.median(self.per_prompt_tps) if self.per_prompt_tps else 0.0,
        }


def _hf_assisted(target: LoadedModel, draft: LoadedModel, prompt: list[int], max_tokens: int, gamma: int | None):
    kwargs: dict[str, object] = {}
    if gamma is not None:  # our block length, every round, no early stop
        kwargs = {"num_assistant_tokens": gamma, "num_assistant_tokens_schedule": "constant",
                  "assistant_confidence_threshold": 0.0}
    ids = torch.tensor([prompt])
    t0 = time.perf_counter()
    with torch.inference_mode():
        out = target.model.generate(
            ids, attention_mask=torch.ones_like(ids), assistant_model=draft.model, do_sample=False,
            max_new_tokens=max_tokens, min_new_tokens=max_tokens, pad_token_id=target.tokenizer.pad_token_id, **kwargs,
        )
    return out[0, len(prompt) :].tolist(), time.perf_counter() - t0


def run_bench_local(
    settings: CoreSettings,
    modes: list[str],
    n_prompts: int,
    prompt_tokens: int,
    max_tokens: int,
    json_out: Path | None,
    console: Console | None = None,
) -> dict[str, object]:
    console = console or Console()
    unknown = set(modes) - set(MODES)
    if unknown:
        raise SystemExit(f"unknown modes {sorted(unknown)}; choose from {MODES}")
    if not isinstance(settings.gamma, int):
        raise SystemExit("bench local compares fixed block lengths: pass --gamma N")
    modes = ["ar", *[m for m in modes if m != "ar"]]  # the baseline always runs: every ratio needs it
    torch.set_num_threads(settings.threads)
    target, draft = load_model(settings.target), load_model(settings.draft)
    check_pair(draft, target)
    prompts = heldout_prompts(n_prompts, prompt_tokens, target.tokenizer)
    params = SamplingParams(max_tokens=max_tokens, ignore_eos=True)
    gamma = settings.gamma
    console.print(
        f"target {target.name} ({target.n_params / 1e6:.1f}M params), draft {draft.name} "
        f"({draft.n_params / 1e6:.1f}M), gamma {gamma}, {len(prompts)} held-out prompts x {prompt_tokens} tokens, "
        f"{max_tokens} new tokens each, greedy, torch threads {torch.get_num_threads()}, one process"
    )
    figs = {m: ModeFigures(accepted_per_position=[0] * gamma) for m in modes}
    runners: dict[str, Callable[[list[int]], tuple[list[int], float, dict]]] = {
        "ar": lambda p: _ours(generate_autoregressive(target, p, params)),
        "spec": lambda p: _ours(generate_speculative(ModelDrafter(draft), LocalVerifier(target), p, params, gamma)),
        "hf-assisted": lambda p: (*_hf_assisted(target, draft, p, max_tokens, None), {}),
        "hf-assisted-constant": lambda p: (*_hf_assisted(target, draft, p, max_tokens, gamma), {}),
    }
    runners["ar"](prompts[0][:16])  # warm-up: first-call allocations would land on one mode only
    for i, prompt in enumerate(prompts):
        order = modes[i % len(modes) :] + modes[: i % len(modes)]  # rotate who goes first
        outputs: dict[str, list[int]] = {}
        for mode in order:
            tokens, wall, stats = runners[mode](prompt)
            outputs[mode] = tokens
            f = figs[mode]
            f.tokens += len(tokens)
            f.wall_s += wall
            f.runs += 1
            f.per_prompt_tps.append(len(tokens) / wall)
            f.target_passes += int(stats.get("target_passes", 0))
            f.drafted += int(stats.get("drafted", 0))
            f.accepted += int(stats.get("accepted", 0))
            f.rounds += int(stats.get("rounds", 0))
            for j, a in enumerate(stats.get("accepted_per_position", [])):
                f.accepted_per_position[j] += a
        for mode in modes:
            figs[mode].matches_ar += outputs[mode] == outputs["ar"]
        console.print(f"  prompt {i + 1}/{len(prompts)} done", style="dim")

    base = figs["ar"].tokens / figs["ar"].wall_s
    table = Table(title="bench local (greedy, held-out stdlib prompts)")
    for col in ("mode", "tok/s", "vs target alone", "acceptance", "target passes/token", "== target alone"):
        table.add_column(col)
    results = {}
    for mode in modes:
        d = figs[mode].as_dict()
        results[mode] = d
        tps = float(d["tokens_per_s"])  # type: ignore[arg-type]
        acc, tpt = d["acceptance_rate"], d["target_passes_per_token"]
        table.add_row(
            mode, f"{tps:.1f}", f"{tps / base:.2f}x", "-" if acc is None else f"{acc:.3f}",
            "-" if tpt is None else f"{tpt:.3f}", str(d["greedy_equal_to_target"]),
        )
    console.print(table)
    if "spec" in results and results["spec"]["acceptance_per_position"]:
        per_pos = ", ".join(f"{a:.2f}" for a in results["spec"]["acceptance_per_position"])  # type: ignore[union-attr]
        console.print(f"spec acceptance per position (gamma {gamma}): {per_pos}")
    for m in ("hf-assisted", "hf-assisted-constant"):
        if m in results and "spec" in results:
            ratio = float(results["spec"]["tokens_per_s"]) / float(results[m]["tokens_per_s"])  # type: ignore[arg-type]
            console.print(f"spec / {m}: {ratio:.2f}x")
    report = {
        "settings": {"target": target.name, "draft": draft.name, "gamma": gamma, "prompts": len(prompts),
                     "prompt_tokens": prompt_tokens, "max_tokens": max_tokens, "threads": torch.get_num_threads()},
        "machine": {"platform": platform.platform(), "python": platform.python_version(), "torch": torch.__version__},
        "results": results,
    }
    if json_out is not None:
        json_out.write_text(json.dumps(report, indent=2) + "\n")
    return report


def _ours(result) -> tuple[list[int], float, dict]:  # type: ignore[no-untyped-def]
    return result.tokens, result.stats.wall_s, result.stats.as_dict()
