"""`tandem bench capacity`: how much the cloud serves as clients are added, speculative sessions vs cloud-only.

A real cloud (`tandem serve` in a child process, batching verify blocks and completion steps) and real edge clients,
each its own process (`python -m tandem_tools.bench_capacity --worker ...`, the edge client over gRPC with its own torch
threads). At each concurrency c, c clients run the same held-out prompts in speculative mode (draft here, verify
there) and in cloud-only mode (the cloud's own streaming generation), one mode after the other, the order alternating
between concurrencies. Greedy, `ignore_eos`: every request generates exactly `max_tokens`, and the two modes' outputs
for a prompt must be identical.

Figures per (c, mode): aggregate tokens/s (all clients' tokens over the phase's wall time), per-client tokens/s (a
request's tokens over its own wall time, TTFT included, averaged), p99 time per output token (per request, after the
first token), TTFT, and from the cloud's /metrics deltas: target passes per generated token (per sequence: one per
verified block or completion step, prefills included), batched forward passes per generated token and the mean
batch, and the cloud process's CPU time per generated token (/proc).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import platform
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

from tandem.config import DEFAULT_DRAFT, DEFAULT_TARGET

MODES = ("spec", "cloud")
NOTE_SHARED_CORES = (
    "The edge clients run on the cloud's machine here: their draft models compete with the cloud for the same CPU "
    "cores, which real edge devices would not. Tokens per cloud CPU-second (the cloud process's own CPU time) is "
    "the capacity figure that carries over to edges on their own machines."
)


@dataclass(frozen=True)
class CapacityConfig:
    clients: tuple[int, ...] = (1, 2, 4, 8, 16)
    target: str = DEFAULT_TARGET
    draft: str = DEFAULT_DRAFT
    gamma: str = "4"
    max_tokens: int = 64
    prompt_tokens: int = 128
    requests: int = 2  # per client and mode, back to back
    cloud_threads: int = 1
    edge_threads: int = 1
    edge_nice: int = 0  # niceness of the edge processes: >0 lets the cloud go first on shared cores
    max_batch: int = 32
    batch_window_ms: float = 2.0
    pipeline: bool = True


# --- the edge client process


def worker_main(cloud: str, draft_name: str, gamma: str, threads: int, nice: int, pipeline: bool,
                inp: IO[str], out: IO[str]) -> None:
    """One edge device: load the draft, say ready, then run each job line (JSON) and answer one JSON line."""
    import torch

    from edge_client.client import EdgeClient
    from edge_client.settings import EdgeSettings
    from tandem.models import load_model
    from tandem.sampling import SamplingParams

    if nice:
        os.nice(nice)
    torch.set_num_threads(threads)
    draft = load_model(draft_name)
    settings = EdgeSettings.model_validate(dict(cloud=cloud, transport="grpc", draft=draft_name, gamma=gamma,
                                                threads=threads, pipeline=pipeline, retries=0, timeout_s=300.0))
    client = EdgeClient(settings, draft)
    if not inp.readline():  # the cloud is up (it started while this process loaded); nothing: the run was stopped
        return
    for mode in MODES:  # warm-up: connections, first-call allocations
        client.generate([5, 6, 7, 8], SamplingParams(max_tokens=4, ignore_eos=True), mode=mode)
    _send(out, {"ready": True})
    for line in inp:
        job = json.loads(line)
        if job.get("quit"):
            return
        records = []
        for prompt in job["prompts"]:
            stamps: list[tuple[float, int]] = []
            t0 = time.perf_counter()
            def stamp(new: list[int], s: list[tuple[float, int]] = stamps) -> None:
                s.append((time.perf_counter(), len(new)))

            result = client.generate(prompt, SamplingParams(max_tokens=job["max_tokens"], ignore_eos=True),
                                     on_tokens=stamp, mode=job["mode"])
            end = time.perf_counter()
            records.append({"tokens": result.tokens, "wall_s": end - t0,
                            "ttft_s": stamps[0][0] - t0 if stamps else None,
                            "decode_s": stamps[-1][0] - stamps[0][0] if stamps else None,
                            "drafted": result.stats.drafted, "accepted": result.stats.accepted})
        _send(out, {"records": records})


def _send(out: IO[str], obj: dict[str, Any]) -> None:
    out.write(json.dumps(obj) + "\n")
    out.flush()


class EdgeProcess:
    """An edge client in a child process, driven over its stdin/stdout with JSON lines."""

    def __init__(self, cloud: str, cfg: CapacityConfig, log_path: Path | None) -> None:
        args = [sys.executable, "-m", "tandem_tools.bench_capacity", "--worker", "--cloud", cloud, "--draft", cfg.draft,
                "--gamma", cfg.gamma, "--threads", str(cfg.edge_threads), "--nice", str(cfg.edge_nice)]
        if not cfg.pipeline:
            args.append("--no-pipeline")
        env = os.environ | {"HF_HUB_OFFLINE": os.environ.get("HF_HUB_OFFLINE", "1"),
                            "OMP_NUM_THREADS": str(cfg.edge_threads)}
        err = open(log_path, "ab") if log_path else subprocess.DEVNULL  # noqa: SIM115
        self.proc = subprocess.Popen(args, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=err, text=True,
                                     bufsize=1, env=env)
        if not isinstance(err, int):
            err.close()  # the child holds its own copy

    def send(self, obj: dict[str, Any]) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write(json.dumps(obj) + "\n")
        self.proc.stdin.flush()

    def recv(self) -> dict[str, Any]:
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline()
        if not line:
            raise RuntimeError(f"edge process {self.proc.pid} exited ({self.proc.poll()}); see its log")
        return dict(json.loads(line))

    def ask_to_quit(self) -> None:
        with contextlib.suppress(OSError):
            self.send({"quit": True})
            assert self.proc.stdin is not None
            self.proc.stdin.close()  # one still loading sees the end of its input and exits too

    def stop(self, deadline: float) -> None:
        """Wait for it to quit until `deadline` (time.monotonic()), then kill it."""
        try:
            self.proc.wait(timeout=max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(timeout=10)


# --- figures


def percentile(values: list[float], pct: float) -> float:
    """Linear interpolation between closest ranks (numpy's default)."""
    xs = sorted(values)
    if not xs:
        return math.nan
    k = (len(xs) - 1) * pct / 100
    lo, hi = math.floor(k), math.ceil(k)
    return xs[lo] + (xs[hi] - xs[lo]) * (k - lo)


def parse_metrics(text: str) -> dict[str, float]:
    """Prometheus text: each sample name (labels summed over) to its value."""
    out: dict[str, float] = {}
    for line in text.splitlines():
        if not line or line.startswith("#"):
            continue
        name_labels, _, value = line.rpartition(" ")
        name = name_labels.split("{", 1)[0]
        out[name] = out.get(name, 0.0) + float(value)
    return out


def cpu_seconds(pid: int) -> float | None:
    """User + system CPU time of a process (Linux /proc), or None elsewhere."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return None
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def phase_figures(records: list[dict[str, Any]], wall_s: float, metrics: dict[str, float],
                  cpu_s: float | None) -> dict[str, Any]:
    tokens = sum(len(r["tokens"]) for r in records)
    tpot = [r["decode_s"] / (len(r["tokens"]) - 1) for r in records if len(r["tokens"]) > 1 and r["decode_s"]]
    generated = metrics.get("tandem_generation_tokens_total", 0.0)
    batches = metrics.get("tandem_batch_size_count", 0.0)
    drafted, accepted = sum(r["drafted"] for r in records), sum(r["accepted"] for r in records)
    return {
        "requests": len(records),
        "tokens": tokens,
        "wall_s": wall_s,
        "aggregate_tokens_per_s": tokens / wall_s if wall_s else 0.0,
        "per_client_tokens_per_s": statistics.mean(len(r["tokens"]) / r["wall_s"] for r in records),
        "tpot_p50_ms": percentile(tpot, 50) * 1e3,
        "tpot_p99_ms": percentile(tpot, 99) * 1e3,
        "ttft_mean_ms": statistics.mean(r["ttft_s"] for r in records if r["ttft_s"] is not None) * 1e3,
        "target_passes_per_token": metrics.get("tandem_target_forward_passes_total", 0.0) / generated
        if generated else None,
        "batched_passes_per_token": batches / generated if generated else None,
        "mean_batch": metrics.get("tandem_batch_size_sum", 0.0) / batches if batches else None,
        "cloud_cpu_ms_per_token": cpu_s / generated * 1e3 if cpu_s is not None and generated else None,
        # the cloud's capacity where the edges are other machines: tokens per second of one fully busy cloud core
        "tokens_per_cloud_cpu_s": generated / cpu_s if cpu_s and generated else None,
        "acceptance_rate": accepted / drafted if drafted else None,
    }


# --- the benchmark


def run_bench_capacity(cfg: CapacityConfig, out_dir: Path, console: Any = None,
                       prompts: list[list[int]] | None = None) -> dict[str, Any]:
    """`prompts` (at least max(clients) x requests): instead of the held-out ones."""
    import torch
    from rich.console import Console
    from rich.table import Table

    from tandem.models import load_model
    from tandem_tools.procs import CloudProcess
    from tandem_tools.train.data import heldout_prompts

    console = console or Console(width=max(Console().width, 150))  # the table is wide
    out_dir.mkdir(parents=True, exist_ok=True)
    n_clients = max(cfg.clients)
    if prompts is None:
        prompts = heldout_prompts(n_clients * cfg.requests, cfg.prompt_tokens, load_model(cfg.draft).tokenizer)
    env = {"TANDEM_TARGET": cfg.target, "TANDEM_MAX_BATCH": str(cfg.max_batch),
           "TANDEM_BATCH_WINDOW_MS": str(cfg.batch_window_ms), "TANDEM_MAX_DRAFT_TOKENS": "64",
           "TANDEM_MAX_SESSIONS": str(max(64, 2 * n_clients)),
           "TANDEM_MAX_CONCURRENT_REQUESTS": str(max(64, 4 * n_clients))}
    console.print(
        f"[bold]bench capacity[/bold]: target {cfg.target} in a cloud process ({cfg.cloud_threads} torch thread(s), "
        f"max batch {cfg.max_batch}, batch window {cfg.batch_window_ms} ms); up to {n_clients} edge processes with "
        f"{cfg.draft} ({cfg.edge_threads} torch thread(s) each, nice {cfg.edge_nice}), gamma {cfg.gamma}, "
        f"{cfg.requests} request(s) per client and mode, {cfg.prompt_tokens}-token held-out prompts, "
        f"{cfg.max_tokens} new tokens, greedy; {os.cpu_count()} CPU cores"
    )
    console.print(NOTE_SHARED_CORES, style="yellow")
    phases: list[dict[str, Any]] = []
    edges: list[EdgeProcess] = []
    cloud = CloudProcess(threads=cfg.cloud_threads, env=env, log_path=out_dir / "cloud.log", ready_timeout_s=600)
    console.print(f"starting the cloud and {n_clients} edge processes ...", style="dim")
    try:
        # the edges load while the cloud starts
        edges = [EdgeProcess(cloud.grpc_target, cfg, out_dir / f"edge-{i}.log") for i in range(n_clients)]
        cloud.start()
        assert cloud.proc is not None
        for e in edges:
            e.send({"cloud_ready": True})
        for e in edges:
            e.recv()  # warmed up
        for ci, c in enumerate(cfg.clients):
            outputs: dict[str, list[list[int]]] = {}
            for mode in MODES if ci % 2 == 0 else MODES[::-1]:
                before, cpu0 = parse_metrics(cloud.metrics_text()), cpu_seconds(cloud.proc.pid)
                t0 = time.perf_counter()
                for i, e in enumerate(edges[:c]):
                    e.send({"mode": mode, "max_tokens": cfg.max_tokens,
                            "prompts": prompts[i * cfg.requests : (i + 1) * cfg.requests]})
                records = [r for e in edges[:c] for r in e.recv()["records"]]
                wall = time.perf_counter() - t0
                after, cpu1 = parse_metrics(cloud.metrics_text()), cpu_seconds(cloud.proc.pid)
                delta = {k: v - before.get(k, 0.0) for k, v in after.items()}
                cpu = None if cpu0 is None or cpu1 is None else cpu1 - cpu0
                figs = phase_figures(records, wall, delta, cpu)
                outputs[mode] = [r["tokens"] for r in records]
                phases.append({"clients": c, "mode": mode, **figs})
                console.print(f"  {c:>2} client(s), {mode:<5}: {figs['aggregate_tokens_per_s']:.1f} tok/s "
                              f"aggregate, p99 TPOT {figs['tpot_p99_ms']:.1f} ms", style="dim")
            same = outputs["spec"] == outputs["cloud"]
            for ph in phases[-2:]:
                ph["outputs_identical"] = same
    finally:
        for e in edges:
            e.ask_to_quit()
        deadline = time.monotonic() + 15
        for e in edges:
            e.stop(deadline)
        cloud.stop()
    table = Table(title="bench capacity (greedy; aggregate = all clients' tokens / phase wall time)")
    cols = ("clients", "mode", "aggregate tok/s", "per-client tok/s", "p99 TPOT ms", "TTFT ms", "target passes/tok",
            "batched passes/tok", "mean batch", "tok per cloud CPU-s", "acceptance", "spec/cloud aggregate",
            "same output")
    for col in cols:
        table.add_column(col)
    by = {(p["clients"], p["mode"]): p for p in phases}
    for p in phases:
        other = by[(p["clients"], "cloud")]
        ratio = p["aggregate_tokens_per_s"] / other["aggregate_tokens_per_s"] if p["mode"] == "spec" else None
        table.add_row(
            str(p["clients"]), p["mode"], f"{p['aggregate_tokens_per_s']:.1f}", f"{p['per_client_tokens_per_s']:.1f}",
            f"{p['tpot_p99_ms']:.1f}", f"{p['ttft_mean_ms']:.0f}", _fmt(p["target_passes_per_token"], 3),
            _fmt(p["batched_passes_per_token"], 3), _fmt(p["mean_batch"], 2), _fmt(p["tokens_per_cloud_cpu_s"], 1),
            _fmt(p["acceptance_rate"], 3), "-" if ratio is None else f"{ratio:.2f}x", "yes" if p["outputs_identical"]
            else "NO",
        )
    console.print(table)
    goal = _goal(by, 8)
    if goal:
        console.print(goal)
    report = {
        "settings": {**cfg.__dict__, "clients": list(cfg.clients)},
        "machine": {"platform": platform.platform(), "python": platform.python_version(), "torch": torch.__version__,
                    "cpu_cores": os.cpu_count()},
        "note": NOTE_SHARED_CORES,
        "phases": phases,
    }
    (out_dir / "capacity.json").write_text(json.dumps(report, indent=2) + "\n")
    plot_capacity(phases, out_dir / "capacity.png", cfg)
    console.print(f"wrote {out_dir / 'capacity.json'} and {out_dir / 'capacity.png'}")
    return report


def _fmt(v: float | None, digits: int) -> str:
    return "-" if v is None else f"{v:.{digits}f}"


def _goal(by: dict[tuple[int, str], dict[str, Any]], c: int) -> str | None:
    if (c, "spec") not in by:
        return None
    spec, cloud = by[(c, "spec")], by[(c, "cloud")]
    ratio = spec["aggregate_tokens_per_s"] / cloud["aggregate_tokens_per_s"]
    return (f"at {c} clients: speculative {spec['aggregate_tokens_per_s']:.1f} tok/s aggregate vs cloud-only "
            f"{cloud['aggregate_tokens_per_s']:.1f} = {ratio:.2f}x (goal >= 2.5x); per-client "
            f"{spec['per_client_tokens_per_s']:.1f} vs {cloud['per_client_tokens_per_s']:.1f} tok/s, p99 TPOT "
            f"{spec['tpot_p99_ms']:.1f} vs {cloud['tpot_p99_ms']:.1f} ms; tokens per cloud CPU-second "
            f"{_fmt(spec['tokens_per_cloud_cpu_s'], 1)} vs {_fmt(cloud['tokens_per_cloud_cpu_s'], 1)}"
            + (f" = {spec['tokens_per_cloud_cpu_s'] / cloud['tokens_per_cloud_cpu_s']:.2f}x"
               if spec["tokens_per_cloud_cpu_s"] and cloud["tokens_per_cloud_cpu_s"] else ""))


def plot_capacity(phases: list[dict[str, Any]], path: Path, cfg: CapacityConfig) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [("aggregate_tokens_per_s", "aggregate tokens/s"), ("per_client_tokens_per_s", "per-client tokens/s"),
              ("tpot_p99_ms", "p99 time per output token (ms)"),
              ("target_passes_per_token", "target passes per token (solid), batched (dashed)"),
              ("tokens_per_cloud_cpu_s", "tokens per cloud CPU-second"), ("mean_batch", "mean batch")]
    fig, axes = plt.subplots(2, 3, figsize=(15, 8))
    for ax, (key, title) in zip(axes.flat, panels, strict=True):
        for mode, color in (("spec", "tab:blue"), ("cloud", "tab:orange")):
            pts = sorted((p["clients"], p[key]) for p in phases if p["mode"] == mode and p[key] is not None)
            ax.plot([x for x, _ in pts], [y for _, y in pts], "o-", color=color,
                    label="speculative" if mode == "spec" else "cloud-only")
            if key == "target_passes_per_token":
                pts = sorted((p["clients"], p["batched_passes_per_token"]) for p in phases
                             if p["mode"] == mode and p["batched_passes_per_token"] is not None)
                ax.plot([x for x, _ in pts], [y for _, y in pts], "o--", color=color)
        ax.set_xscale("log", base=2)
        ax.set_xticks(list(cfg.clients), [str(c) for c in cfg.clients])
        ax.set_xlabel("concurrent clients")
        ax.set_title(title)
        ax.grid(alpha=0.3)
        ax.legend()
    fig.suptitle(f"tandem bench capacity: {cfg.target} / {cfg.draft}, gamma {cfg.gamma}, {cfg.max_tokens} tokens, "
                 f"cloud {cfg.cloud_threads} thread(s), {os.cpu_count()} cores shared with the edges")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _worker_cli(argv: list[str]) -> None:
    p = argparse.ArgumentParser(prog="python -m tandem_tools.bench_capacity", description="one edge client process")
    p.add_argument("--worker", action="store_true", required=True)
    p.add_argument("--cloud", required=True)
    p.add_argument("--draft", default=DEFAULT_DRAFT)
    p.add_argument("--gamma", default="4")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--nice", type=int, default=0)
    p.add_argument("--no-pipeline", action="store_true")
    a = p.parse_args(argv)
    worker_main(a.cloud, a.draft, a.gamma, a.threads, a.nice, not a.no_pipeline, sys.stdin, sys.stdout)


if __name__ == "__main__":
    _worker_cli(sys.argv[1:])
