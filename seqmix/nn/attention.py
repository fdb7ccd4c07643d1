"""``Attention``: q/k/v/o projections, optional qk-norm and RoPE, and one call of ``seqmix.ops.attention``.

MHA, GQA and MQA by ``num_kv_heads``; K/V are never repeated (the op reads kv head ``h // G``).
Parallel form: ``module(x [B, T, d_model], positions=[T], segment_ids=[B, T]) -> [B, T, d_model]``.
Decoding: ``cache = module.init_cache(B, max_len)``, then ``y, cache = module.decode(x, cache)`` with
any number of new tokens (a prompt, then one token at a time); RoPE uses text positions. The cache is
an ``ops.KVCache``, or an :class:`AttentionCache` (KV cache + short-conv caches) with ``short_conv``.
Mixers: ``attn``, ``swa:W``, ``chunk:C``, ``stream:W``.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from flax import nnx

from seqmix import ops
from seqmix.ops import masks as masks_lib
from seqmix.ops.per_head import split_heads
from seqmix.nn.mixer import int_arg, no_arg, register_mixer
from seqmix.nn.norm import RMSNorm
from seqmix.nn.rope import apply_rope
from seqmix.nn.short_conv import ConvCache, QKVConvs, check_short_conv


def _positive_int(name: str, value) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"Attention: {name} must be an int >= 1; got {value!r}")
    return value


def _check_sp(value, owner: str):
    if value is None:
        return None
    from seqmix.parallel.config import check_sequence_parallel

    return check_sequence_parallel(value, owner)


@functools.partial(jax.tree_util.register_dataclass, data_fields=["kv", "conv"], meta_fields=[])
@dataclasses.dataclass(frozen=True)
class AttentionCache:
    """Decode cache of an :class:`Attention` with short convs: its ``KVCache`` and the q, k, v conv caches."""

    kv: ops.KVCache
    conv: tuple[ConvCache, ConvCache, ConvCache]

    @property
    def next_pos(self):
        """The text position of the next token (the KV cache's)."""
        return self.kv.next_pos


class Attention(nnx.Module):
    """Softmax self-attention layer (FAMILIES.md §2.1).

    Args:
      d_model: model width (input and output features).
      num_heads: query heads ``Hq``.
      num_kv_heads: key/value heads ``Hkv`` (divides ``Hq``); default ``Hq`` (MHA), 1 = MQA.
      head_dim: per-head width ``D``; default ``d_model // num_heads``.
      mask: a ``seqmix.ops.masks.Mask``; default ``Causal()``. Or a ``masks.PerHead`` (one mask per kv
        head, e.g. ``masks.duo_attention``): each group of heads runs as its own call and its decode
        cache is sized for its own mask (``ops.attention_per_head``).
      rope: apply rotary embeddings to q and k (``rope_theta`` base).
      qk_norm: RMSNorm over ``D`` on q and k (before RoPE).
      sink_logits: learn a per-head sink logit ``b_h`` (``[Hq]``, zeros init) that joins the softmax
        denominator only.
      soft_cap: logit soft cap ``c`` (``s <- c·tanh(s/c)``) or None.
      short_conv: width of a causal depthwise conv + SiLU on the q, k, v projections (before qk-norm and
        RoPE; resets at segment starts), or None (default: none).
      use_bias: biases on the projections.
      dtype: compute dtype (projections, attention, output); param_dtype: parameter dtype.
      impl: implementation request passed to the op (None = automatic).
      sequence_parallel: a :class:`seqmix.parallel.SequenceParallel` (or None): the parallel form runs
        the softmax strategy it names over its mesh on global arrays (positions stay global, so RoPE
        and the mask are unchanged); decoding stays single-device.
    """

    def __init__(self, d_model: int, num_heads: int, *, num_kv_heads: int | None = None,
                 head_dim: int | None = None, mask: masks_lib.Mask | None = None, rope: bool = True,
                 rope_theta: float = 10000.0, qk_norm: bool = False, sink_logits: bool = False,
                 soft_cap: float | None = None, short_conv: int | None = None, use_bias: bool = False,
                 dtype=jnp.float32,
                 param_dtype=jnp.float32, impl=None, sequence_parallel=None, rngs: nnx.Rngs):
        d_model = _positive_int("d_model", d_model)
        num_heads = _positive_int("num_heads", num_heads)
        num_kv_heads = num_heads if num_kv_heads is None else _positive_int("num_kv_heads", num_kv_heads)
        if num_heads % num_kv_heads:
            raise ValueError(f"Attention: num_kv_heads must divide num_heads; got num_kv_heads={num_kv_heads}, "
                             f"num_heads={num_heads}")
        if head_dim is None:
            if d_model % num_heads:
                raise ValueError(f"Attention: num_heads must divide d_model when head_dim is not given; "
                                 f"got d_model={d_model}, num_heads={num_heads}")
            head_dim = d_model // num_heads
        head_dim = _positive_int("head_dim", head_dim)
        if rope and head_dim % 2:
            raise ValueError(f"Attention: RoPE needs an even head_dim; got head_dim={head_dim}")
        mask = masks_lib.Causal() if mask is None else mask
        if not isinstance(mask, (masks_lib.Mask, masks_lib.PerHead)):
            raise ValueError(f"Attention: mask must be a seqmix.ops.masks.Mask, a PerHead or None; got "
                             f"{type(mask).__name__}")
        if isinstance(mask, masks_lib.PerHead) and len(mask.index) != num_kv_heads:
            raise ValueError(f"Attention: the PerHead mask names {len(mask.index)} kv heads; the layer has "
                             f"num_kv_heads={num_kv_heads}")
        if soft_cap is not None and (isinstance(soft_cap, bool) or not isinstance(soft_cap, (int, float)) or soft_cap <= 0):
            raise ValueError(f"Attention: soft_cap must be a positive number or None; got {soft_cap!r}")
        if not rope_theta > 0:
            raise ValueError(f"Attention: rope_theta must be > 0; got {rope_theta!r}")

        self.d_model, self.num_heads, self.num_kv_heads, self.head_dim = d_model, num_heads, num_kv_heads, head_dim
        self.mask, self.rope, self.rope_theta = mask, bool(rope), float(rope_theta)
        self.soft_cap = None if soft_cap is None else float(soft_cap)
        self.dtype, self.impl = dtype, impl
        self.sequence_parallel = _check_sp(sequence_parallel, "Attention")
        if isinstance(mask, masks_lib.PerHead):
            self._kv_type = ops.PerHeadCache
        kw = dict(use_bias=use_bias, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.q_proj = nnx.Linear(d_model, num_heads * head_dim, **kw)
        self.k_proj = nnx.Linear(d_model, num_kv_heads * head_dim, **kw)
        self.v_proj = nnx.Linear(d_model, num_kv_heads * head_dim, **kw)
        self.o_proj = nnx.Linear(num_heads * head_dim, d_model, **kw)
        short_conv = check_short_conv("Attention", short_conv)
        kv_width = num_kv_heads * head_dim
        self.qkv_conv = None if short_conv is None else QKVConvs(
            (num_heads * head_dim, kv_width, kv_width), short_conv, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        norm_kw = dict(dtype=dtype, param_dtype=param_dtype)
        self.q_norm = RMSNorm(head_dim, **norm_kw) if qk_norm else None
        self.k_norm = RMSNorm(head_dim, **norm_kw) if qk_norm else None
        self.sink = nnx.Param(jnp.zeros((num_heads,), param_dtype)) if sink_logits else None

    # ------------------------------------------------------------------ helpers

    def _check_x(self, x):
        if jnp.ndim(x) != 3 or jnp.shape(x)[-1] != self.d_model:
            raise ValueError(f"Attention: x must have shape [batch, seq, {self.d_model}]; got "
                             f"{jnp.asarray(x).dtype}{list(jnp.shape(x))}")
        if not jnp.issubdtype(jnp.asarray(x).dtype, jnp.floating):
            raise ValueError(f"Attention: x must be a floating array; got {jnp.asarray(x).dtype}")
        return x

    def _project(self, x, positions, segment_ids=None, conv_caches=None):
        """x [B, T, d_model] -> q [B, T, Hq, D], k, v [B, T, Hkv, D] (short convs, qk-norm, RoPE applied)
        and the updated conv caches (None in the parallel form)."""
        b, t, _ = x.shape
        q, k, v = self.q_proj(x), self.k_proj(x), self.v_proj(x)
        if self.qkv_conv is not None:
            q, k, v, conv_caches = self.qkv_conv(q, k, v, segment_ids=segment_ids, caches=conv_caches)
        q = q.reshape(b, t, self.num_heads, self.head_dim)
        k = k.reshape(b, t, self.num_kv_heads, self.head_dim)
        v = v.reshape(b, t, self.num_kv_heads, self.head_dim)
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        if self.rope:
            q = apply_rope(q, positions, theta=self.rope_theta)
            k = apply_rope(k, positions, theta=self.rope_theta)
        return q, k, v, conv_caches

    def _out(self, o):
        b, t = o.shape[:2]
        return self.o_proj(o.reshape(b, t, self.num_heads * self.head_dim))

    def _op_kwargs(self):
        return dict(mask=self.mask, sink_logits=None if self.sink is None else self.sink[...],
                    soft_cap=self.soft_cap, impl=self.impl)

    # ------------------------------------------------------------------ parallel form

    def __call__(self, x, *, positions=None, segment_ids=None):
        """x ``[B, T, d_model]``; positions int ``[T]`` (default ``arange(T)``; used by RoPE and the
        mask); segment_ids int ``[B, T]`` (packed documents) or None. Returns ``[B, T, d_model]``."""
        x = self._check_x(x)
        t = x.shape[1]
        if positions is None:
            positions = jnp.arange(t, dtype=jnp.int32)
        positions = jnp.asarray(positions)
        if positions.shape != (t,) or not jnp.issubdtype(positions.dtype, jnp.integer):
            raise ValueError(f"Attention: positions must be an int array of shape [{t}]; got "
                             f"{positions.dtype}{list(positions.shape)}")
        positions = positions.astype(jnp.int32)
        q, k, v, _ = self._project(x, positions, segment_ids)
        return self._out(self._attend(q, k, v, positions, segment_ids))

    def _attend(self, q, k, v, positions, segment_ids):
        """The op on projected q ``[B, T, Hq, D]``, k, v ``[B, T, Hkv, D]`` -> o ``[B, T, Hq, D]``."""
        kw = self._op_kwargs()
        if isinstance(self.mask, masks_lib.PerHead):  # each group of heads is a call with its own mask
            per_head, sink = kw.pop("mask"), kw.pop("sink_logits")
            return split_heads(per_head, q, k, v, sink, lambda q, k, v, mask, sink: self._attend_one(
                q, k, v, positions, segment_ids, **kw, mask=mask, sink_logits=sink))
        return self._attend_one(q, k, v, positions, segment_ids, **kw)

    def _attend_one(self, q, k, v, positions, segment_ids, **kw):
        if self.sequence_parallel is not None:
            return self.sequence_parallel.attention(q, k, v, positions=positions, segment_ids=segment_ids, **kw)
        return ops.attention(q, k, v, segment_ids=segment_ids, q_positions=positions, kv_positions=positions, **kw)

    # ------------------------------------------------------------------ decoding

    def init_cache(self, batch: int, max_len: int, dtype=None) -> ops.KVCache | AttentionCache:
        """An empty KV cache for sequences of up to ``max_len`` tokens, sized for the mask
        (``ops.cache_size_for``: a ring of the window plus sink slots, or ``max_len`` slots); with short
        convs, an :class:`AttentionCache` that also holds their last inputs."""
        batch, max_len = _positive_int("batch", batch), _positive_int("max_len", max_len)
        dtype = self.dtype if dtype is None else dtype
        kv = self._init_kv(batch, max_len, dtype)
        if self.qkv_conv is None:
            return kv
        return AttentionCache(kv=kv, conv=self.qkv_conv.init_cache(batch, dtype))

    _kv_type = ops.KVCache  # what _init_kv returns

    def _init_kv(self, batch: int, max_len: int, dtype):
        if isinstance(self.mask, masks_lib.PerHead):
            return ops.init_per_head_cache(batch, self.mask, self.head_dim, max_len=max_len, dtype=dtype)
        ring, n_sink = ops.cache_size_for(self.mask, max_len)
        return ops.init_kv_cache(batch, self.num_kv_heads, self.head_dim, ring=ring, n_sink=n_sink, dtype=dtype)

    def _attend_decode(self, q, k, v, kv, segment_ids):
        """The decode step on projected new tokens: ``(o [B, T_new, Hq, D], kv)``."""
        kw = self._op_kwargs()
        if isinstance(self.mask, masks_lib.PerHead):
            return ops.attention_decode_per_head(q, k, v, kv, masks=kw.pop("mask"), segment_ids=segment_ids, **kw)
        return ops.attention_decode(q, k, v, kv, segment_ids=segment_ids, **kw)

    def decode(self, x, cache, *, segment_ids=None):
        """Append ``T_new`` tokens ``x [B, T_new, d_model]`` to ``cache`` (from :meth:`init_cache`) and return
        ``(y [B, T_new, d_model], cache)``; equals the parallel form's rows for these tokens.
        RoPE positions are text positions ``cache.next_pos + arange(T_new)``; ``segment_ids [B, T_new]``
        (None = segment 0)."""
        x = self._check_x(x)
        expected = self._kv_type if self.qkv_conv is None else AttentionCache
        if not isinstance(cache, expected):
            raise ValueError(f"Attention.decode: cache must be a {expected.__name__} (from init_cache); "
                             f"got {type(cache).__name__}")
        kv, conv = (cache, None) if self.qkv_conv is None else (cache.kv, cache.conv)
        positions = kv.next_pos + jnp.arange(x.shape[1], dtype=jnp.int32)
        q, k, v, conv = self._project(x, positions, segment_ids, conv)
        o, kv = self._attend_decode(q, k, v, kv, segment_ids)
        return self._out(o), (kv if conv is None else AttentionCache(kv=kv, conv=conv))


# ----------------------------------------------------------------------------- mixers


def _attention_mixer(make_mask):
    def factory(dims, arg, *, rngs: nnx.Rngs, sequence_parallel=None) -> Attention:
        return Attention(dims.d_model, dims.num_heads, num_kv_heads=dims.num_kv_heads, mask=make_mask(arg),
                         rope=True, rope_theta=dims.rope_theta, **dims.layer_kwargs(sequence_parallel), rngs=rngs)
    return factory


register_mixer("attn", _attention_mixer(lambda arg: masks_lib.Causal()), check_arg=no_arg,
               doc="causal softmax attention")
register_mixer("swa", _attention_mixer(lambda arg: masks_lib.LocalWindow(int(arg))), check_arg=int_arg,
               doc="sliding-window softmax attention over the last W keys (swa:W)", example="8")
register_mixer("chunk", _attention_mixer(lambda arg: masks_lib.ChunkedCausal(int(arg))), check_arg=int_arg,
               doc="chunked causal softmax attention, chunks of C tokens (chunk:C)", example="8")
register_mixer("power", _attention_mixer(lambda arg: masks_lib.PowerAttention(int(arg))), check_arg=int_arg,
               doc="PowerAttention: causal blocks of B tokens at power-of-two block distances, own block, first block "
                   "(power:B)", example="8")
def parse_duo_arg(arg: str | None) -> tuple[int, int]:
    """``"W:R"`` -> (streaming window, retrieval kv heads); ValueError otherwise."""
    parts = [] if arg is None else arg.split(":")
    if len(parts) != 2 or not all(p.isdigit() for p in parts) or int(parts[0]) < 1:
        raise ValueError(f"mixer 'duo' needs a window >= 1 and a number of retrieval kv heads (duo:W:R); got "
                         f"{'duo' if arg is None else f'duo:{arg}'}")
    return int(parts[0]), int(parts[1])


def _duo_mixer(dims, arg, *, rngs: nnx.Rngs, sequence_parallel=None) -> Attention:
    window, n_retrieval = parse_duo_arg(arg)
    hkv = dims.num_kv_heads or dims.num_heads
    if n_retrieval > hkv:
        raise ValueError(f"mixer duo:{arg}: {n_retrieval} retrieval heads but the layer has {hkv} kv heads")
    mask = masks_lib.duo_attention([h < n_retrieval for h in range(hkv)], window=window)
    return Attention(dims.d_model, dims.num_heads, num_kv_heads=dims.num_kv_heads, mask=mask, rope=True,
                     rope_theta=dims.rope_theta, **dims.layer_kwargs(sequence_parallel), rngs=rngs)


register_mixer("duo", _duo_mixer, check_arg=lambda name, arg: parse_duo_arg(arg),
               doc="DuoAttention: the first R kv heads causal over everything (retrieval), the rest a window of W "
                   "keys plus 4 sinks (streaming); full KV cache for retrieval heads only (duo:W:R)", example="8:1")
register_mixer("stream", _attention_mixer(lambda arg: masks_lib.streaming(int(arg), 4)), check_arg=int_arg,
               doc="StreamingLLM: window of W keys plus the first 4 tokens (stream:W)", example="8")
