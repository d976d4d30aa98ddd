"""Text for the completion API: prompts from chat messages, and incremental decoding with stop strings."""

from __future__ import annotations

from typing import Any

from transformers import PreTrainedTokenizerBase


def chat_prompt(tokenizer: PreTrainedTokenizerBase, messages: list[dict[str, Any]]) -> list[int]:
    """The tokenizer's chat template if it has one; else the messages' text joined by newlines (a code model)."""
    if getattr(tokenizer, "chat_template", None):
        ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
        if isinstance(ids, dict) or hasattr(ids, "keys"):
            ids = ids["input_ids"]
        return [int(i) for i in ids]
    text = "\n".join(m["content"] for m in messages if m["content"])
    return encode(tokenizer, text)


def message_text(content: str | list[dict[str, Any]] | None) -> str:
    if content is None or isinstance(content, str):
        return content or ""
    return "".join(str(part.get("text", "")) for part in content if part.get("type") == "text")


def encode(tokenizer: PreTrainedTokenizerBase, text: str) -> list[int]:
    return [int(i) for i in tokenizer.encode(text, add_special_tokens=False)]


class IncrementalText:
    """Text deltas of a growing token sequence, decoded whole each time so multi-byte pieces come out complete.

    Text that may be the start of a stop string is held back until it is known not to be one.
    """

    def __init__(self, tokenizer: PreTrainedTokenizerBase, stop: list[str] | None = None) -> None:
        self.tokenizer = tokenizer
        self.stop = [s for s in stop or [] if s]
        self.ids: list[int] = []
        self.sent = 0  # characters of the decoded text already returned
        self.stopped = False

    def _decode(self) -> str:
        return self.tokenizer.decode(self.ids, skip_special_tokens=True, clean_up_tokenization_spaces=False)

    def push(self, ids: list[int]) -> str:
        if self.stopped:
            return ""
        self.ids.extend(ids)
        text = self._decode()
        stable = text.rstrip("\ufffd")  # an unfinished multi-byte character: wait for its next piece
        hits = [i for i in (stable.find(s) for s in self.stop) if i != -1]
        if hits:
            self.stopped = True
            return self._emit(stable, min(hits))
        return self._emit(stable, len(stable) - self._held(stable))

    def flush(self) -> str:
        """At the end of generation: whatever was held back."""
        return "" if self.stopped else self._emit(self._decode(), None)

    def _emit(self, text: str, end: int | None) -> str:
        end = len(text) if end is None else end
        if end <= self.sent:
            return ""
        out = text[self.sent : end]
        self.sent = end
        return out

    def _held(self, text: str) -> int:
        """Length of the longest tail of `text` that is a proper prefix of a stop string."""
        best = 0
        for s in self.stop:
            for n in range(min(len(s) - 1, len(text)), best, -1):
                if text.endswith(s[:n]):
                    best = n
                    break
        return best
