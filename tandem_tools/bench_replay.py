"""`tandem bench replay`: replay a trace through the real edge client against a real cloud over an emulated network,
every mode at every round-trip time, a `tandem netem` proxy (its own process) in front of the cloud. Closed loop (every
mode once per prompt, in a seeded order) or, with `arrival_s` in the trace, open loop. Writes `results.json`,
`summary.md` and a plot (docs/performance.md).
"""

from __future__ import annotations

import contextlib
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
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

from tandem.config import DEFAULT_DRAFT, DEFAULT_TARGET
from tandem_tools import llama_server
from tandem_tools import replay_summary as rs
from tandem_tools.procs import CloudProcess, free_port, stop_process, wait_ready
from tandem_tools.replay_summary import FREE, MODES, RequestRecord, TraceRow, load_trace

log = logging.getLogger(__name__)

ROOT = Path(__file__).resolve().parents[1]


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
            [sys.executable, "-m", "tandem_tools.cli", "netem", "--listen", self.address, "--upstream", self.upstream,
             "--rtt-ms", str(self.rtt_ms)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        wait_ready(self.proc, self._listening, self.ready_timeout_s, "tandem netem", self.__exit__)
        return self

    def _listening(self) -> bool:
        with contextlib.suppress(OSError), socket.create_connection((self.host, self.port), timeout=0.5):
            return True
        return False

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
    target: str = DEFAULT_TARGET
    draft: str = DEFAULT_DRAFT
    gamma: int | str = 4  # fixed 4 measured better than adaptive here (adaptive collapses to ~1 under noise)
    limit: int | None = None
    edge_threads: int = 1
    cloud_threads: int = 1
    timeout_s: float = 60.0
    api_key: str | None = None
    free_twins: bool = False  # each mode also runs each request without its response_format, side by side


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
    with contextlib.suppress(OSError):
        cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                    if line.startswith("model name")), cpu)
    import transformers

    return {"cpu": cpu, "cpu_count": os.cpu_count(), "platform": platform.platform(),
            "python": platform.python_version(), "torch": torch.__version__, "transformers": transformers.__version__}


_MODE_SETTINGS: dict[str, dict[str, Any]] = {  # each replay mode as the edge's settings
    "cloud": {"mode": "cloud"}, "spec": {"mode": "spec", "pipeline": False},
    "spec-pipelined": {"mode": "spec", "pipeline": True},
    "spec-p-min": {"mode": "spec", "pipeline": True, "block_value": False},  # blocks end at draft_p_min
    "spec-chain": {"mode": "spec", "pipeline": True, "draft_tree": False},  # by value, no siblings (tandem.tree)
    "spec-pool": {"mode": "spec", "pipeline": True, "draft_pool": True},  # + a phrase pool's chains in the tree
    "auto": {"mode": "auto", "pipeline": True}}


def _edge_settings(cfg: ReplayConfig, mode: str, address: str) -> Any:
    from edge_client.settings import EdgeSettings

    mode = mode.removesuffix(FREE)
    if mode not in _MODE_SETTINGS:
        raise ValueError(f"unknown mode {mode!r}; choose from {', '.join(MODES)}")
    kw: dict[str, Any] = dict(cloud=address, transport="grpc", draft=cfg.draft, gamma=cfg.gamma,
                              threads=cfg.edge_threads, timeout_s=cfg.timeout_s, retries=0, api_key=cfg.api_key)
    return EdgeSettings(**kw, **_MODE_SETTINGS[mode])


def _one(client: Any, mode: str, rtt: float, index: int, ids: list[int], row: TraceRow, t_ref: float) -> RequestRecord:
    from tandem.errors import TandemError
    from tandem.sampling import SamplingParams

    rec = RequestRecord(mode, rtt, index, len(ids), row.max_tokens)
    arrivals: list[float] = []
    rejections = [0]

    def on_round(drafted: int, accepted: int) -> None:
        rejections[0] += accepted < drafted
    grammar = None if mode.endswith(FREE) else row.grammar()
    params = SamplingParams(max_tokens=row.max_tokens, temperature=row.temperature, seed=row.seed, grammar=grammar)
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
    rec.switched_to_cloud, rec.rejected_rounds = s.switched_to_cloud, rejections[0]
    if mode == "cloud":  # the cloud streams one token per target step; the edge counts steps, not rounds
        rec.rounds = rec.drafted = rec.accepted = 0
    rec.output_sha = hashlib.sha256(json.dumps(result.tokens).encode()).hexdigest()[:16]
    return rec


def run_replay(cfg: ReplayConfig, console: Console | None = None) -> dict[str, Any]:
    # transports load here, not at import: the core stays transport-free
    from edge_client.client import edge_decoder, make_verifier
    from tandem.config import DraftPlacement
    from tandem.models import load_draft
    from tandem.sampling import SamplingParams

    console = console or Console()
    torch.set_num_threads(cfg.edge_threads)
    rows = load_trace(cfg.trace, cfg.limit)
    warnings: list[str] = []

    def warn(msg: str) -> None:
        warnings.append(msg)
        console.print(f"[bold yellow]warning[/]: {msg}")
    # llama-server, llama-server-spec: the peer (llama.cpp), each prompt once at the first RTT, no edge client
    peer_modes = [m for m in cfg.modes if m in llama_server.MODES]
    modes = [m for m in cfg.modes if m not in peer_modes]
    if cfg.free_twins:  # each mode also without the requests' response_format, side by side
        modes += [m + FREE for m in modes]
    if not modes and not peer_modes:
        raise ValueError("no mode left to run")
    place = DraftPlacement()  # the draft's device, dtype and fast path: TANDEM_DRAFT_* (the cloud reads TANDEM_*)
    draft = load_draft(cfg.draft, place, cfg.edge_threads)
    prompts = [r.ids(draft.tokenizer) for r in rows]
    greedy = {i for i, r in enumerate(rows) if r.temperature == 0}
    open_loop = any(r.arrival_s is not None for r in rows)
    cfg.out.mkdir(parents=True, exist_ok=True)
    peers = llama_server.Peers(  # the target's threads as the cloud's, the draft's as the edge's
        peer_modes, cfg.target, cfg.draft, cfg.cloud_threads,
        llama_server.context_size(prompts, max(r.max_tokens for r in rows)), draft_threads=cfg.edge_threads,
        log_dir=cfg.out, warn=warn)
    peer_records: list[llama_server.PeerRecord] = []
    cloud_proc = None if cfg.cloud else CloudProcess(
        threads=cfg.cloud_threads, env={"TANDEM_TARGET": cfg.target},
        log_path=cfg.out / "cloud.log", ready_timeout_s=900)  # a compiled target builds its graphs first
    records: list[RequestRecord] = []
    if cloud_proc is not None:
        console.print(f"starting the cloud ({cfg.target}, {cfg.cloud_threads} torch thread(s)) ...")
        cloud_proc.start()
    try:
        peers.start()
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
            f"{', '.join(modes)}; target {target_name} at {upstream}, draft {draft.describe()}, gamma {cfg.gamma}; "
            f"torch threads: edge {torch.get_num_threads()}, cloud {cfg.cloud_threads if cloud_proc else 'its own'}, "
            f"netem in its own process; {'open' if open_loop else 'closed'}-loop")
        total = len(cfg.rtts) * len(modes) * len(rows)
        columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                   TimeRemainingColumn())
        with Progress(*columns, console=console) as progress:
            task = progress.add_task("replay", total=total)
            for rtt in cfg.rtts:
                with NetemProcess(upstream, rtt) as proxy:
                    clients = {m: edge_decoder(_edge_settings(cfg, m, proxy.address), draft) for m in modes}
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
                            if rtt == cfg.rtts[0]:  # the peer right after tandem's modes, at the first RTT only
                                for m in peers.modes:
                                    progress.update(task, description=f"prompt {i + 1} {m}")
                                    peer_records.append(llama_server.replay_record(peers, m, i, ids, rows[i]))
                            if not console.is_terminal:  # no live bar in a log: a line per prompt instead
                                console.print(f"RTT {rtt:g} ms: prompt {i + 1}/{len(prompts)} done")
        if open_loop:  # the peer closed-loop, after the open-loop replays
            peer_records += [llama_server.replay_record(peers, m, i, ids, rows[i])
                             for i, ids in enumerate(prompts) for m in peers.modes]
    finally:
        peers.stop()
        if cloud_proc is not None:
            cloud_proc.stop()

    summary = rs.summarize(records, modes, cfg.rtts)
    mismatches = rs.greedy_mismatches(records, greedy)
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
        "per_kind": rs.per_kind(records, [r.kind for r in rows], modes, cfg.rtts, greedy),  # []: a trace without kinds
        "requests": [asdict(r) for r in records],
    }
    if peers.modes:
        results["llama_server"] = {"info": peers.info, "summary": rs.peer_summary(peer_records, records, greedy),
                                   "requests": [asdict(r) for r in peer_records]}
    markdown = rs.render_markdown(results) + (rs.render_peer_markdown(results["llama_server"]["summary"], peers.info)
                                              if peers.modes else "")
    (cfg.out / "results.json").write_text(json.dumps(results, indent=1))
    (cfg.out / "summary.md").write_text(markdown)
    plot(results, cfg.out / "speedup_vs_rtt.png")
    console.print(markdown, markup=False, highlight=False, soft_wrap=True)
    if mismatches:
        console.print(f"[bold red]GREEDY OUTPUTS DIFFER across modes for {len(mismatches)} prompt(s): a bug, "
                      "please report it[/] (results.json: greedy_mismatches)")
    console.print(f"wrote {cfg.out / 'results.json'}, {cfg.out / 'summary.md'}, {cfg.out / 'speedup_vs_rtt.png'}")
    return results


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


def _open_loop(cfg: ReplayConfig, mode: str, rtt: float, address: str, draft: Any, prompts: list[list[int]],
               rows: list[TraceRow], advance: Callable[[], None]) -> list[RequestRecord]:
    """Each request starts at its arrival time in its own thread, with its own edge_decoder (its own draft state)."""
    from edge_client.client import edge_decoder

    out: list[RequestRecord] = []
    lock = threading.Lock()
    t_ref = time.perf_counter()

    def run(i: int) -> None:
        client = edge_decoder(_edge_settings(cfg, mode, address), draft)
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
