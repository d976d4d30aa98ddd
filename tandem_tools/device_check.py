"""`python -m tandem_tools.device_check --out DIR [--device cuda] [--quick]`: the in-process speed figures of one
machine, in minutes, offline. Random-weight models built from the packaged configs (`tandem_tools.randmodels`: a
Llama-3.2-1B-shaped target and a 72M draft with its vocabulary) give the costs: v(n), the time of a pass over n
positions over that of one, and c, a draft step over a target step, on HF eager, the fast path eager and compiled,
per dtype, beside the memory-bandwidth and compute bounds and a capacity curve (batched decoding). The test pair
(`test-target`, `test-draft`: small code models in a source checkout) gives real acceptance: the target alone vs
speculative vs the edge's default drafter (blocks by value, trees), with greedy equality checked. Each section has a
time budget; one that fails is recorded and the rest run. Writes results.json and summary.md after every section."""

from __future__ import annotations

import argparse
import functools
import gc
import json
import os
import platform
import sys
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from tandem import fastlm
from tandem.config import TEST_DRAFT, TEST_TARGET
from tandem.models import LoadedModel, check_pair, load_model, parse_dtype, resolve_device
from tandem_tools import device_timing as dt
from tandem_tools import roofline
from tandem_tools.randmodels import random_model

FULL = dict(context=256, ns="1,2,3,4,5,8,16", batches="1,2,4,8,16,32", capacity_steps=32, reps=20, pair_prompts=10,
            pair_prompt_tokens=64, pair_tokens=64, read_mb=2048, matmul_size=8192, budget_s=450.0,
            compile_need_s=90.0)
QUICK = dict(context=32, ns="1,2,4", batches="1,2,4", capacity_steps=4, reps=3, pair_prompts=2,
             pair_prompt_tokens=32, pair_tokens=12, read_mb=16, matmul_size=256, budget_s=120.0,
             compile_need_s=30.0)

# Two differently shaped models compiled in one process: dynamo then makes FastSpec's ints symbolic on the second
# one, and `enable_gqa=kv_heads != heads` becomes a SymBool that scaled_dot_product_attention rejects.
STATIC_INTS = torch._dynamo.config.patch(automatic_dynamic_shapes=False)
STATIC_INTS_NOTE = "automatic_dynamic_shapes off: each model's graphs specialised to its own shapes"


def log(msg: str) -> None:
    sys.stdout.write(msg + "\n")
    sys.stdout.flush()


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m tandem_tools.device_check", description=__doc__.split("\n")[0])
    p.add_argument("--out", required=True, type=Path, help="folder for results.json and summary.md")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N")
    p.add_argument("--quick", action="store_true", help="small sizes and counts: a smoke run")
    p.add_argument("--dtypes", default="bfloat16,float32", help="random models' dtypes, the first one measured first")
    p.add_argument("--target-config", default="llama-1b", help="a packaged config name or a JSON file")
    p.add_argument("--draft-config", default="llama-72m", help="a packaged config name or a JSON file")
    p.add_argument("--compile", action=argparse.BooleanOptionalAction, default=None,
                   help="also the compiled fast path (default: on a CUDA device only)")
    p.add_argument("--no-test-pair", dest="test_pair", action="store_false", help="skip the test pair")
    p.add_argument("--gamma", type=int, default=4)
    for key, value in FULL.items():
        p.add_argument("--" + key.replace("_", "-"), type=type(value))
    args = p.parse_args(argv)
    for key, value in (QUICK if args.quick else FULL).items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    args.ns, args.batches = ([int(x) for x in str(v).split(",")] for v in (args.ns, args.batches))
    args.dtypes = [str(parse_dtype(x)).removeprefix("torch.") for x in args.dtypes.split(",")]
    return args


def environment(device: torch.device) -> dict[str, Any]:
    import transformers

    env: dict[str, Any] = {
        "device": str(device), "torch": torch.__version__, "cuda": torch.version.cuda,
        "transformers": transformers.__version__, "python": platform.python_version(), "cpus": os.cpu_count(),
        "torch_threads": torch.get_num_threads(), "device_name": platform.processor() or platform.machine()}
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        env |= {"device_name": torch.cuda.get_device_name(device), "gpu_memory_GiB": props.total_memory / 2**30,
                "multiprocessors": props.multi_processor_count}
    return env


class Check:
    """The run's state: options, deadline, results so far, and the random pair of one dtype (loaded on demand)."""

    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.device = resolve_device(args.device)
        self.compile = args.compile if args.compile is not None else self.device.type == "cuda"
        self.end = time.monotonic() + args.budget_s
        self.results: dict[str, Any] = {"environment": environment(self.device), "settings": {
            k: v for k, v in vars(args).items() if k != "out"} | {"compile": self.compile}, "sections": {}}
        self.pairs: dict[str, tuple[LoadedModel, LoadedModel]] = {}
        self.measured: dict[str, roofline.Peaks] = {}

    def left(self) -> float:
        return self.end - time.monotonic()

    def pair(self, dtype: str) -> tuple[LoadedModel, LoadedModel]:
        if dtype not in self.pairs:
            self.pairs.clear()  # one pair in memory at a time
            free_memory()
            target = random_model(self.args.target_config, dtype, self.device)
            draft = random_model(self.args.draft_config, dtype, self.device, seed=1)
            check_pair(draft, target)
            self.pairs[dtype] = target, draft
        return self.pairs[dtype]

    def section(self, name: str, max_s: float, need_s: float, fn: Callable[[float], dict[str, Any]]) -> None:
        """Run `fn(deadline)` if `need_s` seconds are left; its figures, or its error, go under `name`."""
        left = self.left()
        if left < need_s:
            res: dict[str, Any] = {"skipped": f"time budget: {left:.0f} s left, needs about {need_s:.0f} s"}
        else:
            log(f"== {name} ({left:.0f} s of the budget left)")
            t0 = time.monotonic()
            try:
                res = fn(min(self.end, t0 + max_s))
            except Exception as e:  # recorded; the next section runs
                res = {"error": f"{type(e).__name__}: {e}", "traceback": traceback.format_exc(limit=6)}
            res["section_s"] = time.monotonic() - t0
        self.results["sections"][name] = res
        log(f"   {name}: " + ("; ".join(f"{k} {v}" for k, v in res.items() if k in ("skipped", "error"))
                               or f"done in {res['section_s']:.1f} s"))
        self.write()
        free_memory()

    def write(self) -> None:
        """results.json and summary.md as they stand: a run stopped from outside keeps what it measured."""
        self.args.out.mkdir(parents=True, exist_ok=True)
        (self.args.out / "results.json").write_text(json.dumps(self.results, indent=2) + "\n")
        (self.args.out / "summary.md").write_text(device_summary(self.results))

    # --- sections

    def peaks(self, dtype: str) -> roofline.Peaks:
        if dtype not in self.measured:
            self.measured[dtype] = roofline.measure_peaks(self.device, parse_dtype(dtype), self.args.read_mb,
                                                          self.args.matmul_size)
        return self.measured[dtype]

    def bounds(self, deadline: float) -> dict[str, Any]:
        return {"matmul_size": self.args.matmul_size, "read_mb": self.args.read_mb,
                **{d: self.peaks(d).as_dict() for d in self.args.dtypes}}

    def figures(self, dtype: str) -> dict[str, Any]:
        """`dt.pair_figures` of the random pair of `dtype` as its models run now."""
        return dt.pair_figures(*self.pair(dtype), self.args.context, self.args.ns, self.args.reps, self.peaks(dtype))

    def timing(self, dtype: str, deadline: float) -> dict[str, Any]:
        target, draft = self.pair(dtype)
        res: dict[str, Any] = {"target": target.describe(), "draft": draft.describe(), "context": self.args.context}
        res["hf-eager"] = self.figures(dtype)
        for m in (target, draft):
            fastlm.enable(m.torch_model, compile=False)
        return res | {"fast-eager": self.figures(dtype)}

    @STATIC_INTS
    def compiled(self, dtype: str, deadline: float) -> dict[str, Any]:
        target, draft = self.pair(dtype)
        t0 = time.monotonic()
        for m, buckets in ((target, dt.compile_buckets(self.args.ns)), (draft, (1,))):
            fastlm.enable(m.torch_model, compile=False).compile(buckets)
        res: dict[str, Any] = {"compile_s": time.monotonic() - t0, "buckets": list(dt.compile_buckets(self.args.ns)),
                               "dynamo": STATIC_INTS_NOTE, "fast-compiled": self.figures(dtype)}
        self.pairs.clear()  # its graphs hold the weights: release both now
        torch._dynamo.reset()
        return res

    def capacity(self, dtype: str, deadline: float) -> dict[str, Any]:
        a = self.args
        target, _ = self.pair(dtype)
        res: dict[str, Any] = {"how": "HF eager forward, DynamicCache, equal-length random prompts, greedy; the "
                               "prefill untimed", "context": a.context, "steps": a.capacity_steps, "batches": {}}
        dt.batched_decode(target, 1, a.context, 2)  # warm-up
        last = 0.0
        for b in a.batches:
            if time.monotonic() + 2 * last > deadline:
                res["batches"][str(b)] = {"skipped": "time budget"}
                continue
            t0 = time.monotonic()
            try:
                res["batches"][str(b)] = dt.batched_decode(target, b, a.context, a.capacity_steps)
            except torch.OutOfMemoryError as e:
                res["batches"][str(b)] = {"error": f"out of memory: {e}".splitlines()[0]}
                free_memory()
            last = time.monotonic() - t0
        return res

    @STATIC_INTS
    def trained_pair(self, compiled: bool, deadline: float) -> dict[str, Any]:
        from tandem_tools.train.data import heldout_prompts

        a = self.args
        t0 = time.monotonic()
        target, draft = (load_model(m, "float32", self.device, compile=compiled) for m in (TEST_TARGET, TEST_DRAFT))
        check_pair(draft, target)
        res: dict[str, Any] = {"target": target.describe(), "draft": draft.describe(), "load_s": time.monotonic() - t0,
                               "gamma": a.gamma, "prompt_tokens": a.pair_prompt_tokens, "max_tokens": a.pair_tokens,
                               "prompts": "held-out standard-library code (tandem_tools.train.data.heldout_prompts)"}
        prompts = heldout_prompts(a.pair_prompts, a.pair_prompt_tokens, target.tokenizer)
        res |= {"dynamo": STATIC_INTS_NOTE} if compiled else {}
        res |= dt.pair_modes(target, draft, prompts, a.pair_tokens, a.gamma, deadline)
        if compiled:
            del target, draft
            torch._dynamo.reset()
        return res


def free_memory() -> None:
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def device_summary(results: dict[str, Any]) -> str:
    """summary.md: the figures of results.json as tables."""
    env, secs = results["environment"], results["sections"]
    lines = [f"# Device check: {env['device_name']} ({env['device']})", "",
             f"torch {env['torch']} (CUDA {env['cuda']}), transformers {env['transformers']}, Python {env['python']}",
             ""]
    b = secs.get("bounds", {})
    for d in (k for k, v in b.items() if isinstance(v, dict)):
        lines.append(f"- {d}: read {b[d]['bandwidth_gbs']:.0f} GB/s ({b['read_mb']} MB summed), matmul "
                     f"{b[d]['matmul_gflops'] / 1e3:.1f} TFLOP/s ({b['matmul_size']}^3)")
    lines.append("")
    for name, sec in secs.items():
        if name.startswith(("timing-", "compiled-")) and "error" not in sec and "skipped" not in sec:
            lines += _timing_table(name, sec)
        elif name.startswith("capacity-") and "batches" in sec:
            lines += [f"## {name}: target decoding B sequences at once ({sec['how']})", "",
                      "| B | tokens/s | step ms |", "|---|---|---|"]
            for batch, r in sec["batches"].items():
                lines.append(f"| {batch} | {r['tokens_per_s']:.1f} | {r['step_ms']:.2f} |" if "tokens_per_s" in r
                             else f"| {batch} | {r.get('error') or r.get('skipped')} | |")
            lines.append("")
        elif name.startswith("test-pair-") and "modes" in sec:
            lines += [f"## {name}: {sec['target']} / {sec['draft']}, gamma {sec['gamma']}, {sec['prompts_done']} "
                      f"prompts x {sec['max_tokens']} tokens, greedy", "",
                      "| mode | tokens/s | vs target alone | acceptance | target passes/token | == target alone |",
                      "|---|---|---|---|---|---|"]
            for mode, r in sec["modes"].items():
                acc, tpt, up = r["acceptance_rate"], r["target_passes_per_token"], r.get("speedup_vs_target_alone")
                lines.append(f"| {mode} | {r['tokens_per_s']:.1f} | {'1.00' if up is None else f'{up:.2f}'}x | "
                             f"{'-' if acc is None else f'{acc:.3f}'} | {'-' if tpt is None else f'{tpt:.3f}'} | "
                             f"{r['greedy_equal_to_target']} |")
            lines.append("")
    notes = [f"- {n}: {s.get('error') or s.get('skipped')}" for n, s in secs.items() if "error" in s or "skipped" in s]
    if notes:
        lines += ["## Not measured", "", *notes, ""]
    return "\n".join(lines)


def _timing_table(name: str, sec: dict[str, Any]) -> list[str]:
    lines = [f"## {name}: " + (f"{sec['target']} / {sec['draft']}, " if "target" in sec else "")
             + (f"compiled in {sec['compile_s']:.0f} s, " if "compile_s" in sec else "")
             + "one pass over n positions after the context (ms)", ""]
    paths = [p for p in ("hf-eager", "fast-eager", "fast-compiled") if p in sec]
    ns = list(sec[paths[0]]["target"]["v"]) if paths else []
    lines += ["| path | target step ms (bound) | draft step ms (bound) | c | " + " | ".join(f"v({n})" for n in ns)
              + " |", "|---" * (4 + len(ns)) + "|"]
    for p in paths:
        t, d = sec[p]["target"], sec[p]["draft"]
        bound = f"{t['bandwidth_bound_ms']:.3f}"
        lines.append(f"| {p} | {t['pass_ms'][ns[0]]:.3f} ({bound}) | {d['pass_ms'][next(iter(d['pass_ms']))]:.3f} "
                     f"({d['bandwidth_bound_ms']:.3f}) | {sec[p]['c']:.3f} | "
                     + " | ".join(f"{t['v'][n]:.2f}" for n in ns) + " |")
    return [*lines, ""]


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    check = Check(args)
    env = check.results["environment"]
    log(f"device {env['device']} ({env['device_name']}), torch {env['torch']} (CUDA {env['cuda']}), transformers "
        f"{env['transformers']}, budget {args.budget_s:.0f} s, compiled fast path {'on' if check.compile else 'off'}")
    first, *rest = args.dtypes
    need, budget = args.compile_need_s, args.budget_s
    check.section("bounds", 0.05 * budget, 0, check.bounds)
    check.section(f"timing-{first}", 0.15 * budget, 5, functools.partial(check.timing, first))
    check.section(f"capacity-{first}", 0.1 * budget, 5, functools.partial(check.capacity, first))
    if args.test_pair:
        check.section("test-pair-eager", 0.15 * budget, 10, functools.partial(check.trained_pair, False))
    for d in rest:
        check.section(f"timing-{d}", 0.1 * budget, 5, functools.partial(check.timing, d))
        check.section(f"capacity-{d}", 0.08 * budget, 5, functools.partial(check.capacity, d))
    if check.compile:
        check.section(f"compiled-{first}", 0.3 * budget, need, functools.partial(check.compiled, first))
        if args.test_pair:
            check.section("test-pair-compiled", 0.25 * budget, need, functools.partial(check.trained_pair, True))
        for d in rest:
            check.section(f"compiled-{d}", 0.25 * budget, need, functools.partial(check.compiled, d))
    check.pairs.clear()
    log(device_summary(check.results))
    return check.results


if __name__ == "__main__":
    main()
