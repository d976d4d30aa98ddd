"""Rebuild a distillation folder from the gzipped answers kept in the repository (`data/distill/`): each shard's
jsonl as it was, and its top-32 `.npz` recomputed by one teacher-forced pass of the target over prompt + answer.

    python -m tandem_tools.distill.rebuild --src data/distill --out ~/.cache/tandem/distill-data --threads 2

The generating job kept the top-32 of the logits that produced each token, from batched decoding with a KV cache;
a teacher-forced pass over the same tokens gives the same distribution up to float rounding (a test checks the
ranking). Resumable: shards whose jsonl and npz are both in `--out` are skipped; each is written atomically.
"""

from __future__ import annotations

import argparse
import gzip
import json
import logging
import shutil
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from tandem_tools.distill.decode import TOP_K, RowResult
from tandem_tools.distill.generate import write_shard
from tandem_tools.distill.target import TARGET

log = logging.getLogger("distill.rebuild")


@torch.no_grad()
def teacher_forced_topk(model: Any, prompt_ids: list[int], output_ids: list[int], top_k: int = TOP_K) -> tuple[
        np.ndarray, np.ndarray]:
    """The target's top-k (ids, log-probs) at every answer position: those that predicted output_ids[i]."""
    ids = torch.tensor([prompt_ids + output_ids[:-1]])  # [1, P + n - 1]
    logits = model(input_ids=ids, use_cache=False).logits[0, len(prompt_ids) - 1:].float()  # [n, V]
    top = torch.log_softmax(logits, dim=-1).topk(top_k, dim=-1)
    return top.indices.numpy().astype(np.uint16), top.values.numpy().astype(np.float16)


def rebuild_shard(model: Any, src: Path, out: Path) -> int:
    """One shard: its jsonl as it was, its npz recomputed (written as the generating job writes them); the answer
    tokens it covered."""
    with gzip.open(src, "rt") as f:
        records = [json.loads(line) for line in f if line.strip()]
    empty = (np.zeros((0, TOP_K), np.uint16), np.zeros((0, TOP_K), np.float16))
    results = [RowResult(r["output_ids"], r.get("finish", "length"),
                         *(teacher_forced_topk(model, r["prompt_ids"], r["output_ids"]) if r["output_ids"] else empty))
               for r in records]
    write_shard(out, int(src.name.split(".")[0].removeprefix("shard-")), records, results)
    return sum(len(r.output_ids) for r in results)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--src", type=Path, default=Path("data/distill"), help="gzipped shard-*.jsonl.gz files")
    p.add_argument("--out", type=Path, default=Path("~/.cache/tandem/distill-data"))
    p.add_argument("--target", default=TARGET)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--limit", type=int, default=None, help="only the first N shards")
    args = p.parse_args(argv)
    logging.basicConfig(stream=sys.stdout, level=logging.INFO, format="%(asctime)s %(message)s", force=True)
    torch.set_num_threads(args.threads)
    log.info("threads: torch.get_num_threads()=%d (asked %d)", torch.get_num_threads(), args.threads)
    out = args.out.expanduser()
    out.mkdir(parents=True, exist_ok=True)
    for extra in ("selfq-questions.jsonl", "run-config.json"):
        if (args.src / extra).is_file() and not (out / extra).exists():
            shutil.copy2(args.src / extra, out / extra)
    shards = sorted(args.src.glob("shard-*.jsonl.gz"))[: args.limit]
    todo = [s for s in shards if not all((out / s.name.removesuffix(".jsonl.gz")).with_suffix(x).is_file()
                                         for x in (".jsonl", ".npz"))]
    log.info("%d shards in %s, %d to rebuild into %s", len(shards), args.src, len(todo), out)
    if not todo:
        return
    from tandem.models import load_model

    model = load_model(args.target).model
    t0, tokens = time.time(), 0
    for i, src in enumerate(todo):
        tokens += rebuild_shard(model, src, out)
        log.info("%s: %d/%d shards, %d answer tokens, %.0f tok/s", src.name, i + 1, len(todo), tokens,
                 tokens / (time.time() - t0))


if __name__ == "__main__":
    main()
