"""Structured output: a grammar (JSON schema, any JSON object, regex, Lark grammar, choices) as a token mask, by
llguidance. One `GrammarState` per sequence follows its tokens; moving it to another sequence rolls back to the
common prefix and consumes the rest, as the KV cache does (`sync`).
"""

from __future__ import annotations

import json
import threading
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal

import llguidance
import llguidance.hf
import llguidance.torch
import torch

from tandem.errors import InvalidRequestError

GrammarKind = Literal["json_schema", "json_object", "regex", "lark", "choice"]
KINDS: tuple[GrammarKind, ...] = ("json_schema", "json_object", "regex", "lark", "choice")
if TYPE_CHECKING:
    from llguidance._lib import JsonCompileOptions

_BITS = torch.arange(32, dtype=torch.int32)  # [32]


@dataclass(frozen=True)
class Grammar:
    """What the output must follow. `spec`: the schema as JSON text, the regex, the Lark grammar, or the choices as a
    JSON list of strings; "" for json_object."""

    kind: GrammarKind
    spec: str = ""

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise InvalidRequestError(f"unknown grammar kind {self.kind!r}; one of {', '.join(KINDS)}")

    def source(self) -> str:
        """The grammar in llguidance's own form."""
        LL = llguidance.LLMatcher
        # JSON without free whitespace (the separators ", " and ": "): a model cannot pad its output without end
        compact: JsonCompileOptions = {"whitespace_flexible": False}
        try:
            if self.kind == "json_schema":
                return str(LL.grammar_from_json_schema(self.spec, defaults=compact))
            if self.kind == "json_object":
                return str(LL.grammar_from_json_schema(json.dumps({"type": "object"}), defaults=compact))
            if self.kind == "regex":
                return str(LL.grammar_from_regex(self.spec))
            if self.kind == "lark":
                return str(LL.grammar_from_lark(self.spec))
            choices = json.loads(self.spec)
        except (ValueError, TypeError) as e:
            raise InvalidRequestError(f"the {self.kind} grammar is not valid: {e}") from None
        if not isinstance(choices, list) or not choices or not all(isinstance(c, str) and c for c in choices):
            raise InvalidRequestError("choice needs a non-empty list of non-empty strings")
        return str(LL.grammar_from_lark("start: " + " | ".join(json.dumps(c) for c in choices)))


_tokenizers: dict[int, tuple[Any, llguidance.LLTokenizer]] = {}
_lock = threading.Lock()


def _ll_tokenizer(tokenizer: Any, vocab_size: int) -> llguidance.LLTokenizer:
    """llguidance's view of a tokenizer, built once per tokenizer object (it walks the whole vocabulary)."""
    with _lock:
        held = _tokenizers.get(id(tokenizer))
        if held is None or held[0] is not tokenizer:
            try:
                held = (tokenizer, llguidance.hf.from_tokenizer(tokenizer, n_vocab=vocab_size))
            except ValueError as e:
                raise InvalidRequestError(f"structured output needs a byte-level BPE or SentencePiece tokenizer, as "
                                          f"the grammar engine reads it; this model's: {e}") from None
            _tokenizers[id(tokenizer)] = held
        return held[1]


class GrammarState:
    """The grammar's state along one sequence of output tokens, and the mask of the tokens it allows next."""

    def __init__(self, grammar: Grammar, tokenizer: Any, vocab_size: int, eos_token_ids: tuple[int, ...]) -> None:
        source = grammar.source()
        error = llguidance.LLMatcher.validate_grammar(source)
        if error:
            raise InvalidRequestError(f"the {grammar.kind} grammar is not valid: {error}")
        self.matcher = llguidance.LLMatcher(_ll_tokenizer(tokenizer, vocab_size), source, log_level=0)
        if self.matcher.is_error():
            raise InvalidRequestError(f"the {grammar.kind} grammar is not valid: {self.matcher.get_error()}")
        self.vocab_size = vocab_size
        self.eos = list(eos_token_ids)
        self.tokens: list[int] = []  # consumed, in order
        self._bitmask = torch.zeros(1, (vocab_size + 31) // 32, dtype=torch.int32)  # [1, ceil(V / 32)]

    def sync(self, tokens: list[int]) -> bool:
        """Move to the state after `tokens` (output tokens): roll back to the common prefix, consume the rest. False
        if the grammar refuses one of them: the state then stays after the last one it took."""
        common = 0
        for a, b in zip(self.tokens, tokens, strict=False):
            if a != b:
                break
            common += 1
        back = len(self.tokens) - common
        if back:
            if not self.matcher.rollback(back):
                raise RuntimeError(f"the grammar could not roll back {back} tokens: {self.matcher.get_error()}")
            del self.tokens[common:]
        for t in tokens[common:]:
            # validate first: a refused consume_token leaves llguidance's matcher in its error state
            if self.matcher.is_stopped() or self.matcher.validate_tokens([t]) != 1:
                return False
            if not self.matcher.consume_token(t):
                raise RuntimeError(f"the grammar refused a token it validated: {self.matcher.get_error()}")
            self.tokens.append(t)
        return True

    def forced(self) -> list[int]:
        """The tokens the grammar forces next, whatever the model says (e.g. a JSON schema's next key); [] if none."""
        if self.matcher.is_stopped():
            return self.eos[:1] if len(self.eos) == 1 else []
        return [int(t) for t in self.matcher.compute_ff_tokens()]

    def allowed(self) -> torch.Tensor:
        """[V] bool: the tokens the grammar allows next (only the end of sequence once it is complete)."""
        if self.matcher.is_stopped():
            mask = torch.zeros(self.vocab_size, dtype=torch.bool)
            mask[self.eos] = True
            return mask
        llguidance.torch.fill_next_token_bitmask(self.matcher, self._bitmask, 0)
        bits = (self._bitmask[0, :, None] >> _BITS) & 1  # [ceil(V / 32), 32]
        return bits.reshape(-1)[: self.vocab_size].bool()
