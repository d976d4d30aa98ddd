"""The roofline every benchmark prints: measured pass times beside the lower bounds this machine allows (weight bytes
over the measured bandwidth, FLOPs over the measured matmul peak); v(n) = pass(n) / pass(1), c = draft step / target
step (docs/fast-path.md).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import torch

from tandem.models import LoadedModel
from tandem.pass_timing import median_s, pass_times


@dataclass(frozen=True)
class Peaks:
    device: str
    dtype: str
    threads: int
    bandwidth_gbs: float  # read bandwidth, GB/s
    matmul_gflops: float  # a large square matmul, GFLOP/s

    def as_dict(self) -> dict[str, object]:
        return {"device": self.device, "dtype": self.dtype, "threads": self.threads,
                "bandwidth_gbs": round(self.bandwidth_gbs, 2), "matmul_gflops": round(self.matmul_gflops, 1)}


def measure_peaks(device: torch.device, dtype: torch.dtype, read_mb: int = 512, size: int = 1024) -> Peaks:
    """Read bandwidth: a sum over `read_mb` MB (past any cache); peak: a size^3 matmul in `dtype`."""
    big = torch.ones(read_mb * 2**20 // 4, dtype=torch.float32, device=device)
    bw = big.numel() * 4 / median_s(big.sum, device, 5) / 1e9
    del big
    a = torch.randn(size, size, device=device).to(dtype)
    b = torch.randn(size, size, device=device).to(dtype)
    flops = 2 * size**3 / median_s(lambda: a @ b, device, 5) / 1e9
    return Peaks(str(device), str(dtype).removeprefix("torch."), torch.get_num_threads(), bw, flops)


def step_bytes(model: LoadedModel) -> int:
    """Weight bytes a pass reads: all parameters but input-embedding tables it only looks rows up in (llama.cpp:
    the file's tensors as published, every one counted)."""
    if model.backend != "torch":
        return model.weight_bytes
    m = model.torch_model
    emb, head = m.get_input_embeddings(), m.get_output_embeddings()
    untied = emb is not None and (head is None or head.weight is not emb.weight)  # untied: the table is a lookup
    skip = {id(emb.weight)} if untied else set()
    unique = {id(p): p for p in m.parameters() if id(p) not in skip}
    return sum(p.numel() * p.element_size() for p in unique.values())


def matmul_params(model: LoadedModel) -> int:
    """Parameters in matrices a pass multiplies by (each costs 2 FLOPs per position)."""
    if model.backend != "torch":  # quantised blocks: bytes say nothing of the count
        return model.n_params
    return step_bytes(model) // model.dtype.itemsize


def roofline(model: LoadedModel, times: dict[int, float], peaks: Peaks) -> dict[str, object]:
    """Pass times with their bandwidth and compute bounds, v(n) and how far the step is from its bound."""
    step = times[min(times)]
    bw_bound = step_bytes(model) / (peaks.bandwidth_gbs * 1e9)
    flops = 2 * matmul_params(model)
    return {
        "model": model.name, "params": model.n_params, "step_bytes": step_bytes(model),
        "dtype": str(model.dtype).removeprefix("torch."), "compiled": model.compiled,
        "pass_ms": {n: round(t * 1e3, 3) for n, t in sorted(times.items())},
        "v": {n: round(t / step, 3) for n, t in sorted(times.items())},
        "bandwidth_bound_ms": round(bw_bound * 1e3, 3),
        "compute_bound_ms": {n: round(flops * n / (peaks.matmul_gflops * 1e9) * 1e3, 3) for n in sorted(times)},
        "step_over_bound": round(step / max(bw_bound, flops / (peaks.matmul_gflops * 1e9)), 3),
    }


def pair_roofline(target: LoadedModel, draft: LoadedModel, gamma: int, context: int = 128,
                  positions: Iterable[int] = ()) -> dict[str, object]:
    """The target's step and verify-(gamma + 1) times (and its passes over `positions`), the draft's step, their
    bounds, v and c."""
    positions = sorted({1, 2, gamma + 1, 2 * gamma + 1, *positions})
    t_peaks = measure_peaks(target.device, target.dtype)
    d_peaks = t_peaks if (draft.device, draft.dtype) == (target.device, target.dtype) else \
        measure_peaks(draft.device, draft.dtype)
    t = roofline(target, pass_times(target, positions, context), t_peaks)
    d = roofline(draft, pass_times(draft, [1], context), d_peaks)
    return {
        "peaks": t_peaks.as_dict(), **({} if d_peaks is t_peaks else {"draft_peaks": d_peaks.as_dict()}),
        "target": t, "draft": d, "gamma": gamma,
        "v": t["v"][gamma + 1],  # type: ignore[index]
        "c": round(d["pass_ms"][1] / t["pass_ms"][1], 4),  # type: ignore[index]
    }


def describe(r: dict[str, object]) -> list[str]:
    """Lines for a console: the pair's roofline."""
    t, d, p = r["target"], r["draft"], r["peaks"]
    assert isinstance(t, dict) and isinstance(d, dict) and isinstance(p, dict)
    g = r["gamma"]
    assert isinstance(g, int)
    return [
        f"machine: {p['device']}, {p['threads']} threads, read {p['bandwidth_gbs']} GB/s, {p['dtype']} matmul "
        f"{p['matmul_gflops']} GFLOP/s",
        f"target {t['model']} ({t['dtype']}, {'compiled' if t['compiled'] else 'eager'}): step {t['pass_ms'][1]} ms, "
        f"bandwidth bound {t['bandwidth_bound_ms']} ms ({t['step_over_bound']}x of it); verify {g + 1} positions "
        f"{t['pass_ms'][g + 1]} ms: v = {r['v']}",
        f"draft {d['model']} ({d['dtype']}, {'compiled' if d['compiled'] else 'eager'}): step {d['pass_ms'][1]} ms "
        f"(bound {d['bandwidth_bound_ms']} ms): c = {r['c']}",
    ]
