"""The `tandem` command line. Composition root: heavy and transport imports happen inside commands."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer

from tandem.config import DEFAULT_DRAFT, DEFAULT_TARGET, TEST_DRAFT, TEST_TARGET

app = typer.Typer(no_args_is_help=True, add_completion=False, help="tandem: edge-cloud speculative decoding.")
bench_app = typer.Typer(no_args_is_help=True, help="Benchmarks (figures printed, ratios measured side by side).")
app.add_typer(bench_app, name="bench")
edge_app = typer.Typer(no_args_is_help=True, help="The edge device: a local OpenAI-compatible endpoint.")
app.add_typer(edge_app, name="edge")


def _overrides(**kw: Any) -> dict[str, Any]:
    """CLI options left unset fall through to the environment (TANDEM_...) and the settings' defaults."""
    return {k: v for k, v in kw.items() if v is not None}


@app.command()
def demo(
    prompt: Annotated[str | None, typer.Argument(help="a question (chat model) or code to complete (code model)")]
    = None,
    max_tokens: Annotated[int, typer.Option(help="tokens to generate")] = 96,
    gamma: Annotated[str | None, typer.Option(help="draft block length, or 'adaptive' (the default: up to 16, sized "
                                                   "on the measured cost curve, ended where the draft is unsure)")]
    = None,
    threads: Annotated[int, typer.Option(help="torch threads for each of the cloud and the edge (one core each)")] = 1,
    mode: Annotated[str, typer.Option(help="the mode streamed first: spec, auto or cloud")] = "spec",
    target: Annotated[str | None, typer.Option(help="the cloud's target model")] = None,
    draft: Annotated[str | None, typer.Option(help="the edge's draft model")] = None,
    web: Annotated[bool, typer.Option("--web", help="start the cloud and the edge, serve the chat page")] = False,
    port: Annotated[int, typer.Option(help="--web: the edge's (the page's) port; 0: a free one")] = 8001,
) -> None:
    """A pair end to end on the real path (the cloud in its own process, the edge here over gRPC): the answer
    streamed as it is accepted, then acceptance, tokens per target pass and every mode against cloud-only (the target
    alone)."""
    import os

    from tandem.config import CoreSettings
    from tandem_tools.demo_run import MODES, run_demo, run_web

    if mode not in MODES:
        raise typer.BadParameter(f"choose from {', '.join(MODES)}", param_hint="--mode")
    gamma = gamma or os.environ.get("TANDEM_GAMMA") or "adaptive"
    settings = CoreSettings(**_overrides(gamma=gamma, threads=threads, target=target, draft=draft))
    if web:
        return run_web(settings, port)
    run_demo(settings, prompt, max_tokens, mode)


TARGET_HELP = (f"target model: a short name (default {DEFAULT_TARGET}; {TEST_TARGET}: the test pair, in a source "
               "checkout), a .gguf file, a folder, or a hub id")
DEVICE_OPT = "auto (CUDA, else MPS, else CPU), cpu, cuda[:N], mps"
DTYPE_OPT = "auto (bfloat16 where the hardware computes it natively, else float32), float32, bfloat16 or float16"
SIZES_OPT = "pass lengths compiled at start-up, comma-separated (default 1,2,3,4,5,6,8,12,16)"
COMPILE_OPT = "the fast path: compiled decode and verify steps (Llama and Qwen2 models; compiles at start-up)"
DRAFT_HELP = (f"draft model: a short name (default {DEFAULT_DRAFT}; {TEST_DRAFT}: the test pair, in a source "
              "checkout), a folder, or a hub id")


@bench_app.command("local")
def bench_local(
    modes: Annotated[str, typer.Option(help="comma-separated: ar, ar-eager, spec, spec-value, spec-tree, "
                                            "spec-pool, hf-assisted, llama-server, llama-server-spec")
                     ] = "ar,spec,hf-assisted",
    prompts: Annotated[int, typer.Option(help="requests of the trace, or held-out stdlib prompts (a code model)")] = 10,
    prompt_tokens: Annotated[int, typer.Option()] = 128,
    max_tokens: Annotated[int, typer.Option()] = 96,
    gamma: Annotated[int | None, typer.Option()] = None,
    threads: Annotated[int | None, typer.Option()] = None,
    json_out: Annotated[Path | None, typer.Option("--json", help="also write the figures here")] = None,
    warm: Annotated[bool, typer.Option(help="spec-pool: a cold vs a warm phrase pool over similar prompts")] = False,
    trace: Annotated[Path | None, typer.Option(help="prompts from a trace (default for a chat model: "
                                                    "benchmarks/traces/chat.jsonl)")]
    = None,
    target: Annotated[str | None, typer.Option(help="target model")] = None,
    draft: Annotated[str | None, typer.Option(help="draft model")] = None,
    device: Annotated[str | None, typer.Option(help="the target's device: " + DEVICE_OPT)] = None,
    dtype: Annotated[str | None, typer.Option(help="the target's dtype: " + DTYPE_OPT)] = None,
    compile: Annotated[bool | None, typer.Option("--compile/--no-compile", help="the target: " + COMPILE_OPT)] = None,
    compile_sizes: Annotated[str | None, typer.Option(help=SIZES_OPT)] = None,
    draft_device: Annotated[str | None, typer.Option(help=DEVICE_OPT)] = None,
    draft_dtype: Annotated[str | None, typer.Option(help=DTYPE_OPT)] = None,
    draft_compile: Annotated[bool | None, typer.Option("--draft-compile/--no-draft-compile", help=COMPILE_OPT)]
    = None,
    draft_p_min: Annotated[float | None, typer.Option(help="spec: a block ends before a token the draft "
                                                           "gives less than this probability")] = None,
) -> None:
    """Target alone vs our speculative loop vs HF transformers' assisted generation, interleaved, greedy; with the
    pair's roofline (v, c and the bounds) and, with mode ar-eager, every mode's match rate against float32 eager."""
    from tandem.config import CoreSettings
    from tandem_tools.bench_local import run_bench_local

    settings = CoreSettings(**_overrides(gamma=gamma, threads=threads, target=target, draft=draft, device=device,
                                         dtype=dtype, compile=compile, compile_sizes=compile_sizes,
                                         draft_device=draft_device, draft_dtype=draft_dtype,
                                         draft_compile=draft_compile, draft_p_min=draft_p_min))
    run_bench_local(settings, modes.split(","), prompts, prompt_tokens, max_tokens, json_out, warm=warm, trace=trace)


@bench_app.command("replay")
def bench_replay(
    trace: Annotated[Path, typer.Option(help="JSON lines: prompt (or messages), max_tokens [, temperature, seed, "
                                             "arrival_s, response_format or structured_outputs, kind]")],
    out: Annotated[Path, typer.Option(help="folder for results.json, summary.md, speedup_vs_rtt.png")],
    cloud: Annotated[str | None, typer.Option(help="HOST:PORT (gRPC) of a running cloud; unset: start one")] = None,
    rtt_ms: Annotated[str, typer.Option(help="comma-separated round-trip times to emulate")] = "0,10,20,50,100",
    modes: Annotated[str, typer.Option(help="comma-separated: cloud, spec, spec-pipelined, spec-p-min, spec-chain, "
                                            "spec-pool, auto")]
    = "cloud,spec,spec-pipelined,auto",
    gamma: Annotated[str, typer.Option(help="draft block length, or 'adaptive'")] = "4",
    prompts: Annotated[int | None, typer.Option("--prompts", "--limit", help="replay only the first N lines")]
    = None,
    target: Annotated[str | None, typer.Option(help="target model of the cloud started here")] = None,
    draft: Annotated[str | None, typer.Option(help="draft model of the edge")] = None,
    threads: Annotated[int, typer.Option(help="torch threads of the edge (this process)")] = 1,
    cloud_threads: Annotated[int, typer.Option(help="torch threads of the cloud started here")] = 1,
    free_twins: Annotated[bool, typer.Option(help="each mode also runs each request without its output constraint "
                                                  "(mode/free), side by side: what structured output costs")] = False,
) -> None:
    """Replay a trace through the real edge client and cloud over emulated round-trip times, every mode side by side."""
    import os

    from tandem_tools.bench_replay import ReplayConfig, run_replay

    cfg = ReplayConfig(
        trace=trace, out=out, cloud=cloud, rtts=[float(x) for x in rtt_ms.split(",") if x.strip()],
        modes=[m.strip() for m in modes.split(",") if m.strip()],
        gamma=int(gamma) if gamma.isdigit() else gamma,
        limit=prompts, target=target or os.environ.get("TANDEM_TARGET", DEFAULT_TARGET),
        draft=draft or os.environ.get("TANDEM_DRAFT", DEFAULT_DRAFT), edge_threads=threads,
        cloud_threads=cloud_threads, api_key=os.environ.get("TANDEM_API_KEY") or None, free_twins=free_twins)
    run_replay(cfg)


@bench_app.command("load")
def bench_load(
    sessions: Annotated[int, typer.Option(help="concurrent sessions (threads here, each its own edge client)")] = 16,
    duration: Annotated[float, typer.Option(help="seconds of load; requests in flight then run to their end")] = 300.0,
    out: Annotated[Path, typer.Option(help="folder for load.json (and cloud.log of a cloud started here)")]
    = Path("load-out"),
    cloud: Annotated[str | None, typer.Option(help="HOST:PORT of a running cloud; unset: start one")] = None,
    metrics: Annotated[str | None, typer.Option(help="URL of that cloud's /metrics (default: HOST:8000)")] = None,
    transport: Annotated[str, typer.Option(help="grpc | grpc-unary | http (then --cloud is the HTTP port)")]
    = "grpc",
    prompts: Annotated[int, typer.Option(help="distinct prompts from the trace, each checked against a reference")]
    = 12,
    prompt_tokens: Annotated[int | None, typer.Option(help="keep the last N tokens of each prompt")] = None,
    max_tokens: Annotated[int | None, typer.Option(help="per request; default: the trace's")] = None,
    gamma: Annotated[str, typer.Option(help="draft block length, or 'adaptive'")] = "adaptive",
    mode: Annotated[str, typer.Option(help="the edges' mode: auto (load-aware: they follow the cloud's advice) or "
                                      "spec (speculate whatever the load)")] = "auto",
    sample_s: Annotated[float, typer.Option(help="seconds between samples of the cloud's metrics and memory")] = 5.0,
    warmup: Annotated[float | None, typer.Option(help="seconds left out of the memory slope")] = None,
    target: Annotated[str, typer.Option(help="target model of the cloud started here")] = DEFAULT_TARGET,
    draft: Annotated[str, typer.Option(help="draft model of the edge")] = DEFAULT_DRAFT,
    cloud_threads: Annotated[int, typer.Option(help="torch threads of the cloud started here")] = 1,
    trace: Annotated[Path | None, typer.Option(help="JSON lines with prompt, max_tokens")] = None,
) -> None:
    """Sustained load through the real edge client: throughput, latency, failures, memory, sessions freed."""
    import os

    from tandem_tools.bench_load import DEFAULT_TRACE, LoadConfig, run_load

    if cloud is not None and metrics is None:
        metrics = f"http://{cloud.rpartition(':')[0] or '127.0.0.1'}:8000/metrics"
    cfg = LoadConfig(
        sessions=sessions, duration_s=duration, out=out, cloud=cloud, metrics_url=metrics,
        trace=trace or DEFAULT_TRACE, prompts=prompts, prompt_tokens=prompt_tokens, max_tokens=max_tokens,
        target=target, draft=draft, transport=transport, gamma=int(gamma) if gamma.isdigit() else gamma, mode=mode,
        cloud_threads=cloud_threads, sample_s=sample_s, warmup_s=warmup,
        api_key=os.environ.get("TANDEM_API_KEY") or None)
    summary = run_load(cfg, echo=typer.echo)["summary"]
    if summary["failed"] or summary["mismatched"] or not summary["sessions_freed"]:
        raise typer.Exit(1)


@bench_app.command("capacity")
def bench_capacity(
    clients: Annotated[str, typer.Option(help="comma-separated concurrencies")] = "1,2,4,8,16",
    out: Annotated[Path, typer.Option(help="folder for capacity.json, capacity.png, the replay table and the logs")]
    = Path("capacity-out"),
    modes: Annotated[str, typer.Option(help="comma-separated: cloud (cloud-only stream), spec (fixed gamma), auto "
                                            "(the block length the cloud advises)")] = "cloud,spec,auto",
    edges: Annotated[str, typer.Option(help="replay: recorded draft proposals at the measured draft pace (no cloud "
                                            "CPU); real: a draft model in each edge process")] = "replay",
    max_tokens: Annotated[int, typer.Option(help="new tokens per request (ignore_eos: exactly this many)")] = 64,
    prompt_tokens: Annotated[int, typer.Option(help="held-out prompt length (without a trace)")] = 128,
    trace: Annotated[Path | None, typer.Option(help="JSON lines with prompt (or messages); default: the chat trace "
                                               "for a chat pair, held-out code otherwise")] = None,
    requests: Annotated[int, typer.Option(help="requests per client and mode, back to back")] = 2,
    gamma: Annotated[str, typer.Option(help="spec's block length: at most this many (blocks end by value, with "
                                            "siblings, as the edge's defaults), or adaptive")] = "4",
    max_gamma: Annotated[int, typer.Option(help="the largest block auto may draft (and the replay table holds)")] = 8,
    target: Annotated[str, typer.Option(help="the cloud's target model")] = DEFAULT_TARGET,
    draft: Annotated[str, typer.Option(help="the edges' draft model")] = DEFAULT_DRAFT,
    cloud_threads: Annotated[int, typer.Option(help="torch threads of the cloud process")] = 1,
    edge_threads: Annotated[int, typer.Option(help="torch threads of each real edge; replay: those the draft step "
                                                   "is timed with")] = 1,
    edge_nice: Annotated[int, typer.Option(help="niceness of the edge processes (>0: the cloud goes first)")] = 0,
    max_batch: Annotated[int, typer.Option(help="the cloud's max batch (1: no batching)")] = 32,
    batch_window_ms: Annotated[float, typer.Option(help="the cloud's batch window")] = 2.0,
    pipeline: Annotated[bool, typer.Option("--pipeline/--no-pipeline", help="edges send blocks ahead")] = True,
) -> None:
    """Cloud capacity: cloud-only, speculative and load-aware auto clients at each concurrency, side by side
    (JSON + plot)."""
    from tandem_tools.bench_capacity import CapacityConfig, run_bench_capacity

    cfg = CapacityConfig(
        clients=tuple(int(c) for c in clients.split(",") if c.strip()), target=target, draft=draft, gamma=gamma,
        max_gamma=max_gamma, modes=tuple(m.strip() for m in modes.split(",") if m.strip()), edges=edges,
        max_tokens=max_tokens, prompt_tokens=prompt_tokens, requests=requests, cloud_threads=cloud_threads,
        trace=str(trace) if trace else None, edge_threads=edge_threads, edge_nice=edge_nice, max_batch=max_batch,
        batch_window_ms=batch_window_ms, pipeline=pipeline)
    try:
        cfg.check()
    except ValueError as e:
        raise typer.BadParameter(str(e)) from None
    run_bench_capacity(cfg, out)


@bench_app.command("agreement")
def bench_agreement(
    prompts: Annotated[int, typer.Option(help="requests of the trace")] = 8,
    max_tokens: Annotated[int, typer.Option(help="at most this many answer tokens per request")] = 64,
    trace: Annotated[Path | None, typer.Option(help="JSON lines (default: benchmarks/traces/chat.jsonl)")] = None,
    target: Annotated[str | None, typer.Option(help=TARGET_HELP)] = None,
    draft: Annotated[str | None, typer.Option(help=DRAFT_HELP)] = None,
    threads: Annotated[int | None, typer.Option(help="torch and llama.cpp threads")] = None,
    json_out: Annotated[Path | None, typer.Option("--json", help="also write the figures here")] = None,
    timing: Annotated[bool, typer.Option("--timing/--no-timing", help="time the target's pass and the draft's step "
                                                                      "here: each block's speed in one process")]
    = True,
) -> None:
    """How far the draft follows the target: the target's greedy answers, the rank of each of their tokens in the
    draft's teacher-forced logits, the tokens per target pass chains and siblings would yield, and (timed here)
    their speed in one process."""
    from tandem.config import CoreSettings
    from tandem_tools.bench_agreement import run_bench_agreement

    settings = CoreSettings(**_overrides(target=target, draft=draft, threads=threads))
    run_bench_agreement(settings, prompts, max_tokens, trace, json_out, timing)


@app.command()
def serve(
    target: Annotated[str | None, typer.Option(help=TARGET_HELP)] = None,
    host: Annotated[str | None, typer.Option()] = None,
    http_port: Annotated[int | None, typer.Option()] = None,
    grpc_port: Annotated[int | None, typer.Option()] = None,
    device: Annotated[str | None, typer.Option(help=DEVICE_OPT)] = None,
    dtype: Annotated[str | None, typer.Option(help=DTYPE_OPT)] = None,
    compile: Annotated[bool | None, typer.Option("--compile/--no-compile", help=COMPILE_OPT)] = None,
    compile_sizes: Annotated[str | None, typer.Option(help=SIZES_OPT)] = None,
    threads: Annotated[int | None, typer.Option(help="torch intra-op threads")] = None,
) -> None:
    """Serve the target model: HTTP (OpenAI-compatible + sessions) and gRPC from one process, one model worker."""
    from cloud_server.main import run
    from cloud_server.settings import ServerSettings
    from tandem_tools.procs import die_with_parent

    die_with_parent()  # started by a demo or a bench: it goes with them

    run(ServerSettings(**_overrides(target=target, host=host, http_port=http_port, grpc_port=grpc_port,
                                    device=device, dtype=dtype, compile=compile, compile_sizes=compile_sizes,
                                    threads=threads)))


def _edge_settings(**kw: Any) -> Any:
    from edge_client.settings import EdgeSettings

    return EdgeSettings(**_overrides(**kw))


@app.command()
def generate(
    prompt: Annotated[str, typer.Argument(help="a question for a chat model (its chat template is applied), or the "
                                                "text to continue (a model without one, or --raw)")],
    cloud: Annotated[str | None, typer.Option(help="HOST:PORT of the cloud (its gRPC or HTTP port, per --transport)")]
    = None,
    transport: Annotated[str | None, typer.Option(help="grpc | grpc-unary | http")] = None,
    mode: Annotated[str | None, typer.Option(help="spec | cloud | edge (lossy) | auto")] = None,
    max_tokens: Annotated[int, typer.Option()] = 64,
    temperature: Annotated[float, typer.Option(help="0: greedy")] = 0.0,
    top_p: Annotated[float, typer.Option()] = 1.0,
    seed: Annotated[int | None, typer.Option()] = None,
    draft: Annotated[str | None, typer.Option(help=DRAFT_HELP)] = None,
    gamma: Annotated[str | None, typer.Option(help="draft block length, or 'adaptive'")] = None,
    pipeline: Annotated[bool | None, typer.Option("--pipeline/--no-pipeline", help="send blocks ahead")] = None,
    fallback: Annotated[str | None, typer.Option(help="none | edge: the draft alone when the cloud is lost")] = None,
    threads: Annotated[int | None, typer.Option(help="torch threads for the draft")] = None,
    json_out: Annotated[bool, typer.Option("--json", help="print one JSON object instead of streaming text")] = False,
    raw: Annotated[bool, typer.Option("--raw", help="continue the text as is, even with a chat model")] = False,
) -> None:
    """Draft here, verify in the cloud: the target model's output, streamed as tokens are accepted."""
    import json
    import sys

    import torch

    from edge_client.client import edge_decoder
    from tandem.errors import TandemError
    from tandem.models import load_draft
    from tandem.sampling import SamplingParams
    from tandem_protocol.openai_api.text import IncrementalText, chat_prompt, encode

    settings = _edge_settings(cloud=cloud, transport=transport, mode=mode, draft=draft, gamma=gamma,
                              pipeline=pipeline, fallback=fallback, threads=threads)
    torch.set_num_threads(settings.threads)
    try:
        model = load_draft(settings.draft, settings, settings.threads)
        chat = not raw and getattr(model.tokenizer, "chat_template", None)
        ids = chat_prompt(model.tokenizer, [{"role": "user", "content": prompt}]) if chat else encode(model.tokenizer,
                                                                                                    prompt)
        params = SamplingParams(max_tokens=max_tokens, temperature=temperature, top_p=top_p, seed=seed)
        text = IncrementalText(model.tokenizer)

        def show(new: list[int]) -> None:
            sys.stdout.write(text.push(new))
            sys.stdout.flush()

        result = edge_decoder(settings, model).generate(ids, params, on_tokens=None if json_out else show)
    except TandemError as e:
        print(f"error: {e}", file=sys.stderr)
        raise typer.Exit(1) from None
    stats = result.stats.as_dict()
    if json_out:
        full = model.tokenizer.decode(result.tokens, skip_special_tokens=True, clean_up_tokenization_spaces=False)
        print(json.dumps({"text": full, "token_ids": result.tokens, "finish_reason": result.finish_reason,
                          "lossy": result.stats.lossy, "stats": stats}))
        return
    print(text.flush())
    note = " LOSSY: the draft alone, not the target's output" if result.stats.lossy else ""
    print(f"[{stats['mode']}: {stats['tokens']} tokens, {stats['tokens_per_s']:.1f} tok/s, acceptance "
          f"{stats['acceptance_rate']:.2f}, gamma {stats['gamma_mean']}{note}]", file=sys.stderr)


@edge_app.command("serve")
def edge_serve(
    cloud: Annotated[str | None, typer.Option(help="HOST:PORT of the cloud")] = None,
    port: Annotated[int | None, typer.Option(help="the local endpoint's port")] = None,
    host: Annotated[str | None, typer.Option()] = None,
    transport: Annotated[str | None, typer.Option(help="grpc | grpc-unary | http")] = None,
    mode: Annotated[str | None, typer.Option(help="spec | cloud | edge (lossy) | auto")] = None,
    draft: Annotated[str | None, typer.Option()] = None,
    gamma: Annotated[str | None, typer.Option(help="draft block length, or 'adaptive'")] = None,
    fallback: Annotated[str | None, typer.Option(help="none | edge")] = None,
    draft_device: Annotated[str | None, typer.Option(help=DEVICE_OPT)] = None,
    draft_dtype: Annotated[str | None, typer.Option(help=DTYPE_OPT)] = None,
    draft_compile: Annotated[bool | None, typer.Option("--draft-compile/--no-draft-compile", help=COMPILE_OPT)]
    = None,
    threads: Annotated[int | None, typer.Option(help="torch intra-op threads for the draft")] = None,
) -> None:
    """An OpenAI-compatible endpoint on the device, served by the speculative loop against the cloud."""
    from edge_client.http_app import run

    run(_edge_settings(cloud=cloud, port=port, host=host, transport=transport, mode=mode, draft=draft, gamma=gamma,
                       fallback=fallback, draft_device=draft_device, draft_dtype=draft_dtype,
                       draft_compile=draft_compile, threads=threads))


@app.command()
def netem(
    listen: Annotated[str, typer.Option(help="HOST:PORT to accept connections on")],
    upstream: Annotated[str, typer.Option(help="HOST:PORT to forward to")],
    rtt_ms: Annotated[float, typer.Option(help="added round-trip time; each direction is delayed by half")] = 0.0,
    jitter_ms: Annotated[float, typer.Option(help="uniform +- jitter on each one-way delay (byte order kept)")] = 0.0,
    bandwidth_mbps: Annotated[float | None, typer.Option(help="cap per direction; unset: unlimited")] = None,
    loss_pct: Annotated[float, typer.Option(help="chance per chunk that the connection is reset")] = 0.0,
) -> None:
    """A user-space network emulator: a TCP proxy adding delay, jitter, a bandwidth cap and connection drops."""
    from tandem_tools.netem import run_netem

    run_netem(listen, upstream, rtt_ms, jitter_ms, bandwidth_mbps, loss_pct)


if __name__ == "__main__":
    app()
