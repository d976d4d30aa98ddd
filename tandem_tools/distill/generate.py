"""Resumable background job: the target's own answers (greedy or seeded samples) to the distillation prompts.

    tandem distill-data --out ~/.cache/tandem/distill-data --threads 1

Output folder:
  shard-NNNNN.jsonl  one line per prompt: {"id", "category", "split", "mode": "greedy"|"sample", "temperature",
                     "top_p", "seed", "prompt_ids", "output_ids", "finish": "eos"|"length"} (+ "question_prompt",
                     "question" for category selfq). No padding; output_ids include the final EOS when finish=eos.
  shard-NNNNN.npz    the target's top-32 at every generated position, for a KL term: "ids" (prompt ids, same order
                     as the jsonl), "offsets" (int64 [rows+1]; row i is offsets[i]:offsets[i+1], aligned with
                     output_ids), "top_ids" (uint16 [positions, 32]), "top_logprobs" (float16 [positions, 32],
                     log_softmax of the raw, untempered logits that produced the token).
  selfq-questions.jsonl  questions the target wrote for the selfq category (reused on restart).
  progress.json, run-config.json.
Both shard files are written atomically (temp file + rename, npz first) after every batch; on restart, ids already
in a shard-*.jsonl are skipped, so the job can be killed at any time and restarted with the same command.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import re
import sys
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np
import torch

from tandem_protocol.openai_api.text import chat_prompt
from tandem_tools.distill.decode import RowResult, RowSpec, decode_batch
from tandem_tools.distill.prompts import Prompt, build_prompts, hash_int
from tandem_tools.distill.target import load_target

log = logging.getLogger("distill.generate")
TEMPERATURES = (0.7, 0.8, 0.9, 1.0)
TOP_P = 0.95


def decoding_settings(pid: str) -> dict[str, Any]:
    """Greedy for about half the prompts, else sampling at T in 0.7-1.0, top_p 0.95, seed from the id."""
    h = hash_int("mode:" + pid)
    if h % 2 == 0:
        return {"mode": "greedy", "temperature": None, "top_p": None, "seed": None}
    return {
        "mode": "sample",
        "temperature": TEMPERATURES[(h >> 1) % 4],
        "top_p": TOP_P,
        "seed": hash_int("seed:" + pid),
    }


def atomic_write(path: Path, write: Callable[[BinaryIO], object]) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with tmp.open("wb") as handle:
        write(handle)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(tmp, path)


def write_json(path: Path, obj: object) -> None:
    atomic_write(path, lambda h: h.write(json.dumps(obj, indent=1).encode()))


def scan_done(out: Path) -> tuple[set[str], int, Counter[str], int]:
    """Ids already generated, tokens generated, per-category counts, and the next free shard number."""
    for stale in out.glob("*.tmp"):
        stale.unlink()
    done: set[str] = set()
    tokens, last = 0, -1
    cats: Counter[str] = Counter()
    for path in sorted(out.glob("shard-*.jsonl")):
        last = max(last, int(path.stem.split("-")[1]))
        for line in path.read_text().splitlines():
            rec = json.loads(line)
            done.add(rec["id"])
            tokens += len(rec["output_ids"])
            cats[f"{rec['category']}/{rec['split']}"] += 1
    for npz in out.glob("shard-*.npz"):  # an npz without its jsonl is from a batch that did not finish
        if not npz.with_suffix(".jsonl").exists():
            npz.unlink()
    return done, tokens, cats, last + 1


def clean_question(text: str) -> str:
    """The first usable question in the target's reply: quotes, "Question:" prefixes and preambles removed."""
    for line in sorted(text.splitlines(), key=lambda x: "?" not in x):  # lines with a question mark first
        line = re.sub(r"^\s*(question\s*:|q\s*:|\d+[.)]|[-*])\s*", "", line.strip(), flags=re.I)
        quoted = re.search(r"[\"“]([^\"”]{8,})", line)
        if quoted and "?" in quoted.group(1):
            line = quoted.group(1)
        if "?" in line:
            line = line[: line.index("?") + 1]
        line = line.strip(" \"'*“”")
        if len(line) >= 8:
            return line
    return ""


class QuestionBank:
    """Questions the target writes for the lazy `selfq` prompts, generated when first needed and kept on disk."""

    def __init__(self, path: Path, model: Any, tok: Any, eos: set[int], max_tokens: int = 64) -> None:
        self.path, self.model, self.tok, self.eos, self.max_tokens = path, model, tok, eos, max_tokens
        self.questions: dict[str, str] = {}
        if path.exists():
            for line in path.read_text().splitlines():
                try:
                    rec = json.loads(line)
                except json.JSONDecodeError:  # a line cut short by a kill; that question is generated again
                    continue
                self.questions[rec["id"]] = rec["question"]

    def resolve(self, prompts: list[Prompt]) -> None:
        todo = [p for p in prompts if p.lazy and p.id not in self.questions]
        if not todo:
            return
        specs = [RowSpec(chat_prompt(self.tok, p.messages), "sample", 0.8, TOP_P, hash_int("q:" + p.id)) for p in todo]
        results = decode_batch(self.model, specs, self.max_tokens, self.eos, self.tok.pad_token_id)
        lines = []
        for prompt, res in zip(todo, results, strict=True):
            question = clean_question(self.tok.decode(res.output_ids, skip_special_tokens=True))
            self.questions[prompt.id] = question
            lines.append(json.dumps({"id": prompt.id, "question": question}))
        with self.path.open("a") as handle:  # append-only; a lost line is simply regenerated identically
            handle.write("\n".join(lines) + "\n")

    def user_messages(self, prompt: Prompt) -> list[dict[str, str]]:
        question = self.questions.get(prompt.id, "")
        return [{"role": "user", "content": question}] if question else prompt.messages


def write_shard(out: Path, index: int, records: list[dict[str, Any]], results: list[RowResult]) -> None:
    offsets = np.cumsum([0] + [len(r.output_ids) for r in results]).astype(np.int64)
    arrays = {
        "ids": np.array([r["id"] for r in records]),
        "offsets": offsets,
        "top_ids": np.concatenate([r.top_ids for r in results]).astype(np.uint16),
        "top_logprobs": np.concatenate([r.top_logprobs for r in results]).astype(np.float16),
    }
    stem = out / f"shard-{index:05d}"
    atomic_write(stem.with_suffix(".npz"), lambda h: np.savez_compressed(h, **arrays))  # type: ignore[arg-type]
    body = "".join(json.dumps(r, separators=(",", ":")) + "\n" for r in records)
    atomic_write(stem.with_suffix(".jsonl"), lambda h: h.write(body.encode()))


def run_batch(
    model: Any, tok: Any, chunk: list[tuple[Prompt, list[int]]], eos: set[int], max_new: int, bank: QuestionBank
) -> tuple[list[dict[str, Any]], list[RowResult]]:
    """Decode one batch; the jsonl records and the per-row results (for the npz)."""
    settings = [decoding_settings(p.id) for p, _ in chunk]
    specs = [
        RowSpec(ids, s["mode"], s["temperature"] or 1.0, s["top_p"] or 1.0, s["seed"] or 0)
        for (_, ids), s in zip(chunk, settings, strict=True)
    ]
    results = decode_batch(model, specs, max_new, eos, tok.pad_token_id)
    records = []
    for (p, ids), s, res in zip(chunk, settings, results, strict=True):
        rec = {"id": p.id, "category": p.category, "split": p.split, **s, "prompt_ids": ids}
        rec |= {"output_ids": res.output_ids, "finish": res.finish}
        if p.lazy:
            rec |= {"question_prompt": p.messages[-1]["content"], "question": bank.questions.get(p.id, "")}
        records.append(rec)
    return records, results


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description="Generate distillation data from the target (resumable).")
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--window", type=int, default=4, help="batches per length-sorted window of pending prompts")
    parser.add_argument("--max-new-tokens", type=int, default=256)
    parser.add_argument("--max-prompt-tokens", type=int, default=1024)
    parser.add_argument("--limit", type=int, default=None, help="only the first N prompts of the interleaved order")
    parser.add_argument("--seed", type=int, default=0, help="prompt-set seed (must stay the same across restarts)")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    logging.basicConfig(stream=sys.stdout, level=logging.INFO, format="%(asctime)s %(message)s", force=True)
    torch.set_num_threads(args.threads)
    log.info(
        "threads: torch.get_num_threads()=%d (asked %d), pid %d", torch.get_num_threads(), args.threads, os.getpid()
    )
    out: Path = args.out.expanduser()
    out.mkdir(parents=True, exist_ok=True)
    config_path = out / "run-config.json"
    if config_path.exists() and json.loads(config_path.read_text())["seed"] != args.seed:
        raise SystemExit(f"{out} was generated with another --seed; use the same seed or another --out")
    write_json(config_path, {"seed": args.seed, "max_new_tokens": args.max_new_tokens, "top_k_saved": 32})

    model, tok = load_target()
    eos = {int(tok.eos_token_id)}
    gen_eos = model.generation_config.eos_token_id
    eos |= set(gen_eos if isinstance(gen_eos, list) else [gen_eos] if gen_eos is not None else [])
    prompts = build_prompts(args.seed)[: args.limit]
    done, tokens_total, cats, shard = scan_done(out)
    pending = [p for p in prompts if p.id not in done]
    log.info(
        "prompts: %d total, %d done, %d pending; %d tokens so far", len(prompts), len(done), len(pending), tokens_total
    )
    previous = json.loads((out / "progress.json").read_text()) if (out / "progress.json").exists() else {}
    elapsed_before = float(previous.get("elapsed_total_s", 0.0))
    bank = QuestionBank(out / "selfq-questions.jsonl", model, tok, eos)
    start, run_tokens, run_prompts, step = time.time(), 0, 0, args.batch * args.window

    for w in range(0, len(pending), step):
        window = pending[w : w + step]
        bank.resolve(window)
        encoded = []
        for p in window:
            ids = chat_prompt(tok, bank.user_messages(p) if p.lazy else p.messages)
            if len(ids) <= args.max_prompt_tokens:
                encoded.append((p, ids))
            else:
                log.warning("skipping %s: %d prompt tokens", p.id, len(ids))
        encoded.sort(key=lambda e: len(e[1]))
        for b in range(0, len(encoded), args.batch):
            chunk = encoded[b : b + args.batch]
            t0 = time.time()
            records, results = run_batch(model, tok, chunk, eos, args.max_new_tokens, bank)
            dt = time.time() - t0
            cats.update(f"{r['category']}/{r['split']}" for r in records)
            write_shard(out, shard, records, results)
            new_tokens = sum(len(r.output_ids) for r in results)
            run_tokens += new_tokens
            tokens_total += new_tokens
            run_prompts += len(chunk)
            elapsed = time.time() - start
            done_n = len(done) + run_prompts
            write_json(
                out / "progress.json",
                {
                    "prompts_total": len(prompts),
                    "prompts_done": done_n,
                    "tokens_generated": tokens_total,
                    "tokens_per_s": round(run_tokens / elapsed, 2),
                    "elapsed_s": round(elapsed, 1),
                    "elapsed_total_s": round(elapsed_before + elapsed, 1),
                    "last_shard": shard,
                    "done_by_category_split": dict(sorted(cats.items())),
                    "threads": args.threads,
                    "batch": args.batch,
                    "pid": os.getpid(),
                    "updated": time.strftime("%Y-%m-%d %H:%M:%S"),
                },
            )
            eta_h = (len(prompts) - done_n) * elapsed / max(run_prompts, 1) / 3600
            log.info(
                "shard %05d: %d prompts (len %d-%d), %d tokens in %.1f s = %.1f tok/s"
                " | run %.1f tok/s | %d/%d done, eta %.1f h",
                shard, len(chunk), len(chunk[0][1]), len(chunk[-1][1]), new_tokens, dt, new_tokens / dt,
                run_tokens / elapsed, done_n, len(prompts), eta_h,
            )  # fmt: skip
            shard += 1
    log.info("all %d prompts done", len(prompts))


if __name__ == "__main__":
    main()
