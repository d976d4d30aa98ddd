from __future__ import annotations

import copy
import os

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from tandem.adaptive import AdaptiveGamma
from tandem.costs import CostCurve, Ewma
from tandem.drafting import ModelDrafter
from tandem.models import LoadedModel, tokenizer_fingerprint
from tandem.pool import PhrasePool
from tandem.tree import PoolBranches
from tandem.value import BlockValue, Calibration

os.environ.setdefault("HF_HUB_OFFLINE", "1")
torch.set_num_threads(1)

TINY_VOCAB = 96


def tiny_tokenizer(extra: str = "") -> PreTrainedTokenizerFast:
    """A character per token (ids 2..95: the characters 32..125), byte-level as GPT-2's: a grammar engine reads it."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    shown = bytes_to_unicode()  # byte -> the character byte-level vocabularies write it as (space: "Ġ")
    vocab = {"<eos>": 0, "<pad>": 1} | {shown[b] + extra: b - 30 for b in range(32, 32 + TINY_VOCAB - 2)}
    tok = Tokenizer(models.BPE(vocab, [], unk_token="<pad>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<eos>", pad_token="<pad>")


def tiny_model(seed: int, layers: int = 2, hidden: int = 64, context: int = 256) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    cfg = LlamaConfig(
        vocab_size=TINY_VOCAB, hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=4,
        num_key_value_heads=2, intermediate_size=2 * hidden, max_position_embeddings=context,
        initializer_range=0.3,  # peaky logits: a random model then has a clear argmax and repeats itself less
        eos_token_id=0, pad_token_id=1, bos_token_id=0,
    )
    return LlamaForCausalLM(cfg).eval().requires_grad_(False)


def wrap(model: LlamaForCausalLM, name: str, tokenizer: PreTrainedTokenizerFast | None = None) -> LoadedModel:
    tokenizer = tokenizer or tiny_tokenizer()
    return LoadedModel(name, model, tokenizer, tokenizer_fingerprint(tokenizer))


def noisy_copy(model: LlamaForCausalLM, scale: float, seed: int) -> LlamaForCausalLM:
    """A draft that agrees with the target often but not always."""
    gen = torch.Generator().manual_seed(seed)
    out = copy.deepcopy(model)
    for p in out.parameters():
        p.add_(torch.randn(p.shape, generator=gen) * scale * p.std())
    return out


@pytest.fixture(scope="session")
def tiny_target() -> LoadedModel:
    return wrap(tiny_model(0, layers=3), "tiny-target")


@pytest.fixture(scope="session")
def tiny_draft(tiny_target: LoadedModel) -> LoadedModel:
    return wrap(noisy_copy(tiny_target.model, 0.05, seed=1), "tiny-draft")


class BigramLM(torch.nn.Module):
    """Hand-built logits: the logits after token t are `table[t]`, whatever came before. Fills a real KV cache."""

    def __init__(self, table: torch.Tensor) -> None:  # table: [V, V]
        super().__init__()
        self.table = table
        self.unit = torch.nn.Parameter(torch.ones(()))  # a model has parameters (their dtype is read)
        self.config = LlamaConfig(
            vocab_size=table.shape[0], hidden_size=8, num_hidden_layers=1, num_attention_heads=1,
            num_key_value_heads=1, max_position_embeddings=64,
        )

    def forward(self, input_ids: torch.Tensor, past_key_values, position_ids=None, use_cache=True, attention_mask=None):
        n = input_ids.shape[1]
        past_key_values.update(torch.zeros(1, 1, n, 8), torch.zeros(1, 1, n, 8), 0)
        return type("Out", (), {"logits": self.table[input_ids]})()


def chain_table(vocab: int, overrides: dict[int, int] | None = None) -> torch.Tensor:
    """Greedy successor of t is (t + 1) % vocab, except where `overrides` says otherwise."""
    table = torch.zeros(vocab, vocab)
    for t in range(vocab):
        table[t, (overrides or {}).get(t, (t + 1) % vocab)] = 10.0
    return table


def bigram(table: torch.Tensor, name: str) -> LoadedModel:
    tok = tiny_tokenizer()
    return LoadedModel(name, BigramLM(table), tok, tokenizer_fingerprint(tok))  # type: ignore[arg-type]


class FixedCurve(CostCurve):
    def observe(self, n: int, seconds: float) -> None:  # the test's costs, whatever the passes take
        pass


class FixedTimes(AdaptiveGamma):
    """The test's draft step and round trip, whatever the loop measures: block shapes independent of the machine."""

    def observe_draft_step(self, seconds: float) -> None:
        pass

    def observe_rtt(self, seconds: float) -> None:
        pass


def tree_drafter(draft: LoadedModel, pool: PhrasePool | None = None) -> ModelDrafter:
    """The edge's default drafter (blocks by value, siblings, with `pool` its chains) on a flat cost curve: every
    node with a chance pays. Its blocks depend on the verdicts alone, not on timings."""
    value = BlockValue(FixedTimes(draft_s=Ewma(0.01), costs=FixedCurve({1: 0.1, 64: 0.1})), Calibration(), False)
    return ModelDrafter(draft, value=value, tree=True, pool=None if pool is None else PoolBranches(pool))
