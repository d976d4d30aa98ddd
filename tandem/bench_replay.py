"""`tandem bench replay`: replay a trace through the real edge client against a real cloud over an emulated network.

For each round-trip time a `tandem netem` proxy (its own process) sits in front of the cloud (its own process, or
`--cloud`); the edge client runs here, one draft model, one torch thread. Closed loop (no `arrival_s` in the trace):
for each RTT, for each prompt, every mode runs once, in a seeded random order per prompt, so drift on a shared
machine hits all modes alike. Open loop (`arrival_s` present): for each RTT and mode the trace is replayed with requests
started at their arrival times, each in its own thread with its own EdgeClient (its own draft state; the draft
weights are shared read-only).

Every request's timings and counters go to `results.json`; per mode x RTT summaries (percentiles, throughput,
acceptance, target passes and bytes per token, speedup over cloud-only at the same RTT) to `summary.md` and a plot.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import logging
import os
import platform
import random
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

from tandem.figures import percentiles
from tandem.procs import CloudProcess, free_port, stop_process

log = logging.getLogger(__name__)

MODES = ("cloud", "spec", "spec-pipelined", "ouroboros", "auto")
LOSSLESS = frozenset(MODES)  # every replay mode gives the target's own output (edge, the lossy one, is not offered)
ROOT = Path(__file__).resolve().parents[1]


# --- the trace


@dataclass(frozen=True)
class TraceRow:
    prompt: str
    max_tokens: int
    temperature: float = 0.0
    seed: int | None = None
    arrival_s: float | None = None


def load_trace(path: Path, limit: int | None = None) -> list[TraceRow]:
    rows: list[TraceRow] = []
    for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        d = json.loads(line)
        if not isinstance(d.get("prompt"), str) or not isinstance(d.get("max_tokens"), int) or d["max_tokens"] < 1:
            raise ValueError(f"{path}:{n}: each line needs a string 'prompt' and a positive integer 'max_tokens'")
        rows.append(TraceRow(d["prompt"], d["max_tokens"], float(d.get("temperature", 0.0)), d.get("seed"),
                             None if d.get("arrival_s") is None else float(d["arrival_s"])))
        if limit is not None and len(rows) >= limit:
            break
    if not rows:
        raise ValueError(f"{path}: no requests")
    return rows


# --- the figures (pure functions, tested on hand-made numbers)


def leviathan_e(alpha: float, gamma: float) -> float:
    """Expected tokens per round, E(alpha, gamma) = (1 - alpha^(gamma+1)) / (1 - alpha) (Leviathan et al. 2023)."""
    if alpha >= 1.0:
        return gamma + 1.0
    return (1.0 - alpha ** (gamma + 1)) / (1.0 - alpha)


@dataclass
class RequestRecord:
    mode: str
    rtt_ms: float
    prompt_index: int
    prompt_tokens: int
    max_tokens: int
    tokens: int = 0
    finish_reason: str | None = None
    start_s: float = 0.0  # since the RTT's replay began
    ttft_s: float | None = None
    tpot_s: float | None = None  # (e2e - ttft) / (tokens - 1)
    e2e_s: float = 0.0
    itl_s: list[float] = field(default_factory=list)  # gaps between deliveries; a verified block arrives at once
    rounds: int = 0
    drafted: int = 0
    accepted: int = 0
    rejected_rounds: int = 0  # verified blocks that ended in a rejection (accepted < drafted)
    target_passes: int = 0
    bytes_sent: int = 0
    bytes_received: int = 0
    stale: int = 0
    gamma_mean: float | None = None
    measured_rtt_ms: float | None = None  # the edge's own round-trip samples (speculative modes)
    switched_to_cloud: bool = False
    output_sha: str = ""
    error: str | None = None


def summarize(records: Sequence[RequestRecord], modes: Sequence[str], rtts: Sequence[float]) -> list[dict[str, Any]]:
    """One row per mode x RTT. Throughput is total tokens / total end-to-end time over the requests that succeeded
    in this mode and in cloud mode at the same RTT; the speedup is its ratio to cloud mode's over those requests."""
    by: dict[tuple[str, float], dict[int, RequestRecord]] = {}
    for r in records:
        by.setdefault((r.mode, r.rtt_ms), {})[r.prompt_index] = r
    rows: list[dict[str, Any]] = []
    for rtt in rtts:
        cloud = {i: r for i, r in by.get(("cloud", rtt), {}).items() if r.error is None}
        for mode in modes:
            mine = by.get((mode, rtt), {})
            ok = [r for r in mine.values() if r.error is None]
            if not mine:
                continue
            tokens = sum(r.tokens for r in ok)
            e2e = sum(r.e2e_s for r in ok)
            drafted, accepted = sum(r.drafted for r in ok), sum(r.accepted for r in ok)
            passes, rounds = sum(r.target_passes for r in ok), sum(r.rounds for r in ok)
            # tokens per verified block: requests that speculated throughout (auto may have switched to cloud)
            spec_only = [r for r in ok if r.rounds and not r.switched_to_cloud]
            spec_tokens, spec_rounds = sum(r.tokens for r in spec_only), sum(r.rounds for r in spec_only)
            gammas = [r.gamma_mean for r in ok if r.gamma_mean is not None]
            # vLLM's acceptance rate counts drafted positions after a rejection, never reached, as failures; the
            # alpha of E(alpha, gamma) is the chance a reached position is accepted
            rejected = sum(r.rejected_rounds for r in ok)
            alpha = accepted / (accepted + rejected) if accepted + rejected else None
            gamma = sum(gammas) / len(gammas) if gammas else None
            common = [i for i in cloud if i in mine and mine[i].error is None] if "cloud" in modes else []
            speedup = None
            if common:
                mode_rate = sum(mine[i].tokens for i in common) / sum(mine[i].e2e_s for i in common)
                cloud_rate = sum(cloud[i].tokens for i in common) / sum(cloud[i].e2e_s for i in common)
                speedup = mode_rate / cloud_rate if cloud_rate else None
            rtts_seen = [r.measured_rtt_ms for r in ok if r.measured_rtt_ms is not None]
            rows.append({
                "mode": mode, "rtt_ms": rtt, "requests": len(ok), "errors": len(mine) - len(ok), "tokens": tokens,
                "ttft_ms": percentiles([r.ttft_s for r in ok if r.ttft_s is not None], 1e3),
                "tpot_ms": percentiles([r.tpot_s for r in ok if r.tpot_s is not None], 1e3),
                "itl_ms": percentiles([x for r in ok for x in r.itl_s], 1e3),
                "e2e_ms": percentiles([r.e2e_s for r in ok], 1e3),
                "tokens_per_s": tokens / e2e if e2e else None,
                "speedup_vs_cloud": speedup,
                "acceptance_rate": accepted / drafted if drafted else None,
                "alpha": alpha,
                "target_passes_per_token": passes / tokens if tokens else None,
                "bytes_per_token": sum(r.bytes_sent + r.bytes_received for r in ok) / tokens if tokens else None,
                "tokens_per_round": spec_tokens / spec_rounds if spec_rounds else None,
                "gamma_mean": gamma,
                "leviathan_e": leviathan_e(alpha, gamma) if alpha is not None and gamma is not None else None,
                "stale_per_round": sum(r.stale for r in ok) / rounds if rounds else None,
                "measured_rtt_ms": sum(rtts_seen) / len(rtts_seen) if rtts_seen else None,
                "switched_to_cloud": sum(r.switched_to_cloud for r in ok),
            })
    return rows


def greedy_mismatches(records: Sequence[RequestRecord], greedy: set[int]) -> list[dict[str, Any]]:
    """Lossless modes must give identical greedy output for a prompt (at every RTT): every disagreement."""
    outputs: dict[int, dict[str, str]] = {}
    for r in records:
        if r.error is None and r.prompt_index in greedy and r.mode in LOSSLESS:
            outputs.setdefault(r.prompt_index, {})[f"{r.mode}@{r.rtt_ms:g}ms"] = r.output_sha
    return [{"prompt_index": i, "outputs": o} for i, o in sorted(outputs.items()) if len(set(o.values())) > 1]


def _f(v: float | None, fmt: str) -> str:
    return "-" if v is None else format(v, fmt)


def render_markdown(results: dict[str, Any]) -> str:
    meta, rows = results["meta"], results["summary"]
    lines = [
        "# tandem bench replay",
        "",
        f"Trace `{meta['trace']}`, {meta['prompts']} requests, greedy unless the trace says otherwise; target "
        f"`{meta['target']}`, draft `{meta['draft']}`, gamma {meta['settings']['gamma']}; torch threads: edge "
        f"{meta['threads']['edge']}, cloud {meta['threads']['cloud']}; {meta['machine']['cpu']} "
        f"({meta['machine']['cpu_count']} CPUs); revision {meta['git_revision']}.",
        "",
        "| mode | RTT ms | tok/s | speedup vs cloud | TTFT p50 / p90 / p99 ms | TPOT p50 / p90 ms | ITL p50 / p99 ms "
        "| e2e p50 / p90 ms | acceptance (alpha) | tokens / round (E(a,g)) | target passes / token | bytes / token |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        t, tp, it, e = r["ttft_ms"], r["tpot_ms"], r["itl_ms"], r["e2e_ms"]
        per_round = "-" if r["tokens_per_round"] is None else (
            f"{r['tokens_per_round']:.2f} ({_f(r['leviathan_e'], '.2f')})")
        lines.append(
            f"| {r['mode']} | {r['rtt_ms']:g} | {_f(r['tokens_per_s'], '.1f')} | "
            f"{_f(r['speedup_vs_cloud'], '.2f')}x | {_f(t['p50'], '.0f')} / {_f(t['p90'], '.0f')} / "
            f"{_f(t['p99'], '.0f')} | {_f(tp['p50'], '.1f')} / {_f(tp['p90'], '.1f')} | {_f(it['p50'], '.1f')} / "
            f"{_f(it['p99'], '.1f')} | {_f(e['p50'], '.0f')} / {_f(e['p90'], '.0f')} | "
            f"{_f(r['acceptance_rate'], '.3f')} ({_f(r['alpha'], '.3f')}) | {per_round} | "
            f"{_f(r['target_passes_per_token'], '.3f')} | "
            f"{_f(r['bytes_per_token'], '.0f')} |"
        )
    lines += [
        "",
        "- **tok/s**: total tokens / total end-to-end time of the mode's requests. **Speedup vs cloud**: that rate "
        "divided by cloud-only's at the same RTT, over the same prompts, measured in the same run.",
        "- **TTFT**: request start to the first token; **TPOT**: (e2e - TTFT) / (tokens - 1); **ITL**: gaps between "
        "successive deliveries (a verified block arrives at once, so speculative ITLs are per block).",
        "- **acceptance**: accepted / drafted tokens (vLLM's rate); **alpha**: accepted / (accepted + rejections), "
        "the chance that a drafted position, once reached, is accepted.",
        "- **tokens / round**: tokens per verified block, beside Leviathan's E(a, g) = (1 - a^(g+1)) / (1 - a) from "
        "the measured alpha a and mean block length g (a pipelined block sent ahead counts only its part beyond "
        "what was accepted).",
        "- Every RTT goes through the `tandem netem` proxy (RTT 0 too), so the proxy's own cost is in every figure.",
    ]
    if meta.get("target_step_ms") is not None:
        lines.append(f"- One target step (cloud-only TPOT p50 at the lowest RTT): {meta['target_step_ms']:.1f} ms.")
    for w in results["warnings"]:
        lines.append(f"- **warning**: {w}")
    mism = results["greedy_mismatches"]
    lines.append(f"- Greedy outputs identical across modes and RTTs: "
                 f"{'yes' if not mism else f'NO, {len(mism)} prompts differ (see results.json)'}.")
    return "\n".join(lines) + "\n"


def plot(results: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = results["summary"]
    modes = list(dict.fromkeys(r["mode"] for r in rows))
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4.2))
    for mode in modes:
        mine = [r for r in rows if r["mode"] == mode and r["tokens_per_s"] is not None]
        xs = [r["rtt_ms"] for r in mine]
        ax1.plot(xs, [r["speedup_vs_cloud"] or 0.0 for r in mine], marker="o", label=mode)
        ax2.plot(xs, [r["tokens_per_s"] for r in mine], marker="o", label=mode)
    ax1.axhline(1.0, color="grey", lw=0.8, ls="--")
    ax1.set(xlabel="round-trip time (ms)", ylabel="speedup vs cloud-only (same RTT, same run)",
            title="speedup vs RTT")
    ax2.set(xlabel="round-trip time (ms)", ylabel="tokens / s", title="throughput per request")
    for ax in (ax1, ax2):
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    meta = results["meta"]
    fig.suptitle(f"tandem bench replay: {meta['target']} / {meta['draft']}, {meta['prompts']} requests, "
                 f"gamma {meta['settings']['gamma']}, threads edge {meta['threads']['edge']} / cloud "
                 f"{meta['threads']['cloud']}", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# --- the processes


class NetemProcess:
    """`tandem netem` in a child process, so the proxy's event loop does not share the edge's GIL."""

    def __init__(self, upstream: str, rtt_ms: float, host: str = "127.0.0.1", ready_timeout_s: float = 30.0) -> None:
        self.host, self.port = host, free_port(host)
        self.upstream, self.rtt_ms, self.ready_timeout_s = upstream, rtt_ms, ready_timeout_s
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def address(self) -> str:
        return f"{self.host}:{self.port}"

    def __enter__(self) -> NetemProcess:
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "tandem.cli", "netem", "--listen", self.address, "--upstream", self.upstream,
             "--rtt-ms", str(self.rtt_ms)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + self.ready_timeout_s
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"tandem netem exited with {self.proc.returncode}")
            try:
                socket.create_connection((self.host, self.port), timeout=0.5).close()
                return self
            except OSError:
                time.sleep(0.1)
        self.__exit__()
        raise TimeoutError("tandem netem did not listen in time")

    def __exit__(self, *exc: object) -> None:
        stop_process(self.proc)


# --- the run


@dataclass
class ReplayConfig:
    trace: Path
    out: Path
    rtts: list[float]
    modes: list[str]
    cloud: str | None = None  # HOST:PORT (gRPC) of a running cloud; None: start one
    target: str = "demo-target"
    draft: str = "demo-draft"
    gamma: int | str = 4  # fixed 4 measured better than adaptive here (adaptive collapses to ~1 under noise)
    limit: int | None = None
    edge_threads: int = 1
    cloud_threads: int = 1
    timeout_s: float = 60.0
    api_key: str | None = None


def _git_revision() -> str | None:
    try:
        rev = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True,
                             timeout=10, check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=ROOT,
                               capture_output=True, text=True, timeout=10, check=True).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None
    return rev + ("-dirty" if dirty else "")


def _machine() -> dict[str, Any]:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    import transformers

    return {"cpu": cpu, "cpu_count": os.cpu_count(), "platform": platform.platform(),
            "python": platform.python_version(), "torch": torch.__version__, "transformers": transformers.__version__}


def _edge_settings(cfg: ReplayConfig, mode: str, address: str) -> Any:
    from edge_client.settings import EdgeSettings

    kw: dict[str, Any] = dict(cloud=address, transport="grpc", draft=cfg.draft, gamma=cfg.gamma,
                              threads=cfg.edge_threads, timeout_s=cfg.timeout_s, retries=0, api_key=cfg.api_key)
    if mode == "cloud":
        kw["mode"] = "cloud"
    elif mode == "spec":
        kw |= {"mode": "spec", "pipeline": False}
    elif mode == "spec-pipelined":
        kw |= {"mode": "spec", "pipeline": True}
    elif mode == "ouroboros":
        kw |= {"mode": "spec", "pipeline": True, "ouroboros": True}
    elif mode == "auto":
        kw |= {"mode": "auto", "pipeline": True}
    else:
        raise ValueError(f"unknown mode {mode!r}; choose from {', '.join(MODES)}")
    return EdgeSettings(**kw)


def _one(client: Any, mode: str, rtt: float, index: int, ids: list[int], row: TraceRow, t_ref: float) -> RequestRecord:
    from tandem.errors import TandemError
    from tandem.sampling import SamplingParams

    rec = RequestRecord(mode, rtt, index, len(ids), row.max_tokens)
    arrivals: list[float] = []
    rejections = [0]

    def on_round(drafted: int, accepted: int) -> None:
        rejections[0] += accepted < drafted
    params = SamplingParams(max_tokens=row.max_tokens, temperature=row.temperature, seed=row.seed)
    t0 = time.perf_counter()
    rec.start_s = t0 - t_ref
    try:
        result = client.generate(ids, params, on_tokens=lambda new: arrivals.append(time.perf_counter()),
                                 on_round=on_round)
    except TandemError as e:
        rec.e2e_s = time.perf_counter() - t0
        rec.error = f"{type(e).__name__}: {e}"
        return rec
    rec.e2e_s = time.perf_counter() - t0
    s = result.stats
    rec.tokens, rec.finish_reason = len(result.tokens), result.finish_reason
    rec.ttft_s = arrivals[0] - t0 if arrivals else None
    if rec.ttft_s is not None and rec.tokens > 1:
        rec.tpot_s = (rec.e2e_s - rec.ttft_s) / (rec.tokens - 1)
    rec.itl_s = [b - a for a, b in itertools.pairwise(arrivals)]
    rec.rounds, rec.drafted, rec.accepted, rec.target_passes = s.rounds, s.drafted, s.accepted, s.target_passes
    rec.bytes_sent, rec.bytes_received, rec.stale = s.bytes_sent, s.bytes_received, s.stale
    rec.gamma_mean = sum(s.gammas) / len(s.gammas) if s.gammas else None
    rec.measured_rtt_ms = sum(s.rtt_ms) / len(s.rtt_ms) if s.rtt_ms else None
    rec.switched_to_cloud = s.switched_to_cloud
    rec.rejected_rounds = rejections[0]
    if mode == "cloud":  # the cloud streams one token per target step; the edge counts steps, not rounds
        rec.rounds = rec.drafted = rec.accepted = 0
    rec.output_sha = hashlib.sha256(json.dumps(result.tokens).encode()).hexdigest()[:16]
    return rec


def run_replay(cfg: ReplayConfig, console: Console | None = None) -> dict[str, Any]:
    # transports load here, not at import: the core stays transport-free
    from cloud_server.text import encode
    from edge_client.loop import EdgeClient, make_verifier
    from edge_client.settings import EdgeSettings
    from tandem.models import load_model
    from tandem.sampling import SamplingParams

    console = console or Console()
    torch.set_num_threads(cfg.edge_threads)
    rows = load_trace(cfg.trace, cfg.limit)
    warnings: list[str] = []
    modes = list(cfg.modes)
    if "ouroboros" in modes and "ouroboros" not in EdgeSettings.model_fields:
        warnings.append("mode ouroboros skipped: this edge client has no `ouroboros` setting (Ouroboros drafting "
                        "is not in this build)")
        console.print(f"[bold yellow]warning[/]: {warnings[-1]}")
        modes.remove("ouroboros")
    if not modes:
        raise ValueError("no mode left to run")
    draft = load_model(cfg.draft)
    prompts = [encode(draft.tokenizer, r.prompt) for r in rows]
    greedy = {i for i, r in enumerate(rows) if r.temperature == 0}
    open_loop = any(r.arrival_s is not None for r in rows)
    cfg.out.mkdir(parents=True, exist_ok=True)
    cloud_proc = None if cfg.cloud else CloudProcess(
        threads=cfg.cloud_threads, env={"TANDEM_TARGET": cfg.target},
        log_path=cfg.out / "cloud.log")
    records: list[RequestRecord] = []
    if cloud_proc is not None:
        console.print(f"starting the cloud ({cfg.target}, {cfg.cloud_threads} torch thread(s)) ...")
        cloud_proc.start()
    try:
        upstream = cfg.cloud or cloud_proc.grpc_target  # type: ignore[union-attr]
        probe = make_verifier(_edge_settings(cfg, "spec", upstream), draft)
        try:
            session = probe.open(prompts[0][:8], SamplingParams(max_tokens=1))
            target_name, target_fp = session.opened.target_name, session.opened.target_fingerprint
            session.close()
        finally:
            probe.close()
        console.print(
            f"[bold]tandem bench replay[/]: {len(rows)} requests from {cfg.trace.name}, RTTs {cfg.rtts} ms, modes "
            f"{', '.join(modes)}; target {target_name} at {upstream}, draft {draft.name}, gamma {cfg.gamma}; torch "
            f"threads: edge {torch.get_num_threads()}, cloud {cfg.cloud_threads if cloud_proc else 'its own'}, "
            f"netem in its own process; {'open' if open_loop else 'closed'}-loop")
        total = len(cfg.rtts) * len(modes) * len(rows)
        columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                   TimeRemainingColumn())
        with Progress(*columns, console=console) as progress:
            task = progress.add_task("replay", total=total)
            for rtt in cfg.rtts:
                with NetemProcess(upstream, rtt) as proxy:
                    clients = {m: EdgeClient(_edge_settings(cfg, m, proxy.address), draft) for m in modes}
                    for m in modes:  # warm-up, not timed: connections, caches, the adaptive model's first samples
                        progress.update(task, description=f"RTT {rtt:g} ms: warm-up {m}")
                        clients[m].generate(prompts[0][:64], SamplingParams(max_tokens=32))
                    t_ref = time.perf_counter()
                    if open_loop:
                        for m in modes:
                            progress.update(task, description=f"RTT {rtt:g} ms: {m} (open loop)")
                            records += _open_loop(cfg, m, rtt, proxy.address, draft, prompts, rows,
                                                  lambda: progress.advance(task))
                    else:
                        for i, ids in enumerate(prompts):
                            # a fresh seeded order per prompt: no mode always follows the same other one
                            order = random.Random(f"{rtt}/{i}").sample(modes, len(modes))
                            for m in order:
                                progress.update(task, description=f"RTT {rtt:g} ms: prompt {i + 1} {m}")
                                rec = _one(clients[m], m, rtt, i, ids, rows[i], t_ref)
                                if rec.error:
                                    console.print(f"[red]error[/] {m} RTT {rtt:g} prompt {i}: {rec.error}")
                                records.append(rec)
                                progress.advance(task)
                            if not console.is_terminal:  # no live bar in a log: a line per prompt instead
                                console.print(f"RTT {rtt:g} ms: prompt {i + 1}/{len(prompts)} done")
    finally:
        if cloud_proc is not None:
            cloud_proc.stop()

    summary = summarize(records, modes, cfg.rtts)
    mismatches = greedy_mismatches(records, greedy)
    low = [r for r in summary if r["mode"] == "cloud" and r["rtt_ms"] == min(cfg.rtts)]
    results: dict[str, Any] = {
        "meta": {
            "command": "tandem bench replay " + " ".join(sys.argv[3:]) if sys.argv[1:3] == ["bench", "replay"]
            else " ".join(sys.argv),
            "trace": cfg.trace.name, "prompts": len(rows), "open_loop": open_loop,
            "target": target_name, "target_fingerprint": target_fp, "draft": draft.name,
            "draft_fingerprint": draft.fingerprint, "draft_params": draft.n_params,
            "cloud": "started here" if cloud_proc else cfg.cloud, "modes": modes, "rtts_ms": cfg.rtts,
            "settings": {k: (str(v) if isinstance(v, Path) else v) for k, v in asdict(cfg).items() if k != "api_key"},
            "edge_settings": {m: _edge_settings(cfg, m, "netem").model_dump(
                mode="json", exclude={"api_key", "edge_api_keys"}) for m in modes},
            "threads": {"edge": torch.get_num_threads(), "cloud": cfg.cloud_threads if cloud_proc else None,
                        "netem": "own process"},
            "target_step_ms": low[0]["tpot_ms"]["p50"] if low else None,
            "machine": _machine(), "git_revision": _git_revision(),
            "time_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        },
        "summary": summary, "greedy_mismatches": mismatches, "warnings": warnings,
        "requests": [asdict(r) for r in records],
    }
    (cfg.out / "results.json").write_text(json.dumps(results, indent=1))
    (cfg.out / "summary.md").write_text(render_markdown(results))
    plot(results, cfg.out / "speedup_vs_rtt.png")
    console.print(render_markdown(results), markup=False, highlight=False, soft_wrap=True)
    if mismatches:
        console.print(f"[bold red]GREEDY OUTPUTS DIFFER across modes for {len(mismatches)} prompt(s): a bug, "
                      "please report it[/] (results.json: greedy_mismatches)")
    console.print(f"wrote {cfg.out / 'results.json'}, {cfg.out / 'summary.md'}, {cfg.out / 'speedup_vs_rtt.png'}")
    return results


def _open_loop(cfg: ReplayConfig, mode: str, rtt: float, address: str, draft: Any, prompts: list[list[int]],
               rows: list[TraceRow], advance: Callable[[], None]) -> list[RequestRecord]:
    """Each request starts at its arrival time in its own thread, with its own EdgeClient (its own draft state)."""
    from edge_client.loop import EdgeClient

    out: list[RequestRecord] = []
    lock = threading.Lock()
    t_ref = time.perf_counter()

    def run(i: int) -> None:
        client = EdgeClient(_edge_settings(cfg, mode, address), draft)
        rec = _one(client, mode, rtt, i, prompts[i], rows[i], t_ref)
        with lock:
            out.append(rec)
            advance()

    threads: list[threading.Thread] = []
    for i, row in sorted(enumerate(rows), key=lambda x: x[1].arrival_s or 0.0):
        delay = (row.arrival_s or 0.0) - (time.perf_counter() - t_ref)
        if delay > 0:
            time.sleep(delay)
        t = threading.Thread(target=run, args=(i,), name=f"replay-{i}")
        t.start()
        threads.append(t)
    for t in threads:
        t.join()
    return out
