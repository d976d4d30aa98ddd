"""Train the demo pair: a byte-level BPE tokenizer, a Llama target, and a Llama draft distilled from the target.

Every stage checkpoints into a work directory and resumes from there, so an interrupted run carries on.
Stages: tokenizer -> encoded corpus -> target (cross-entropy) -> draft (KL to the target's soft labels + CE) -> export.
"""

from __future__ import annotations

import json
import math
import platform
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from tandem_tools.train import data

EOS = "<|endoftext|>"
PAD = "<|pad|>"


@dataclass(frozen=True)
class TrainConfig:
    vocab_size: int = 8192
    seq_len: int = 256
    batch_size: int = 8
    target_steps: int = 950
    target_lr: float = 2e-3
    draft_steps: int = 750
    draft_lr: float = 3e-3
    distill_alpha: float = 0.7  # weight of KL(p_target || q_draft); 1 - alpha on cross-entropy
    warmup: int = 40
    checkpoint_every: int = 25
    eval_windows: int = 64
    seed: int = 1234


def target_config(vocab_size: int) -> LlamaConfig:
    return LlamaConfig(
        vocab_size=vocab_size, hidden_size=512, num_hidden_layers=6, num_attention_heads=8, num_key_value_heads=8,
        intermediate_size=1408, max_position_embeddings=2048, tie_word_embeddings=True, rms_norm_eps=1e-5,
        bos_token_id=0, eos_token_id=0, pad_token_id=1,
    )


def draft_config(vocab_size: int) -> LlamaConfig:
    return LlamaConfig(
        vocab_size=vocab_size, hidden_size=160, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=4,
        intermediate_size=512, max_position_embeddings=2048, tie_word_embeddings=True, rms_norm_eps=1e-5,
        bos_token_id=0, eos_token_id=0, pad_token_id=1,
    )


def train_tokenizer(texts: list[str], vocab_size: int) -> PreTrainedTokenizerFast:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=[EOS, PAD], initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=EOS, bos_token=EOS, pad_token=PAD)


def encode(tokenizer: PreTrainedTokenizerFast, texts: list[str]) -> torch.Tensor:
    ids: list[int] = []
    for t in texts:
        ids.extend(tokenizer.encode(t))
        ids.append(tokenizer.eos_token_id)
    return torch.tensor(ids, dtype=torch.int32)


def lr_at(step: int, total: int, peak: float, warmup: int) -> float:
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return peak * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))


def sample_batch(stream: torch.Tensor, batch: int, seq_len: int, gen: torch.Generator) -> torch.Tensor:
    starts = torch.randint(0, len(stream) - seq_len - 1, (batch,), generator=gen)
    return torch.stack([stream[s : s + seq_len + 1] for s in starts.tolist()]).long()  # [batch, seq_len + 1]


@torch.inference_mode()
def heldout_loss(model: LlamaForCausalLM, stream: torch.Tensor, seq_len: int, windows: int) -> float:
    model.eval()
    stride = max(seq_len, (len(stream) - seq_len - 1) // windows)
    losses = []
    for i in range(windows):
        x = stream[i * stride : i * stride + seq_len + 1].long()[None]
        if x.shape[1] < seq_len + 1:
            break
        logits = model(x[:, :-1]).logits
        losses.append(F.cross_entropy(logits[0], x[0, 1:]).item())
    model.train()
    return sum(losses) / len(losses)


class Logger:
    def __init__(self, path: Path, echo: Callable[[str], None] | None = None) -> None:
        self.path = path
        self.echo = echo

    def __call__(self, **record: object) -> None:
        with self.path.open("a") as f:
            f.write(json.dumps(record) + "\n")
        if self.echo is not None:
            self.echo(json.dumps(record))


def _train_stage(
    name: str,
    model: LlamaForCausalLM,
    loss_fn: Callable[[torch.Tensor], tuple[torch.Tensor, dict[str, float]]],
    steps: int,
    peak_lr: float,
    cfg: TrainConfig,
    work: Path,
    log: Logger,
    heldout: torch.Tensor,
    train_stream: torch.Tensor,
) -> None:
    from tqdm import tqdm

    ckpt = work / f"{name}.ckpt.pt"
    opt = torch.optim.AdamW(model.parameters(), lr=peak_lr, betas=(0.9, 0.95), weight_decay=0.1)
    gen = torch.Generator().manual_seed(cfg.seed + (0 if name == "target" else 1))
    start = 0
    if ckpt.exists():
        state = torch.load(ckpt, weights_only=False)
        model.load_state_dict(state["model"])
        opt.load_state_dict(state["opt"])
        gen.set_state(state["gen"])
        start = state["step"]
    model.train()
    bar = tqdm(range(start, steps), initial=start, total=steps, desc=f"train {name}", mininterval=5)
    t0 = time.time()
    for step in bar:
        for g in opt.param_groups:
            g["lr"] = lr_at(step, steps, peak_lr, cfg.warmup)
        batch = sample_batch(train_stream, cfg.batch_size, cfg.seq_len, gen)
        loss, parts = loss_fn(batch)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        bar.set_postfix(loss=f"{loss.item():.3f}")
        done = step + 1
        if done % cfg.checkpoint_every == 0 or done == steps:
            state = {"model": model.state_dict(), "opt": opt.state_dict(), "gen": gen.get_state(), "step": done}
            torch.save(state, ckpt)
        elapsed = round(time.time() - t0, 1)
        record: dict[str, object] = {"stage": name, "step": done, "loss": round(loss.item(), 4), "s": elapsed}
        record.update({k: round(v, 4) for k, v in parts.items()})
        if done % 100 == 0 or done == steps:
            record["heldout_loss"] = round(heldout_loss(model, heldout, cfg.seq_len, cfg.eval_windows), 4)
        log(**record)


def train_demo(out_dir: Path, work_dir: Path, cfg: TrainConfig, echo: Callable[[str], None] | None = print) -> dict:
    """Run (or resume) every stage and write the tokenizer, both models and `train_report.json` into `out_dir`."""
    torch.manual_seed(cfg.seed)
    work_dir.mkdir(parents=True, exist_ok=True)
    out_dir.mkdir(parents=True, exist_ok=True)
    log = Logger(work_dir / "train_log.jsonl", echo)

    files = data.list_corpus()
    data.write_manifest(files, out_dir / "files.json", platform.python_version())
    tok_dir = work_dir / "tokenizer"
    if not (tok_dir / "tokenizer.json").exists():
        tokenizer = train_tokenizer(data.read_texts(files, "train"), cfg.vocab_size)
        tokenizer.save_pretrained(tok_dir)
        log(stage="tokenizer", vocab=len(tokenizer))
    tokenizer = PreTrainedTokenizerFast.from_pretrained(tok_dir)

    streams = work_dir / "streams.pt"
    if not streams.exists():
        torch.save({s: encode(tokenizer, data.read_texts(files, s)) for s in ("train", "heldout")}, streams)
    enc = torch.load(streams)
    train_stream, heldout = enc["train"], enc["heldout"]
    log(stage="data", train_tokens=len(train_stream), heldout_tokens=len(heldout), files=len(files))

    vocab = len(tokenizer)
    target = LlamaForCausalLM(target_config(vocab))

    def target_loss(batch: torch.Tensor) -> tuple[torch.Tensor, dict[str, float]]:
        logits = target(batch[:, :-1]).logits  # [B, T, V]
        return F.cross_entropy(logits.flatten(0, 1), batch[:, 1:].flatten()), {}

    _train_stage(
        "target", target, target_loss, cfg.target_steps, cfg.target_lr, cfg, work_dir, log, heldout, train_stream
    )
    target.eval().requires_grad_(False)

    draft = LlamaForCausalLM(draft_config(vocab))

    def distill_loss(batch: torch.Tensor) -> tuple[torch.Tensor, dict[str, float]]:
        x, y = batch[:, :-1], batch[:, 1:]
        with torch.no_grad():
            log_p = F.log_softmax(target(x).logits.float(), dim=-1)  # [B, T, V]
        log_q = F.log_softmax(draft(x).logits.float(), dim=-1)  # [B, T, V]
        kl = F.kl_div(log_q.flatten(0, 1), log_p.flatten(0, 1), log_target=True, reduction="batchmean")
        ce = F.nll_loss(log_q.flatten(0, 1), y.flatten())
        return cfg.distill_alpha * kl + (1 - cfg.distill_alpha) * ce, {"kl": kl.item(), "ce": ce.item()}

    _train_stage("draft", draft, distill_loss, cfg.draft_steps, cfg.draft_lr, cfg, work_dir, log, heldout, train_stream)

    report = {
        "config": asdict(cfg),
        "python": platform.python_version(),
        "target_params": sum(p.numel() for p in target.parameters()),
        "draft_params": sum(p.numel() for p in draft.parameters()),
        "target_heldout_loss": heldout_loss(target, heldout, cfg.seq_len, cfg.eval_windows),
        "draft_heldout_loss": heldout_loss(draft, heldout, cfg.seq_len, cfg.eval_windows),
        "train_tokens": len(train_stream),
        "heldout_tokens": len(heldout),
    }
    tokenizer.save_pretrained(out_dir / "tokenizer")
    for name, model in (("target", target), ("draft", draft)):
        model.to(torch.bfloat16).save_pretrained(  # type: ignore[arg-type]
            out_dir / name, safe_serialization=True)
        tokenizer.save_pretrained(out_dir / name)
    (out_dir / "train_report.json").write_text(json.dumps(report, indent=2) + "\n")
    log(stage="export", **{k: v for k, v in report.items() if k != "config"})
    return report


if __name__ == "__main__":
    import sys

    out = Path(sys.argv[1]) if len(sys.argv) > 1 else Path("demo-out")
    work = Path(sys.argv[2]) if len(sys.argv) > 2 else Path("demo-work")
    train_demo(out, work, TrainConfig())
