"""The `tandem` command line. Composition root: heavy and transport imports happen inside commands."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer

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
    prompt: Annotated[str | None, typer.Argument(help="code to complete; default: a held-out stdlib excerpt")] = None,
    max_tokens: Annotated[int, typer.Option(help="tokens to generate")] = 96,
    gamma: Annotated[str | None, typer.Option(help="draft block length, or 'adaptive'")] = None,
    threads: Annotated[int, typer.Option(help="torch threads for each of the cloud and the edge (one core each)")] = 1,
) -> None:
    """Run the demo pair end to end: completion, acceptance, tokens per target pass, speedup over the target alone."""
    from tandem.config import CoreSettings
    from tandem.demo_run import run_demo

    run_demo(CoreSettings(**_overrides(gamma=gamma, threads=threads)), prompt, max_tokens)


@app.command("train-demo")
def train_demo_cmd(
    out: Annotated[Path, typer.Option(help="where the tokenizer and both models are written")] = Path("demo-out"),
    work_dir: Annotated[Path, typer.Option(help="checkpoints and logs; rerun to resume")] = Path("demo-work"),
    target_steps: Annotated[int | None, typer.Option()] = None,
    draft_steps: Annotated[int | None, typer.Option()] = None,
    threads: Annotated[int, typer.Option()] = 2,
) -> None:
    """Reproduce the demo pair from the standard library's own sources (resumable)."""
    import torch

    from tandem.train.trainer import TrainConfig, train_demo

    torch.set_num_threads(threads)
    cfg = TrainConfig(**_overrides(target_steps=target_steps, draft_steps=draft_steps))
    report = train_demo(out, work_dir, cfg, echo=None)
    typer.echo(f"target held-out loss {report['target_heldout_loss']:.3f}, draft {report['draft_heldout_loss']:.3f}")
    typer.echo(f"wrote {out}; copy it over tandem/demo to ship it")


@bench_app.command("local")
def bench_local(
    modes: Annotated[str, typer.Option(help="comma-separated: ar, spec, hf-assisted")] = "ar,spec,hf-assisted",
    prompts: Annotated[int, typer.Option(help="held-out stdlib prompts")] = 10,
    prompt_tokens: Annotated[int, typer.Option()] = 128,
    max_tokens: Annotated[int, typer.Option()] = 96,
    gamma: Annotated[int | None, typer.Option()] = None,
    threads: Annotated[int | None, typer.Option()] = None,
    json_out: Annotated[Path | None, typer.Option("--json", help="also write the figures here")] = None,
) -> None:
    """Target alone vs our speculative loop vs HF transformers' assisted generation, interleaved, greedy."""
    from tandem.bench_local import run_bench_local
    from tandem.config import CoreSettings

    settings = CoreSettings(**_overrides(gamma=gamma, threads=threads))
    run_bench_local(settings, modes.split(","), prompts, prompt_tokens, max_tokens, json_out)


@app.command()
def serve(
    target: Annotated[str | None, typer.Option(help="target model: demo-target, a folder, or a hub id")] = None,
    host: Annotated[str | None, typer.Option()] = None,
    http_port: Annotated[int | None, typer.Option()] = None,
    grpc_port: Annotated[int | None, typer.Option()] = None,
) -> None:
    """Serve the target model: HTTP (OpenAI-compatible + sessions) and gRPC from one process, one model worker."""
    from cloud_server.main import run
    from cloud_server.settings import ServerSettings

    run(ServerSettings(**_overrides(target=target, host=host, http_port=http_port, grpc_port=grpc_port)))


def _edge_settings(**kw: Any) -> Any:
    from edge_client.settings import EdgeSettings

    return EdgeSettings(**_overrides(**kw))


@app.command()
def generate(
    prompt: Annotated[str, typer.Argument(help="the text to continue")],
    cloud: Annotated[str | None, typer.Option(help="HOST:PORT of the cloud (its gRPC or HTTP port, per --transport)")]
    = None,
    transport: Annotated[str | None, typer.Option(help="grpc | grpc-unary | http")] = None,
    mode: Annotated[str | None, typer.Option(help="spec | cloud | edge (lossy) | auto")] = None,
    max_tokens: Annotated[int, typer.Option()] = 64,
    temperature: Annotated[float, typer.Option(help="0: greedy")] = 0.0,
    top_p: Annotated[float, typer.Option()] = 1.0,
    seed: Annotated[int | None, typer.Option()] = None,
    draft: Annotated[str | None, typer.Option(help="draft model: demo-draft, a folder, or a hub id")] = None,
    gamma: Annotated[str | None, typer.Option(help="draft block length, or 'adaptive'")] = None,
    pipeline: Annotated[bool | None, typer.Option("--pipeline/--no-pipeline", help="send blocks ahead")] = None,
    fallback: Annotated[str | None, typer.Option(help="none | edge: the draft alone when the cloud is lost")] = None,
    threads: Annotated[int | None, typer.Option(help="torch threads for the draft")] = None,
    json_out: Annotated[bool, typer.Option("--json", help="print one JSON object instead of streaming text")] = False,
) -> None:
    """Draft here, verify in the cloud: the target model's output, streamed as tokens are accepted."""
    import json
    import sys

    import torch

    from cloud_server.text import IncrementalText, encode
    from edge_client.loop import EdgeClient
    from tandem.errors import TandemError
    from tandem.models import load_model
    from tandem.sampling import SamplingParams

    settings = _edge_settings(cloud=cloud, transport=transport, mode=mode, draft=draft, gamma=gamma,
                              pipeline=pipeline, fallback=fallback, threads=threads)
    torch.set_num_threads(settings.threads)
    try:
        model = load_model(settings.draft)
        ids = encode(model.tokenizer, prompt)
        params = SamplingParams(max_tokens=max_tokens, temperature=temperature, top_p=top_p, seed=seed)
        text = IncrementalText(model.tokenizer)

        def show(new: list[int]) -> None:
            sys.stdout.write(text.push(new))
            sys.stdout.flush()

        result = EdgeClient(settings, model).generate(ids, params, on_tokens=None if json_out else show)
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
) -> None:
    """An OpenAI-compatible endpoint on the device, served by the speculative loop against the cloud."""
    from edge_client.http_app import run

    run(_edge_settings(cloud=cloud, port=port, host=host, transport=transport, mode=mode, draft=draft, gamma=gamma,
                       fallback=fallback))


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
    from tandem.netem import run_netem

    run_netem(listen, upstream, rtt_ms, jitter_ms, bandwidth_mbps, loss_pct)


if __name__ == "__main__":
    app()
