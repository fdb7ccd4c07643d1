"""What every recurrent layer shares: argument checks, Mamba-2 gates, the parallel/decode driver, the gated output.

Every layer follows the mixer protocol (``seqmix.nn.mixer``):

* ``layer(x [B, T, d_model], *, positions=None, segment_ids=None) -> [B, T, d_model]`` (parallel form,
  the op's chunked implementation; ``segment_ids [B, T]`` packs documents: the state and the short
  convolutions reset where the segment changes);
* ``cache = layer.init_cache(batch, max_len)`` (a :class:`~seqmix.nn.recurrent_cache.RecurrentCache`);
* ``y, cache = layer.decode(x [B, T_new, d_model], cache, *, segment_ids=None)``: the op with
  ``initial_state=cache.state, return_state=True``; a single token takes the family record's decode step.

A layer names its family (``_family``); its op, decode step and argument names come from the record.
Common arguments: ``dtype`` (compute dtype of projections, op inputs and output; gates, norms'
statistics and recurrent states are fp32), ``param_dtype``, ``impl`` (the op's implementation request),
``chunk_size``, ``sequence_parallel`` (a :class:`seqmix.parallel.SequenceParallel` or None: the parallel
form runs the op by its ``recurrent_strategy``, LASP-2 by default; decoding stays single-device), ``rngs``.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from flax import nnx

from seqmix.nn.norm import RMSNorm
from seqmix.nn.recurrent_cache import RecurrentCache, decode_segments, init_recurrent_cache
from seqmix.nn.short_conv import QKVConvs, check_short_conv
from seqmix.ops._registry import get_family


def positive_int(owner: str, name: str, value) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{owner}: {name} must be an int >= 1; got {value!r}")
    return value


def resolve_head_dim(owner: str, d_model: int, num_heads: int, head_dim) -> int:
    if head_dim is None:
        if d_model % num_heads:
            raise ValueError(f"{owner}: num_heads must divide d_model when head_dim is not given; got "
                             f"d_model={d_model}, num_heads={num_heads}")
        return d_model // num_heads
    return positive_int(owner, "head_dim", head_dim)


def l2norm(x, eps: float = 1e-6):
    """L2-normalize the last axis in fp32; returns x's dtype."""
    xf = x.astype(jnp.float32)
    return (xf * jax.lax.rsqrt(jnp.sum(xf * xf, axis=-1, keepdims=True) + eps)).astype(x.dtype)


def inv_softplus(x):
    return x + jnp.log(-jnp.expm1(-x))


def mamba_decay_params(rngs: nnx.Rngs, num_heads: int, param_dtype, dt_min=1e-3, dt_max=0.1):
    """Mamba-2 init: ``A ~ U(1, 16)`` (``A_log = log A``), ``dt`` log-uniform in [dt_min, dt_max],
    ``dt_bias = softplus⁻¹(dt)``."""
    a = jax.random.uniform(rngs.params(), (num_heads,), jnp.float32, 1.0, 16.0)
    u = jax.random.uniform(rngs.params(), (num_heads,), jnp.float32)
    dt = jnp.maximum(jnp.exp(u * (math.log(dt_max) - math.log(dt_min)) + math.log(dt_min)), 1e-4)
    return nnx.Param(jnp.log(a).astype(param_dtype)), nnx.Param(inv_softplus(dt).astype(param_dtype))


def mamba_gate(a, a_log, dt_bias):
    """``g = −exp(A_log)·softplus(a + dt_bias)`` (fp32, ≤ 0) for ``a [B, T, H]``."""
    a = a.astype(jnp.float32) + dt_bias.astype(jnp.float32)
    return -jnp.exp(a_log.astype(jnp.float32)) * jax.nn.softplus(a)


def check_positions(owner: str, positions, b: int, t: int):
    if positions is None:
        return jnp.arange(t, dtype=jnp.int32)
    positions = jnp.asarray(positions)
    if positions.shape not in ((t,), (b, t)) or not jnp.issubdtype(positions.dtype, jnp.integer):
        raise ValueError(f"{owner}: positions must be an int array of shape [{t}] or [{b}, {t}]; got "
                         f"{positions.dtype}{list(positions.shape)}")
    return positions.astype(jnp.int32)


def check_segments(owner: str, segment_ids, b: int, t: int):
    if segment_ids is None:
        return None
    seg = jnp.asarray(segment_ids)
    if seg.shape != (b, t) or not jnp.issubdtype(seg.dtype, jnp.integer):
        raise ValueError(f"{owner}: segment_ids must be an int array of shape [{b}, {t}]; got "
                         f"{seg.dtype}{list(seg.shape)}")
    return seg.astype(jnp.int32)


def check_sp(value, owner: str):
    if value is None:
        return None
    from seqmix.parallel.config import check_sequence_parallel

    return check_sequence_parallel(value, owner)



class RecurrentLayer(nnx.Module):
    """Shared driver: subclasses give ``_features``, ``_output``, the op, its step and the state dims.

    ``_features(x, positions, segment_ids, conv_caches) -> (q, k, v, per_token, conv_caches)``: q, k
    ``[B, T, H, Dk]``, v ``[B, T, H, Dv]`` in the compute dtype, ``per_token`` a dict of the op's
    per-token arrays (``g``, ``beta``; time on axis 1), ``conv_caches`` a tuple (or None in the
    parallel form). ``_output(o [B, T, H, Dv], x) -> [B, T, d_model]``.
    """

    _family: str = ""  # the op's registry family: its op, decode step and argument names come from the record

    # ---------------------------------------------------------------- to override
    def _features(self, x, positions, segment_ids, conv_caches):  # pragma: no cover - abstract
        raise NotImplementedError

    def _output(self, o, x):  # pragma: no cover - abstract
        raise NotImplementedError

    def _static(self) -> dict:
        """Keyword arguments shared by the op and its step (scale, decay, feature map...)."""
        return {}

    def _state_dims(self) -> tuple[int, int]:
        return self.key_dim, self.head_dim

    # ---------------------------------------------------------------- shared
    def _common_init(self, d_model, num_heads, head_dim, key_dim, *, dtype, impl, chunk_size,
                     sequence_parallel=None):
        name = type(self).__name__
        self.sequence_parallel = check_sp(sequence_parallel, name)
        self.d_model = positive_int(name, "d_model", d_model)
        self.num_heads = positive_int(name, "num_heads", num_heads)
        self.head_dim = resolve_head_dim(name, d_model, num_heads, head_dim)
        self.key_dim = self.head_dim if key_dim is None else positive_int(name, "key_dim", key_dim)
        self.chunk_size = positive_int(name, "chunk_size", chunk_size)
        self.dtype, self.impl = dtype, impl

    def _init_qkv(self, d_model, *, short_conv=None, conv_activation="silu", use_bias=False, dtype,
                  param_dtype, rngs):
        """The q, k, v projections (``H·Dk``, ``H·Dk``, ``H·Dv``), followed by short causal convolutions
        of width ``short_conv`` when it is set (``qkv_conv``)."""
        h, dk, dv = self.num_heads, self.key_dim, self.head_dim
        kw = dict(use_bias=use_bias, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.q_proj = nnx.Linear(d_model, h * dk, **kw)
        self.k_proj = nnx.Linear(d_model, h * dk, **kw)
        self.v_proj = nnx.Linear(d_model, h * dv, **kw)
        short_conv = check_short_conv(type(self).__name__, short_conv)
        self.qkv_conv = None if short_conv is None else QKVConvs(
            (h * dk, h * dk, h * dv), short_conv, activation=conv_activation, dtype=dtype,
            param_dtype=param_dtype, rngs=rngs)

    def _qkv(self, x, segment_ids, conv_caches):
        """``(q, k [B, T, H, Dk], v [B, T, H, Dv], conv caches)``: projections, then the short convs
        (conv caches: None in the parallel form, else the updated tuple, empty without convs)."""
        q, k, v = self.q_proj(x), self.k_proj(x), self.v_proj(x)
        if self.qkv_conv is not None:
            q, k, v, conv_caches = self.qkv_conv(q, k, v, segment_ids=segment_ids, caches=conv_caches)
        return (self._heads(q, self.key_dim), self._heads(k, self.key_dim), self._heads(v, self.head_dim),
                conv_caches)

    def _conv_caches(self, batch: int) -> tuple:
        return () if self.qkv_conv is None else self.qkv_conv.init_cache(batch, self.dtype)

    def _check_x(self, x):
        name = type(self).__name__
        if jnp.ndim(x) != 3 or jnp.shape(x)[-1] != self.d_model:
            raise ValueError(f"{name}: x must have shape [batch, seq, {self.d_model}]; got "
                             f"{jnp.asarray(x).dtype}{list(jnp.shape(x))}")
        if not jnp.issubdtype(jnp.asarray(x).dtype, jnp.floating):
            raise ValueError(f"{name}: x must be a floating array; got {jnp.asarray(x).dtype}")
        return x

    def _heads(self, y, dim: int):
        b, t = y.shape[:2]
        return y.reshape(b, t, self.num_heads, dim)

    def __call__(self, x, *, positions=None, segment_ids=None):
        """x ``[B, T, d_model]``; positions int ``[T]`` (default ``arange(T)``); segment_ids int ``[B, T]``
        or None. Returns ``[B, T, d_model]`` in the compute dtype."""
        x = self._check_x(x)
        b, t, _ = x.shape
        positions = check_positions(type(self).__name__, positions, b, t)
        segment_ids = check_segments(type(self).__name__, segment_ids, b, t)
        q, k, v, per_token, _ = self._features(x, positions, segment_ids, None)
        fam = get_family(self._family)
        if self.sequence_parallel is not None:
            positional = [per_token.pop(a) for a in fam.positional if a in per_token]
            o = self.sequence_parallel.recurrent(self._family, q, k, v, *positional, **per_token,
                                                 **self._static(), segment_ids=segment_ids,
                                                 chunk_size=self.chunk_size, impl=self.impl)
        else:
            o = fam.op(q, k, v, **per_token, **self._static(), segment_ids=segment_ids,
                       chunk_size=self.chunk_size, impl=self.impl)
        return self._output(o, x)

    def init_cache(self, batch: int, max_len: int | None = None) -> RecurrentCache:
        """A zero state (fp32 ``[batch, H, Dk', Dv']``) and empty short-conv caches. ``max_len`` is
        accepted for the mixer protocol; a recurrent cache does not grow."""
        batch = positive_int(type(self).__name__, "batch", batch)
        if max_len is not None:
            positive_int(type(self).__name__, "max_len", max_len)
        dk, dv = self._state_dims()
        return init_recurrent_cache(batch, self.num_heads, dk, dv, self._conv_caches(batch))

    def decode(self, x, cache: RecurrentCache, *, segment_ids=None):
        """Feed ``x [B, T_new, d_model]`` after the cached tokens; returns ``(y [B, T_new, d_model],
        cache)``. ``segment_ids [B, T_new]`` (None = segment 0, as in ``Attention.decode``): the state
        and the conv caches reset where the segment changes, including at the first new token."""
        x = self._check_x(x)
        if not isinstance(cache, RecurrentCache):
            raise ValueError(f"{type(self).__name__}.decode: cache must be a RecurrentCache (from "
                             f"init_cache); got {type(cache).__name__}")
        n_convs = 0 if self.qkv_conv is None else 3
        if len(cache.conv) != n_convs:
            raise ValueError(f"{type(self).__name__}.decode: cache holds {len(cache.conv)} conv caches; "
                             f"this layer has {n_convs} short convolutions")
        b, t, _ = x.shape
        seg, s0 = decode_segments(cache, b, t, segment_ids)
        positions = cache.next_pos + jnp.arange(t, dtype=jnp.int32)
        q, k, v, per_token, conv = self._features(x, positions, seg, cache.conv)
        fam = get_family(self._family)
        if t == 1:  # the record's decode step takes the per-token arrays by the op's argument names
            o, state = fam.decode(q[:, 0], k[:, 0], v[:, 0], s0, **{n: a[:, 0] for n, a in per_token.items()},
                                  **self._static())
            o = o[:, None]
        else:
            o, state = fam.op(q, k, v, **per_token, **self._static(), initial_state=s0,
                              return_state=True, segment_ids=None if segment_ids is None else seg,
                              chunk_size=self.chunk_size, impl=self.impl)
        y = self._output(o, x)
        return y, cache.replace(state=state, conv=tuple(conv), seg_id=seg[:, -1], next_pos=cache.next_pos + t)


class GatedOutput(nnx.Module):
    """``W_o(RMSNorm_head(o) ⊙ swish(x W_g))`` (GLA / GDN / RetNet output), or ``W_o(RMSNorm_head(o))``
    without the gate."""

    def __init__(self, d_model: int, num_heads: int, head_dim: int, *, gate: bool = True, eps: float = 1e-5,
                 dtype, param_dtype, rngs: nnx.Rngs):
        kw = dict(use_bias=False, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.num_heads, self.head_dim = num_heads, head_dim
        self.norm = RMSNorm(head_dim, eps=eps, dtype=dtype, param_dtype=param_dtype)
        self.gate = nnx.Linear(d_model, num_heads * head_dim, **kw) if gate else None
        self.proj = nnx.Linear(num_heads * head_dim, d_model, **kw)

    def __call__(self, o, x):
        b, t = o.shape[:2]
        o = self.norm(o).reshape(b, t, self.num_heads * self.head_dim)
        if self.gate is not None:
            o = o * jax.nn.silu(self.gate(x))
        return self.proj(o)
