"""The figures of `tandem bench capacity`: per phase (a concurrency and a mode), per concurrency (the modes against
cloud-only, the goal), the printed table and the plot."""

from __future__ import annotations

import math
import re
import statistics
from pathlib import Path
from typing import Any

from tandem_tools import bench_common, figures
from tandem_tools.bench_common import fmt

MODE_COLORS = {"cloud": "tab:orange", "spec": "tab:blue", "auto": "tab:green"}
MODE_LABELS = {"cloud": "cloud-only", "spec": "speculative (fixed gamma)", "auto": "auto (load-aware)"}
GENERATED = "tandem_generation_tokens_total"
AUTO_VS_BEST = 0.95  # the goal: auto's aggregate >= 0.95x the better of cloud and spec, its p99 TPOT <= cloud's


def percentile(values: list[float], pct: float) -> float:
    """`figures.percentile`, NaN for no samples (the table shows "-", the plot leaves it out)."""
    v = figures.percentile(values, pct)
    return math.nan if v is None else v


def parse_metrics(text: str) -> dict[str, float]:
    """Prometheus text: each sample name (labels summed over) to its value."""
    out: dict[str, float] = {}
    for key, value in bench_common.parse_metrics(text).items():
        name = key.split("{", 1)[0]
        out[name] = out.get(name, 0.0) + value
    return out


def histogram_buckets(text: str, name: str) -> dict[str, float]:
    """A histogram's cumulative bucket counts by `le` (other labels summed over)."""
    out: dict[str, float] = {}
    for key, value in bench_common.parse_metrics(text).items():
        le = re.search(r'[{,]le="([^"]*)"', key)
        if key.startswith(name + "_bucket{") and le:
            out[le[1]] = out.get(le[1], 0.0) + value
    return out


def bucket_counts(before: dict[str, float], after: dict[str, float]) -> dict[str, int]:
    """Per-bucket (not cumulative) counts between two `histogram_buckets` readings, by upper bound."""
    out: dict[str, int] = {}
    below = 0.0
    for le in sorted(after, key=lambda le: math.inf if le == "+Inf" else float(le)):
        cum = after[le] - before.get(le, 0.0)
        out[le] = round(cum - below)
        below = cum
    return out


def _ratio(metrics: dict[str, float], num: str, den: str) -> float | None:
    """num / den from /metrics deltas (an absent num: 0); None where den is absent or counted nothing."""
    return metrics.get(num, 0.0) / metrics[den] if metrics.get(den) else None


def phase_figures(records: list[dict[str, Any]], wall_s: float, metrics: dict[str, float],
                  cpu_s: float | None) -> dict[str, Any]:
    """One phase: the edges' records, its wall time, the cloud's /metrics deltas and CPU seconds."""
    tokens = sum(len(r["tokens"]) for r in records)
    tpot = [r["decode_s"] / (len(r["tokens"]) - 1) for r in records if len(r["tokens"]) > 1 and r["decode_s"]]
    generated = metrics.get(GENERATED, 0.0)
    drafted, accepted = sum(r["drafted"] for r in records), sum(r["accepted"] for r in records)
    return {
        "requests": len(records), "tokens": tokens, "wall_s": wall_s,
        "aggregate_tokens_per_s": tokens / wall_s if wall_s else 0.0,
        "per_client_tokens_per_s": statistics.mean(len(r["tokens"]) / r["wall_s"] for r in records),
        "tpot_p50_ms": percentile(tpot, 50) * 1e3, "tpot_p99_ms": percentile(tpot, 99) * 1e3,
        "ttft_mean_ms": statistics.mean(r["ttft_s"] for r in records if r["ttft_s"] is not None) * 1e3,
        "target_passes_per_token": _ratio(metrics, "tandem_target_forward_passes_total", GENERATED),
        "batched_passes_per_token": _ratio(metrics, "tandem_batch_size_count", GENERATED),
        "mean_batch": _ratio(metrics, "tandem_batch_size_sum", "tandem_batch_size_count"),
        # positions (tokens fed) per batched pass: how much each pass of the target carries
        "mean_positions_per_pass": _ratio(metrics, "tandem_batch_positions_sum", "tandem_batch_positions_count"),
        "cloud_cpu_ms_per_token": cpu_s / generated * 1e3 if cpu_s is not None and generated else None,
        # the cloud's capacity where the edges are other machines: tokens per second of one fully busy cloud core
        "tokens_per_cloud_cpu_s": generated / cpu_s if cpu_s and generated else None,
        "acceptance_rate": accepted / drafted if drafted else None,
        "switched_to_cloud_share": sum(bool(r.get("switched_to_cloud")) for r in records) / len(records),
        "advised_gamma_mean": _ratio(metrics, "tandem_advised_gamma_sum", "tandem_advised_gamma_count"),
        "draft_passes": sum(r.get("draft_passes", 0) for r in records),
        "stale_blocks": sum(r.get("stale", 0) for r in records),
        "replay_misses": sum(r.get("replay_misses", 0) for r in records),  # proposals off the table (stale ones)
    }


def compare_modes(phases: list[dict[str, Any]]) -> None:
    """Per concurrency: each mode's aggregate against cloud-only's (`aggregate_vs_cloud`, None without a cloud
    phase), in place."""
    by = {(p["clients"], p["mode"]): p for p in phases}
    for p in phases:
        cloud = by.get((p["clients"], "cloud"))
        base = cloud["aggregate_tokens_per_s"] if cloud else 0.0
        p["aggregate_vs_cloud"] = p["aggregate_tokens_per_s"] / base if base else None


def goals(phases: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per concurrency with all three modes: auto's aggregate >= AUTO_VS_BEST x the better of cloud and spec, and
    auto's p99 TPOT <= cloud's."""
    by = {(p["clients"], p["mode"]): p for p in phases}
    out = []
    for c in sorted({p["clients"] for p in phases}):
        if not all((c, m) in by for m in ("cloud", "spec", "auto")):
            continue
        cloud, spec, auto = by[(c, "cloud")], by[(c, "spec")], by[(c, "auto")]
        best = max(cloud["aggregate_tokens_per_s"], spec["aggregate_tokens_per_s"])
        vs_best = auto["aggregate_tokens_per_s"] / best if best else math.nan
        out.append({"clients": c, "auto_vs_best": vs_best, "auto_tpot_p99_ms": auto["tpot_p99_ms"],
                    "cloud_tpot_p99_ms": cloud["tpot_p99_ms"], "aggregate_met": vs_best >= AUTO_VS_BEST,
                    "tpot_met": auto["tpot_p99_ms"] <= cloud["tpot_p99_ms"]})
    return out


def goal_line(g: dict[str, Any]) -> str:
    ok = g["aggregate_met"] and g["tpot_met"]
    return (f"at {g['clients']:>2} client(s): auto/best(cloud, spec) aggregate {g['auto_vs_best']:.2f}x (goal >= "
            f"{AUTO_VS_BEST}x: {'ok' if g['aggregate_met'] else 'NO'}), p99 TPOT auto {g['auto_tpot_p99_ms']:.1f} vs "
            f"cloud {g['cloud_tpot_p99_ms']:.1f} ms (goal <=: {'ok' if g['tpot_met'] else 'NO'}) -> "
            + ("[green]met[/green]" if ok else "[red]not met[/red]"))


def print_table(phases: list[dict[str, Any]], console: Any) -> None:
    from rich.table import Table

    cols = ("clients", "mode", "agg tok/s", "vs cloud", "client tok/s", "TPOT p50", "TPOT p99", "TTFT ms",
            "passes/tok", "pos/pass", "batch", "tok/CPU-s", "accept", "to cloud", "advised", "same")
    table = Table(*cols, title="bench capacity (greedy; agg = all clients' tokens / phase wall time; TPOT in ms; "
                  "passes/tok: target passes per token; pos/pass: positions per batched pass; tok/CPU-s: per cloud "
                  "CPU-second; advised: the cloud's mean advised gamma)")
    for p in phases:
        ratio = p.get("aggregate_vs_cloud")
        table.add_row(
            str(p["clients"]), p["mode"], f"{p['aggregate_tokens_per_s']:.1f}",
            fmt(ratio, ".2f") + ("x" if ratio else ""), f"{p['per_client_tokens_per_s']:.1f}", fmt(p["tpot_p50_ms"]),
            fmt(p["tpot_p99_ms"]), f"{p['ttft_mean_ms']:.0f}", fmt(p["target_passes_per_token"], ".3f"),
            fmt(p["mean_positions_per_pass"], ".2f"), fmt(p["mean_batch"], ".2f"), fmt(p["tokens_per_cloud_cpu_s"]),
            fmt(p["acceptance_rate"], ".3f"), f"{p['switched_to_cloud_share']:.0%}",
            fmt(p["advised_gamma_mean"], ".2f"), "yes" if p.get("outputs_identical") else "NO")
    console.print(table)


PANELS = [("aggregate_tokens_per_s", "aggregate tokens/s"), ("aggregate_vs_cloud", "aggregate vs cloud-only (x)"),
          ("per_client_tokens_per_s", "per-client tokens/s"),
          ("tpot_p99_ms", "time per output token, ms (p99 solid, p50 dashed)"), ("ttft_mean_ms", "mean TTFT (ms)"),
          ("target_passes_per_token", "target passes per token"),
          ("mean_positions_per_pass", "mean positions per target pass"),
          ("tokens_per_cloud_cpu_s", "tokens per cloud CPU-second"), ("mean_batch", "mean batch (sequences/pass)"),
          ("acceptance_rate", "acceptance rate"), ("switched_to_cloud_share", "share of requests switched to cloud"),
          ("advised_gamma_mean", "mean advised gamma (cloud)")]


def plot_capacity(phases: list[dict[str, Any]], path: Path, clients: tuple[int, ...], title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    modes = list(dict.fromkeys(p["mode"] for p in phases))
    fig, axes = plt.subplots(3, 4, figsize=(20, 12))
    for ax, (key, name) in zip(axes.flat, PANELS, strict=True):
        lines = [(key, "o-", True)] + ([("tpot_p50_ms", "o--", False)] if key == "tpot_p99_ms" else [])
        for mode in modes:
            for k, style, labelled in lines:
                pts = sorted((p["clients"], p[k]) for p in phases if p["mode"] == mode and _finite(p.get(k)))
                if pts or not labelled:
                    ax.plot([x for x, _ in pts], [y for _, y in pts], style, color=MODE_COLORS.get(mode),
                            label=MODE_LABELS.get(mode, mode) if labelled else None)
        if key == "aggregate_vs_cloud":
            ax.axhline(1.0, color="grey", lw=0.8)
        if len(clients) > 1:
            ax.set_xscale("log", base=2)
        ax.set_xticks(list(clients), [str(c) for c in clients])
        ax.set(xlabel="concurrent clients", title=name)
        ax.grid(alpha=0.3)
        if ax.get_lines() and ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=8)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def _finite(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)
