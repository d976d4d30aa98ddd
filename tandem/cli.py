"""The `tandem` command line. Composition root: heavy and transport imports happen inside commands."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer

app = typer.Typer(no_args_is_help=True, add_completion=False, help="tandem: edge-cloud speculative decoding.")
bench_app = typer.Typer(no_args_is_help=True, help="Benchmarks (figures printed, ratios measured side by side).")
app.add_typer(bench_app, name="bench")


def _overrides(**kw: Any) -> dict[str, Any]:
    """CLI options left unset fall through to the environment (TANDEM_...) and the settings' defaults."""
    return {k: v for k, v in kw.items() if v is not None}


@app.command()
def demo(
    prompt: Annotated[str | None, typer.Argument(help="code to complete; default: a held-out stdlib excerpt")] = None,
    max_tokens: Annotated[int, typer.Option(help="tokens to generate")] = 96,
    gamma: Annotated[int | None, typer.Option(help="draft block length")] = None,
    threads: Annotated[int | None, typer.Option(help="torch threads")] = None,
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
