"""`tandem bench load`: sustained load through the real edge client; does the cloud keep serving, losslessly?

N sessions, each a thread here with its own edge decoder (threads: N processes would each load torch and the draft
and crowd out the cloud), loop over the trace's prompts, every output checked against the cloud's own greedy one, while
a sampler reads the cloud's /metrics and memory. What `load.json` holds: docs/reliability.md ("Sustained load").
"""

from __future__ import annotations

import itertools
import json
import logging
import os
import platform
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from tandem.config import DEFAULT_DRAFT, DEFAULT_TARGET
from tandem_tools.bench_common import common_prefix, fmt, parse_metrics
from tandem_tools.figures import percentiles
from tandem_tools.procs import CloudProcess
from tandem_tools.replay_summary import CODE_TRACE, load_trace

log = logging.getLogger(__name__)
DEFAULT_TRACE = CODE_TRACE


@dataclass
class LoadConfig:
    sessions: int = 16
    duration_s: float = 300.0
    out: Path = Path("load-out")
    cloud: str | None = None  # HOST:PORT (gRPC) of a running cloud; None: start one here
    metrics_url: str | None = None  # its /metrics; with `cloud` unset, the one started here
    trace: Path = DEFAULT_TRACE
    prompts: int = 12  # distinct prompts (the trace's first ones); a reference output is computed for each
    prompt_tokens: int | None = None  # keep at most the last N tokens of each prompt
    max_tokens: int | None = None  # per request; None: the trace's
    target: str = DEFAULT_TARGET
    draft: str = DEFAULT_DRAFT
    transport: str = "grpc"
    gamma: int | str = "adaptive"
    mode: str = "auto"  # the edge's: auto follows the cloud's load-aware advice; spec speculates whatever the load
    timeout_s: float = 30.0
    retries: int = 5
    edge_threads: int = 1
    cloud_threads: int = 1
    sample_s: float = 5.0
    # excluded from the memory slope; None: until every session has finished a request, and at least a third of
    # the run (at most 120 s)
    warmup_s: float | None = None
    drain_s: float = 30.0  # after the end, how long the cloud has to show 0 open sessions
    api_key: str | None = None
    cloud_env: dict[str, str] = field(default_factory=dict)  # TANDEM_* settings of a cloud started here


@dataclass
class RequestRecord:
    session: int
    prompt_index: int
    start_s: float  # since the load began
    e2e_s: float = 0.0
    ttft_s: float | None = None
    tpot_s: float | None = None
    tokens: int = 0
    resumes: int = 0
    acceptance: float | None = None
    matches: bool = False  # streamed and returned tokens both equal the reference
    lost_tokens: int = 0  # reference tokens missing or wrong from the first difference on
    duplicated_tokens: int = 0  # tokens beyond the reference, or streamed twice
    error: str | None = None


@dataclass
class Sample:
    t_s: float
    requests_done: int
    failures: int
    tokens: int  # client side, completed requests
    tokens_per_s: float  # over the last interval, tokens of requests completed in it
    open_sessions: float | None
    rss_mib: float | None
    evicted: float | None  # sessions closed by TTL since the start
    cloud_tokens: float | None  # tandem_generation_tokens_total


# --- pure figures (tested on hand-made numbers)


def slope(ts: Sequence[float], ys: Sequence[float]) -> tuple[float | None, float | None]:
    """Least-squares slope of ys over ts and its standard error (a slope within about two of it is indistinguishable
    from flat); None for fewer than two distinct times (the error: three)."""
    n = len(ts)
    mt, my = (sum(ts) / n, sum(ys) / n) if n else (0.0, 0.0)
    var = sum((t - mt) ** 2 for t in ts)
    if n < 2 or var == 0:
        return None, None
    b = sum((t - mt) * (y - my) for t, y in zip(ts, ys, strict=True)) / var
    if n < 3:
        return b, None
    residual = sum((y - my - b * (t - mt)) ** 2 for t, y in zip(ts, ys, strict=True)) / (n - 2)
    return b, (residual / var) ** 0.5


def compare(out: list[int], reference: list[int]) -> tuple[int, int]:
    """(lost, duplicated): reference tokens missing or wrong from the first difference on; tokens beyond it."""
    common = common_prefix(out, reference)
    return len(reference) - common, max(0, len(out) - len(reference)) if common == len(reference) else 0


def vm_rss_mib(pid: int) -> float | None:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    except (OSError, ValueError):
        pass
    return None


def summarize(records: Sequence[RequestRecord], samples: Sequence[Sample], wall_s: float,
              warmup_s: float) -> dict[str, Any]:
    """Throughput is over the run's wall time: the load, then the requests in flight run to their end."""
    ok = [r for r in records if r.error is None]
    after = [(s.t_s / 60, s.rss_mib) for s in samples if s.t_s >= warmup_s and s.rss_mib is not None]
    rss = [s.rss_mib for s in samples if s.rss_mib is not None]
    mem_slope, mem_stderr = slope([t for t, _ in after], [y for _, y in after])
    evicted = [s.evicted for s in samples if s.evicted is not None]
    return {
        "requests": len(records), "failed": len(records) - len(ok),
        "mismatched": sum(not r.matches for r in ok),
        "lost_tokens": sum(r.lost_tokens for r in ok), "duplicated_tokens": sum(r.duplicated_tokens for r in ok),
        "tokens": sum(r.tokens for r in ok), "resumes": sum(r.resumes for r in records),
        "tokens_per_s": sum(r.tokens for r in ok) / wall_s if wall_s > 0 else 0.0,
        "requests_per_s": len(ok) / wall_s if wall_s > 0 else 0.0,
        "e2e_s": percentiles([r.e2e_s for r in ok]), "ttft_ms": percentiles(
            [r.ttft_s for r in ok if r.ttft_s is not None], 1e3),
        "tpot_ms": percentiles([r.tpot_s for r in ok if r.tpot_s is not None], 1e3),
        "acceptance_mean": (sum(a) / len(a)) if (a := [r.acceptance for r in ok if r.acceptance is not None])
        else None,
        "rss_mib": {"first": rss[0] if rss else None, "max": max(rss, default=None), "last": rss[-1] if rss else None},
        "memory_slope_mib_per_min": mem_slope, "memory_slope_stderr": mem_stderr,
        "memory_slope_samples": len(after), "warmup_s": warmup_s,
        "evicted": (evicted[-1] - evicted[0]) if evicted else None,
        "errors": sorted({r.error for r in records if r.error})[:10]}


# --- the run


@dataclass
class _Cloud:
    """What the sampler reads: the cloud's /metrics and, for a cloud started here, /proc."""

    metrics_url: str | None
    pid: int | None

    def scrape(self) -> dict[str, float]:
        if self.metrics_url is None:
            return {}
        try:
            with urllib.request.urlopen(self.metrics_url, timeout=5) as r:
                return parse_metrics(r.read().decode())
        except (urllib.error.URLError, OSError) as e:
            log.warning("could not read %s: %s", self.metrics_url, e)
            return {}

    def rss_mib(self, metrics: dict[str, float]) -> float | None:
        if self.pid is not None:
            return vm_rss_mib(self.pid)
        value = metrics.get("process_resident_memory_bytes")
        return None if value is None else value / 2**20


def _edge_settings(cfg: LoadConfig, address: str, mode: str = "spec") -> Any:
    """Validated from the run's plain strings (a bad mode or transport fails here, clearly)."""
    from edge_client.settings import EdgeSettings

    return EdgeSettings.model_validate(dict(
        cloud=address, transport=cfg.transport, mode=mode, draft=cfg.draft, gamma=cfg.gamma, threads=cfg.edge_threads,
        timeout_s=cfg.timeout_s, retries=cfg.retries, api_key=cfg.api_key))


def _prompts(cfg: LoadConfig, tokenizer: Any) -> tuple[list[list[int]], list[int]]:
    rows = load_trace(cfg.trace, cfg.prompts)
    ids = [r.ids(tokenizer) for r in rows]
    if cfg.prompt_tokens is not None:
        ids = [p[-cfg.prompt_tokens:] for p in ids]
    return ids, [int(cfg.max_tokens or r.max_tokens) for r in rows]


def _one(client: Any, session: int, index: int, ids: list[int], max_tokens: int, reference: list[int],
         t_ref: float) -> RequestRecord:
    from tandem.sampling import SamplingParams

    t0 = time.perf_counter()
    rec = RequestRecord(session, index, t0 - t_ref)
    streamed: list[int] = []
    arrivals: list[float] = []

    def on_tokens(new: list[int]) -> None:
        streamed.extend(new)
        arrivals.append(time.perf_counter())

    try:
        result = client.generate(ids, SamplingParams(max_tokens=max_tokens), on_tokens=on_tokens)
    except Exception as e:  # every failure is a figure of the run
        rec.e2e_s = time.perf_counter() - t0
        rec.error = f"{type(e).__name__}: {e}"
        return rec
    rec.e2e_s = time.perf_counter() - t0
    rec.tokens = len(result.tokens)
    rec.ttft_s = arrivals[0] - t0 if arrivals else None
    if rec.ttft_s is not None and rec.tokens > 1:
        rec.tpot_s = (rec.e2e_s - rec.ttft_s) / (rec.tokens - 1)
    s = result.stats
    rec.resumes = s.resumes
    rec.acceptance = s.accepted / s.drafted if s.drafted else None
    rec.matches = streamed == result.tokens == reference
    rec.lost_tokens, rec.duplicated_tokens = map(max, compare(streamed, reference), compare(result.tokens, reference))
    return rec


def run_load(cfg: LoadConfig, echo: Callable[[str], None] = print) -> dict[str, Any]:
    # transports load here, not at import: the core stays transport-free
    import torch

    from edge_client.client import edge_decoder
    from tandem.models import load_model

    torch.set_num_threads(cfg.edge_threads)
    cfg.out.mkdir(parents=True, exist_ok=True)
    if cfg.cloud is not None:
        return _run(cfg, cfg.cloud, _Cloud(cfg.metrics_url, None), False, load_model(cfg.draft), edge_decoder, echo)
    env = {"TANDEM_TARGET": cfg.target, "TANDEM_MAX_SESSIONS": str(max(64, 2 * cfg.sessions)),
           "TANDEM_MAX_CONCURRENT_REQUESTS": str(max(64, 4 * cfg.sessions))} | cfg.cloud_env
    echo(f"starting the cloud ({cfg.target}, {cfg.cloud_threads} torch thread(s), its own process) ...")
    with CloudProcess(threads=cfg.cloud_threads, env=env, log_path=cfg.out / "cloud.log") as proc:
        address = proc.http_url if cfg.transport == "http" else proc.grpc_target
        cloud = _Cloud(cfg.metrics_url or proc.http_url + "/metrics", proc.proc.pid if proc.proc else None)
        return _run(cfg, address, cloud, True, load_model(cfg.draft), edge_decoder, echo)


def _run(cfg: LoadConfig, address: str, cloud: _Cloud, started_here: bool, draft: Any, edge_client: Any,
         echo: Callable[[str], None]) -> dict[str, Any]:
    import torch

    prompts, max_tokens = _prompts(cfg, draft.tokenizer)
    echo(f"tandem bench load: {cfg.sessions} sessions for {cfg.duration_s:g} s against {address} "
         f"({cfg.transport}); {len(prompts)} prompts, greedy; edge: one thread per session in this process, torch "
         f"threads {torch.get_num_threads()}; cloud: {cfg.cloud_threads if started_here else 'its own'} torch "
         f"thread(s); metrics from {cloud.metrics_url or 'nowhere (no --metrics)'}")
    echo("computing the reference outputs (the cloud alone, greedy) ...")
    ref_client = edge_client(_edge_settings(cfg, address, mode="cloud"), draft)
    from tandem.sampling import SamplingParams

    references = [ref_client.generate(ids, SamplingParams(max_tokens=n)).tokens
                  for ids, n in zip(prompts, max_tokens, strict=True)]

    records: list[RequestRecord] = []
    samples: list[Sample] = []
    lock = threading.Lock()
    stop = threading.Event()
    t_ref = time.perf_counter()
    evicted0 = cloud.scrape().get('tandem_sessions_closed_total{reason="expired"}', 0.0)

    def session(i: int) -> None:
        client = edge_client(_edge_settings(cfg, address, cfg.mode), draft)
        for k in itertools.takewhile(lambda _: not stop.is_set(), itertools.count(i)):
            index = k % len(prompts)
            rec = _one(client, i, index, prompts[index], max_tokens[index], references[index], t_ref)
            with lock:
                records.append(rec)

    def sample() -> None:
        last_t, last_tokens = 0.0, 0
        while True:
            m = cloud.scrape()
            t = time.perf_counter() - t_ref
            with lock:
                done = list(records)
            tokens = sum(r.tokens for r in done if r.error is None)
            s = Sample(t, len(done), sum(r.error is not None for r in done), tokens,
                       (tokens - last_tokens) / (t - last_t) if t > last_t else 0.0,
                       m.get("tandem_open_sessions"), cloud.rss_mib(m),
                       None if not m else m.get('tandem_sessions_closed_total{reason="expired"}', 0.0) - evicted0,
                       m.get("tandem_generation_tokens_total"))
            samples.append(s)
            echo(f"  t={t:6.1f}s  requests {s.requests_done:5d}  failed {s.failures}  {s.tokens_per_s:7.1f} tok/s  "
                 f"open sessions {s.open_sessions}  cloud RSS "
                 f"{'?' if s.rss_mib is None else f'{s.rss_mib:.1f}'} MiB")
            last_t, last_tokens = t, tokens
            if stop.wait(cfg.sample_s):
                return

    sampler = threading.Thread(target=sample, name="load-sampler", daemon=True)
    threads = [threading.Thread(target=session, args=(i,), name=f"load-{i}", daemon=True) for i in range(cfg.sessions)]
    for t in (sampler, *threads):
        t.start()
    time.sleep(cfg.duration_s)
    stop.set()
    sampler.join()
    for t in threads:  # requests in flight run to their end
        t.join(cfg.timeout_s * (cfg.retries + 2) + 60)
    stuck = sum(t.is_alive() for t in threads)
    wall = time.perf_counter() - t_ref
    # every session freed: the cloud's gauge back to 0 (a Session stream closes its session as it ends)
    deadline = time.monotonic() + cfg.drain_s
    while True:
        m = cloud.scrape()
        open_at_end = m.get("tandem_open_sessions")
        if open_at_end == 0 or time.monotonic() > deadline or not m:
            break
        time.sleep(0.5)
    warmup = cfg.warmup_s
    if warmup is None:
        firsts = [min(r.start_s + r.e2e_s for r in records if r.session == i) for i in range(cfg.sessions)
                  if any(r.session == i for r in records)]
        warmup = max([min(120.0, cfg.duration_s / 3), *firsts])
    summary = summarize(records, samples, wall, warmup)
    summary |= {"open_sessions_at_end": open_at_end, "sessions_freed": open_at_end == 0, "stuck_sessions": stuck,
                "wall_s": wall, "rss_mib_at_end": cloud.rss_mib(m)}
    results = {
        "meta": {
            "command": "tandem bench load " + " ".join(sys.argv[3:]) if sys.argv[1:3] == ["bench", "load"]
            else " ".join(sys.argv),
            "settings": {k: (str(v) if isinstance(v, Path) else v) for k, v in asdict(cfg).items()
                         if k not in ("api_key", "cloud_env")},
            "cloud": address, "started_here": started_here, "draft": draft.name,
            "threads": {"edge_torch": torch.get_num_threads(), "edge_sessions": cfg.sessions,
                        "cloud_torch": cfg.cloud_threads if started_here else None},
            "machine": {"cpu_count": os.cpu_count(), "platform": platform.platform(),
                        "python": platform.python_version(), "torch": torch.__version__},
            "time_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        },
        "summary": summary, "references": references,
        "samples": [asdict(s) for s in samples], "requests": [asdict(r) for r in records],
    }
    (cfg.out / "load.json").write_text(json.dumps(results, indent=1))
    echo(render(summary))
    echo(f"wrote {cfg.out / 'load.json'}")
    return results


def render(s: dict[str, Any]) -> str:
    f = fmt  # short: the lines below are long
    slope_v = s["memory_slope_mib_per_min"]
    return "\n".join([
        f"requests {s['requests']} ({s['failed']} failed), tokens {s['tokens']}, {f(s['tokens_per_s'])} tok/s, "
        f"{f(s['requests_per_s'], '.2f')} req/s, resumes {s['resumes']}",
        f"greedy outputs vs the cloud alone: {s['mismatched']} mismatched, {s['lost_tokens']} lost, "
        f"{s['duplicated_tokens']} duplicated tokens",
        f"latency: e2e p50/p90/p99 {f(s['e2e_s']['p50'], '.2f')}/{f(s['e2e_s']['p90'], '.2f')}/"
        f"{f(s['e2e_s']['p99'], '.2f')} s; TTFT p50/p99 {f(s['ttft_ms']['p50'], '.0f')}/{f(s['ttft_ms']['p99'], '.0f')}"
        f" ms; TPOT p50/p99 {f(s['tpot_ms']['p50'])}/{f(s['tpot_ms']['p99'])} ms",
        f"cloud RSS first/max/last {f(s['rss_mib']['first'])}/{f(s['rss_mib']['max'])}/{f(s['rss_mib']['last'])} "
        f"MiB, after the drain {f(s.get('rss_mib_at_end'))} MiB; slope after {s['warmup_s']:.0f} s warm-up "
        f"{f(slope_v, '+.2f')} +- {f(s['memory_slope_stderr'], '.2f')} MiB/min ({s['memory_slope_samples']} samples)",
        f"sessions evicted {f(s['evicted'], '.0f')}; open sessions at the end {f(s['open_sessions_at_end'], '.0f')} "
        f"({'all freed' if s['sessions_freed'] else 'NOT all freed'}); stuck session threads {s['stuck_sessions']}",
    ])
