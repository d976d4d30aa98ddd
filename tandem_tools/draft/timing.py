"""Decode-step time of candidate draft shapes and of the target: one token at a time after a ~300-token context,
eager PyTorch, float32, one thread (what the edge runs). The defaults of `tandem_tools.draft.train` come from here.

    python -m tandem_tools.draft.timing --threads 1 --out draft-timing.json

`--verify-positions 1,2,3,4,5` also times the target's forward over that many new positions at once (a verify pass
of gamma + 1 positions) and its ratio v to a one-token step; `--draft NAME` times a trained draft (e.g. the shipped
smollm2-135m-draft) beside the candidate shapes.
"""

from __future__ import annotations

import argparse
import itertools
import json
import logging
import statistics
import sys
import time
from pathlib import Path

import torch

from tandem.frspec import FRSpecDraft, draft_config
from tandem.kv import SequenceState

log = logging.getLogger("draft.timing")


def step_ms(model: torch.nn.Module, vocab: int, context: int = 300, steps: int = 40, warmup: int = 5,
            positions: int = 1) -> float:
    """Median ms of one step: feed `positions` tokens after a cache of `context`, argmax each, roll back."""
    gen = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, vocab, (context,), generator=gen).tolist()
    state = SequenceState(model, tokens)  # type: ignore[arg-type]
    state.run(tokens)
    times = []
    for i in range(warmup + steps):
        t0 = time.perf_counter()
        logits = state.run([tokens[(i + j) % context] for j in range(positions)])  # [positions, V]
        logits.argmax(-1).tolist()
        times.append(time.perf_counter() - t0)
        state.rollback(context)
    return 1000 * statistics.median(times[warmup:])


def draft_step_ms(layers: int, hidden: int, k: int, rank: int, vocab: int = 49152) -> float:
    torch.manual_seed(0)
    model = FRSpecDraft(draft_config(vocab, hidden, layers), rank, torch.randperm(vocab)[:k]).eval()
    return step_ms(model, vocab)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--layers", default="1,2,3")
    parser.add_argument("--hidden", default="256,384,512,576")
    parser.add_argument("--k", default="8192,16384")
    parser.add_argument("--rank", default="64,128")
    parser.add_argument("--target", default="smollm2-135m-instruct", help="'' to skip timing the target")
    parser.add_argument("--verify-positions", default="", help="e.g. 1,2,3,4,5: the target's forward over n positions")
    parser.add_argument("--draft", default="", help="also time this trained draft (a name load_model resolves)")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args(argv)
    logging.basicConfig(stream=sys.stdout, level=logging.INFO, format="%(message)s", force=True)
    torch.set_num_threads(args.threads)
    rows: list[dict[str, object]] = []
    target_ms = None
    verify: list[dict[str, object]] = []
    trained: dict[str, object] = {}
    from tandem.models import load_model

    if args.target:
        target = load_model(args.target)
        target_ms = step_ms(target.torch_model, target.vocab_size, steps=20, warmup=3)
        log.info("target %s: %.2f ms/step", args.target, target_ms)
        for n in (int(x) for x in args.verify_positions.split(",") if x.strip()):
            ms = step_ms(target.torch_model, target.vocab_size, steps=20, warmup=3, positions=n)
            verify.append({"positions": n, "ms": round(ms, 2), "v": round(ms / target_ms, 3)})
            log.info(json.dumps(verify[-1]))
        del target
    if args.draft:
        draft = load_model(args.draft)
        ms = step_ms(draft.torch_model, draft.vocab_size)
        trained = {"draft": args.draft, "ms": round(ms, 3), "ratio": round(ms / target_ms, 4) if target_ms else None}
        log.info(json.dumps(trained))
    ints = [[int(x) for x in s.split(",")] for s in (args.layers, args.hidden, args.k, args.rank)]
    for layers, hidden, k, rank in itertools.product(*ints):
        ms = draft_step_ms(layers, hidden, k, rank)
        row: dict[str, object] = {"layers": layers, "hidden": hidden, "k": k, "rank": rank, "ms": round(ms, 3)}
        if target_ms:
            row["ratio"] = round(ms / target_ms, 4)
        rows.append(row)
        log.info(json.dumps(row))
    if args.out:
        report = {"threads": args.threads, "target": args.target, "target_ms": target_ms, "verify": verify,
                  "trained_draft": trained, "drafts": rows}
        args.out.write_text(json.dumps(report, indent=1) + "\n")


if __name__ == "__main__":
    main()
