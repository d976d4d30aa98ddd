"""Random-weight Llama models of realistic sizes, built from a config shipped in the package (`tandem/configs/`), for
timings that need no trained weights: `random_model("llama-1b", "bfloat16", "cuda")`. Every such model shares one
stand-in tokenizer (a handful of special tokens: prompts are random ids), so any two of them pass `check_pair`."""

from __future__ import annotations

import functools
import json
from pathlib import Path

import torch
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

import tandem
from tandem.models import LoadedModel, parse_dtype, resolve_device, tokenizer_fingerprint

CONFIG_DIR = Path(tandem.__file__).parent / "configs"
RANDOM_MODELS = {p.stem: p for p in sorted(CONFIG_DIR.glob("*.json"))}  # llama-1b, llama-72m


def load_config(name_or_path: str | Path) -> LlamaConfig:
    """A packaged config by name, or a JSON file (LlamaConfig's fields; keys starting with `_` are notes)."""
    path = RANDOM_MODELS.get(str(name_or_path)) or Path(name_or_path)
    if not path.is_file():
        known = ", ".join(RANDOM_MODELS)
        raise FileNotFoundError(f"no random-model config {name_or_path!r}: a JSON file or one of {known}")
    fields = {k: v for k, v in json.loads(path.read_text()).items() if not k.startswith("_")}
    return LlamaConfig(**fields)


def param_count(cfg: LlamaConfig) -> int:
    """Parameters of LlamaForCausalLM(cfg) (no bias terms), from the config alone; a tied head counted once."""
    h, layers, inter, vocab = cfg.hidden_size, cfg.num_hidden_layers, cfg.intermediate_size, cfg.vocab_size
    head_dim = getattr(cfg, "head_dim", None) or h // cfg.num_attention_heads
    kv_heads = cfg.num_key_value_heads or cfg.num_attention_heads
    attn = h * head_dim * (2 * cfg.num_attention_heads + 2 * kv_heads)  # q, o; k, v
    per_layer = attn + 3 * h * inter + 2 * h  # + gate, up, down; two norms
    embed = vocab * h * (1 if cfg.tie_word_embeddings else 2)
    return embed + layers * per_layer + h  # + the final norm


@functools.cache
def stand_in_tokenizer() -> PreTrainedTokenizerFast:
    from tokenizers import Tokenizer, models

    vocab = {"<eos>": 0, "<pad>": 1, "<unk>": 2}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<eos>", pad_token="<pad>", unk_token="<unk>")


def random_model(name_or_path: str | Path, dtype: torch.dtype | str = torch.float32,
                 device: torch.device | str = "cpu", seed: int = 0) -> LoadedModel:
    """LlamaForCausalLM(config) with HF's own random init (normal, std `initializer_range`), built on `device` in
    float32 and then cast, in eval mode without gradients."""
    cfg = load_config(name_or_path)
    device = resolve_device(device) if isinstance(device, str) else device
    torch.manual_seed(seed)
    with torch.device(device):
        model = LlamaForCausalLM(cfg)
    model.to(parse_dtype(dtype))  # type: ignore[arg-type]
    model.eval().requires_grad_(False)
    tok = stand_in_tokenizer()
    return LoadedModel(f"random-{Path(name_or_path).stem}", model, tok, tokenizer_fingerprint(tok))
