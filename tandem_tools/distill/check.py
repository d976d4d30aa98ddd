"""Sanity checks before a long run: read a few answers, and compare batched greedy decoding with unbatched `generate`.

python -m tandem_tools.distill.check --threads 1 --n 12 --new 96
"""

from __future__ import annotations

import argparse

import torch

from tandem_protocol.openai_api.text import chat_prompt
from tandem_tools.distill.decode import RowSpec, decode_batch
from tandem_tools.distill.prompts import build_prompts
from tandem_tools.distill.target import load_target

READ = ("Why is the sky blue?", "Write a haiku about the first snow of winter.", "What is 15% of 240?")


def first_diff(a: list[int], b: list[int]) -> int | None:
    for i, (x, y) in enumerate(zip(a, b, strict=False)):
        if x != y:
            return i
    return None if len(a) == len(b) else min(len(a), len(b))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--n", type=int, default=12, help="prompts in the batched-vs-unbatched comparison")
    parser.add_argument("--new", type=int, default=96)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    print(f"threads={torch.get_num_threads()}")  # noqa: T201
    model, tok = load_target()
    eos, pad = {tok.eos_token_id}, tok.pad_token_id

    reads = [chat_prompt(tok, [{"role": "user", "content": q}]) for q in READ]
    for q, res in zip(READ, decode_batch(model, [RowSpec(r) for r in reads], 200, eos, pad), strict=True):
        print(f"\n### {q}\n{tok.decode(res.output_ids, skip_special_tokens=True)}")  # noqa: T201

    prompts = build_prompts(0)
    picked, seen = [], set()
    for p in prompts:  # one per category first, then fill
        if p.category not in seen and not p.lazy:
            seen.add(p.category)
            picked.append(p)
    picked += [p for p in prompts if not p.lazy and p not in picked][: max(0, args.n - len(picked))]
    ids = [chat_prompt(tok, p.messages) for p in picked[: args.n]]
    print(f"\nbatched greedy (batch {len(ids)}, prompt lengths {sorted(len(i) for i in ids)}) vs unbatched generate")  # noqa: T201
    batched = decode_batch(model, [RowSpec(i) for i in ids], args.new, eos, pad)
    same = 0
    for p, prompt, res in zip(picked, ids, batched, strict=True):
        full = model.generate(  # type: ignore[operator]
            torch.tensor([prompt]), do_sample=False, max_new_tokens=args.new)[0, len(prompt) :]
        ref = full.tolist()
        if ref and ref[-1] in eos:
            ref = ref[: ref.index(ref[-1]) + 1]
        diff = first_diff(ref, res.output_ids)
        same += diff is None
        note = "EQUAL" if diff is None else f"DIFFER at token {diff}"
        if diff is not None:
            note += (
                f" (top-2 logprobs there {res.top_logprobs[diff, :2].tolist() if diff < len(res.output_ids) else '-'})"
            )
        print(f"{p.id:28s} {len(res.output_ids):4d} tokens  {note}")  # noqa: T201
    print(f"{same}/{len(ids)} identical")  # noqa: T201

    spec = RowSpec(ids[0], "sample", 0.9, 0.95, 1234)
    alone = decode_batch(model, [spec], 48, eos, pad)[0].output_ids
    mixed = decode_batch(model, [spec, *[RowSpec(i, "sample", 0.8, 0.95, 7) for i in ids[1:4]]], 48, eos, pad)
    print(f"seeded sample alone == in a batch: {alone == mixed[0].output_ids}")  # noqa: T201


if __name__ == "__main__":
    main()
