"""The fast path (in the manner of gpt-fast): a Llama-family causal LM as one pure function of (ids, positions, slots,
mask, caches) over a preallocated KV cache indexed by slot, compiled per pass length (docs/fast-path.md). `FastLM`
shares the weights of a loaded HF model; no Python object grows during a pass, so `torch.compile` captures the step.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from tandem.config import COMPILE_SIZES

# block lengths (positions per pass) with a compiled graph of their own; a pass is padded up to the next one
BUCKETS = COMPILE_SIZES
# a draft's passes: one token, or the few it re-feeds after a verdict (longer ones run eagerly)
DRAFT_BUCKETS = (1, 2, 3, 4)
CACHE_STEP = 256  # cache capacity grows in steps of this many slots (each capacity the graphs see is one shape)


@dataclass(frozen=True)
class FastSpec:
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    eps: float
    rope_theta: float
    max_positions: int


def supports(model: nn.Module) -> bool:
    """A plain Llama (HF `LlamaForCausalLM`, default RoPE, no biases), a Qwen2 (`Qwen2ForCausalLM`: the same block
    with q/k/v biases, which its projections carry; no sliding window)."""
    cfg = getattr(model, "config", None)
    kind = getattr(cfg, "model_type", None)
    if cfg is None or kind not in ("llama", "qwen2"):
        return False
    rope = getattr(cfg, "rope_parameters", None) or {"rope_type": "default"}
    if rope.get("rope_type", "default") != "default":
        return False
    if getattr(cfg, "mlp_bias", False) or cfg.hidden_act != "silu":
        return False
    if kind == "qwen2":
        return type(model).__name__ == "Qwen2ForCausalLM" and getattr(cfg, "sliding_window", None) is None
    if getattr(cfg, "attention_bias", False):
        return False
    return type(model).__name__ == "LlamaForCausalLM"


def fast_path_of(model: nn.Module) -> FastLM | None:
    """The fast path `enable` put on `model`, if any."""
    return getattr(model, _ATTR, None)


def enable(model: nn.Module, compile: bool = True, buckets: tuple[int, ...] = BUCKETS) -> FastLM:
    """Put the fast path on `model` (every `tandem.kv.SequenceState` over it then uses a `StaticKV`); with `compile`,
    build the graphs now. Raises ValueError for a model it cannot run."""
    fast = fast_path_of(model) or FastLM(model)
    object.__setattr__(model, _ATTR, fast)  # a plain attribute, not a submodule
    if compile and fast.compiled is None:
        fast.compile(buckets)
    return fast


_ATTR = "_tandem_fast"


class FastLM:
    """One Llama forward over (ids, positions, slots, mask) and caches the caller owns; weights shared, not copied."""

    def __init__(self, model: nn.Module) -> None:
        if not supports(model):
            raise ValueError(f"the fast path runs Llama and Qwen2 models; not {type(model).__name__}")
        cfg: Any = model.config
        self.hf = model  # keeps the shared weights alive; not called
        self.spec = FastSpec(
            layers=cfg.num_hidden_layers, heads=cfg.num_attention_heads, kv_heads=cfg.num_key_value_heads,
            head_dim=getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads,
            eps=cfg.rms_norm_eps,
            rope_theta=float((cfg.rope_parameters or {}).get("rope_theta", getattr(cfg, "rope_theta", 10000.0))),
            max_positions=cfg.max_position_embeddings,
        )
        backbone: Any = model.model
        self.blocks = list(backbone.layers)
        self.norm_w: torch.Tensor = backbone.norm.weight
        self.embed: Any = backbone.embed_tokens
        self.head: Any = model.lm_head
        p = next(model.parameters())
        self.dtype, self.device = p.dtype, p.device
        s = self.spec
        dims = torch.arange(0, s.head_dim, 2, dtype=torch.float32, device=p.device)  # [D/2]
        inv = 1.0 / (s.rope_theta ** (dims / s.head_dim))
        angles = torch.outer(torch.arange(s.max_positions, dtype=torch.float32, device=p.device), inv)  # [P, D/2]
        emb = torch.cat([angles, angles], dim=-1)  # [P, D]
        self.cos, self.sin = emb.cos().to(self.dtype), emb.sin().to(self.dtype)
        self.compiled: Any = None
        self.buckets: tuple[int, ...] = ()  # the pass lengths with a compiled graph
        self.compile_s = 0.0

    def new_cache(self, capacity: int) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """Zeroed key and value caches: per layer one [kv_heads, capacity, head_dim] tensor each."""
        s = self.spec
        shape = (s.kv_heads, capacity, s.head_dim)
        # one tensor per layer, not a view into a stacked one: a compiled graph writes a whole input in place, but may
        # copy a buffer it only sees a view of. Inference tensors always, wherever the caller is: the graphs guard on
        # it, and a cache made outside inference mode would be compiled anew mid-request
        with torch.inference_mode():
            return ([torch.zeros(shape, dtype=self.dtype, device=self.device) for _ in range(s.layers)],
                    [torch.zeros(shape, dtype=self.dtype, device=self.device) for _ in range(s.layers)])

    def _norm(self, h: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        x = h.float()
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.spec.eps)
        return w * x.to(h.dtype)

    def _rope(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        half = x.shape[-1] // 2
        rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
        return x * cos + rotated * sin

    def step(
        self,
        ids: torch.Tensor,  # [n] int64
        positions: torch.Tensor,  # [n] int64, for RoPE
        slots: torch.Tensor,  # [n] int64, where each position's key and value go in the caches
        mask: torch.Tensor,  # [n, S] bool: query i sees slot j
        k_cache: list[torch.Tensor],  # per layer [Hkv, S, D], written in place
        v_cache: list[torch.Tensor],  # per layer [Hkv, S, D], written in place
    ) -> torch.Tensor:
        """[n, V] float32 logits."""
        s = self.spec
        n = ids.shape[0]
        h = self.embed(ids)  # [n, hidden]
        cos, sin = self.cos[positions][None], self.sin[positions][None]  # [1, n, D]
        for i, blk in enumerate(self.blocks):
            att = blk.self_attn
            x = self._norm(h, blk.input_layernorm.weight)
            q = att.q_proj(x).view(n, s.heads, s.head_dim).transpose(0, 1)  # [H, n, D]
            k = att.k_proj(x).view(n, s.kv_heads, s.head_dim).transpose(0, 1)  # [Hkv, n, D]
            v = att.v_proj(x).view(n, s.kv_heads, s.head_dim).transpose(0, 1)
            q, k = self._rope(q, cos, sin), self._rope(k, cos, sin)
            k_cache[i].index_copy_(1, slots, k)
            v_cache[i].index_copy_(1, slots, v)
            o = F.scaled_dot_product_attention(
                q[None], k_cache[i][None], v_cache[i][None], attn_mask=mask[None, None],
                enable_gqa=s.kv_heads != s.heads,
            )  # [1, H, n, D]
            h = h + att.o_proj(o[0].transpose(0, 1).reshape(n, s.heads * s.head_dim))
            x = self._norm(h, blk.post_attention_layernorm.weight)
            mlp = blk.mlp
            h = h + mlp.down_proj(F.silu(mlp.gate_proj(x)) * mlp.up_proj(x))
        h = self._norm(h, self.norm_w)
        return self.head(h).float()  # type: ignore[no-any-return]

    def run(self, ids: torch.Tensor, positions: torch.Tensor, slots: torch.Tensor, mask: torch.Tensor,
            k_cache: list[torch.Tensor], v_cache: list[torch.Tensor]) -> torch.Tensor:
        """`step`, through the compiled graph of the next bucket when there is one (rows padded, then dropped)."""
        with torch.inference_mode():
            # inputs made outside inference mode are copied in: the graphs guard on it (else: a compile mid-request)
            ids, positions, slots, mask = (t if t.is_inference() else t.clone() for t in (ids, positions, slots, mask))
            return self._run(ids, positions, slots, mask, k_cache, v_cache)

    def _run(self, ids: torch.Tensor, positions: torch.Tensor, slots: torch.Tensor, mask: torch.Tensor,
             k_cache: list[torch.Tensor], v_cache: list[torch.Tensor]) -> torch.Tensor:
        n = ids.shape[0]
        bucket = next((b for b in self.buckets if b >= n), None)  # only compiled lengths: never compile mid-request
        if self.compiled is None or bucket is None or int(slots.max()) + bucket - n >= k_cache[0].shape[1]:
            return self.step(ids, positions, slots, mask, k_cache, v_cache)
        pad = bucket - n
        if pad:
            # padding rows write past every real slot (ignored: later passes overwrite them) and see only themselves
            extra = torch.arange(1, pad + 1, device=ids.device) + slots.max()
            ids = torch.cat([ids, ids.new_zeros(pad)])
            positions = torch.cat([positions, positions[-1:].expand(pad)])
            slots = torch.cat([slots, extra])
            mask = torch.cat([mask, F.one_hot(extra, k_cache[0].shape[1]).bool()])
        return self._call(ids, positions, slots, mask, k_cache, v_cache)[:n]

    def _call(self, ids: torch.Tensor, positions: torch.Tensor, slots: torch.Tensor, mask: torch.Tensor,
              k_cache: list[torch.Tensor], v_cache: list[torch.Tensor]) -> torch.Tensor:
        # one graph per block length, all cache capacities alike: n static, the capacity S dynamic
        for t in (ids, positions, slots, mask):
            torch._dynamo.mark_static(t, 0)
        torch._dynamo.mark_dynamic(mask, 1)
        for t in (*k_cache, *v_cache):
            torch._dynamo.mark_dynamic(t, 1)
        return self.compiled(ids, positions, slots, mask, k_cache, v_cache)  # type: ignore[no-any-return]

    def compile(self, buckets: tuple[int, ...] = BUCKETS, capacity: int = CACHE_STEP) -> float:
        """Compile the step for each pass length in `buckets` and run it once; returns the seconds it took. On a CPU
        this happens at every start (the frozen graphs are not cached); on a GPU inductor's cache serves restarts."""
        t0 = time.perf_counter()
        cuda = self.device.type == "cuda"
        # on a GPU: CUDA graphs; on a CPU: inductor's C++ kernels with the weights frozen into the graph
        mode = "reduce-overhead" if cuda else None
        import torch._dynamo.config as dynamo_config
        import torch._inductor.config as inductor_config

        # a CPU: freezing folds the weights into the graph, prepacked for its matmul units (bfloat16 steps ~1.4x
        # faster here); it also keeps inductor's on-disk cache from serving the graph, so every start compiles
        inductor_config.freezing = not cuda
        # every model's graphs hang off the one code object of `step`: a second model's different sizes must make new
        # graphs, not symbolic sizes (SDPA's enable_gqa then fails), and there must be room for all their buckets
        dynamo_config.automatic_dynamic_shapes = False
        dynamo_config.recompile_limit = max(dynamo_config.recompile_limit, 8 * len(BUCKETS))
        dynamo_config.accumulated_recompile_limit = max(dynamo_config.accumulated_recompile_limit, 32 * len(BUCKETS))
        self.compiled = torch.compile(self.step, mode=mode, fullgraph=True)
        k, v = self.new_cache(capacity)
        with torch.inference_mode():
            for n in buckets:
                dev = self.device
                ar = torch.arange(n, device=dev)
                mask = torch.ones(n, capacity, dtype=torch.bool, device=dev).tril()
                self._call(torch.zeros(n, dtype=torch.long, device=dev), ar, ar.clone(), mask, k, v)
        self.buckets = tuple(sorted(set(self.buckets) | set(buckets)))
        self.compile_s = time.perf_counter() - t0
        return self.compile_s
