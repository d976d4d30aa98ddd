"""An FR-Spec draft model (arXiv 2502.14856): a small Llama over the full vocabulary in, the K most frequent tokens out.

The input embedding covers every token id but is low-rank (`embed_low` [V, r] then `embed_up` [r -> hidden]); the LM
head scores only the K ids in the `token_ids` buffer. `forward` still returns logits over the FULL vocabulary, -inf
outside `token_ids`, so softmax gives exactly 0 there and q is exactly the distribution the draft samples from.

The backbone is transformers' `LlamaModel`, so the KV cache is a plain `DynamicCache(config=model.config)` and the
model drops into `tandem.kv.SequenceState` and `tandem.drafting.ModelDrafter` like any HF causal LM.

A saved folder holds `frspec.json` (the dimensions), `config.json` (the backbone's `LlamaConfig`, vocab_size = V) and
`frspec.safetensors` (bfloat16 weights; not `model.safetensors`, so a loader that does not know this format fails
loudly instead of building a randomly initialised Llama), plus whatever tokenizer files the caller copies in.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from transformers import DynamicCache, LlamaConfig, LlamaForCausalLM, LlamaModel
from transformers.modeling_outputs import CausalLMOutputWithPast

FORMAT = 1
META_FILE = "frspec.json"
WEIGHTS_FILE = "frspec.safetensors"


def draft_config(
    vocab_size: int,
    hidden: int,
    layers: int,
    intermediate: int | None = None,
    head_dim: int = 64,
    kv_heads: int | None = None,
    max_positions: int = 8192,
    rope_theta: float = 100000.0,
    rms_norm_eps: float = 1e-5,
    bos_token_id: int | None = None,
    eos_token_id: int | None = None,
    pad_token_id: int | None = None,
) -> LlamaConfig:
    """The backbone's config: heads of `head_dim`, grouped KV heads (a third or half of them), MLP ~8/3 x hidden."""
    if hidden % head_dim:
        raise ValueError(f"hidden {hidden} is not a multiple of head_dim {head_dim}")
    heads = hidden // head_dim
    if kv_heads is None:
        kv_heads = heads // 3 if heads % 3 == 0 else heads // 2 if heads % 2 == 0 else heads
    if intermediate is None:
        intermediate = -(-hidden * 8 // 3 // 64) * 64
    return LlamaConfig(
        vocab_size=vocab_size, hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads,
        num_key_value_heads=kv_heads, head_dim=head_dim, intermediate_size=intermediate,
        max_position_embeddings=max_positions, rope_parameters={"rope_type": "default", "rope_theta": rope_theta},
        rms_norm_eps=rms_norm_eps, tie_word_embeddings=False, bos_token_id=bos_token_id, eos_token_id=eos_token_id,
        pad_token_id=pad_token_id,
    )


def _backbone(config: LlamaConfig) -> LlamaModel:
    """A `LlamaModel` on `config` without its [V, hidden] embedding (built for a vocabulary of 1, then dropped)."""
    vocab, pad = config.vocab_size, config.pad_token_id
    config.vocab_size, config.pad_token_id = 1, None
    try:
        model = LlamaModel(config)
    finally:
        config.vocab_size, config.pad_token_id = vocab, pad
    del model.embed_tokens  # inputs always arrive as `inputs_embeds`
    model.vocab_size = vocab
    return model


class FRSpecDraft(torch.nn.Module):
    """A Llama draft: low-rank input embedding over all V ids, LM head over the K ids in `token_ids`."""

    token_ids: torch.Tensor  # [K] int64, the vocabulary ids the head scores

    def __init__(self, config: LlamaConfig, rank: int, token_ids: torch.Tensor) -> None:
        super().__init__()
        if token_ids.ndim != 1 or not len(token_ids):
            raise ValueError("token_ids must be a non-empty 1-d tensor")
        if int(token_ids.min()) < 0 or int(token_ids.max()) >= config.vocab_size:
            raise ValueError(f"token_ids must lie in [0, {config.vocab_size})")
        if len(torch.unique(token_ids)) != len(token_ids):
            raise ValueError("token_ids must be distinct")
        self.backbone = _backbone(config)
        self.config: LlamaConfig = self.backbone.config  # one object: DynamicCache and batch.py read it
        self.rank = rank
        self.embed_low = torch.nn.Embedding(config.vocab_size, rank)  # [V, r]
        self.embed_up = torch.nn.Linear(rank, config.hidden_size, bias=False)  # [hidden, r]
        self.lm_head = torch.nn.Linear(config.hidden_size, len(token_ids))  # [K, hidden] + [K]
        self.register_buffer("token_ids", token_ids.to(torch.long).clone())

    @property
    def k(self) -> int:
        return int(self.token_ids.shape[0])

    @property
    def vocab_size(self) -> int:
        return int(self.config.vocab_size)

    def embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        """[b, n] ids -> [b, n, hidden] input embeddings."""
        return self.embed_up(self.embed_low(input_ids))  # type: ignore[no-any-return]

    def hidden(
        self,
        input_ids: torch.Tensor,  # [b, n]
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        cache: DynamicCache | None = None,
        use_cache: bool = False,
    ) -> torch.Tensor:
        """[b, n, hidden] final hidden states (after the last norm)."""
        out = self.backbone(
            inputs_embeds=self.embed(input_ids), attention_mask=attention_mask, position_ids=position_ids,
            cache=cache, use_cache=use_cache,
        )
        return out.last_hidden_state  # type: ignore[no-any-return]

    def subset_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """[..., hidden] -> [..., K] head logits, column j scoring vocabulary id `token_ids[j]`."""
        return self.lm_head(hidden)  # type: ignore[no-any-return]

    def expand(self, sub: torch.Tensor) -> torch.Tensor:
        """[..., K] head logits -> [..., V] logits, -inf outside `token_ids` (softmax is exactly 0 there)."""
        full = sub.new_full((*sub.shape[:-1], self.vocab_size), float("-inf"))  # [..., V]
        return full.index_copy_(-1, self.token_ids, sub)

    def forward(
        self,
        input_ids: torch.Tensor | None = None,  # [b, n]
        past_key_values: DynamicCache | None = None,
        position_ids: torch.Tensor | None = None,  # [b, n]
        attention_mask: torch.Tensor | None = None,  # [b, kv] or an additive [b, 1, n, kv]
        use_cache: bool = True,
        **kw: Any,
    ) -> CausalLMOutputWithPast:
        """Like a HF causal LM: `.logits` [b, n, V] (-inf outside `token_ids`) and the cache, grown by n."""
        cache = past_key_values if past_key_values is not None else kw.pop("cache", None)
        if input_ids is None:
            raise ValueError("FRSpecDraft needs input_ids")
        if use_cache and cache is None:
            cache = DynamicCache(config=self.config)
        h = self.hidden(input_ids, attention_mask, position_ids, cache, use_cache)  # [b, n, hidden]
        return CausalLMOutputWithPast(logits=self.expand(self.subset_logits(h)), cache=cache)


def save_frspec(model: FRSpecDraft, folder: str | Path) -> Path:
    """Write `frspec.json`, `config.json` and bfloat16 `frspec.safetensors` into `folder` (created)."""
    out = Path(folder)
    out.mkdir(parents=True, exist_ok=True)
    cfg = model.config
    meta = {
        "format": FORMAT, "vocab_size": cfg.vocab_size, "k": model.k, "rank": model.rank,
        "hidden_size": cfg.hidden_size, "num_hidden_layers": cfg.num_hidden_layers,
        "num_attention_heads": cfg.num_attention_heads, "num_key_value_heads": cfg.num_key_value_heads,
        "intermediate_size": cfg.intermediate_size, "n_params": sum(p.numel() for p in model.parameters()),
    }
    state = {
        name: (t.detach().to(torch.bfloat16) if t.is_floating_point() else t.detach()).contiguous()
        for name, t in model.state_dict().items()
    }
    save_file(state, str(out / WEIGHTS_FILE), metadata={"format": "pt", "frspec": str(FORMAT)})
    cfg.to_json_file(str(out / "config.json"))
    (out / META_FILE).write_text(json.dumps(meta, indent=1) + "\n")
    return out


def is_frspec(folder: str | Path) -> bool:
    return (Path(folder) / META_FILE).is_file()


def load_frspec(folder: str | Path, dtype: torch.dtype = torch.float32) -> FRSpecDraft:
    """The draft saved in `folder`, floating weights cast to `dtype`, in eval mode without gradients."""
    src = Path(folder)
    meta = json.loads((src / META_FILE).read_text())
    if meta.get("format") != FORMAT:
        raise ValueError(f"{src / META_FILE}: format {meta.get('format')!r}, expected {FORMAT}")
    config = LlamaConfig.from_json_file(str(src / "config.json"))
    state = load_file(str(src / WEIGHTS_FILE))
    model = FRSpecDraft(config, int(meta["rank"]), state["token_ids"])
    model.load_state_dict(state)
    for prm in model.parameters():  # parameters only: token_ids stays int64, the rotary inv_freq float32
        prm.data = prm.data.to(dtype)
    model.eval().requires_grad_(False)
    return model


def as_llama(model: FRSpecDraft) -> LlamaForCausalLM:
    """The same draft as a plain `LlamaForCausalLM`, for tools that need one (HF transformers' assisted generation):
    the low-rank embedding multiplied out to [V, hidden], and a full-vocabulary head whose rows outside `token_ids`
    score -1e9 (same argmax, and softmax 0 to float precision). It costs a full [V, hidden] head per step."""
    cfg = LlamaConfig.from_dict(model.config.to_dict())
    llama = LlamaForCausalLM(cfg)
    llama.to(next(model.parameters()).dtype)  # type: ignore[arg-type]
    llama.model.load_state_dict(model.backbone.state_dict(), strict=False)  # all but embed_tokens
    with torch.no_grad():
        llama.model.embed_tokens.weight.copy_(model.embed_low.weight @ model.embed_up.weight.T)  # [V, hidden]
        head = torch.nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=True).to(llama.model.embed_tokens.weight.dtype)
        head.weight.zero_()
        head.bias.fill_(-1e9)
        head.weight[model.token_ids] = model.lm_head.weight
        head.bias[model.token_ids] = model.lm_head.bias
    llama.lm_head = head
    llama.config.tie_word_embeddings = False
    return llama.eval().requires_grad_(False)  # type: ignore[no-any-return, no-untyped-call]
