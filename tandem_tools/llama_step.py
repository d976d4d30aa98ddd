"""The llama.cpp runtime's pass costs beside llama.cpp's own generation, in one run, same GGUF file and threads.

    python -m tandem_tools.llama_step --model qwen2.5-coder-0.5b-instruct --threads 1 --json out.json

A step is what drafting costs: one position fed after `--context` cached ones (`LlamaSequence.run`), unpadded; `--rows`
adds passes over more positions, unpadded and padded as an exact target pads them (`tandem.llamacpp.settle_rows`).
llama.cpp's own time per token is its server's (one slot, no draft, the same threads, a prompt as long as our context):
`timings.predicted_per_token_ms` of `--bench-tokens` greedy tokens, the median of `--bench-runs`, before and after
ours; the ratio is ours over their mean.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from pathlib import Path

from rich.console import Console

from tandem import llamacpp
from tandem_tools.llama_server import LlamaServer, describe_peer, gguf_file, peer_program, server_command
from tandem_tools.procs import free_port


def _median_ms(seq: llamacpp.LlamaSequence, at: int, ids: list[int], repeats: int) -> float:
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        seq.run(ids)
        times.append(time.perf_counter() - t0)
        seq.rollback(at)
    return 1000 * statistics.median(times)


def pass_costs(path: Path, threads: int, rows: list[int], context: int,
               repeats: int) -> tuple[dict[int, float], dict[int, float], str]:
    """Median ms of a pass over each count of `rows` after `context` cached positions: unpadded, and padded."""
    model = llamacpp.LlamaCppModel(path, threads)
    prefix = [1000 + i % 20000 for i in range(context)]
    seq = llamacpp.LlamaSequence(model, prefix)
    seq.run(prefix, outputs=0)
    _median_ms(seq, context, [2000], 3)  # warm
    plain = {n: _median_ms(seq, context, list(range(2000, 2000 + n)), repeats) for n in rows}
    seq.close()
    llamacpp.settle_rows(model)
    seq = llamacpp.LlamaSequence(model, prefix)
    seq.run(prefix, outputs=0)
    padded = {n: _median_ms(seq, context, list(range(2000, 2000 + n)), repeats) for n in rows}
    seq.close()
    return plain, padded, model.rows_why


def peer_ms(program: list[str], path: Path, threads: int, context: int, tokens: int, runs: int) -> float:
    """llama.cpp's own ms per generated token through its server (one slot, no draft, `threads`): the median over
    `runs` greedy generations of `tokens` after a `context`-token prompt, of `timings.predicted_per_token_ms`."""
    port = free_port()
    ctx = -(-(context + tokens + 16) // 256) * 256
    prompt = [1000 + i % 20000 for i in range(context)]
    with LlamaServer(server_command(program, path, port, threads, ctx), port, ready_timeout_s=600) as server:
        server.complete(prompt[:16], 4)  # warm-up
        return statistics.median(server.complete(prompt, tokens, ignore_eos=True).predicted_per_token_ms
                                 for _ in range(runs))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="qwen2.5-coder-0.5b-instruct", help="a shipped GGUF name or a .gguf path")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--rows", default="1,2,4,8,9,12,16", help="pass sizes measured (comma-separated)")
    ap.add_argument("--context", type=int, default=128, help="positions cached before each pass")
    ap.add_argument("--repeats", type=int, default=15)
    ap.add_argument("--bench-tokens", type=int, default=32, help="tokens llama.cpp's server generates a run")
    ap.add_argument("--bench-runs", type=int, default=3)
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    path = gguf_file(args.model)
    rows = [int(r) for r in args.rows.split(",")]
    console = Console()
    program, why = peer_program()

    def own() -> float | None:
        return None if program is None else peer_ms(program, path, args.threads, args.context, args.bench_tokens,
                                                    args.bench_runs)
    # llama.cpp's own before and after ours: its figure is the mean of the two, so drift on a shared machine shows
    first = own()
    plain, padded, rule = pass_costs(path, args.threads, rows, args.context, args.repeats)
    last = own()
    step = plain[1] if 1 in plain else pass_costs(path, args.threads, [1], args.context, args.repeats)[0][1]
    result: dict[str, object] = {"model": path.name, "threads": args.threads, "machine": platform.machine(),
                                 "context": args.context, "plain_ms": plain, "exact_ms": padded, "exact_rule": rule}
    console.print(f"{path.name}, {args.threads} thread(s), after {args.context} cached positions; exact: {rule}")
    for n in rows:
        console.print(f"  pass over {n:>2}: {plain[n]:7.1f} ms plain, {padded[n]:7.1f} ms exact")
    if program is not None and first is not None and last is not None:
        mean = (first + last) / 2
        result |= {"llama_server": describe_peer(program), "llama_server_ms": [first, last],
                   "step_over_llama_server": step / mean}
        console.print(f"  llama.cpp's own generation, its server from {describe_peer(program)}, one slot, no draft: "
                      f"{first:.1f} and {last:.1f} ms/token; our step {step:.1f} ms = {step / mean:.2f}x",
                      highlight=False)
    else:
        console.print(f"  no llama.cpp generation to compare with: {why}", highlight=False)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()
