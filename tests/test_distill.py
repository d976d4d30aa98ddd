"""Distillation data: batched decoding gives each greedy row the target's own output and top-k, prompts are
deterministic and split by id, and none of the benchmark chat trace's requests is among them."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from tandem.models import LoadedModel
from tandem.sampling import SamplingParams
from tandem.session import generate_autoregressive
from tandem_tools.distill.decode import RowSpec, decode_batch
from tandem_tools.distill.generate import clean_question
from tandem_tools.distill.prompts import build_prompts, split_of

ROOT = Path(__file__).resolve().parents[1]


def test_batched_greedy_rows_are_the_targets_own(tiny_target: LoadedModel) -> None:
    prompts = [[5, 9, 14], [33] * 7 + [34], [10, 20, 30, 40, 50], [7]]
    specs = [RowSpec(p) for p in prompts] + [RowSpec([8, 9, 10], "sample", 0.9, 0.95, seed=3)]
    results = decode_batch(tiny_target.model, specs, 12, eos_ids=set(), pad_id=0)
    for p, r in zip(prompts, results, strict=False):
        want = generate_autoregressive(tiny_target, p, SamplingParams(max_tokens=12, ignore_eos=True)).tokens
        assert r.output_ids == want and r.finish == "length"
        assert r.top_ids[:, 0].tolist() == want  # greedy: the chosen token is the top-1
        assert np.all(np.diff(r.top_logprobs.astype(np.float32), axis=1) <= 1e-3)  # sorted, best first
    again = decode_batch(tiny_target.model, specs[-1:], 12, eos_ids=set(), pad_id=0)[0]
    assert len(results[-1].output_ids) == 12 and again.output_ids == results[-1].output_ids  # seeded by the row


def test_prompts_are_deterministic_split_by_id_and_not_the_benchmarks() -> None:
    a, b = build_prompts(0), build_prompts(0)
    assert [p.id for p in a] == [p.id for p in b] and len({p.id for p in a}) == len(a) > 5000
    assert all(p.split == split_of(p.id) for p in a)
    assert 0.01 < sum(p.split == "eval" for p in a) / len(a) < 0.06
    assert len({p.category for p in a}) >= 8
    chat = [json.loads(line) for line in (ROOT / "benchmarks" / "traces" / "chat.jsonl").read_text().splitlines()]
    asked = {m["content"] for r in chat for m in r["messages"] if m["role"] == "user"}
    taught = {m["content"] for p in a for m in p.messages}
    assert not asked & taught


def test_the_targets_own_questions_are_cleaned() -> None:
    assert clean_question('Here is one: "What makes a bridge stable in strong wind?" I hope') == \
        "What makes a bridge stable in strong wind?"
    assert clean_question("Question: Why do cats purr? More text") == "Why do cats purr?"
    assert clean_question("ok") == ""


def test_rebuilt_topk_matches_what_generation_kept(tiny_target: LoadedModel, tmp_path: Path) -> None:
    import gzip

    from tandem_tools.distill.generate import write_shard
    from tandem_tools.distill.rebuild import rebuild_shard

    specs = [RowSpec([5, 9, 14]), RowSpec([8, 9, 10], "sample", 0.9, 0.95, seed=3), RowSpec([33] * 7 + [34])]
    results = decode_batch(tiny_target.model, specs, 10, eos_ids=set(), pad_id=0)
    records = [{"id": f"r{i}", "prompt_ids": s.prompt_ids} for i, s in enumerate(specs)]
    records = [r | {"output_ids": res.output_ids} for r, res in zip(records, results, strict=True)]
    kept, src, out = tmp_path / "kept", tmp_path / "src", tmp_path / "out"
    for d in (kept, src, out):
        d.mkdir()
    write_shard(kept, 0, records, results)
    with gzip.open(src / "shard-00000.jsonl.gz", "wb") as f:
        f.write((kept / "shard-00000.jsonl").read_bytes())
    assert rebuild_shard(tiny_target.model, src / "shard-00000.jsonl.gz", out) == 30
    assert (out / "shard-00000.jsonl").read_bytes() == (kept / "shard-00000.jsonl").read_bytes()
    with np.load(kept / "shard-00000.npz") as a, np.load(out / "shard-00000.npz") as b:
        assert a["ids"].tolist() == b["ids"].tolist() and a["offsets"].tolist() == b["offsets"].tolist()
        assert (a["top_ids"][:, 0] == b["top_ids"][:, 0]).all()
        assert (a["top_ids"][:, :8] == b["top_ids"][:, :8]).mean() > 0.95  # near-ties lower down may swap
        assert np.allclose(a["top_logprobs"].astype(np.float32), b["top_logprobs"].astype(np.float32), atol=0.02)
