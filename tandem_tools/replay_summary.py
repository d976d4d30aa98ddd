"""`tandem bench replay`'s records and what is made of them: the trace, per-request records, per mode x RTT summaries,
the greedy-equality check, the per-kind table and `summary.md`."""

from __future__ import annotations

import itertools
import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tandem_tools.bench_common import fmt as _f
from tandem_tools.figures import percentile, percentiles

MODES = ("cloud", "spec", "spec-pipelined", "spec-p-min", "spec-chain", "spec-pool", "auto")
FREE = "/free"  # a mode's twin that drops each request's response_format (`bench replay --free-twins`)
LOSSLESS = frozenset(MODES)  # every replay mode gives the target's own output (edge, the lossy one, is not offered)


# --- the trace


@dataclass(frozen=True)
class TraceRow:
    """A request: a `prompt` to complete, or chat `messages` (the model's chat template makes the prompt)."""

    prompt: str
    max_tokens: int
    temperature: float = 0.0
    seed: int | None = None
    arrival_s: float | None = None
    messages: tuple[dict[str, str], ...] | None = None
    response_format: dict[str, Any] | None = None  # OpenAI's: a json_object or json_schema the output must follow
    structured_outputs: dict[str, Any] | None = None  # or vLLM's: json, regex, grammar or choice
    kind: str | None = None  # the sort of request (writing, math, ...): `bench replay`'s per-kind table

    def grammar(self) -> Any:
        """The row's output constraint as a core `Grammar` (None: free text)."""
        from tandem_protocol.openai_api.params import constraint
        from tandem_protocol.openai_api.schemas import ResponseFormat, StructuredOutputs

        rf, so = self.response_format, self.structured_outputs
        return constraint(None if rf is None else ResponseFormat.model_validate(rf),
                          None if so is None else StructuredOutputs.model_validate(so))

    def ids(self, tokenizer: Any) -> list[int]:
        from tandem_protocol.openai_api.text import chat_prompt, encode

        if self.messages is not None:
            return chat_prompt(tokenizer, [dict(m) for m in self.messages])
        return encode(tokenizer, self.prompt)


TRACES = Path(__file__).resolve().parent.parent / "benchmarks" / "traces"
CHAT_TRACE, CODE_TRACE = TRACES / "chat.jsonl", TRACES / "code-completion.jsonl"


def load_trace(path: Path, limit: int | None = None) -> list[TraceRow]:
    rows: list[TraceRow] = []
    for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        d = json.loads(line)
        messages = d.get("messages")
        chat = isinstance(messages, list) and messages and all(
            isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)
            for m in messages)
        if not (isinstance(d.get("prompt"), str) or chat) or not isinstance(d.get("max_tokens"), int) \
                or d["max_tokens"] < 1 or not isinstance(d.get("kind", ""), str):
            raise ValueError(f"{path}:{n}: each line needs a string 'prompt' (or chat 'messages': role and content "
                             "strings) and a positive integer 'max_tokens'; a 'kind', if any, is a string")
        rows.append(TraceRow(str(d.get("prompt") or ""), d["max_tokens"], float(d.get("temperature", 0.0)),
                             d.get("seed"), None if d.get("arrival_s") is None else float(d["arrival_s"]),
                             tuple({"role": m["role"], "content": m["content"]} for m in messages) if chat else None,
                             d.get("response_format"), d.get("structured_outputs"), d.get("kind")))
        if limit is not None and len(rows) >= limit:
            break
    if not rows:
        raise ValueError(f"{path}: no requests")
    return rows


# --- the figures (pure functions, tested on hand-made numbers)


def leviathan_e(alpha: float, gamma: float) -> float:
    """Expected tokens per round, E(alpha, gamma) = (1 - alpha^(gamma+1)) / (1 - alpha) (Leviathan et al. 2023)."""
    return gamma + 1.0 if alpha >= 1.0 else (1.0 - alpha ** (gamma + 1)) / (1.0 - alpha)


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
        for mode in modes:
            # the twins (no response_format) are compared with their own cloud-only twin, and each with its twin
            ref = "cloud" + FREE if mode.endswith(FREE) else "cloud"
            cloud = {i: r for i, r in by.get((ref, rtt), {}).items() if r.error is None}
            twin = {i: r for i, r in by.get((mode + FREE, rtt), {}).items() if r.error is None}
            mine = by.get((mode, rtt), {})
            ok = [r for r in mine.values() if r.error is None]
            if not mine:
                continue
            tokens, e2e = sum(r.tokens for r in ok), sum(r.e2e_s for r in ok)
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
            rtts_seen = [r.measured_rtt_ms for r in ok if r.measured_rtt_ms is not None]
            rows.append({
                "mode": mode, "rtt_ms": rtt, "requests": len(ok), "errors": len(mine) - len(ok), "tokens": tokens,
                "ttft_ms": percentiles([r.ttft_s for r in ok if r.ttft_s is not None], 1e3),
                "tpot_ms": percentiles([r.tpot_s for r in ok if r.tpot_s is not None], 1e3),
                "itl_ms": percentiles([x for r in ok for x in r.itl_s], 1e3),
                "e2e_ms": percentiles([r.e2e_s for r in ok], 1e3),
                "tokens_per_s": tokens / e2e if e2e else None,
                "speedup_vs_cloud": _ratio(mine, cloud) if ref in modes else None,
                "vs_free_twin": _ratio(mine, twin) if twin else None,  # tok/s with the response_format / without
                # the same per output token after the first (the outputs' lengths differ: prefill weighs unlike)
                "vs_free_twin_tpot": _tpot_ratio(twin, mine) if twin else None,
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


def _ratio(mine: dict[int, RequestRecord], other: dict[int, RequestRecord]) -> float | None:
    """Tokens/s of `mine` over `other`'s, on the requests both served."""
    common = [i for i in other if i in mine and mine[i].error is None]
    rate, other_rate = _rate(mine, common), _rate(other, common)
    return rate / other_rate if rate is not None and other_rate else None


def _tpot_ratio(a: dict[int, RequestRecord], b: dict[int, RequestRecord]) -> float | None:
    """Mean TPOT of `a` over that of `b`, on the requests both served with two tokens or more."""
    common = [i for i in a if i in b and a[i].tpot_s is not None and b[i].tpot_s is not None]
    return sum(a[i].tpot_s or 0.0 for i in common) / sum(b[i].tpot_s or 0.0 for i in common) if common else None


def greedy_mismatches(records: Sequence[RequestRecord], greedy: set[int]) -> list[dict[str, Any]]:
    """Lossless modes must give identical greedy output for a prompt (at every RTT; the free twins among
    themselves): every disagreement."""
    outputs: dict[tuple[int, bool], dict[str, str]] = {}
    for r in records:
        base = r.mode.removesuffix(FREE)
        if r.error is None and r.prompt_index in greedy and base in LOSSLESS:
            key = (r.prompt_index, r.mode.endswith(FREE))
            outputs.setdefault(key, {})[f"{r.mode}@{r.rtt_ms:g}ms"] = r.output_sha
    return [{"prompt_index": i, "outputs": o} for (i, _), o in sorted(outputs.items()) if len(set(o.values())) > 1]


FLOOR = 0.95  # the per-kind goal: each edge mode at least this share of cloud-only's tok/s on every kind


def per_kind(records: Sequence[RequestRecord], kinds: Sequence[str | None], modes: Sequence[str],
             rtts: Sequence[float], greedy: set[int]) -> list[dict[str, Any]]:
    """Per mode x RTT, each kind of request (`kinds[prompt_index]`) against cloud-only at that RTT on the same
    requests: the mean time per request, tok/s over cloud-only's (as `summarize`'s speedup), tokens per target pass,
    greedy outputs equal; over the kinds, the lowest and median ratio and how many kinds reach FLOOR."""
    by: dict[tuple[str, float, str | None], dict[int, RequestRecord]] = {}
    for r in records:
        if r.error is None:
            by.setdefault((r.mode, r.rtt_ms, kinds[r.prompt_index]), {})[r.prompt_index] = r
    out: list[dict[str, Any]] = []
    for rtt, mode in itertools.product(rtts, modes):
        ref = "cloud" + FREE * mode.endswith(FREE)  # a free twin against cloud-only's twin
        rows: list[dict[str, Any]] = []
        for kind in dict.fromkeys(k for k in kinds if k):
            mine, cloud = by.get((mode, rtt, kind), {}), by.get((ref, rtt, kind), {})
            if mode == ref or not (both := [i for i in mine if i in cloud]):
                continue
            passes = sum(mine[i].target_passes for i in both)
            rows.append({"kind": kind, "requests": len(both), "vs_cloud": _ratio(mine, cloud),
                         "ms": 1e3 * sum(mine[i].e2e_s for i in both) / len(both),
                         "cloud_ms": 1e3 * sum(cloud[i].e2e_s for i in both) / len(both),
                         "tokens_per_pass": sum(mine[i].tokens for i in both) / passes if passes else None,
                         "greedy_equal": _equal(mine, cloud, greedy)[0]})
        if scored := sorted((r["vs_cloud"], r["kind"]) for r in rows if r["vs_cloud"] is not None):
            out.append({"mode": mode, "rtt_ms": rtt, "kinds": rows, "min_vs_cloud": scored[0][0],
                        "lowest_kind": scored[0][1], "median_vs_cloud": percentile([x for x, _ in scored], 50),
                        "at_or_above_floor": sum(x >= FLOOR for x, _ in scored), "kinds_compared": len(scored),
                        "floor": FLOOR})
    return out


def render_kinds(per: Sequence[dict[str, Any]]) -> list[str]:
    """`summary.md`'s per-kind section (`per_kind`); none for a trace without kinds."""
    if not per:
        return []
    lines = ["", f"## Per kind: each mode against cloud-only (goal: at least {FLOOR}x on every kind)", "",
             "| mode | RTT ms | kind | ms / request | cloud-only ms | vs cloud | tokens / target pass "
             "| greedy output == cloud-only |", "|---|---|---|---|---|---|---|---|"]
    lines += [f"| {p['mode']} | {p['rtt_ms']:g} | {k['kind']} | {k['ms']:.0f} | {k['cloud_ms']:.0f} | "
              f"{_f(k['vs_cloud'], '.2f')}x | {_f(k['tokens_per_pass'], '.2f')} | {k['greedy_equal']} |"
              for p in per for k in p["kinds"]]
    lines += [""] + [f"- **{p['mode']}**, RTT {p['rtt_ms']:g} ms: lowest {p['min_vs_cloud']:.2f}x "
                     f"({p['lowest_kind']}), median {p['median_vs_cloud']:.2f}x; {p['at_or_above_floor']}/"
                     f"{p['kinds_compared']} kinds at or above {FLOOR}x." for p in per]
    return [*lines, "- **vs cloud**: tok/s over cloud-only's on the kind's requests, same RTT, same run (with equal "
            "outputs, cloud-only's time over the mode's); **tokens / target pass**: the mode's tokens over its target "
            "passes (cloud-only: 1)."]


def render_markdown(results: dict[str, Any]) -> str:
    meta, rows = results["meta"], results["summary"]
    lines = [
        "# tandem bench replay", "",
        f"Trace `{meta['trace']}`, {meta['prompts']} requests, greedy unless the trace says otherwise; target "
        f"`{meta['target']}`, draft `{meta['draft']}`, gamma {meta['settings']['gamma']}; torch threads: edge "
        f"{meta['threads']['edge']}, cloud {meta['threads']['cloud']}; {meta['machine']['cpu']} "
        f"({meta['machine']['cpu_count']} CPUs); revision {meta['git_revision']}.", "",
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
            f"{_f(r['target_passes_per_token'], '.3f')} | {_f(r['bytes_per_token'], '.0f')} |")
    lines += [
        "", "- **tok/s**: total tokens / total end-to-end time of the mode's requests. **Speedup vs cloud**: that "
        "rate divided by cloud-only's at the same RTT, over the same prompts, measured in the same run.",
        "- **TTFT**: request start to the first token; **TPOT**: (e2e - TTFT) / (tokens - 1); **ITL**: gaps between "
        "successive deliveries (a verified block arrives at once, so speculative ITLs are per block).",
        "- **acceptance**: accepted / drafted tokens (vLLM's rate); **alpha**: accepted / (accepted + rejections), "
        "the chance that a drafted position, once reached, is accepted.",
        "- **tokens / round**: tokens per verified block, beside Leviathan's E(a, g) = (1 - a^(g+1)) / (1 - a) from "
        "the measured alpha a and mean block length g (a pipelined block sent ahead counts only its part beyond "
        "what was accepted).",
        "- Every RTT goes through the `tandem netem` proxy (RTT 0 too), so the proxy's own cost is in every figure.",
    ]
    twins = [r for r in rows if r.get("vs_free_twin") is not None]
    if twins:
        lines += ["", "Structured output (`--free-twins`): tok/s of each mode with the requests' response_format over "
                  "its twin without it (`MODE/free`), same prompts, same run; the twins' speedups are against "
                  "`cloud/free`. Per token: TPOT without over TPOT with (1: free; the outputs' lengths differ, so "
                  "tok/s also weighs the prefill unlike).", "", "| mode | RTT ms | tok/s with / without | per token |",
                  "|---|---|---|---|"]
        lines += [f"| {r['mode']} | {r['rtt_ms']:g} | {r['vs_free_twin']:.3f} | {_f(r['vs_free_twin_tpot'], '.3f')} |"
                  for r in twins]
    if meta.get("target_step_ms") is not None:
        lines.append(f"- One target step (cloud-only TPOT p50 at the lowest RTT): {meta['target_step_ms']:.1f} ms.")
    lines += [f"- **warning**: {w}" for w in results["warnings"]]
    mism = results["greedy_mismatches"]
    lines.append(f"- Greedy outputs identical across modes and RTTs: "
                 f"{'yes' if not mism else f'NO, {len(mism)} prompts differ (see results.json)'}.")
    return "\n".join(lines + render_kinds(results.get("per_kind", []))) + "\n"


# --- the peer, llama.cpp's llama-server (`tandem_tools.llama_server`): each prompt once, beside every RTT's rows

PEER_BASE = "llama-server"  # the peer alone: every ratio of this section is against it


def _rate(recs: dict[int, Any], common: Sequence[int]) -> float | None:
    e2e = sum(recs[i].e2e_s for i in common)
    return sum(recs[i].tokens for i in common) / e2e if e2e else None


def peer_summary(peer_records: Sequence[Any], records: Sequence[RequestRecord], greedy: set[int]) -> dict[str, Any]:
    """Per peer (`llama_server.PeerRecord`s): its figures, its greedy outputs equal to cloud-only's (tandem's target
    alone) and llama-server's (its own); each side's speculation against its own target alone (`speculation_equal`);
    every mode x RTT's tok/s over llama-server alone's, on the prompts both served (llama-server-spec's too)."""
    by_peer: dict[str, dict[int, Any]] = {}
    for p in peer_records:
        if p.error is None:
            by_peer.setdefault(p.mode, {})[p.prompt_index] = p
    cloud = {r.prompt_index: r.output_sha for r in records if r.mode == "cloud" and r.error is None}
    base = by_peer.get(PEER_BASE, {})
    rows = []
    for mode in dict.fromkeys(p.mode for p in peer_records):
        mine = by_peer.get(mode, {})
        ok = list(mine.values())
        compared = [p for p in ok if p.prompt_index in greedy and p.prompt_index in cloud]
        n, ms, drafted = sum(p.predicted_n for p in ok), sum(p.predicted_ms for p in ok), sum(p.drafted for p in ok)
        rows.append({
            "mode": mode, "requests": len(ok), "not_run": sum(p.mode == mode and p.error is not None
                                                              for p in peer_records),
            "tokens": sum(p.tokens for p in ok), "tokens_per_s": _rate(mine, list(mine)),
            "ttft_ms": percentiles([p.ttft_s for p in ok if p.ttft_s is not None], 1e3),
            "tpot_ms": percentiles([p.tpot_s for p in ok if p.tpot_s is not None], 1e3),
            "e2e_ms": percentiles([p.e2e_s for p in ok], 1e3),
            "server_decode_tokens_per_s": n / ms * 1e3 if ms else None,
            "acceptance_rate": sum(p.accepted for p in ok) / drafted if drafted else None,
            "equal_to_cloud": f"{sum(cloud[p.prompt_index] == p.output_sha for p in compared)}/{len(compared)}",
            "equal_to_llama_server": None if mode == PEER_BASE else _equal(mine, base, greedy)[0],
        })
    by: dict[tuple[str, float | None], dict[int, Any]] = {}
    for r in records:
        if r.error is None:
            by.setdefault((r.mode, r.rtt_ms), {})[r.prompt_index] = r
    spec_equal: list[dict[str, Any]] = [{"mode": m, "reference": PEER_BASE, "rtt_ms": None, **_equal(
        recs, base, greedy)[1]} for m, recs in by_peer.items() if m != PEER_BASE and base]
    for (m, rtt), recs in sorted(by.items(), key=lambda kv: (kv[0][1], kv[0][0])):
        ref = "cloud" + FREE * m.endswith(FREE)  # a free twin against cloud-only's twin
        if ref != m and (ref, rtt) in by:
            spec_equal.append({"mode": m, "reference": ref, "rtt_ms": rtt, **_equal(recs, by[(ref, rtt)], greedy)[1]})
    by |= {(m, None): recs for m, recs in by_peer.items() if m != PEER_BASE}
    ratios: list[dict[str, Any]] = []
    for (mode, rtt), mine in sorted(by.items(), key=lambda kv: (kv[0][1] is None, kv[0][1] or 0.0,
                                                                 kv[0][0] != "cloud", kv[0][0])):
        if (vs := _ratio(mine, base)) is not None:  # on the prompts both served
            ratios.append({"mode": mode, "rtt_ms": rtt, "prompts": sum(i in base for i in mine), "vs_llama_server": vs})
    return {"rows": rows, "speculation_equal": spec_equal, "vs_llama_server": ratios}


def _equal(mine: dict[int, Any], ref: dict[int, Any], greedy: set[int]) -> tuple[str, dict[str, int]]:
    """Greedy prompts both served, and how many of `mine`'s outputs equal `ref`'s: 'k/n' and the counts."""
    both = [i for i in mine if i in ref and i in greedy]
    equal = sum(mine[i].output_sha == ref[i].output_sha for i in both)
    return f"{equal}/{len(both)}", {"equal": equal, "compared": len(both)}


def render_peer_markdown(summary: dict[str, Any], info: dict[str, Any]) -> str:
    """`summary.md`'s section on the peer (`peer_summary`; `info`: `llama_server.Peers.info`)."""
    spec = info["spec"]
    lines = ["", "## The peer: llama.cpp's llama-server, same run", "",
             f"llama.cpp's server from {info.get('peer', info['version'])}, on the GGUF files tandem's weights come "
             f"from, the same prompt token ids, greedy; threads: target {info['threads']}, draft "
             f"{info['draft_threads']}; llama-server-spec drafts with the draft GGUF (`-md`, n_max {spec['n_max']}, "
             f"n_min {spec['n_min']}, p_min {spec['p_min']}). Each prompt once, right after tandem's modes at the "
             "first RTT; loopback HTTP, streamed, no netem: RTT does not apply to a peer on one machine.", "",
             "| peer | requests | tok/s | TTFT p50 ms | TPOT p50 ms | e2e p50 ms | server decode tok/s | acceptance "
             "| greedy output == cloud-only | == llama-server |", "|---|---|---|---|---|---|---|---|---|---|"]
    for r in summary["rows"]:
        lines.append(f"| {r['mode']} | {r['requests']} | {_f(r['tokens_per_s'], '.1f')} | "
                     f"{_f(r['ttft_ms']['p50'], '.0f')} | {_f(r['tpot_ms']['p50'], '.1f')} | "
                     f"{_f(r['e2e_ms']['p50'], '.0f')} | {_f(r['server_decode_tokens_per_s'], '.1f')} | "
                     f"{_f(r['acceptance_rate'], '.3f')} | {r['equal_to_cloud']} | "
                     f"{r.get('equal_to_llama_server') or '-'} |")
    if summary.get("speculation_equal"):
        lines += ["", "Speculation against its own target alone, greedy prompts: llama.cpp's (llama-server-spec vs "
                  "llama-server; not bit-exact) beside tandem's (each mode vs cloud-only at the same RTT).", "",
                  "| mode | vs | RTT ms | greedy output equal |", "|---|---|---|---|"]
        lines += [f"| {r['mode']} | {r['reference']} | {_f(r['rtt_ms'], 'g')} | "
                  f"{r['equal']}/{r['compared']} |" for r in summary["speculation_equal"]]
    if summary["vs_llama_server"]:
        lines += ["", "| mode | RTT ms | prompts | tok/s vs llama-server alone |", "|---|---|---|---|"]
        lines += [f"| {r['mode']} | {_f(r['rtt_ms'], 'g')} | {r['prompts']} | "
                  f"{r['vs_llama_server']:.2f}x |" for r in summary["vs_llama_server"]]
    lines += ["", "- tok/s: tokens / end-to-end time (prefill included), as for tandem's modes. llama.cpp computes on "
              "the Q4_K_M blocks, tandem on their dequantised values: greedy outputs may differ, and the "
              "`== cloud-only` column says how often they are identical."]
    return "\n".join(lines) + "\n"
