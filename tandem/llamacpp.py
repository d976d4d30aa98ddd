"""The llama.cpp runtime: a GGUF file executed as published (its quantised weights), through llama.cpp's C API
(`tandem.llama_lib`). The core sees it as a `tandem.kv.SequenceState`; each sequence owns a llama.cpp context (its KV
cache) from its model's pool. A pass's row count changes ggml's kernels, and with them a row's last bits: a target's
passes are padded (`settle_rows`, probed at load; docs/llama-cpp.md); a draft's are not (q is what it computed).
"""

from __future__ import annotations

import logging
import threading
import weakref
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from tandem import llama_lib
from tandem.errors import CacheRollbackError, ModelLoadError
from tandem.kv import feed_tail

log = logging.getLogger(__name__)
N_BATCH = 512  # positions one llama_decode takes; a longer feed is split
DEFAULT_N_CTX = 4096  # a context's positions (the model's own training length if shorter)


def _lib() -> Any:
    return llama_lib.library()


@dataclass(frozen=True)
class Config:
    """What the core reads of a model's config (`tandem.models.LoadedModel`, the KV estimate of the cloud)."""

    vocab_size: int
    max_position_embeddings: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    hidden_size: int
    head_dim: int


class LlamaCppModel:
    """One GGUF model loaded by llama.cpp, and a pool of contexts over it. `threads`: llama.cpp's threads for every
    pass (set deliberately: its default, all cores, fights the other model on a shared machine)."""

    def __init__(self, path: Path, threads: int, n_ctx: int = DEFAULT_N_CTX, gpu_layers: int = 0,
                 extra_bufts: bool = True) -> None:
        lib = _lib()
        params = lib.llama_model_default_params()
        params.n_gpu_layers = gpu_layers
        params.use_extra_bufts = extra_bufts
        self.path = path
        self.ptr = lib.llama_model_load_from_file(str(path).encode(), params)
        if not self.ptr:
            raise ModelLoadError(f"llama.cpp cannot load {str(path)!r}")
        self.threads = threads
        vocab = lib.llama_model_get_vocab(self.ptr)
        self.vocab_size = int(lib.llama_vocab_n_tokens(vocab))
        self.n_ctx = min(n_ctx, int(lib.llama_model_n_ctx_train(self.ptr)))
        layers, heads = int(lib.llama_model_n_layer(self.ptr)), int(lib.llama_model_n_head(self.ptr))
        kv_heads, hidden = int(lib.llama_model_n_head_kv(self.ptr)), int(lib.llama_model_n_embd(self.ptr))
        self.config = Config(self.vocab_size, int(lib.llama_model_n_ctx_train(self.ptr)), layers, heads, kv_heads,
                             hidden, hidden // heads)
        self.n_params = int(lib.llama_model_n_params(self.ptr))
        self.size_bytes = int(lib.llama_model_size(self.ptr))
        self.min_rows = self.row_multiple = 1  # no padding until `settle_rows` (a draft needs none: q is what it is)
        self.rows_why = ""
        self._free: list[Any] = []
        self._lock = threading.Lock()
        weakref.finalize(self, _free_model, lib, self.ptr, self._free)

    def describe(self) -> str:
        rows = f"; {self.rows_why}" if self.rows_why else ""
        return (f"llama.cpp, {self.path.name} as published ({self.size_bytes / 2**20:.0f} MiB), {self.threads} "
                f"threads{rows}")

    def take_context(self) -> Any:
        """A context with an empty cache: from the pool, else a new one."""
        with self._lock:
            if self._free:
                return self._free.pop()
        lib = _lib()
        params = lib.llama_context_default_params()
        params.n_ctx = self.n_ctx
        params.n_batch = params.n_ubatch = N_BATCH
        params.n_seq_max = 1
        params.n_threads = params.n_threads_batch = self.threads
        params.no_perf = True
        ctx = lib.llama_init_from_model(self.ptr, params)
        if not ctx:
            raise ModelLoadError(f"llama.cpp cannot make a context of {self.n_ctx} positions for {self.path.name}")
        return ctx

    def give_back(self, ctx: Any) -> None:
        _lib().llama_memory_clear(_lib().llama_get_memory(ctx), True)
        with self._lock:
            self._free.append(ctx)


def _free_model(lib: Any, ptr: Any, contexts: list[Any]) -> None:
    for ctx in contexts:
        lib.llama_free(ctx)
    lib.llama_model_free(ptr)


class _Batch:
    """A reusable llama_batch of up to N_BATCH positions, one sequence."""

    def __init__(self) -> None:
        self.lib = _lib()
        self.raw = self.lib.llama_batch_init(N_BATCH, 0, 1)

    def fill(self, ids: list[int], start: int, outputs: bool) -> None:
        """`ids` at positions start.., logits for all of them or none."""
        b = self.raw
        b.n_tokens = len(ids)
        for i, t in enumerate(ids):
            b.token[i] = t
            b.pos[i] = start + i
            b.n_seq_id[i] = 1
            b.seq_id[i][0] = 0
            b.logits[i] = int(outputs)

    def __del__(self) -> None:
        self.lib.llama_batch_free(self.raw)


class LlamaSequence:
    """`tandem.kv.SequenceState` on llama.cpp: `tokens` is the committed sequence; the cache covers `tokens[:cached]`
    (plus, inside a forward, more)."""

    def __init__(self, model: LlamaCppModel, tokens: list[int]) -> None:
        self.model = model
        self.tokens = list(tokens)
        self.device = torch.device("cpu")
        self.min_rows, self.row_multiple = model.min_rows, model.row_multiple
        self.exact = None  # a torch model's exact passes (`tandem.exact`); here rows are settled at load
        self.lib = _lib()
        self.ctx = model.take_context()
        self.mem = self.lib.llama_get_memory(self.ctx)
        self.batch = _Batch()
        self.cached = 0
        self._release = weakref.finalize(self, model.give_back, self.ctx)

    def close(self) -> None:
        """Hand the context back now: the state is not used again."""
        self._release()

    def forward(self, extra: list[int] | tuple[int, ...] = ()) -> torch.Tensor:
        """Feed the uncached tail of `tokens`, then `extra` (not committed), in one pass; [1 + len(extra), V]
        logits: the row after `tokens`, then one per extra token (as `tandem.kv.SequenceState.forward`)."""
        return feed_tail(self, extra)

    def catch_up(self, bulk: int = 0) -> None:
        """Cache every committed token but the last."""
        end = len(self.tokens) - 1
        if self.cached > end:
            raise CacheRollbackError("the cache runs past the committed tokens: commit or roll back first")
        if self.cached < end:
            self.run(self.tokens[self.cached : end], outputs=0)

    def forward_tree(self, parents: list[int], nodes: list[int]) -> torch.Tensor:
        raise CacheRollbackError("tree blocks need the torch runtime: a llama.cpp target verifies lines")

    def run(self, ids: list[int], outputs: int | None = None) -> torch.Tensor:
        """Feed `ids` at the next uncached positions; [outputs, V] float32 logits for the first `outputs` (all)."""
        n = len(ids)
        outputs = n if outputs is None else outputs
        start = self.cached
        if start + n + self.min_rows > self.model.n_ctx:
            raise CacheRollbackError(f"the sequence would run past the context's {self.model.n_ctx} positions")
        rows: list[np.ndarray] = []
        done = 0
        while done < n:
            part = ids[done : done + N_BATCH]
            # never fewer rows than `min_rows`: padding comes last, no real row sees it, its cache entries are dropped
            pad = max(self.min_rows, -(-len(part) // self.row_multiple) * self.row_multiple) - len(part)
            want = max(0, min(len(part), outputs - done))
            self.batch.fill(part + part[-1:] * pad, start + done, want > 0)
            rc = self.lib.llama_decode(self.ctx, self.batch.raw)
            if rc != 0:
                self.lib.llama_memory_seq_rm(self.mem, 0, start, -1)
                self.cached = start
                raise CacheRollbackError(f"llama_decode failed ({rc}) at position {start + done}")
            if pad:
                self.lib.llama_memory_seq_rm(self.mem, 0, start + done + len(part), -1)
            if want:
                ptr = self.lib.llama_get_logits(self.ctx)
                v = self.model.vocab_size
                rows.append(np.ctypeslib.as_array(ptr, shape=(want * v,)).reshape(want, v).copy())
            done += len(part)
        self.cached = start + n
        if not rows:
            return torch.empty(0, self.model.vocab_size)
        return torch.from_numpy(np.concatenate(rows))  # [outputs, V]

    def rollback(self, length: int) -> None:
        """Forget cached positions from `length` on."""
        if length > self.cached or length < 0:
            raise CacheRollbackError(f"cannot roll back to {length}: only {self.cached} positions cached")
        if length < self.cached and not self.lib.llama_memory_seq_rm(self.mem, 0, length, -1):
            raise CacheRollbackError(f"llama.cpp cannot drop positions from {length} on")
        self.cached = length

    def commit(self, new_tokens: list[int], keep_cached: int) -> None:
        """Append emitted tokens and keep at most `keep_cached` cached positions (those still on the sequence)."""
        self.tokens.extend(new_tokens)
        self.rollback(min(self.cached, keep_cached))


def probe(model: LlamaCppModel, positions: int = 48, seed: int = 0) -> bool:
    """Do a position's logits come out bit for bit the same in any split of the same positions into passes (padded
    as the model says)? Checked on random token ids, three random splits (passes of 1-12) against one whole pass."""
    gen = np.random.default_rng(seed)
    ids = [int(t) for t in gen.integers(100, model.vocab_size - 100, positions)]
    whole = LlamaSequence(model, ids)
    ref = whole.run(ids)
    whole.close()
    for _ in range(3):
        seq = LlamaSequence(model, ids)
        got, at = [], 0
        while at < positions:
            n = min(int(gen.integers(1, 13)), positions - at)
            got.append(seq.run(ids[at : at + n]))
            at += n
        seq.close()
        if not torch.equal(torch.cat(got), ref):
            return False
    return True


ROW_RULES = ((8, 4), (16, 8), (32, 16))  # (at least, multiple of): the first is what ggml's CPU kernels need today


def settle_rows(model: LlamaCppModel, rules: tuple[tuple[int, int], ...] = ROW_RULES) -> None:
    """The first padding rule in `rules` for which `probe` passes; where none does, the last (then a pass's rows may
    still depend on its shape: `rows_why` says so, and start-up warns)."""
    for least, multiple in rules:
        model.min_rows, model.row_multiple = least, multiple
        if probe(model):
            model.rows_why = (f"exact passes: padded to at least {least} rows, a multiple of {multiple} (probed: "
                              "rows then match across pass shapes)")
            return
    model.rows_why = (f"passes padded to at least {model.min_rows} rows; rows still differ across pass shapes "
                      "(probed): greedy output may differ from the target alone at near ties")
    log.warning("%s: %s", model.path.name, model.rows_why)
