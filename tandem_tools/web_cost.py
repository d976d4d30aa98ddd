"""What the chat page's stream costs the edge: tokens/s of the same greedy requests streamed plainly and as the page
asks for them (`return_token_origins`, `return_metrics`, `include_usage`), side by side, alternating, through a
real `tandem serve` and a real `tandem edge serve` in their own processes.

    python -m tandem_tools.web_cost --out benchmarks/results/web/stream-cost.json
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import httpx
from rich.console import Console

from tandem.config import TEST_DRAFT, TEST_TARGET
from tandem_tools.bench_common import cpu_seconds
from tandem_tools.procs import CloudProcess, free_port, http_ok, popen_logged, stop_process, wait_ready

PROMPTS = [
    "def fibonacci(n):\n", "class Stack:\n    def __init__(self):\n", "import os\n\ndef walk(path):\n",
    "def parse_args(argv):\n    parser = argparse.ArgumentParser(", "def read_lines(path):\n    with open(",
    "class Node:\n    def __init__(self, value, next=None):\n", "def merge(a, b):\n    result = []\n",
    "def is_prime(n):\n    if n < 2:\n",
]
PAGE = {"stream_options": {"include_usage": True}, "return_metrics": True, "return_token_origins": True}


def start_edge(cloud: str, draft: str, gamma: str, threads: int) -> tuple[subprocess.Popen[bytes], str]:
    port = free_port()
    env = os.environ | {"HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": str(threads)}
    proc = popen_logged([sys.executable, "-m", "tandem_tools.cli", "edge", "serve", "--cloud", cloud, "--port",
                         str(port), "--draft", draft, "--gamma", gamma, "--threads", str(threads)], None, env=env)
    url = f"http://127.0.0.1:{port}"
    wait_ready(proc, lambda: http_ok(url + "/health"), 300, "the edge", lambda: stop_process(proc))
    return proc, url


def timed(client: httpx.Client, url: str, prompt: str, max_tokens: int,
          extra: dict[str, Any]) -> tuple[str, int, float]:
    """(text, tokens, seconds from sending the request to `[DONE]`)."""
    body = {"model": "tandem", "messages": [{"role": "user", "content": prompt}], "max_tokens": max_tokens,
            "temperature": 0, "ignore_eos": True, "stream": True} | extra
    text, tokens = "", 0
    t0 = time.perf_counter()
    with client.stream("POST", url + "/v1/chat/completions", json=body) as r:
        r.raise_for_status()
        for line in r.iter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            for choice in json.loads(line[6:])["choices"]:
                text += choice["delta"].get("content", "")
                tokens += len(choice.get("tandem", {}).get("origins", ""))
    return text, tokens, time.perf_counter() - t0


def measure(url: str, pid: int, repeats: int, max_tokens: int) -> dict[str, Any]:
    runs: dict[str, list[tuple[int, float, float]]] = {"plain": [], "page": []}
    ratios, same = [], True
    with httpx.Client(timeout=600) as client:
        for prompt in PROMPTS[:2]:  # warm-up, not timed
            for extra in ({}, PAGE):
                timed(client, url, prompt, max_tokens, extra)
        for r in range(repeats):
            for i, prompt in enumerate(PROMPTS):
                order = ["plain", "page"] if (r + i) % 2 == 0 else ["page", "plain"]
                got = {}
                for kind in order:
                    cpu = cpu_seconds(pid) or 0.0  # Linux: /proc
                    text, tokens, seconds = timed(client, url, prompt, max_tokens, PAGE if kind == "page" else {})
                    got[kind] = (text, seconds)
                    cpu = (cpu_seconds(pid) or 0.0) - cpu
                    runs[kind].append((tokens if kind == "page" else max_tokens, seconds, cpu))
                same = same and got["plain"][0] == got["page"][0]
                ratios.append(got["plain"][1] / got["page"][1])  # = page tok/s / plain tok/s (same tokens)
    out: dict[str, Any] = {}
    for kind, rows in runs.items():
        tokens, seconds, cpu = (sum(col) for col in zip(*rows, strict=True))
        out[kind] = {"requests": len(rows), "tokens": tokens, "seconds": seconds, "tok_s": tokens / seconds,
                     "edge_cpu_ms_per_token": 1e3 * cpu / tokens}
    page, plain = out["page"], out["plain"]
    return out | {"page_vs_plain_tok_s": page["tok_s"] / plain["tok_s"],
                  "page_vs_plain_edge_cpu_per_token": page["edge_cpu_ms_per_token"] / plain["edge_cpu_ms_per_token"],
                  "page_vs_plain_median_pair": statistics.median(ratios), "texts_equal": same}


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--target", default=TEST_TARGET)
    ap.add_argument("--draft", default=TEST_DRAFT)
    ap.add_argument("--gamma", default="adaptive")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--max-tokens", type=int, default=96)
    ap.add_argument("--threads", type=int, default=1, help="torch threads for each of the cloud and the edge")
    ap.add_argument("--out", type=Path)
    args = ap.parse_args(argv)
    console = Console()
    with CloudProcess(threads=args.threads, env={"TANDEM_TARGET": args.target}, ready_timeout_s=300) as cloud:
        edge, url = start_edge(cloud.grpc_target, args.draft, args.gamma, args.threads)
        try:
            result = measure(url, edge.pid, args.repeats, args.max_tokens)
        finally:
            stop_process(edge)
    result = {"command": "python -m tandem_tools.web_cost " + " ".join(argv if argv is not None else sys.argv[1:]),
              "target": args.target, "draft": args.draft, "gamma": args.gamma, "max_tokens": args.max_tokens,
              "threads": args.threads, "prompts": len(PROMPTS), "repeats": args.repeats} | result
    console.print_json(data=result)
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
