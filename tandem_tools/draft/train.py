"""Train an FR-Spec draft for the target on its own generated answers (resumable), and write the shippable folder.

    python -m tandem_tools.draft.train --data ~/.cache/tandem/distill-data --out draft-out --work-dir draft-work \\
        --threads 2

Loss on output positions only: w * KL(p_target_top32 || q) + (1 - w) * CE(generated token), both over the K head
tokens (p is renormalised over the top-32 ids the head can express; generated tokens outside it are skipped).
The work dir holds `checkpoint.pt` (written atomically every --ckpt-every steps; a rerun resumes from it, on the
same shards: their names are kept in the checkpoint) and `train_log.jsonl`. The out dir gets the draft
(`tandem.frspec.save_frspec`), the target's tokenizer files, `train_log.jsonl` and `train_report.json`.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import shutil
import sys
import time
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from transformers import LlamaConfig

from tandem.frspec import FRSpecDraft, save_frspec
from tandem_tools.draft import build, data

log = logging.getLogger("draft.train")
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja",
                   "vocab.json", "merges.txt", "added_tokens.json")
# chosen by `python -m tandem_tools.draft.timing` (see the module doc): ~2.5 ms a step, ~4.6% of the target's
DEFAULTS = {"layers": 2, "hidden": 384, "rank": 128, "k": 16384}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", type=Path, default=Path("~/.cache/tandem/distill-data"))
    p.add_argument("--out", type=Path, required=True, help="the shippable draft folder")
    p.add_argument("--work-dir", type=Path, required=True, help="checkpoint + train_log.jsonl (resumes from here)")
    p.add_argument("--target", default="smollm2-135m-instruct", help="for the init and the tokenizer files")
    p.add_argument("--steps", type=int, default=3000)
    p.add_argument("--batch-tokens", type=int, default=8192, help="padded input tokens per step")
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--warmup", type=int, default=100)
    p.add_argument("--weight-decay", type=float, default=0.1)
    p.add_argument("--kl-weight", type=float, default=0.7)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--layers", type=int, default=DEFAULTS["layers"])
    p.add_argument("--hidden", type=int, default=DEFAULTS["hidden"])
    p.add_argument("--intermediate", type=int, default=None, help="default: ~8/3 x hidden, a multiple of 64")
    p.add_argument("--rank", type=int, default=DEFAULTS["rank"])
    p.add_argument("--k", type=int, default=DEFAULTS["k"])
    p.add_argument("--max-len", type=int, default=1280, help="longest input; longer rows lose their prompt's start")
    p.add_argument("--eval-every", type=int, default=200)
    p.add_argument("--eval-tokens", type=int, default=65536, help="cap on the eval rows' tokens")
    p.add_argument("--ckpt-every", type=int, default=100)
    p.add_argument("--log-every", type=int, default=10)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--init-from", type=Path, default=None,
                   help="a work dir (or its checkpoint.pt) of an earlier run: start from its weights and head tokens "
                        "(a fresh optimiser and schedule); ignored when this work dir already has a checkpoint")
    p.add_argument("--export", choices=("best", "last"), default="best",
                   help="ship the weights with the lowest eval loss seen (best.pt in the work dir) or the last ones")
    return p.parse_args(argv)


def lr_at(step: int, total: int, peak: float, warmup: int) -> float:
    """Linear warmup, then cosine down to 10% of the peak."""
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return peak * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))


def losses(model: FRSpecDraft, batch: data.Batch, slot: torch.Tensor, kl_weight: float) -> dict[str, torch.Tensor]:
    """loss, kl, ce and (no grad) the greedy / T=1 acceptance estimates over the batch's output positions."""
    h = model.hidden(batch.inputs)  # [b, L, hidden]
    logq = F.log_softmax(model.subset_logits(h[batch.rows, batch.cols]).float(), dim=-1)  # [n, K]
    # KL(p || q) over the target's top-32 ids inside the head, p renormalised there
    tslot = slot[batch.top_ids]  # [n, 32]
    inside = tslot >= 0  # [n, 32]
    logp = batch.top_logprobs.masked_fill(~inside, float("-inf"))  # [n, 32]
    has = inside.any(-1)  # [n]
    logp = logp[has] - torch.logsumexp(logp[has], -1, keepdim=True)  # [m, 32]
    lq = logq[has].gather(-1, tslot[has].clamp(min=0))  # [m, 32]
    p = logp.exp()  # [m, 32] (0 outside)
    kl = (p * (logp.masked_fill(p == 0, 0.0) - lq)).sum(-1).mean()
    # CE on the generated token, where the head has it
    lslot = slot[batch.labels]  # [n]
    ok = lslot >= 0
    ce = -logq[ok].gather(-1, lslot[ok, None]).mean()
    with torch.no_grad():
        q_top = logq.gather(-1, tslot.clamp(min=0)).exp() * inside  # [n, 32] q at the target's top-32
        accept_t1 = torch.minimum(batch.top_logprobs.exp(), q_top).sum(-1).mean()  # lower bound: top-32 only
        accept_greedy = (model.token_ids[logq.argmax(-1)] == batch.top_ids[:, 0]).float().mean()
    return {"loss": kl_weight * kl + (1 - kl_weight) * ce, "kl": kl, "ce": ce, "accept_greedy": accept_greedy,
            "accept_t1": accept_t1}


@torch.no_grad()
def evaluate(model: FRSpecDraft, batches: list[data.Batch], slot: torch.Tensor, kl_weight: float) -> dict[str, float]:
    was = model.training
    model.eval()
    sums: dict[str, float] = {}
    n = 0
    for b in batches:
        w = len(b.labels)
        for k, v in losses(model, b, slot, kl_weight).items():
            sums[k] = sums.get(k, 0.0) + float(v) * w
        n += w
    model.train(was)
    return {f"eval_{k}": round(v / max(n, 1), 4) for k, v in sums.items()}


def atomic_save(obj: object, path: Path) -> None:
    tmp = path.with_name(path.name + ".tmp")
    torch.save(obj, tmp)
    os.replace(tmp, path)


def param_groups(model: FRSpecDraft, weight_decay: float) -> list[dict[str, Any]]:
    """Decay the matrices; not norms, biases or the [V, r] embedding (most of its rows are rarely seen)."""
    decay: list[torch.nn.Parameter] = []
    no_decay: list[torch.nn.Parameter] = []
    for name, prm in model.named_parameters():
        (decay if prm.ndim == 2 and not name.startswith("embed_low") else no_decay).append(prm)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def target_folder(target: str) -> Path:
    from tandem.models import resolve

    return Path(resolve(target))


def fresh_model(args: argparse.Namespace, train_rows: list[data.Row], eval_rows: list[data.Row]) -> tuple[
        FRSpecDraft, dict[str, Any]]:
    """Choose the head tokens, load the target and initialise the draft from it; what was chosen, for the report."""
    from tandem.models import load_model

    target = load_model(args.target)
    vocab = target.vocab_size
    eos = [t for t in (target.torch_model.config.eos_token_id, target.tokenizer.eos_token_id) if isinstance(t, int)]
    counts = build.token_counts(train_rows)
    ranked = build.rank_tokens(counts, vocab, always=eos)
    head = ranked[: min(args.k, vocab)]  # [K]
    model, svd = build.build_draft(target.torch_model, head, args.layers, args.hidden, args.rank, args.intermediate,
                                   args.seed, torch.tensor([counts.get(int(t), 0) for t in head]))
    info = {
        "k_coverage_train": build.coverage_table(ranked, train_rows),
        "k_coverage_eval": build.coverage_table(ranked, eval_rows),
        **svd,
    }
    del target
    return model, info


def warm_model(source: Path) -> tuple[FRSpecDraft, dict[str, Any]]:
    """An earlier run's draft: its checkpoint's config and head, with best.pt's weights when it has them."""
    folder = source if source.is_dir() else source.parent
    ckpt = torch.load(folder / "checkpoint.pt", weights_only=False)
    model = FRSpecDraft(LlamaConfig.from_dict(ckpt["config"]), ckpt["rank"], ckpt["model"]["token_ids"])
    best = folder / "best.pt"
    model.load_state_dict(torch.load(best, weights_only=False)["model"] if best.exists() else ckpt["model"])
    return model, {**ckpt["build_info"], "init_from_step": ckpt["step"]}


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    logging.basicConfig(stream=sys.stdout, level=logging.INFO, format="%(asctime)s %(message)s")
    torch.set_num_threads(args.threads)
    from tqdm import tqdm

    data_dir, work, out = args.data.expanduser(), args.work_dir.expanduser(), args.out.expanduser()
    work.mkdir(parents=True, exist_ok=True)
    ckpt_path, log_path = work / "checkpoint.pt", work / "train_log.jsonl"
    state = torch.load(ckpt_path, weights_only=False) if ckpt_path.exists() else None
    shards = state["shards"] if state else data.shard_names(data_dir)
    if not shards:
        raise SystemExit(f"no shards in {data_dir}")
    train_rows, eval_rows, eval_source = data.split_rows(data.read_rows(data_dir, shards))
    if state:
        model = FRSpecDraft(LlamaConfig.from_dict(state["config"]), state["rank"], state["model"]["token_ids"])
        model.load_state_dict(state["model"])
        build_info = state["build_info"]
        log.info("resuming from step %d (%s)", state["step"], ckpt_path)
        if log_path.exists():  # drop what was logged after the checkpoint: those steps run again
            kept = [line for line in log_path.read_text().splitlines()
                    if line.strip() and json.loads(line).get("step", 0) <= state["step"]]
            log_path.write_text("".join(line + "\n" for line in kept))
    elif args.init_from is not None:
        model, build_info = warm_model(args.init_from.expanduser())
        log.info("starting from the weights in %s", args.init_from)
    else:
        model, build_info = fresh_model(args, train_rows, eval_rows)
        log.info("head K=%d, coverage of generated tokens by K (eval): %s", model.k, build_info["k_coverage_eval"])
    slot = data.slot_table(model.token_ids, model.vocab_size)
    vocab = model.vocab_size
    cov = {name: data.coverage(rows, model.token_ids, vocab) for name, rows in (("train", train_rows),
                                                                               ("eval", eval_rows))}
    opt = torch.optim.AdamW(param_groups(model, args.weight_decay), lr=args.lr, betas=(0.9, 0.95))
    step, epoch, index, trained_tokens, elapsed, best_loss = 0, 0, 0, 0, 0.0, math.inf
    if state:
        opt.load_state_dict(state["opt"])
        step, epoch, index = state["step"], state["epoch"], state["index"]
        trained_tokens, elapsed, best_loss = state["trained_tokens"], state["elapsed_s"], state["best_loss"]
    pad = int(model.config.pad_token_id or 0)
    eval_pick, total = [], 0
    for r in sorted(eval_rows, key=lambda r: r.id):
        if total >= args.eval_tokens:
            break
        eval_pick.append(r)
        total += len(r)
    eval_lengths = [min(len(r), args.max_len + 1) - 1 for r in eval_pick]
    eval_batches = [data.collate([eval_pick[i] for i in b], args.max_len, pad) for b in data.plan_batches(
        eval_lengths, args.batch_tokens, torch.Generator().manual_seed(0))]
    lengths = [min(len(r), args.max_len + 1) - 1 for r in train_rows]

    def epoch_plan(e: int) -> list[list[int]]:
        return data.plan_batches(lengths, args.batch_tokens, torch.Generator().manual_seed(args.seed * 1000 + e))

    def checkpoint() -> None:
        atomic_save({
            "step": step, "epoch": epoch, "index": index, "trained_tokens": trained_tokens, "elapsed_s": elapsed,
            "best_loss": best_loss,
            "model": model.state_dict(), "opt": opt.state_dict(), "config": model.config.to_dict(),
            "rank": model.rank, "shards": shards, "build_info": build_info, "args": vars(args) | {
                k: str(v) for k, v in vars(args).items() if isinstance(v, Path)},
        }, ckpt_path)

    def write_log(record: dict[str, Any]) -> None:
        with log_path.open("a") as f:
            f.write(json.dumps(record) + "\n")

    if not state:
        write_log({"event": "start", "train_rows": len(train_rows), "eval_rows": len(eval_rows),
                   "eval_source": eval_source, "shards": len(shards), "k": model.k, "coverage": cov, **build_info})
    plan = epoch_plan(epoch)
    model.train()
    bar = tqdm(total=args.steps, initial=step, desc="train draft", mininterval=5, dynamic_ncols=True)
    t_window, tok_window = time.time(), 0
    last_eval: dict[str, float] = {}
    while step < args.steps:
        if index >= len(plan):
            epoch, index = epoch + 1, 0
            plan = epoch_plan(epoch)
        t0 = time.time()
        for g in opt.param_groups:
            g["lr"] = lr_at(step, args.steps, args.lr, args.warmup)
        batch = data.collate([train_rows[i] for i in plan[index]], args.max_len, pad)
        parts = losses(model, batch, slot, args.kl_weight)
        opt.zero_grad(set_to_none=True)
        parts["loss"].backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        step, index = step + 1, index + 1
        trained_tokens += batch.tokens
        tok_window += batch.tokens
        elapsed += time.time() - t0
        bar.update(1)
        bar.set_postfix(loss=f"{parts['loss'].item():.3f}", acc=f"{parts['accept_greedy'].item():.2f}")
        record: dict[str, Any] = {}
        if step % args.eval_every == 0 or step == args.steps:
            last_eval = evaluate(model, eval_batches, slot, args.kl_weight)
            record |= last_eval
            tqdm.write(f"step {step}: " + json.dumps(last_eval))
            if last_eval["eval_loss"] < best_loss:
                best_loss = last_eval["eval_loss"]
                atomic_save({"step": step, "model": model.state_dict(), "eval": last_eval}, work / "best.pt")
        if step % args.log_every == 0 or record:
            now = time.time()
            record = {"step": step, "epoch": epoch, "lr": round(opt.param_groups[0]["lr"], 7),
                      **{k: round(v.item(), 4) for k, v in parts.items()},
                      "tokens_per_s": round(tok_window / max(now - t_window, 1e-9), 1), "tokens": trained_tokens,
                      "elapsed_s": round(elapsed, 1), **record}
            t_window, tok_window = now, 0
            write_log(record)
        if step % args.ckpt_every == 0 or step == args.steps:
            checkpoint()
    bar.close()
    exported: dict[str, Any] = {"exported": "last", "exported_step": step}
    if args.export == "best" and (work / "best.pt").exists():
        best = torch.load(work / "best.pt", weights_only=False)
        model.load_state_dict(best["model"])
        exported = {"exported": "best", "exported_step": best["step"]}
        last_eval = best["eval"]
    elif not last_eval:  # the loop evaluates at its last step; empty when it had nothing left to run
        last_eval = evaluate(model, eval_batches, slot, args.kl_weight)
    return export(args, model, out, work, {
        **exported, "steps": step, "epochs": round(epoch + index / max(len(plan), 1), 3),
        "trained_tokens": trained_tokens, "train_time_s": round(elapsed, 1), "train_rows": len(train_rows),
        "eval_rows": len(eval_rows), "eval_source": eval_source, "shards": len(shards), "coverage": cov,
        **build_info, **last_eval,
    })


def portable(path: Path) -> str:
    """A path as the report ships it: under the home folder as `~/...`, elsewhere by its name alone."""
    path = path.expanduser()
    try:
        return "~/" + str(path.resolve().relative_to(Path.home().resolve()))
    except ValueError:
        return path.name


def export(args: argparse.Namespace, model: FRSpecDraft, out: Path, work: Path, facts: dict[str, Any]) -> dict[
        str, Any]:
    """The shippable folder: the draft, the target's tokenizer files, the log and the report."""
    from transformers import AutoTokenizer

    from tandem.models import tokenizer_fingerprint
    from tandem_tools.draft.timing import step_ms

    model.eval()
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    save_frspec(model, tmp)
    src = target_folder(args.target)
    for name in TOKENIZER_FILES:
        if (src / name).is_file():
            shutil.copy2(src / name, tmp / name)
    shutil.copy2(work / "train_log.jsonl", tmp / "train_log.jsonl")
    with torch.no_grad():
        decode_ms = step_ms(model, model.vocab_size, steps=20, warmup=3)
    target_fp = tokenizer_fingerprint(AutoTokenizer.from_pretrained(str(src)))
    draft_fp = tokenizer_fingerprint(AutoTokenizer.from_pretrained(str(tmp)))
    report = {
        "args": {k: portable(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
        "dims": {"layers": model.config.num_hidden_layers, "hidden": model.config.hidden_size,
                 "intermediate": model.config.intermediate_size, "rank": model.rank, "k": model.k,
                 "vocab": model.vocab_size},
        "n_params": sum(p.numel() for p in model.parameters()),
        "weights_bytes": (tmp / "frspec.safetensors").stat().st_size,
        "decode_step_ms_float32": round(decode_ms, 3), "decode_threads": torch.get_num_threads(),
        "target": args.target, "target_fingerprint": target_fp, "draft_fingerprint": draft_fp,
        "torch": torch.__version__, **facts,
    }
    (tmp / "train_report.json").write_text(json.dumps(report, indent=1) + "\n")
    shutil.rmtree(out, ignore_errors=True)
    os.replace(tmp, out)
    shutil.copy2(out / "train_report.json", work / "train_report.json")
    log.info("wrote %s: %s", out, json.dumps({k: v for k, v in report.items() if k not in ("args", "coverage")}))
    return report


if __name__ == "__main__":
    main()
