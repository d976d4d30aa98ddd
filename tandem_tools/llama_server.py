"""llama.cpp's llama-server, the peer tandem is measured against in the same run (`bench local`, `bench replay`).

Mode `llama-server` is the target GGUF alone, `llama-server-spec` adds the draft GGUF (`-md`, `SpecSettings`); the
server runs from the `xllamacpp` wheel (`tandem_tools.llama_peer`), or `TANDEM_LLAMA_SERVER`'s binary. Same GGUF files,
threads and prompt ids as tandem, greedy, no prompt cache: docs/llama-cpp.md. Timed: the request's wall time here
(prefill + decode + loopback HTTP), beside the server's own `timings`.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import shlex
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from tandem_tools import llama_peer
from tandem_tools.bench_common import common_prefix, fmt
from tandem_tools.procs import free_port, http_ok, popen_logged, stop_process, wait_ready

VERSION = llama_peer.VERSION  # the xllamacpp wheel the peer runs by default
BASE, SPEC = "llama-server", "llama-server-spec"
MODES = (BASE, SPEC)
peer_program, describe_peer = llama_peer.program, llama_peer.describe


def gguf_file(model: str) -> Path:
    """The GGUF file behind a model name tandem loads (a shipped short name, or a .gguf path); ValueError if none."""
    from tandem import gguf

    if gguf.is_shipped(model):
        return gguf.shipped_path(model)
    if model.endswith(".gguf") and Path(model).is_file():
        return Path(model)
    raise ValueError(f"{model} is not a GGUF model (llama-server needs one)")


@dataclass(frozen=True)
class SpecSettings:
    """llama-server-spec's drafting: up to 16 tokens a round, cut where the draft's top probability is below 0.75
    (llama.cpp's long-standing server defaults for a draft model, not tandem's gamma: each side as tuned by its own
    authors). `TANDEM_LLAMA_SERVER_ARGS` appends arguments to both servers (a later flag wins)."""

    n_max: int = 16
    n_min: int = 1
    p_min: float = 0.75

    def args(self) -> list[str]:
        return ["--spec-type", "draft-simple", "--spec-draft-n-max", str(self.n_max),
                "--spec-draft-n-min", str(self.n_min), "--spec-draft-p-min", str(self.p_min)]


def server_command(program: Path | Sequence[str], model: Path, port: int, threads: int, ctx: int,
                   draft: Path | None = None, draft_threads: int | None = None, spec: SpecSettings = SpecSettings(),
                   extra: Sequence[str] = ()) -> list[str]:
    """llama-server's command line after `program` (a binary, or `peer_program()`'s): one slot, `threads` for
    decoding and for prefill (-t, -tb); the draft's likewise (-td, -tbd)."""
    head = [str(program)] if isinstance(program, Path) else list(program)
    cmd = [*head, "-m", str(model), "--host", "127.0.0.1", "--port", str(port), "-t", str(threads),
           "-tb", str(threads), "-c", str(ctx), "-np", "1", "--cache-ram", "0", "--no-webui"]
    if draft is not None:
        dt = str(draft_threads or threads)
        cmd += ["-md", str(draft), "-td", dt, "-tbd", dt, *spec.args()]
    return cmd + list(extra)


def completion_request(prompt: Sequence[int], max_tokens: int, temperature: float = 0.0, seed: int | None = None,
                       ignore_eos: bool = False, stream: bool = False) -> dict[str, Any]:
    """The `/completion` body: prompt token ids as given (no BOS added, no template), the ids back."""
    body: dict[str, Any] = {"prompt": list(prompt), "n_predict": max_tokens, "cache_prompt": False,
                            "return_tokens": True, "stream": stream, "ignore_eos": ignore_eos}
    body |= ({"temperature": 0.0, "top_k": 1, "samplers": ["top_k"]} if temperature <= 0
             else {"temperature": temperature})
    if seed is not None:
        body["seed"] = seed
    return body


@dataclass
class PeerResult:
    """One completion: the tokens, the wall time here, the server's timings."""

    tokens: list[int]
    wall_s: float
    prompt_n: int = 0
    prompt_ms: float = 0.0
    predicted_n: int = 0
    predicted_ms: float = 0.0
    predicted_per_token_ms: float = 0.0  # the server's: per decode step (the first token comes with the prefill)
    draft_n: int = 0
    draft_n_accepted: int = 0
    stop_type: str | None = None
    arrivals_s: list[float] = field(default_factory=list)  # streamed: when each token arrived, since the request


def parse_completion(body: dict[str, Any], wall_s: float, tokens: list[int] | None = None,
                     arrivals_s: list[float] | None = None) -> PeerResult:
    """A final `/completion` answer; `tokens`: those streamed before it (a streamed final answer holds none)."""
    if "error" in body:
        raise RuntimeError(f"llama-server: {body['error']}")
    t = body.get("timings") or {}
    out = list(tokens or []) + [int(x) for x in body.get("tokens") or []]
    return PeerResult(out, wall_s, int(t.get("prompt_n", 0)), float(t.get("prompt_ms", 0.0)),
                      int(t.get("predicted_n", 0)), float(t.get("predicted_ms", 0.0)),
                      float(t.get("predicted_per_token_ms", 0.0)), int(t.get("draft_n", 0)),
                      int(t.get("draft_n_accepted", 0)), body.get("stop_type"), list(arrivals_s or []))


class LlamaServer:
    """llama-server as a child process on a free loopback port; `start` waits for `/health`, `stop` ends it
    (SIGTERM, then SIGKILL after `stop_timeout_s`)."""

    def __init__(self, command: list[str], port: int, log_path: Path | None = None, ready_timeout_s: float = 300.0,
                 request_timeout_s: float = 900.0) -> None:
        self.command, self.port, self.log_path = command, port, log_path
        self.ready_timeout_s, self.request_timeout_s = ready_timeout_s, request_timeout_s
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> LlamaServer:
        self.proc = popen_logged(self.command, self.log_path, stdin=subprocess.DEVNULL)
        wait_ready(self.proc, self.healthy, self.ready_timeout_s, "llama-server", self.stop,
                   f" (log: {self.log_path})" if self.log_path else "")
        return self

    def healthy(self) -> bool:
        return http_ok(self.url + "/health", timeout=2)

    def props(self) -> dict[str, Any]:
        try:
            with urllib.request.urlopen(self.url + "/props", timeout=10) as r:
                return dict(json.loads(r.read()))
        except (urllib.error.URLError, OSError, ValueError):
            return {}

    def complete(self, prompt: Sequence[int], max_tokens: int, temperature: float = 0.0, seed: int | None = None,
                 ignore_eos: bool = False, stream: bool = False) -> PeerResult:
        body = completion_request(prompt, max_tokens, temperature, seed, ignore_eos, stream)
        req = urllib.request.Request(self.url + "/completion", json.dumps(body).encode(),
                                     {"Content-Type": "application/json"})
        t0 = time.perf_counter()
        try:
            with urllib.request.urlopen(req, timeout=self.request_timeout_s) as r:
                if not stream:
                    return parse_completion(json.loads(r.read()), time.perf_counter() - t0)
                tokens: list[int] = []
                arrivals: list[float] = []
                for raw in r:  # server-sent events: "data: {...}" lines, the last one with "stop": true
                    line = raw.decode().strip()
                    if not line.startswith("data:"):
                        continue
                    chunk = json.loads(line[5:])
                    if chunk.get("stop") or "error" in chunk:
                        return parse_completion(chunk, time.perf_counter() - t0, tokens, arrivals)
                    new = [int(x) for x in chunk.get("tokens") or []]
                    if new:
                        tokens += new
                        arrivals += [time.perf_counter() - t0] * len(new)
                raise RuntimeError("llama-server: the stream ended without a final answer")
        except urllib.error.HTTPError as e:
            raise RuntimeError(f"llama-server: HTTP {e.code}: {e.read()[:500]!r}") from e

    def stop(self, stop_timeout_s: float = 10.0) -> None:
        stop_process(self.proc, timeout_s=stop_timeout_s)

    def __enter__(self) -> LlamaServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def context_size(prompts: Sequence[Sequence[int]], max_tokens: int, spec: SpecSettings = SpecSettings()) -> int:
    """Room for the longest prompt, its output and a draft overshoot, rounded up to 256."""
    need = max((len(p) for p in prompts), default=0) + max_tokens + spec.n_max + 16
    return -(-need // 256) * 256


class Peers:
    """The llama-server peers a bench asked for: resolved here (a mode whose server or GGUF file cannot be had is
    skipped, the reason in `skipped`), started together on entering, stopped together on leaving."""

    def __init__(self, modes: Sequence[str], target: str, draft: str, threads: int, ctx: int,
                 draft_threads: int | None = None, log_dir: Path | None = None, spec: SpecSettings = SpecSettings(),
                 warn: Callable[[str], object] = lambda msg: None) -> None:
        self.servers: dict[str, LlamaServer] = {}
        self.skipped: dict[str, str] = {}
        self.results: dict[str, list[PeerResult]] = {}
        self.prefix: dict[str, list[tuple[int, int]]] = {}  # per prompt: tokens equal before the first divergence
        self.spec_equal: list[bool] = []  # per prompt both ran: llama-server-spec's output == llama-server's
        self.info: dict[str, Any] = {"version": VERSION, "spec": asdict(spec), "threads": threads,
                                     "draft_threads": draft_threads or threads, "ctx": ctx, "modes": {}}
        self.modes = [m for m in MODES if m in modes]
        program, reason = peer_program() if self.modes else (None, "")
        try:
            files = (gguf_file(target), gguf_file(draft)) if program else None
        except (ValueError, OSError, RuntimeError) as e:
            files, reason = None, str(e)
        if program is None or files is None:
            for m in self.modes:
                self.skipped[m] = reason
                warn(f"mode {m} skipped: {reason}")
            self.modes = []
            return
        self.info["peer"] = describe_peer(program)
        extra = shlex.split(os.environ.get("TANDEM_LLAMA_SERVER_ARGS", ""))
        for m in self.modes:
            port = free_port()
            cmd = server_command(program, files[0], port, threads, ctx, files[1] if m == SPEC else None,
                                 draft_threads, spec, extra)
            self.servers[m] = LlamaServer(cmd, port, log_dir / f"{m}.log" if log_dir else None)
            self.info["modes"][m] = {"command": shlex.join(cmd)}

    def start(self) -> Peers:
        try:
            for m, server in self.servers.items():
                server.start()
                server.complete(list(range(100, 116)), 4)  # warm-up, not timed
                self.info["modes"][m]["build_info"] = server.props().get("build_info")
        except BaseException:
            self.stop()
            raise
        return self

    def run(self, mode: str, prompt: Sequence[int], max_tokens: int, temperature: float = 0.0,
            seed: int | None = None, ignore_eos: bool = False, stream: bool = False) -> PeerResult:
        res = self.servers[mode].complete(prompt, max_tokens, temperature, seed, ignore_eos, stream)
        self.results.setdefault(mode, []).append(res)
        return res

    def runners(self, max_tokens: int, ignore_eos: bool) -> dict[str, Callable[[list[int]], tuple[list[int], float,
                                                                                                   dict[str, Any]]]]:
        """`bench local`'s runners: a prompt's tokens, wall time and counters."""
        def one(mode: str, prompt: list[int]) -> tuple[list[int], float, dict[str, Any]]:
            r = self.run(mode, prompt, max_tokens, ignore_eos=ignore_eos)  # counters as `ModeFigures.add` reads them
            return r.tokens, r.wall_s, {"drafted": r.draft_n, "accepted": r.draft_n_accepted}
        return {m: functools.partial(one, m) for m in self.modes}

    def compare(self, outputs: dict[str, list[int]], reference: str) -> None:
        """After a greedy prompt: how far each peer's output agrees with `reference`'s (tandem's target alone), and
        whether llama-server-spec's equals llama-server's (its own target alone)."""
        ref = outputs.get(reference)
        for m in self.servers:
            if ref is not None and m in outputs:
                self.prefix.setdefault(m, []).append((common_prefix(outputs[m], ref), len(ref)))
        if BASE in outputs and SPEC in outputs:
            self.spec_equal.append(outputs[SPEC] == outputs[BASE])

    def figures(self, mode: str) -> dict[str, Any]:
        """The server's own timings over the run: prefill, decode-only rate, drafting, agreement with the target."""
        rs, pre = self.results.get(mode, []), self.prefix.get(mode, [])
        n, ms = sum(r.predicted_n for r in rs), sum(r.predicted_ms for r in rs)
        return {
            "server_prompt_ms": sum(r.prompt_ms for r in rs), "server_prompt_tokens": sum(r.prompt_n for r in rs),
            "server_decode_tokens_per_s": n / ms * 1e3 if ms else None,
            "server_drafted": sum(r.draft_n for r in rs), "server_draft_accepted": sum(r.draft_n_accepted for r in rs),
            "equal_prefix_tokens": sum(p for p, _ in pre), "reference_tokens": sum(t for _, t in pre),
            **({"greedy_equal_to_llama_server": f"{sum(self.spec_equal)}/{len(self.spec_equal)}"}
               if mode == SPEC and self.spec_equal else {})}

    def stop(self) -> None:
        for s in self.servers.values():
            s.stop()

    def __enter__(self) -> Peers:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def local_report(peers: Peers, results: dict[str, dict[str, Any]]) -> list[str]:
    """`bench local`: the peers' own timings and agreement with the target alone (into `results` too), how often
    each side's speculation equals its own target alone, and each mode's tok/s over llama-server alone's
    (`vs_llama_server`)."""
    lines: list[str] = []
    for m in peers.modes:
        f = peers.figures(m)
        results[m] |= f
        lines.append(f"{m}: server-side decode {fmt(f['server_decode_tokens_per_s'])} tok/s (prefill "
                     f"{f['server_prompt_ms']:.0f} ms for {f['server_prompt_tokens']} prompt tokens in all); output "
                     f"== target alone {results[m]['greedy_equal_to_target']}, first "
                     f"{f['equal_prefix_tokens']}/{f['reference_tokens']} tokens equal before divergence "
                     "(Q4_K_M computed by llama.cpp vs dequantised weights in torch)")
    if SPEC in results and "greedy_equal_to_llama_server" in results[SPEC]:
        ours = ", ".join(f"{m} {d['greedy_equal_to_target']}" for m, d in results.items()
                         if m not in (*MODES, "ar", "ar-eager"))
        lines.append(f"speculation's greedy output == its own target alone: {SPEC} == {BASE} "
                     f"{results[SPEC]['greedy_equal_to_llama_server']} (llama.cpp's is not bit-exact)"
                     + (f"; tandem's == ar: {ours}" if ours else ""))
    if BASE in peers.modes:  # the table shows it too
        base = float(results[BASE]["tokens_per_s"]) or 1e-9
        for d in results.values():
            d["vs_llama_server"] = float(d["tokens_per_s"]) / base
    return lines


# --- bench replay: the peers once per prompt, beside every RTT's rows


@dataclass
class PeerRecord:
    mode: str
    prompt_index: int
    prompt_tokens: int
    max_tokens: int
    tokens: int = 0
    e2e_s: float = 0.0
    ttft_s: float | None = None  # the first streamed token's arrival
    tpot_s: float | None = None  # (e2e - ttft) / (tokens - 1)
    prompt_ms: float = 0.0
    predicted_ms: float = 0.0
    predicted_n: int = 0
    drafted: int = 0
    accepted: int = 0
    stop_type: str | None = None
    output_sha: str = ""
    error: str | None = None


def replay_record(peers: Peers, mode: str, index: int, ids: Sequence[int], row: Any) -> PeerRecord:
    """One trace row through a peer, streamed (TTFT as the edge client sees it). Rows with an output constraint are
    not sent (recorded as skipped): the peer's grammar engine is not tandem's."""
    rec = PeerRecord(mode, index, len(ids), row.max_tokens)
    if row.response_format is not None or row.structured_outputs is not None:
        rec.error = "skipped: constrained output"
        return rec
    try:
        r = peers.run(mode, ids, row.max_tokens, row.temperature, row.seed, stream=True)
    except (RuntimeError, OSError) as e:
        rec.error = str(e)
        return rec
    rec.tokens, rec.e2e_s, rec.stop_type = len(r.tokens), r.wall_s, r.stop_type
    rec.ttft_s = r.arrivals_s[0] if r.arrivals_s else None
    if rec.ttft_s is not None and rec.tokens > 1:
        rec.tpot_s = (rec.e2e_s - rec.ttft_s) / (rec.tokens - 1)
    rec.prompt_ms, rec.predicted_ms, rec.predicted_n = r.prompt_ms, r.predicted_ms, r.predicted_n
    rec.drafted, rec.accepted = r.draft_n, r.draft_n_accepted
    rec.output_sha = hashlib.sha256(json.dumps(r.tokens).encode()).hexdigest()[:16]
    return rec
