"""Text for the completion API: prompts from chat messages, and incremental decoding with stop strings."""

from __future__ import annotations

from typing import Any

from tokenizers import Tokenizer
from tokenizers.decoders import DecodeStream
from transformers import PreTrainedTokenizerBase


def chat_prompt(tokenizer: PreTrainedTokenizerBase, messages: list[dict[str, Any]]) -> list[int]:
    """The tokenizer's chat template if it has one; else the messages' text joined by newlines (a code model)."""
    if getattr(tokenizer, "chat_template", None):
        ids: Any = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
        if isinstance(ids, dict) or hasattr(ids, "keys"):
            ids = ids["input_ids"]
        return [int(i) for i in ids]
    text = "\n".join(m["content"] for m in messages if m["content"])
    return encode(tokenizer, text)


def message_text(content: str | list[Any] | None) -> str:
    """A message's text: a string, or the concatenation of its text parts (objects with `text`)."""
    if content is None or isinstance(content, str):
        return content or ""
    return "".join(str(part.text) for part in content)


def encode(tokenizer: PreTrainedTokenizerBase, text: str) -> list[int]:
    return [int(i) for i in tokenizer.encode(text, add_special_tokens=False)]


class IncrementalText:
    """Text deltas of a growing token sequence, decoded incrementally: each token once, by the tokenizers library's
    streaming decoder (it holds back an unfinished multi-byte character until its next piece), so a stream costs
    time linear in its length. A tokenizer without a fast backend is decoded whole each time instead.

    Text that may be the start of a stop string is held back until it is known not to be one.
    """

    def __init__(self, tokenizer: PreTrainedTokenizerBase, stop: list[str] | None = None) -> None:
        self.tokenizer = tokenizer
        self.stop = [s for s in stop or [] if s]
        self._longest_stop = max((len(s) for s in self.stop), default=0)
        self.ids: list[int] = []
        self.text = ""  # decoded so far
        self.sent = 0  # characters of the decoded text already returned
        self.stopped = False
        self._backend: Tokenizer | None = getattr(tokenizer, "backend_tokenizer", None)
        self._stream = DecodeStream(skip_special_tokens=True) if self._backend is not None else None

    def _decode(self, ids: list[int]) -> str:
        if self._stream is None:
            self.ids.extend(ids)
            text = self._decode_whole()
            return text.rstrip("\ufffd")  # an unfinished multi-byte character: wait for its next piece
        for i in ids:
            self.ids.append(i)
            chunk = self._stream.step(self._backend, i)  # type: ignore[arg-type]  # set together with the stream
            if chunk:
                self.text += chunk
        return self.text

    def _decode_whole(self) -> str:
        return str(self.tokenizer.decode(self.ids, skip_special_tokens=True, clean_up_tokenization_spaces=False))

    def push(self, ids: list[int]) -> str:
        if self.stopped:
            return ""
        self.text = self._decode(ids)
        # text before `sent` was checked already; a stop string may still end in what came after it
        start = max(0, self.sent - self._longest_stop + 1)
        hits = [i for i in (self.text.find(s, start) for s in self.stop) if i != -1]
        if hits:
            self.stopped = True
            return self._emit(min(hits))
        return self._emit(len(self.text) - self._held(self.text))

    def flush(self) -> str:
        """At the end of generation: whatever was held back."""
        if self.stopped:
            return ""
        if self._stream is None:
            self.text = self._decode_whole()
        return self._emit(len(self.text))

    def _emit(self, end: int) -> str:
        if end <= self.sent:
            return ""
        out = self.text[self.sent : end]
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
