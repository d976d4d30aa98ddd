"""The distillation shards (`tandem_tools.distill.generate`) as training sequences for the draft.

A row is prompt_ids + output_ids. The loss sits on the output positions only: input position len(prompt) + j - 1
predicts output token j, with two targets there: the token the target generated (cross-entropy) and the target's
top-32 distribution (KL term). The draft's head scores only K token ids, so generated tokens outside them cannot be
predicted: `coverage` measures how much of the data that loses.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

log = logging.getLogger("draft.data")
TOP = 32  # top-k saved per generated position by the generator


@dataclass
class Row:
    id: str
    split: str  # "train" | "eval"
    mode: str  # "greedy" | "sample"
    prompt_ids: np.ndarray  # [p] int32
    output_ids: np.ndarray  # [n] int32
    top_ids: np.ndarray  # [n, 32] uint16: the target's top-32 ids at each generated position
    top_logprobs: np.ndarray  # [n, 32] float16: their log-probabilities (raw, untempered)

    def __len__(self) -> int:
        return len(self.prompt_ids) + len(self.output_ids)


def shard_names(data_dir: Path) -> list[str]:
    """Complete shards (the jsonl is renamed into place after its npz), sorted: 'shard-00000', ..."""
    return sorted(p.stem for p in data_dir.glob("shard-*.jsonl") if p.with_suffix(".npz").is_file())


def read_shard(data_dir: Path, name: str) -> list[Row]:
    records = [json.loads(line) for line in (data_dir / f"{name}.jsonl").read_text().splitlines() if line.strip()]
    with np.load(data_dir / f"{name}.npz") as z:
        ids, offsets = [str(x) for x in z["ids"]], z["offsets"]
        top_ids, top_lp = z["top_ids"], z["top_logprobs"]
    if ids != [r["id"] for r in records]:
        raise ValueError(f"{name}: the npz rows do not match the jsonl rows")
    rows = []
    for i, r in enumerate(records):
        a, b = int(offsets[i]), int(offsets[i + 1])
        if b - a != len(r["output_ids"]):
            raise ValueError(f"{name}: row {r['id']} has {len(r['output_ids'])} output ids but {b - a} top-k rows")
        rows.append(Row(
            r["id"], r["split"], r["mode"], np.asarray(r["prompt_ids"], dtype=np.int32),
            np.asarray(r["output_ids"], dtype=np.int32), top_ids[a:b], top_lp[a:b],
        ))
    return rows


def read_rows(data_dir: Path, names: Iterable[str] | None = None) -> list[Row]:
    """Every row of the named shards (default: all complete shards), rows without output dropped."""
    names = shard_names(data_dir) if names is None else list(names)
    rows = [r for name in names for r in read_shard(data_dir, name) if len(r.output_ids)]
    log.info("read %d rows from %d shards in %s", len(rows), len(names), data_dir)
    return rows


def split_rows(rows: Sequence[Row], eval_per_mille: int = 30) -> tuple[list[Row], list[Row], str]:
    """(train, eval, where eval came from). Rows marked eval; when there are none, ~3% of train by a hash of the id."""
    train = [r for r in rows if r.split != "eval"]
    held = [r for r in rows if r.split == "eval"]
    if held:
        return train, held, "split=eval"
    hashed = [int(hashlib.sha1(r.id.encode()).hexdigest()[:8], 16) % 1000 < eval_per_mille for r in train]
    held = [r for r, h in zip(train, hashed, strict=True) if h] or train[-1:]
    return [r for r in train if r not in held], held, f"{eval_per_mille}/1000 of train by id hash (no eval rows)"


def slot_table(token_ids: torch.Tensor, vocab: int) -> torch.Tensor:
    """[V] int64: the head column of each vocabulary id, -1 for ids outside `token_ids`."""
    slot = torch.full((vocab,), -1, dtype=torch.long)
    slot[token_ids] = torch.arange(len(token_ids))
    return slot


def coverage(rows: Sequence[Row], token_ids: torch.Tensor, vocab: int) -> dict[str, float]:
    """How much a head over `token_ids` can express: generated tokens, the target's top-1 and top-32 mass inside."""
    inside = slot_table(token_ids, vocab).numpy() >= 0
    gen = np.concatenate([r.output_ids for r in rows]) if rows else np.zeros(0, np.int64)
    tops = np.concatenate([r.top_ids for r in rows]) if rows else np.zeros((0, TOP), np.int64)
    probs = np.exp(np.concatenate([r.top_logprobs for r in rows]).astype(np.float32)) if rows else np.zeros((0, TOP))
    total = float(probs.sum()) or 1.0
    return {
        "generated_tokens": len(gen),
        "generated_covered": float(inside[gen].mean()) if len(gen) else 0.0,
        "target_top1_covered": float(inside[tops[:, 0].astype(np.int64)].mean()) if len(tops) else 0.0,
        "target_top32_mass_covered": float((probs * inside[tops.astype(np.int64)]).sum() / total),
    }


@dataclass
class Batch:
    inputs: torch.Tensor  # [b, L] int64 input ids, right-padded (real positions never attend to padding)
    rows: torch.Tensor  # [n] int64: the batch row of each loss position
    cols: torch.Tensor  # [n] int64: its input position
    labels: torch.Tensor  # [n] int64: the generated token there
    top_ids: torch.Tensor  # [n, 32] int64: the target's top-32 ids
    top_logprobs: torch.Tensor  # [n, 32] float32: their log-probabilities
    tokens: int  # real (non-pad) input tokens


def collate(rows: Sequence[Row], max_len: int, pad_id: int = 0) -> Batch:
    """Rows -> one right-padded batch; a row longer than `max_len` + 1 loses the start of its prompt."""
    seqs, starts = [], []
    for r in rows:
        seq = np.concatenate([r.prompt_ids, r.output_ids])
        cut = max(0, len(seq) - (max_len + 1))
        seqs.append(seq[cut:])
        starts.append(len(r.prompt_ids) - cut)  # index in the cut sequence of output token 0
    width = max(len(s) for s in seqs) - 1
    inputs = torch.full((len(rows), width), pad_id, dtype=torch.long)  # [b, L]
    bi, ci, lab, tid, tlp = [], [], [], [], []
    for i, (r, seq, start) in enumerate(zip(rows, seqs, starts, strict=True)):
        inputs[i, : len(seq) - 1] = torch.from_numpy(seq[:-1].astype(np.int64))
        first = max(start, 1)  # output tokens whose predicting position exists (start 0: the whole prompt was cut)
        j = np.arange(first, len(seq)) - start  # output indices with a loss position
        bi.append(np.full(len(j), i))
        ci.append(j + start - 1)
        lab.append(r.output_ids[j])
        tid.append(r.top_ids[j])
        tlp.append(r.top_logprobs[j])
    return Batch(
        inputs=inputs,
        rows=torch.from_numpy(np.concatenate(bi).astype(np.int64)),
        cols=torch.from_numpy(np.concatenate(ci).astype(np.int64)),
        labels=torch.from_numpy(np.concatenate(lab).astype(np.int64)),
        top_ids=torch.from_numpy(np.concatenate(tid).astype(np.int64)),
        top_logprobs=torch.from_numpy(np.concatenate(tlp).astype(np.float32)),
        tokens=sum(len(s) - 1 for s in seqs),
    )


def plan_batches(lengths: Sequence[int], batch_tokens: int, gen: torch.Generator, pool: int = 256) -> list[list[int]]:
    """Row indices in batches of at most `batch_tokens` padded tokens (one row at least): a shuffle, then rows of
    similar length grouped inside pools of `pool` rows to waste little padding, then the batches shuffled."""
    order = torch.randperm(len(lengths), generator=gen).tolist()
    batches: list[list[int]] = []
    for p in range(0, len(order), pool):
        chunk = sorted(order[p : p + pool], key=lambda i: lengths[i])
        cur: list[int] = []
        for i in chunk:
            width = max([lengths[j] for j in cur] + [lengths[i]])
            if cur and width * (len(cur) + 1) > batch_tokens:
                batches.append(cur)
                cur = []
            cur.append(i)
        if cur:
            batches.append(cur)
    perm = torch.randperm(len(batches), generator=gen).tolist()
    return [batches[i] for i in perm]
