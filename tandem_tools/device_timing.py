"""The measurements `tandem_tools.device_check` makes beyond `tandem_tools.roofline`'s (pass times, v, c and their
bounds): batched decoding throughput, and the test pair's three modes. Wall-clock times with the device
synchronised."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import torch
from transformers import DynamicCache

from tandem import fastlm
from tandem.drafting import ModelDrafter
from tandem.local import LocalVerifier
from tandem.models import LoadedModel
from tandem.sampling import SamplingParams
from tandem.session import generate_autoregressive
from tandem.speculate import generate_speculative
from tandem_tools import roofline
from tandem_tools.bench_local import ModeFigures, _ours, tree_drafter

FIRST_ID = 3  # random prompts avoid the stand-in tokenizer's special ids


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def compile_buckets(ns: list[int]) -> tuple[int, ...]:
    """The fast path's buckets that passes of `ns` positions run in (longer passes run eager)."""
    return tuple(sorted({min(b for b in fastlm.BUCKETS if b >= n) for n in ns if n <= max(fastlm.BUCKETS)}))


def pair_figures(target: LoadedModel, draft: LoadedModel, context: int, ns: list[int], reps: int,
                 peaks: roofline.Peaks) -> dict[str, Any]:
    """The target's pass times over each n of `ns` and the draft's step, after `context` positions, with their
    bounds (`tandem_tools.roofline`); c = draft step / target step."""
    t = roofline.roofline(target, roofline.pass_times(target, ns, context, reps), peaks)
    d = roofline.roofline(draft, roofline.pass_times(draft, [1], context, reps), peaks)
    return {"target": t, "draft": d, "c": d["pass_ms"][1] / t["pass_ms"][1]}  # type: ignore[index]


@torch.inference_mode()
def batched_decode(model: LoadedModel, batch: int, context: int, steps: int, seed: int = 0) -> dict[str, float]:
    """HF eager forward with a DynamicCache: `batch` equal-length random prompts of `context` tokens prefilled, then
    `steps` greedy decoding steps over all rows at once, timed (the prefill is not)."""
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(FIRST_ID, model.vocab_size, (batch, context), generator=gen).to(model.device)  # [B, L]
    cache = DynamicCache(config=model.torch_model.config)
    out = model.torch_model(input_ids=ids, past_key_values=cache, use_cache=True, logits_to_keep=1)
    nxt = out.logits[:, -1].argmax(-1, keepdim=True)  # [B, 1]
    sync(model.device)
    t0 = time.perf_counter()
    for _ in range(steps):
        out = model.torch_model(input_ids=nxt, past_key_values=cache, use_cache=True)
        nxt = out.logits[:, -1].argmax(-1, keepdim=True)
    sync(model.device)
    wall = time.perf_counter() - t0
    return {"tokens_per_s": batch * steps / wall, "step_ms": wall / steps * 1e3}


def pair_modes(target: LoadedModel, draft: LoadedModel, prompts: list[list[int]], max_tokens: int, gamma: int,
               deadline: float) -> dict[str, Any]:
    """The target alone, speculative (gamma, p-min) and the edge's default drafter (blocks by value on the passes
    it measures, siblings), greedy, interleaved prompt by
    prompt; each mode's output compared with the target alone's. Stops after the prompt that passes `deadline`
    (time.monotonic)."""
    params = SamplingParams(max_tokens=max_tokens, ignore_eos=True)
    def speculative(drafter: Callable[[LoadedModel], Any]) -> Callable[[list[int]], Any]:
        return lambda p: _ours(generate_speculative(drafter(draft), LocalVerifier(target), p, params, gamma))

    runners: dict[str, Callable[[list[int]], tuple[list[int], float, dict[str, Any]]]] = {
        "ar": lambda p: _ours(generate_autoregressive(target, p, params)), "spec": speculative(ModelDrafter),
        "spec-tree": speculative(lambda d: tree_drafter(d, gamma, None, None))}
    for run in runners.values():  # warm-up: first-call allocations (and any graph built late) land on no figure
        run(prompts[0])
    figs = {m: ModeFigures(accepted_per_position=[0] * gamma) for m in runners}
    modes, done = list(runners), 0
    for i, prompt in enumerate(prompts):
        outputs = {}
        for mode in modes[i % 3 :] + modes[: i % 3]:  # rotate who goes first
            tokens, wall, stats = runners[mode](prompt)
            outputs[mode] = tokens
            figs[mode].add(tokens, wall, stats)
        for mode in modes:
            figs[mode].matches_ar += outputs[mode] == outputs["ar"]
        done = i + 1
        if time.monotonic() > deadline:
            break
    out: dict[str, Any] = {"prompts_done": done, "modes": {m: f.as_dict() for m, f in figs.items()}}
    base = out["modes"]["ar"]["tokens_per_s"]
    for m in ("spec", "spec-tree"):
        out["modes"][m]["speedup_vs_target_alone"] = out["modes"][m]["tokens_per_s"] / base if base else None
    out["all_equal_to_target_alone"] = all(f.matches_ar == f.runs for f in figs.values())
    return out
