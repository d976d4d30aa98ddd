"""The FR-Spec draft (`tandem.frspec`): a full-vocabulary causal LM whose head covers K ids, -inf elsewhere; and a
smoke run of its trainer (`tandem_tools.draft.train`) on synthetic shards."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import TINY_VOCAB, tiny_model, tiny_tokenizer
from transformers import AutoTokenizer

from tandem.drafting import ModelDrafter
from tandem.frspec import FRSpecDraft, draft_config, is_frspec, load_frspec, save_frspec
from tandem.kv import SequenceState
from tandem.local import LocalVerifier
from tandem.models import LoadedModel, check_pair, load_model, tokenizer_fingerprint
from tandem.sampling import SamplingParams
from tandem.session import generate_autoregressive
from tandem.speculate import generate_speculative
from tandem_tools.draft import build, data

K = 40


def tiny_draft(seed: int = 0, k: int = K) -> FRSpecDraft:
    torch.manual_seed(seed)
    cfg = draft_config(TINY_VOCAB, 64, 2, max_positions=256, eos_token_id=0, pad_token_id=1)
    model = FRSpecDraft(cfg, 16, torch.randperm(TINY_VOCAB)[:k])
    with torch.no_grad():
        for p in model.parameters():  # peaky logits, as in conftest's tiny models
            if p.ndim == 2:
                p.normal_(0, 0.3)
    return model.eval().requires_grad_(False)


@pytest.fixture(scope="module")
def draft() -> FRSpecDraft:
    return tiny_draft()


def outside(model: FRSpecDraft) -> torch.Tensor:
    mask = torch.ones(model.vocab_size, dtype=torch.bool)  # [V]
    mask[model.token_ids] = False
    return mask


def test_logits_are_minus_inf_exactly_outside_the_head(draft: FRSpecDraft) -> None:
    ids = torch.randint(0, TINY_VOCAB, (2, 9), generator=torch.Generator().manual_seed(1))  # [2, 9]
    logits = draft(input_ids=ids).logits  # [2, 9, V]
    assert logits.shape == (2, 9, TINY_VOCAB)
    out = outside(draft)
    assert torch.isneginf(logits[..., out]).all()
    assert torch.isfinite(logits[..., ~out]).all()
    probs = logits.softmax(-1)  # [2, 9, V]
    assert (probs[..., out] == 0).all()
    torch.testing.assert_close(probs[..., draft.token_ids].sum(-1), torch.ones(2, 9))
    assert draft.config.vocab_size == TINY_VOCAB and draft.config.max_position_embeddings == 256


def test_cached_steps_match_one_pass(draft: FRSpecDraft) -> None:
    tokens = [5, 17, 33, 2, 80, 41]
    extra = [7, 9, 64]
    state = SequenceState(draft, tokens)  # type: ignore[arg-type]
    together = state.forward(extra)  # [4, V]
    state.rollback(len(tokens))
    again = state.forward(extra)  # re-feeds the last committed token: another shape, the same logits up to rounding
    torch.testing.assert_close(again, together, atol=1e-5, rtol=1e-5)
    state.rollback(len(tokens))
    assert torch.equal(state.forward(extra), again)
    stepwise = SequenceState(draft, tokens)  # type: ignore[arg-type]
    rows = [stepwise.forward()[-1]]
    for t in extra:
        stepwise.tokens.append(t)
        rows.append(stepwise.forward()[-1])
    torch.testing.assert_close(torch.stack(rows), together, atol=1e-5, rtol=1e-5)
    fin = torch.isfinite(together)
    assert torch.equal(fin, torch.isfinite(torch.stack(rows)))
    with torch.no_grad():  # no cache at all: the same logits
        plain = draft(input_ids=torch.tensor([tokens + extra]), use_cache=False).logits[0, len(tokens) - 1 :]
    torch.testing.assert_close(plain, together, atol=1e-5, rtol=1e-5)
    tree = SequenceState(draft, tokens)  # type: ignore[arg-type]
    chain = tree.forward_tree([-1, 0, 1], extra)  # a chain is the plain sequence (additive 4-d mask path)
    torch.testing.assert_close(chain, together, atol=1e-5, rtol=1e-5)


def test_save_load_round_trip_from_bf16_weights(draft: FRSpecDraft, tmp_path: Path) -> None:
    model = tiny_draft(seed=3)
    for p in model.parameters():  # what the file holds, so float32 logits must match exactly
        p.data = p.data.to(torch.bfloat16).float()
    folder = save_frspec(model, tmp_path / "d")
    assert is_frspec(folder) and not is_frspec(tmp_path)
    loaded = load_frspec(folder)
    assert loaded.token_ids.dtype == torch.int64 and torch.equal(loaded.token_ids, model.token_ids)
    assert all(p.dtype == torch.float32 and not p.requires_grad for p in loaded.parameters())
    assert not loaded.training and loaded.config.vocab_size == TINY_VOCAB
    ids = torch.tensor([[3, 4, 5, 60, 2]])
    assert torch.equal(model(input_ids=ids).logits, loaded(input_ids=ids).logits)
    meta = json.loads((folder / "frspec.json").read_text())
    assert meta["k"] == K and meta["rank"] == 16


def wrapped(model: FRSpecDraft) -> LoadedModel:
    tok = tiny_tokenizer()
    assert len(tok) == model.vocab_size
    return LoadedModel("tiny-frspec", model, tok, tokenizer_fingerprint(tok))  # type: ignore[arg-type]


def test_greedy_drafting_never_leaves_the_head(draft: FRSpecDraft) -> None:
    drafter = ModelDrafter(wrapped(draft))
    allowed = set(draft.token_ids.tolist())
    for start in range(4):
        context = [start, 10 + start, 20 + start]
        drafter.start(context, SamplingParams())
        block = drafter.propose(context, 12)
        assert len(block.tokens) == 12 and set(block.tokens) <= allowed


@pytest.mark.parametrize("q_form", ["full", "sparse"])
def test_sampled_q_is_zero_outside_the_head(draft: FRSpecDraft, q_form: str) -> None:
    drafter = ModelDrafter(wrapped(draft), q_form=q_form)  # type: ignore[arg-type]
    out = outside(draft)
    allowed = set(draft.token_ids.tolist())
    for seed in range(3):
        context = [7, 8, 9]
        drafter.start(context, SamplingParams(temperature=1.0, seed=seed))
        block = drafter.propose(context, 8)
        assert set(block.tokens) <= allowed
        if q_form == "full":
            assert block.q_full is not None
            assert (block.q_full[:, out] == 0).all()
            torch.testing.assert_close(block.q_full.sum(-1), torch.ones(8))
        else:
            assert block.q_ids is not None and block.q_probs is not None
            assert (block.q_probs[out[block.q_ids]] == 0).all()


def test_init_from_target_keeps_its_geometry() -> None:
    target = tiny_model(0, layers=1, hidden=64)
    ids = torch.arange(10, 10 + K)
    model, info = build.build_draft(target, ids, layers=1, hidden=64, rank=64)
    emb, out = target.model.embed_tokens.weight, target.lm_head.weight  # [V, D] (untied here)
    g = target.model.norm.weight  # [D]
    x = torch.tensor([3, 50, 90])
    with torch.no_grad():  # full rank, same width: embedding . head row = the target's E[x] . (E[y] * g)
        got = model.embed(x) @ model.lm_head.weight.T  # [3, K]
    torch.testing.assert_close(got, emb[x] @ (out[ids] * g).T, atol=1e-4, rtol=1e-4)
    assert info["svd_energy_rank"] == pytest.approx(1.0)


def test_collate_aligns_loss_positions_with_the_next_token() -> None:
    rng = np.random.default_rng(0)
    rows = [synthetic_row(rng, f"r{i}", p, n) for i, (p, n) in enumerate([(5, 4), (3, 7), (2, 9)])]
    batch = data.collate(rows, max_len=8)
    assert batch.inputs.shape == (3, 8)
    assert len(batch.labels) == 4 + 7 + 9 - 1  # the last row loses its whole prompt, so its first output's slot
    nxt = batch.cols + 1 < batch.inputs.shape[1]
    follows = batch.inputs[batch.rows[nxt], batch.cols[nxt] + 1]
    inside = follows != 0
    assert torch.equal(follows[inside], batch.labels[nxt][inside])


def synthetic_row(rng: np.random.Generator, rid: str, p: int, n: int, split: str = "train") -> data.Row:
    top = np.stack([rng.permutation(np.arange(2, TINY_VOCAB))[:32] for _ in range(n)]).astype(np.uint16)
    logits = rng.normal(size=(n, 32)) * 2
    lp = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
    return data.Row(rid, split, "greedy", rng.integers(2, TINY_VOCAB, p).astype(np.int32),
                    top[:, 0].astype(np.int32), top, lp.astype(np.float16))


def write_shards(folder: Path, rows: list[data.Row], per_shard: int) -> None:
    """The generator's format: shard-NNNNN.jsonl + shard-NNNNN.npz."""
    folder.mkdir(parents=True)
    for s in range(0, len(rows), per_shard):
        part = rows[s : s + per_shard]
        stem = folder / f"shard-{s // per_shard:05d}"
        np.savez_compressed(
            stem.with_suffix(".npz"), ids=np.array([r.id for r in part]),
            offsets=np.cumsum([0] + [len(r.output_ids) for r in part]).astype(np.int64),
            top_ids=np.concatenate([r.top_ids for r in part]),
            top_logprobs=np.concatenate([r.top_logprobs for r in part]),
        )
        lines = [json.dumps({"id": r.id, "category": "code", "split": r.split, "mode": r.mode, "temperature": None,
                             "top_p": None, "seed": None, "prompt_ids": r.prompt_ids.tolist(),
                             "output_ids": r.output_ids.tolist(), "finish": "length"}) for r in part]
        stem.with_suffix(".jsonl").write_text("\n".join(lines) + "\n")


def test_train_smoke_resumes_and_exports(tmp_path: Path) -> None:
    from tandem_tools.draft import train

    target = tiny_model(0, layers=1, hidden=64)
    tok = tiny_tokenizer()
    target.save_pretrained(tmp_path / "target")
    tok.save_pretrained(tmp_path / "target")
    rng = np.random.default_rng(1)
    rows = [synthetic_row(rng, f"x{i}", int(rng.integers(3, 12)), int(rng.integers(2, 10)),
                          "eval" if i % 8 == 0 else "train") for i in range(24)]
    write_shards(tmp_path / "shards", rows, per_shard=8)
    common = ["--data", str(tmp_path / "shards"), "--out", str(tmp_path / "out"), "--work-dir", str(tmp_path / "work"),
              "--target", str(tmp_path / "target"), "--layers", "1", "--hidden", "64", "--rank", "8", "--k", "48",
              "--batch-tokens", "64", "--warmup", "2", "--eval-every", "2", "--ckpt-every", "2", "--log-every", "1"]
    train.main([*common, "--steps", "3"])
    with (tmp_path / "work" / "train_log.jsonl").open("a") as f:  # logged by a run killed after its checkpoint
        f.write(json.dumps({"step": 4, "loss": -1.0}) + "\n")
    report = train.main([*common, "--steps", "5"])  # resumes from the checkpoint at step 3
    log = [json.loads(line) for line in (tmp_path / "work" / "train_log.jsonl").read_text().splitlines()]
    assert log[0]["event"] == "start" and log[0]["eval_source"] == "split=eval"
    steps = [r["step"] for r in log if "step" in r]
    assert steps == [1, 2, 3, 4, 5]
    assert all(np.isfinite(r["loss"]) and {"kl", "ce", "lr", "tokens_per_s"} <= r.keys() for r in log[1:])
    assert "eval_loss" in log[-1] and report["steps"] == 5
    out = tmp_path / "out"
    assert is_frspec(out) and (out / "train_report.json").is_file() and (out / "train_log.jsonl").is_file()
    loaded = load_frspec(out)
    assert loaded.k == 48 and loaded.config.num_hidden_layers == 1 and 0 in loaded.token_ids.tolist()  # eos kept
    assert tokenizer_fingerprint(AutoTokenizer.from_pretrained(str(out))) == tokenizer_fingerprint(tok)
    assert report["draft_fingerprint"] == report["target_fingerprint"]
    assert set(report["coverage"]) == {"train", "eval"}

    # end to end through the loop, with a local loader standing in for load_model's FR-Spec hook
    tok_out = AutoTokenizer.from_pretrained(str(out))
    draft = LoadedModel("frspec", loaded, tok_out, tokenizer_fingerprint(tok_out))  # type: ignore[arg-type]
    tgt = load_model(str(tmp_path / "target"))
    check_pair(draft, tgt)
    prompt = [5, 9, 14, 3, 77]
    greedy = SamplingParams(max_tokens=24, ignore_eos=True)
    alone = generate_autoregressive(tgt, prompt, greedy).tokens
    assert generate_speculative(ModelDrafter(draft), LocalVerifier(tgt), prompt, greedy, 4).tokens == alone
    for q_form in ("full", "sparse"):
        sampled = SamplingParams(max_tokens=24, ignore_eos=True, temperature=0.9, top_p=0.95, seed=3)
        result = generate_speculative(ModelDrafter(draft, q_form=q_form), LocalVerifier(tgt), prompt, sampled, 4)
        assert len(result.tokens) == 24


def test_the_plain_llama_form_drafts_the_same_greedy_tokens(draft: FRSpecDraft) -> None:
    """For HF transformers' assisted generation: the same draft as a LlamaForCausalLM, same argmax everywhere."""
    from tandem.frspec import as_llama

    llama = as_llama(draft)
    ids = torch.randint(0, draft.vocab_size, (2, 9), generator=torch.Generator().manual_seed(4))
    with torch.inference_mode():
        ours = draft(input_ids=ids, use_cache=False).logits  # [2, 9, V]
        theirs = llama(input_ids=ids, use_cache=False).logits  # [2, 9, V]
    assert torch.equal(ours.argmax(-1), theirs.argmax(-1))
    inside = draft.token_ids
    torch.testing.assert_close(theirs[..., inside], ours[..., inside], rtol=1e-4, atol=1e-4)
