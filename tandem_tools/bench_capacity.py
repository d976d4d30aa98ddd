"""`tandem bench capacity`: how much the cloud serves as clients are added, in three modes side by side.

A real cloud (`tandem serve`, a child process) and edge clients, each its own process (this module, its settings one
JSON argument, driven with JSON lines over stdin/stdout), run the same held-out prompts at each concurrency in each
mode, the order rotating: `cloud`, `spec` (a fixed gamma) and `auto` (load-aware: the block length the cloud advises).
Greedy, `ignore_eos`: every mode's output for a prompt must be identical. Replay edges and the figures:
docs/capacity.md ("Measured: `tandem bench capacity`").
"""

from __future__ import annotations

import contextlib
import json
import os
import platform
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

from tandem.config import DEFAULT_DRAFT, DEFAULT_TARGET
from tandem_tools import capacity_figures as cf
from tandem_tools.bench_common import cpu_seconds
from tandem_tools.procs import CloudProcess, popen_logged
from tandem_tools.replay_edge import TABLE_FILE, ReplayDrafter, ReplayTable, ensure_table
from tandem_tools.replay_summary import CHAT_TRACE, load_trace

MODES = ("cloud", "spec", "auto")
EDGES = ("replay", "real")
NOTE_REPLAY = ("Replay edges: each edge replays the draft's recorded greedy proposals and sleeps the draft time "
               "measured while recording, so drafting costs the cloud's machine no CPU, as with edges on hardware of "
               "their own.")
NOTE_SHARED_CORES = ("Real edges on the cloud's machine here: their draft models compete with the cloud for the same "
                     "CPU cores, which real edge devices would not. Tokens per cloud CPU-second (the cloud process's "
                     "own CPU time) is the capacity figure that carries over to edges on their own machines.")


@dataclass(frozen=True)
class CapacityConfig:
    clients: tuple[int, ...] = (1, 2, 4, 8, 16)
    target: str = DEFAULT_TARGET
    draft: str = DEFAULT_DRAFT
    gamma: str = "4"  # spec's fixed block length (auto's is adaptive, up to max_gamma)
    max_gamma: int = 8
    modes: tuple[str, ...] = MODES
    edges: str = "replay"
    max_tokens: int = 64
    prompt_tokens: int = 128  # held-out code windows of this length (no trace)
    trace: str | None = None  # JSON lines of requests (a chat model's: through its chat template); None: chat.jsonl
    # for a draft with a chat template, held-out code windows otherwise
    requests: int = 2  # per client and mode, back to back
    cloud_threads: int = 1
    edge_threads: int = 1  # real edges' torch threads; replay: the threads the draft step is timed with
    edge_nice: int = 0  # niceness of the edge processes: >0 lets the cloud go first on shared cores
    max_batch: int = 32
    batch_window_ms: float = 2.0
    pipeline: bool = True

    def check(self) -> None:
        if self.edges not in EDGES:
            raise ValueError(f"edges must be one of {', '.join(EDGES)}, got {self.edges!r}")
        if not self.modes or set(self.modes) - set(MODES) or len(set(self.modes)) != len(self.modes):
            raise ValueError(f"modes: distinct ones of {', '.join(MODES)}, got {','.join(self.modes)!r}")
        if self.gamma != "adaptive" and (not self.gamma.isdigit() or not 0 <= int(self.gamma) <= self.max_gamma):
            raise ValueError(f"gamma (spec's block length) must be adaptive or in [0, max_gamma={self.max_gamma}], "
                             f"got {self.gamma!r}")


# --- the edge client process


def worker_main(cloud: str, draft_name: str, gamma: str, max_gamma: int, threads: int, nice: int, pipeline: bool,
                table_path: str | None, inp: IO[str], out: IO[str]) -> None:
    """One edge device: load the draft (replay: for its metadata only), say ready, then run each job line (JSON)
    and answer one JSON line."""
    import torch

    from edge_client.client import edge_decoder
    from edge_client.settings import EdgeSettings
    from tandem.config import DraftPlacement
    from tandem.models import load_draft
    from tandem.sampling import SamplingParams
    from tandem.speculate import SpeculativeDecoder
    from tandem.value import BlockValue

    if nice:
        os.nice(nice)
    torch.set_num_threads(threads)
    draft = load_draft(draft_name, DraftPlacement(), threads)
    table = ReplayTable.load(Path(table_path)) if table_path is not None else None

    def client(mode: str) -> SpeculativeDecoder:
        # a fresh edge per phase: what auto learnt at one concurrency must not carry into the next
        settings = EdgeSettings.model_validate(dict(
            cloud=cloud, transport="grpc", draft=draft_name, gamma="adaptive" if mode == "auto" else gamma,
            max_gamma=max_gamma, threads=threads, pipeline=pipeline, retries=0, timeout_s=300.0))
        return edge_decoder(settings, draft)

    def run(c: SpeculativeDecoder, prompt: list[int], max_tokens: int, mode: str,
            on_tokens: Any = None) -> tuple[Any, int]:
        """The result, and the replay edge's proposals off the table (blocks sent ahead on a wrong guess)."""
        s = c.settings  # by value and with trees, as the edge's own drafter (a fixed gamma only bounds the block)
        value = BlockValue(c.gamma_policy, c.calibration, s.pipeline) if s.block_value else None
        drafter = None if table is None else ReplayDrafter(table, draft, value=value, tree=s.draft_tree)
        result = c.generate(prompt, SamplingParams(max_tokens=max_tokens, ignore_eos=True), on_tokens=on_tokens,
                            mode=mode, drafter=drafter)
        return result, 0 if drafter is None else drafter.misses

    if not inp.readline():  # the cloud is up (it started while this process loaded); nothing: the run was stopped
        return
    warm_prompt = table.prompts[0] if table is not None else [5, 6, 7, 8]
    for mode in MODES:  # warm-up: connections, first-call allocations
        run(client(mode), warm_prompt, 4, mode)
    _send(out, {"ready": True})
    for line in inp:
        job = json.loads(line)
        if job.get("quit"):
            return
        mode, records = job["mode"], []
        edge = client(mode)
        for prompt in job["prompts"]:
            stamps: list[float] = []  # when each batch of new tokens arrived
            t0 = time.perf_counter()
            result, misses = run(edge, prompt, job["max_tokens"], mode,
                                 lambda _, s=stamps: s.append(time.perf_counter()))
            end = time.perf_counter()
            st = result.stats
            records.append({"tokens": result.tokens, "wall_s": end - t0,
                            "ttft_s": stamps[0] - t0 if stamps else None,
                            "decode_s": stamps[-1] - stamps[0] if stamps else None,
                            "drafted": st.drafted, "accepted": st.accepted, "switched_to_cloud": st.switched_to_cloud,
                            "draft_passes": st.draft_passes, "stale": st.stale, "replay_misses": misses})
        _send(out, {"records": records})


def _send(out: IO[str], obj: dict[str, Any]) -> None:
    out.write(json.dumps(obj) + "\n")
    out.flush()


class EdgeProcess:
    """An edge client in a child process, driven over its stdin/stdout with JSON lines."""

    def __init__(self, cloud: str, cfg: CapacityConfig, log_path: Path | None, table: Path | None) -> None:
        settings = {"cloud": cloud, "draft_name": cfg.draft, "gamma": cfg.gamma, "max_gamma": cfg.max_gamma,
                    "threads": cfg.edge_threads, "nice": cfg.edge_nice, "pipeline": cfg.pipeline,
                    "table_path": None if table is None else str(table)}  # `worker_main`'s arguments
        args = [sys.executable, "-m", "tandem_tools.bench_capacity", json.dumps(settings)]
        env = os.environ | {"HF_HUB_OFFLINE": os.environ.get("HF_HUB_OFFLINE", "1"),
                            "OMP_NUM_THREADS": str(cfg.edge_threads)}
        self.proc = popen_logged(args, log_path, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, bufsize=1,
                                 env=env)

    def send(self, obj: dict[str, Any]) -> None:
        assert self.proc.stdin is not None
        _send(self.proc.stdin, obj)

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


# --- the benchmark


def run_bench_capacity(cfg: CapacityConfig, out_dir: Path, console: Any = None,
                       prompts: list[list[int]] | None = None) -> dict[str, Any]:
    """`prompts` (at least max(clients) x requests): instead of the held-out ones."""
    import torch
    from rich.console import Console

    from tandem.config import DraftPlacement
    from tandem.models import load_draft
    from tandem_tools.train.data import heldout_prompts

    cfg.check()
    console = console or Console(width=max(Console().width, 170))  # the table is wide
    out_dir.mkdir(parents=True, exist_ok=True)
    n_clients = max(cfg.clients)
    if prompts is None:
        tokenizer = load_draft(cfg.draft, DraftPlacement()).tokenizer
        trace = Path(cfg.trace) if cfg.trace else None
        if trace is None and getattr(tokenizer, "chat_template", None) and CHAT_TRACE.is_file():
            trace = CHAT_TRACE  # a chat pair gets chat requests, as `bench local` does
        if trace is not None:
            prompts = [r.ids(tokenizer) for r in load_trace(trace, n_clients * cfg.requests)]
            if len(prompts) < n_clients * cfg.requests:
                raise ValueError(f"{trace} has {len(prompts)} requests; {n_clients * cfg.requests} are needed")
            console.print(f"prompts: the first {len(prompts)} requests of {trace.name}")
        else:
            prompts = heldout_prompts(n_clients * cfg.requests, cfg.prompt_tokens, tokenizer)
    prompts = prompts[: n_clients * cfg.requests]
    console.print(
        f"[bold]bench capacity[/bold]: target {cfg.target} in a cloud process ({cfg.cloud_threads} torch thread(s), "
        f"max batch {cfg.max_batch}, batch window {cfg.batch_window_ms} ms); up to {n_clients} {cfg.edges} edge "
        f"processes with {cfg.draft}; modes {', '.join(cfg.modes)} (spec: gamma {cfg.gamma}; auto: adaptive up to "
        f"{cfg.max_gamma}); {cfg.requests} request(s) per client and mode, prompts of {min(map(len, prompts))}-"
        f"{max(map(len, prompts))} tokens, {cfg.max_tokens} new tokens, greedy; {os.cpu_count()} CPU cores")
    table: ReplayTable | None = None
    replay: dict[str, Any] | None = None
    table_path = out_dir / TABLE_FILE if cfg.edges == "replay" else None
    if table_path is not None:
        console.print(f"replay table: the target's outputs and the draft's proposals ({table_path}) ...", style="dim")
        table, reused = ensure_table(table_path, cfg.target, cfg.draft, prompts, cfg.max_tokens, cfg.max_gamma,
                                     cfg.edge_threads, cfg.cloud_threads)
        replay = {"path": table_path.name, "reused": reused, **table.summary()}
        console.print(f"replay table {'reused' if reused else 'recorded'}: {len(table.prompts)} prompts, draft step "
                      f"{table.draft_step_s * 1e3:.2f} ms ({table.draft_threads} torch thread(s), this process alone)")
        console.print(NOTE_REPLAY, style="yellow")
    else:
        console.print(f"real edges: {cfg.edge_threads} torch thread(s) each, nice {cfg.edge_nice}", style="dim")
        console.print(NOTE_SHARED_CORES, style="yellow")
    env = {"TANDEM_TARGET": cfg.target, "TANDEM_MAX_BATCH": str(cfg.max_batch),
           "TANDEM_BATCH_WINDOW_MS": str(cfg.batch_window_ms), "TANDEM_MAX_DRAFT_TOKENS": "64",
           "TANDEM_MAX_SESSIONS": str(max(64, 2 * n_clients)),
           "TANDEM_MAX_CONCURRENT_REQUESTS": str(max(64, 4 * n_clients))}
    phases: list[dict[str, Any]] = []
    edges: list[EdgeProcess] = []
    cloud = CloudProcess(threads=cfg.cloud_threads, env=env, log_path=out_dir / "cloud.log", ready_timeout_s=600)
    console.print(f"starting the cloud and {n_clients} edge processes ...", style="dim")
    try:
        # the edges load while the cloud starts
        edges = [EdgeProcess(cloud.grpc_target, cfg, out_dir / f"edge-{i}.log", table_path) for i in range(n_clients)]
        cloud.start()
        assert cloud.proc is not None
        for e in edges:
            e.send({"cloud_ready": True})
        for e in edges:
            e.recv()  # warmed up
        for ci, c in enumerate(cfg.clients):
            shift = ci % len(cfg.modes)
            outputs: dict[str, list[list[int]]] = {}
            for mode in cfg.modes[shift:] + cfg.modes[:shift]:
                text0, cpu0 = cloud.metrics_text(), cpu_seconds(cloud.proc.pid)
                t0 = time.perf_counter()
                for i, e in enumerate(edges[:c]):
                    e.send({"mode": mode, "max_tokens": cfg.max_tokens,
                            "prompts": prompts[i * cfg.requests : (i + 1) * cfg.requests]})
                records = [r for e in edges[:c] for r in e.recv()["records"]]
                wall = time.perf_counter() - t0
                text1, cpu1 = cloud.metrics_text(), cpu_seconds(cloud.proc.pid)
                before, after = cf.parse_metrics(text0), cf.parse_metrics(text1)
                delta = {k: v - before.get(k, 0.0) for k, v in after.items()}
                cpu = None if cpu0 is None or cpu1 is None else cpu1 - cpu0
                figs = cf.phase_figures(records, wall, delta, cpu)
                advice0, advice = (cf.histogram_buckets(t, "tandem_advised_gamma") for t in (text0, text1))
                figs["advised_gamma_buckets"] = cf.bucket_counts(advice0, advice) if advice else None
                outputs[mode] = [r["tokens"] for r in records]  # prompt j's output at j: edges in order
                if table is not None:
                    figs["outputs_match_table"] = all(
                        o == table.outputs[j][: cfg.max_tokens] for j, o in enumerate(outputs[mode]))
                phases.append({"clients": c, "mode": mode, **figs})
                console.print(f"  {c:>2} client(s), {mode:<5}: {figs['aggregate_tokens_per_s']:.1f} tok/s "
                              f"aggregate, p99 TPOT {figs['tpot_p99_ms']:.1f} ms", style="dim")
            same = all(o == outputs[cfg.modes[0]] for o in outputs.values())
            for ph in phases[-len(cfg.modes):]:
                ph["outputs_identical"] = same
    finally:
        for e in edges:
            e.ask_to_quit()
        deadline = time.monotonic() + 15
        for e in edges:
            e.stop(deadline)
        cloud.stop()
    cf.compare_modes(phases)
    cf.print_table(phases, console)
    goal_list = cf.goals(phases)
    for g in goal_list:
        console.print(cf.goal_line(g))
    if table is not None and not all(p.get("outputs_match_table", True) for p in phases):
        console.print("the cloud's outputs differ from the replay table's: replay edges drafted off the table there",
                      style="red")
    report = {
        "settings": {**cfg.__dict__, "clients": list(cfg.clients), "modes": list(cfg.modes)},
        "machine": {"platform": platform.platform(), "python": platform.python_version(), "torch": torch.__version__,
                    "cpu_cores": os.cpu_count()},
        "note": NOTE_REPLAY if cfg.edges == "replay" else NOTE_SHARED_CORES, "replay": replay, "phases": phases,
        "ratios": {str(c): {p["mode"]: p["aggregate_vs_cloud"] for p in phases if p["clients"] == c}
                   for c in cfg.clients},
        "goals": goal_list}
    (out_dir / "capacity.json").write_text(json.dumps(report, indent=2) + "\n")
    where = (f"{cfg.edges} edges (draft step {table.draft_step_s * 1e3:.2f} ms)" if table is not None
             else f"real edges sharing {os.cpu_count()} cores")
    cf.plot_capacity(phases, out_dir / "capacity.png", cfg.clients,
                     f"tandem bench capacity: {cfg.target} / {cfg.draft}, spec gamma {cfg.gamma}, auto up to "
                     f"{cfg.max_gamma}, {cfg.max_tokens} tokens, cloud {cfg.cloud_threads} thread(s), {where}")
    console.print(f"wrote {out_dir / 'capacity.json'} and {out_dir / 'capacity.png'}")
    return report


if __name__ == "__main__":  # an edge process (`EdgeProcess`): `worker_main`'s arguments as one JSON argument
    worker_main(**json.loads(sys.argv[1]), inp=sys.stdin, out=sys.stdout)
