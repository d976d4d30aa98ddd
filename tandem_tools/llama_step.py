"""The llama.cpp runtime's pass costs beside llama.cpp's own `llama-bench`, in one run, same GGUF file and threads.

    python -m tandem_tools.llama_step --model qwen2.5-coder-0.5b-instruct --threads 1 --json out.json

A step is what drafting costs: one position fed after a cached context (`LlamaSequence.run`), unpadded as a draft
runs it; `--rows` adds passes over more positions, unpadded and padded as an exact target pads them
(`tandem.llamacpp.settle_rows`). `llama-bench -p 0 -n N` gives llama.cpp's own generation time per token (its
`avg_ns` over `-r` repetitions); the ratio is ours over its.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import subprocess
import time
from pathlib import Path

from rich.console import Console

from tandem import llamacpp
from tandem_tools.llama_server import find_binary, gguf_file


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


def llama_bench(path: Path, threads: int, tokens: int, repetitions: int) -> float | None:
    """llama-bench's generation ms per token (`-p 0 -n tokens`), or None without the binary."""
    binary = find_binary("llama-bench")
    if binary is None:
        return None
    out = subprocess.run([str(binary), "-m", str(path), "-p", "0", "-n", str(tokens), "-t", str(threads),
                          "-r", str(repetitions), "-o", "json"], capture_output=True, text=True, check=True).stdout
    row = json.loads(out)[0]
    return float(row["avg_ns"]) / 1e6 / tokens


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="qwen2.5-coder-0.5b-instruct", help="a shipped GGUF name or a .gguf path")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--rows", default="1,2,4,8,9,12,16", help="pass sizes measured (comma-separated)")
    ap.add_argument("--context", type=int, default=128, help="positions cached before each pass")
    ap.add_argument("--repeats", type=int, default=15)
    ap.add_argument("--bench-tokens", type=int, default=32)
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    path = gguf_file(args.model)
    rows = [int(r) for r in args.rows.split(",")]
    console = Console()
    # llama-bench before and after: its figure is the mean of the two, so drift on a shared machine shows
    first = llama_bench(path, args.threads, args.bench_tokens, 3)
    plain, padded, rule = pass_costs(path, args.threads, rows, args.context, args.repeats)
    last = llama_bench(path, args.threads, args.bench_tokens, 3)
    step = plain[1] if 1 in plain else pass_costs(path, args.threads, [1], args.context, args.repeats)[0][1]
    result: dict[str, object] = {"model": path.name, "threads": args.threads, "machine": platform.machine(),
                                 "context": args.context, "plain_ms": plain, "exact_ms": padded, "exact_rule": rule}
    console.print(f"{path.name}, {args.threads} thread(s), after {args.context} cached positions; exact: {rule}")
    for n in rows:
        console.print(f"  pass over {n:>2}: {plain[n]:7.1f} ms plain, {padded[n]:7.1f} ms exact")
    if first is not None and last is not None:
        bench = (first + last) / 2
        result |= {"llama_bench_ms": [first, last], "step_over_llama_bench": step / bench}
        console.print(f"  llama-bench generation: {first:.1f} and {last:.1f} ms/token; our step {step:.1f} ms = "
                      f"{step / bench:.2f}x")
    else:
        console.print("  llama-bench not built (scripts/build-llama-server.sh): no ratio")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()
