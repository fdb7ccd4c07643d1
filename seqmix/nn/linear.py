"""Recurrent (linear-attention-family) layers: projections, gates and norms around one ``seqmix.ops`` call.

Every layer follows the mixer protocol of ``seqmix.models.mixers``:

* ``layer(x [B, T, d_model], *, positions=None, segment_ids=None) -> [B, T, d_model]`` (parallel form,
  the op's chunked implementation; ``segment_ids [B, T]`` packs documents: the state and the short
  convolutions reset where the segment changes);
* ``cache = layer.init_cache(batch, max_len)`` (a :class:`~seqmix.nn.recurrent_cache.RecurrentCache`:
  fp32 state, short-conv caches, last segment id, next position; its size does not depend on
  ``max_len``);
* ``y, cache = layer.decode(x [B, T_new, d_model], cache, *, segment_ids=None)``: one mechanism for
  prefill and decode, the op with ``initial_state=cache.state, return_state=True`` (a single token
  takes the family's ``*_step``). Its rows equal the parallel form's.

Layers (FAMILIES.md §2.4–2.7): :class:`LinearAttention` (elu / identity / relu / Taylor / Hedgehog
feature maps), :class:`Retention` (RetNet), :class:`GatedLinearAttention` (GLA), :class:`SimpleGLA`
(Mamba-2 style scalar gate), :class:`DeltaNet`, :class:`GatedDeltaNet`, :class:`Based`.

Common arguments: ``dtype`` (compute dtype of projections, op inputs and output; gates, norms'
statistics and recurrent states are fp32), ``param_dtype``, ``impl`` (the op's implementation request),
``chunk_size`` (the op's chunk length), ``sequence_parallel`` (a :class:`seqmix.parallel.SequenceParallel`
or None: the parallel form runs the op by its ``recurrent_strategy``, LASP-2 by default, over the mesh on
global arrays; projections, convolutions and gates stay global; decoding stays single-device), ``rngs``.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any, Callable

import jax
import jax.numpy as jnp
from flax import nnx

from seqmix.nn.attention import Attention
from seqmix.nn.feature_maps import FEATURE_MAP_NAMES, HedgehogFeatureMap, attention_distillation_loss
from seqmix.nn.norm import RMSNorm
from seqmix.nn.recurrent_cache import RecurrentCache, decode_segments, init_recurrent_cache
from seqmix.nn.rope import apply_rope
from seqmix.nn.short_conv import ShortConv
from seqmix.ops import _registry
from seqmix.ops import masks as masks_lib
from seqmix.ops.attention import KVCache
from seqmix.ops.delta_rule import delta_rule, delta_rule_step
from seqmix.ops.gated_delta_rule import gated_delta_rule, gated_delta_rule_step
from seqmix.ops.gla import gla, gla_step
from seqmix.ops.linear_attention import feature_dim as _feature_dim
from seqmix.ops.linear_attention import linear_attention, linear_attention_step
from seqmix.ops.retention import retention, retention_step, retnet_decay
from seqmix.ops.simple_gla import simple_gla, simple_gla_step

Array = Any

__all__ = ["Based", "BasedCache", "DeltaNet", "GatedDeltaNet", "GatedLinearAttention", "LinearAttention",
           "Retention", "SimpleGLA", "hedgehog_distillation_loss"]


# ----------------------------------------------------------------------------- helpers


def _positive_int(owner: str, name: str, value) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{owner}: {name} must be an int >= 1; got {value!r}")
    return value


def _head_dim(owner: str, d_model: int, num_heads: int, head_dim) -> int:
    if head_dim is None:
        if d_model % num_heads:
            raise ValueError(f"{owner}: num_heads must divide d_model when head_dim is not given; got "
                             f"d_model={d_model}, num_heads={num_heads}")
        return d_model // num_heads
    return _positive_int(owner, "head_dim", head_dim)


def _l2norm(x, eps: float = 1e-6):
    """L2-normalize the last axis in fp32; returns x's dtype."""
    xf = x.astype(jnp.float32)
    return (xf * jax.lax.rsqrt(jnp.sum(xf * xf, axis=-1, keepdims=True) + eps)).astype(x.dtype)


def _inv_softplus(x):
    return x + jnp.log(-jnp.expm1(-x))


def _mamba_decay_params(rngs: nnx.Rngs, num_heads: int, param_dtype, dt_min=1e-3, dt_max=0.1):
    """Mamba-2 init: ``A ~ U(1, 16)`` (``A_log = log A``), ``dt`` log-uniform in [dt_min, dt_max],
    ``dt_bias = softplus⁻¹(dt)``."""
    a = jax.random.uniform(rngs.params(), (num_heads,), jnp.float32, 1.0, 16.0)
    u = jax.random.uniform(rngs.params(), (num_heads,), jnp.float32)
    dt = jnp.maximum(jnp.exp(u * (math.log(dt_max) - math.log(dt_min)) + math.log(dt_min)), 1e-4)
    return nnx.Param(jnp.log(a).astype(param_dtype)), nnx.Param(_inv_softplus(dt).astype(param_dtype))


def _mamba_gate(a, a_log, dt_bias):
    """``g = −exp(A_log)·softplus(a + dt_bias)`` (fp32, ≤ 0) for ``a [B, T, H]``."""
    a = a.astype(jnp.float32) + dt_bias.astype(jnp.float32)
    return -jnp.exp(a_log.astype(jnp.float32)) * jax.nn.softplus(a)


def _run_conv(conv: ShortConv, x, segment_ids, cache):
    """Parallel form when ``cache`` is None, else decode; returns ``(y, cache)``."""
    if cache is None:
        return conv(x, segment_ids=segment_ids), None
    return conv.decode(x, cache, segment_ids=segment_ids)


def _check_positions(owner: str, positions, b: int, t: int):
    if positions is None:
        return jnp.arange(t, dtype=jnp.int32)
    positions = jnp.asarray(positions)
    if positions.shape not in ((t,), (b, t)) or not jnp.issubdtype(positions.dtype, jnp.integer):
        raise ValueError(f"{owner}: positions must be an int array of shape [{t}] or [{b}, {t}]; got "
                         f"{positions.dtype}{list(positions.shape)}")
    return positions.astype(jnp.int32)


def _check_segments(owner: str, segment_ids, b: int, t: int):
    if segment_ids is None:
        return None
    seg = jnp.asarray(segment_ids)
    if seg.shape != (b, t) or not jnp.issubdtype(seg.dtype, jnp.integer):
        raise ValueError(f"{owner}: segment_ids must be an int array of shape [{b}, {t}]; got "
                         f"{seg.dtype}{list(seg.shape)}")
    return seg.astype(jnp.int32)


def _check_sp(value, owner: str):
    if value is None:
        return None
    from seqmix.parallel.config import check_sequence_parallel

    return check_sequence_parallel(value, owner)


_STEP_NAMES = {"g": "g_t", "beta": "beta_t"}


class _RecurrentLayer(nnx.Module):
    """Shared driver: subclasses give ``_features``, ``_output``, the op, its step and the state dims.

    ``_features(x, positions, segment_ids, conv_caches) -> (q, k, v, per_token, conv_caches)``: q, k
    ``[B, T, H, Dk]``, v ``[B, T, H, Dv]`` in the compute dtype, ``per_token`` a dict of the op's
    per-token arrays (``g``, ``beta``; time on axis 1), ``conv_caches`` a tuple (or None in the
    parallel form). ``_output(o [B, T, H, Dv], x) -> [B, T, d_model]``.
    """

    _op: Callable = None
    _step: Callable = None
    _family: str = ""  # the op's registry family (for sequence parallelism)
    _convs: tuple[str, ...] = ()  # attribute names of the ShortConv modules, in cache order

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
        self.sequence_parallel = _check_sp(sequence_parallel, name)
        self.d_model = _positive_int(name, "d_model", d_model)
        self.num_heads = _positive_int(name, "num_heads", num_heads)
        self.head_dim = _head_dim(name, d_model, num_heads, head_dim)
        self.key_dim = self.head_dim if key_dim is None else _positive_int(name, "key_dim", key_dim)
        self.chunk_size = _positive_int(name, "chunk_size", chunk_size)
        self.dtype, self.impl = dtype, impl

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
        positions = _check_positions(type(self).__name__, positions, b, t)
        segment_ids = _check_segments(type(self).__name__, segment_ids, b, t)
        q, k, v, per_token, _ = self._features(x, positions, segment_ids, None)
        if self.sequence_parallel is not None:
            from seqmix.parallel.lasp import SPECS

            spec = SPECS[self._family]
            if set(per_token) != set(spec.args):
                raise ValueError(f"{type(self).__name__}: per-token arrays {sorted(per_token)} do not match the "
                                 f"{self._family} op's {list(spec.args)}")
            o = self.sequence_parallel.recurrent(self._family, q, k, v, *(per_token[a] for a in spec.args),
                                                 **self._static(), segment_ids=segment_ids,
                                                 chunk_size=self.chunk_size, impl=self.impl)
        else:
            o = type(self)._op(q, k, v, **per_token, **self._static(), segment_ids=segment_ids,
                               chunk_size=self.chunk_size, impl=self.impl)
        return self._output(o, x)

    def init_cache(self, batch: int, max_len: int | None = None) -> RecurrentCache:
        """A zero state (fp32 ``[batch, H, Dk', Dv']``) and empty short-conv caches. ``max_len`` is
        accepted for the mixer protocol; a recurrent cache does not grow."""
        batch = _positive_int(type(self).__name__, "batch", batch)
        if max_len is not None:
            _positive_int(type(self).__name__, "max_len", max_len)
        dk, dv = self._state_dims()
        convs = tuple(getattr(self, n).init_cache(batch, self.dtype) for n in self._convs)
        return init_recurrent_cache(batch, self.num_heads, dk, dv, convs)

    def decode(self, x, cache: RecurrentCache, *, segment_ids=None):
        """Feed ``x [B, T_new, d_model]`` after the cached tokens; returns ``(y [B, T_new, d_model],
        cache)``. ``segment_ids [B, T_new]`` (None = segment 0, as in ``Attention.decode``): the state
        and the conv caches reset where the segment changes, including at the first new token."""
        x = self._check_x(x)
        if not isinstance(cache, RecurrentCache):
            raise ValueError(f"{type(self).__name__}.decode: cache must be a RecurrentCache (from "
                             f"init_cache); got {type(cache).__name__}")
        if len(cache.conv) != len(self._convs):
            raise ValueError(f"{type(self).__name__}.decode: cache holds {len(cache.conv)} conv caches; "
                             f"this layer has {len(self._convs)} short convolutions")
        b, t, _ = x.shape
        seg, s0 = decode_segments(cache, b, t, segment_ids)
        positions = cache.next_pos + jnp.arange(t, dtype=jnp.int32)
        q, k, v, per_token, conv = self._features(x, positions, seg, cache.conv)
        if t == 1:
            extra = {_STEP_NAMES[n]: a[:, 0] for n, a in per_token.items()}
            o, state = type(self)._step(q[:, 0], k[:, 0], v[:, 0], s0, **extra, **self._static())
            o = o[:, None]
        else:
            o, state = type(self)._op(q, k, v, **per_token, **self._static(), initial_state=s0,
                                      return_state=True, segment_ids=None if segment_ids is None else seg,
                                      chunk_size=self.chunk_size, impl=self.impl)
        y = self._output(o, x)
        return y, cache.replace(state=state, conv=tuple(conv), seg_id=seg[:, -1], next_pos=cache.next_pos + t)


class _GatedOutput(nnx.Module):
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


# ----------------------------------------------------------------------------- linear attention


class LinearAttention(_RecurrentLayer):
    """Linear attention (2006.16236) with a feature map φ (FAMILIES.md §2.4).

    ``o_t = Σ_{s≤t} φ(q_t)·φ(k_s) v_s`` (divided by ``Σ_{s≤t} φ(q_t)·φ(k_s) + ε`` with ``normalize``).

    Args:
      d_model: model width; num_heads: ``H``.
      feature_map: ``"elu"`` (elu + 1, default), ``"identity"``, ``"relu"``, ``"taylor"`` (Based's
        2nd-order Taylor map) or ``"hedgehog"`` (learnable per-head map, separate for q and k, see
        :class:`~seqmix.nn.feature_maps.HedgehogFeatureMap` and :func:`hedgehog_distillation_loss`).
      normalize: use the normalizer; default True for the positive maps (elu, taylor, hedgehog), False
        for identity and relu (signed or possibly all-zero features: FAMILIES.md §5.1 rule 6).
      output_norm: per-head RMSNorm of ``o`` before ``W_o``; default ``not normalize``.
      head_dim: per-head value width ``Dv`` (default ``d_model // num_heads``).
      key_dim: per-head q/k width before the map (default ``head_dim``; 16 for taylor, whose feature
        dim is ``1 + d + d(d+1)/2``).
      eps: normalizer ε.

    q, k ``[B, T, H, key_dim]``, v ``[B, T, H, Dv]``; the state is ``[B, H, D', Dv (+1 with normalize)]``.
    """

    _op = staticmethod(linear_attention)
    _family = "linear_attention"
    _step = staticmethod(linear_attention_step)

    def __init__(self, d_model: int, num_heads: int, *, feature_map: str = "elu", normalize: bool | None = None,
                 output_norm: bool | None = None, head_dim: int | None = None, key_dim: int | None = None,
                 eps: float = 1e-6, use_bias: bool = False, chunk_size: int = 64, dtype=jnp.float32,
                 param_dtype=jnp.float32, impl=None,
                 sequence_parallel=None, rngs: nnx.Rngs):
        if not isinstance(feature_map, str) or feature_map not in FEATURE_MAP_NAMES:
            raise ValueError(f"LinearAttention: feature_map must be one of {list(FEATURE_MAP_NAMES)}; got "
                             f"{feature_map!r}")
        if key_dim is None and feature_map == "taylor":
            key_dim = 16
        self._common_init(d_model, num_heads, head_dim, key_dim, dtype=dtype, impl=impl, chunk_size=chunk_size,
                          sequence_parallel=sequence_parallel)
        if normalize is None:
            normalize = feature_map in ("elu", "taylor", "hedgehog")
        if not isinstance(normalize, bool):
            raise ValueError(f"LinearAttention: normalize must be a bool or None; got {normalize!r}")
        output_norm = (not normalize) if output_norm is None else output_norm
        if not isinstance(output_norm, bool):
            raise ValueError(f"LinearAttention: output_norm must be a bool or None; got {output_norm!r}")
        if isinstance(eps, bool) or not isinstance(eps, (int, float)) or not eps > 0:
            raise ValueError(f"LinearAttention: eps must be a positive number; got {eps!r}")
        self.feature_map, self.normalize, self.eps = feature_map, normalize, float(eps)
        h, dk, dv = self.num_heads, self.key_dim, self.head_dim
        kw = dict(use_bias=use_bias, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.q_proj = nnx.Linear(d_model, h * dk, **kw)
        self.k_proj = nnx.Linear(d_model, h * dk, **kw)
        self.v_proj = nnx.Linear(d_model, h * dv, **kw)
        self.o_proj = nnx.Linear(h * dv, d_model, **kw)
        self.o_norm = RMSNorm(dv, dtype=dtype, param_dtype=param_dtype) if output_norm else None
        if feature_map == "hedgehog":
            self.q_map = HedgehogFeatureMap(h, dk, dtype=dtype, param_dtype=param_dtype)
            self.k_map = HedgehogFeatureMap(h, dk, dtype=dtype, param_dtype=param_dtype)
        else:
            self.q_map = self.k_map = None

    def _qk(self, x):
        """Raw (pre-feature-map) q, k ``[B, T, H, key_dim]``."""
        return self._heads(self.q_proj(x), self.key_dim), self._heads(self.k_proj(x), self.key_dim)

    def _features(self, x, positions, segment_ids, conv_caches):
        q, k = self._qk(x)
        if self.q_map is not None:
            q, k = self.q_map(q), self.k_map(k)
        return q, k, self._heads(self.v_proj(x), self.head_dim), {}, conv_caches

    def _static(self):
        if self.q_map is not None:  # features already applied; keep the scale of the raw key_dim
            return dict(feature_map="identity", normalize=self.normalize, eps=self.eps, scale=self.key_dim ** -0.5)
        return dict(feature_map=self.feature_map, normalize=self.normalize, eps=self.eps)

    def _state_dims(self):
        dk = 2 * self.key_dim if self.q_map is not None else _feature_dim(self.feature_map, self.key_dim)
        return dk, self.head_dim + (1 if self.normalize else 0)

    def _output(self, o, x):
        if self.o_norm is not None:
            o = self.o_norm(o)
        b, t = o.shape[:2]
        return self.o_proj(o.reshape(b, t, self.num_heads * self.head_dim))


def hedgehog_distillation_loss(layer: LinearAttention, x, *, segment_ids=None):
    """Hedgehog's attention-distillation loss for ``layer`` (a ``LinearAttention(feature_map="hedgehog")``)
    on ``x [B, T, d_model]``: cross-entropy between the softmax weights of the layer's own q, k (teacher,
    gradient stopped) and the weights of its learned feature maps (student). A scalar (fp32); its
    gradient reaches the feature maps (and q/k projections through the student side). See
    :func:`seqmix.nn.feature_maps.attention_distillation_loss`."""
    if not isinstance(layer, LinearAttention) or layer.q_map is None:
        raise ValueError("hedgehog_distillation_loss: layer must be a LinearAttention with feature_map='hedgehog'")
    x = layer._check_x(x)
    q, k = layer._qk(x)
    return attention_distillation_loss(q, k, layer.q_map(q), layer.k_map(k), scale=layer.key_dim ** -0.5,
                                       segment_ids=segment_ids)


# ----------------------------------------------------------------------------- retention


class Retention(_RecurrentLayer):
    """RetNet's multi-scale retention (2307.08621; FAMILIES.md §2.5).

    q, k, v projections; RoPE on q and k (plain rotary in place of xPos); ``S_t = γ_h S_{t−1} + k_t v_tᵀ``
    with the fixed per-head decay ``log γ_h = log(1 − 2^{−5−h})``; per-head RMSNorm of ``o`` (RetNet's
    GroupNorm without mean subtraction) times ``swish(x W_g)``; ``W_o``.

    Args: d_model, num_heads, head_dim (default ``d_model // num_heads``; even, for RoPE), rope_theta,
    use_bias, chunk_size, dtype, param_dtype, impl, rngs.
    """

    _op = staticmethod(retention)
    _family = "retention"
    _step = staticmethod(retention_step)

    def __init__(self, d_model: int, num_heads: int, *, head_dim: int | None = None, rope_theta: float = 10000.0,
                 use_bias: bool = False, chunk_size: int = 64, dtype=jnp.float32, param_dtype=jnp.float32,
                 impl=None, sequence_parallel=None,
                 rngs: nnx.Rngs):
        self._common_init(d_model, num_heads, head_dim, None, dtype=dtype, impl=impl, chunk_size=chunk_size,
                          sequence_parallel=sequence_parallel)
        if self.head_dim % 2:
            raise ValueError(f"Retention: RoPE needs an even head_dim; got head_dim={self.head_dim}")
        if isinstance(rope_theta, bool) or not isinstance(rope_theta, (int, float)) or not rope_theta > 0:
            raise ValueError(f"Retention: rope_theta must be > 0; got {rope_theta!r}")
        self.rope_theta = float(rope_theta)
        h, d = self.num_heads, self.head_dim
        kw = dict(use_bias=use_bias, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.q_proj = nnx.Linear(d_model, h * d, **kw)
        self.k_proj = nnx.Linear(d_model, h * d, **kw)
        self.v_proj = nnx.Linear(d_model, h * d, **kw)
        self.out = _GatedOutput(d_model, h, d, dtype=dtype, param_dtype=param_dtype, rngs=rngs)

    def _features(self, x, positions, segment_ids, conv_caches):
        q = apply_rope(self._heads(self.q_proj(x), self.head_dim), positions, theta=self.rope_theta)
        k = apply_rope(self._heads(self.k_proj(x), self.head_dim), positions, theta=self.rope_theta)
        return q, k, self._heads(self.v_proj(x), self.head_dim), {}, conv_caches

    def _static(self):
        return dict(decay=retnet_decay(self.num_heads))

    def _output(self, o, x):
        return self.out(o, x)


# ----------------------------------------------------------------------------- GLA and simple GLA


class GatedLinearAttention(_RecurrentLayer):
    """Gated Linear Attention (2312.06635; FAMILIES.md §2.6): a per-channel data-dependent decay.

    ``log α_t = logsigmoid(x_t W_1 W_2 + b) / τ`` per head and key channel (``W_1: d × r``,
    ``W_2: r × H·Dk``, r = ``gate_low_rank``, τ = ``gate_logit_normalizer``);
    ``S_t = Diag(α_t) S_{t−1} + k_t v_tᵀ``; output ``W_o(RMSNorm_head(o) ⊙ swish(x W_r))``.

    Args: d_model, num_heads, gate_low_rank (16), gate_logit_normalizer (16), head_dim (``Dv``, default
    ``d_model // num_heads``), key_dim (``Dk``, default head_dim), use_bias, chunk_size, dtype,
    param_dtype, impl, rngs.
    """

    _op = staticmethod(gla)
    _family = "gla"
    _step = staticmethod(gla_step)

    def __init__(self, d_model: int, num_heads: int, *, gate_low_rank: int = 16,
                 gate_logit_normalizer: float = 16.0, head_dim: int | None = None, key_dim: int | None = None,
                 use_bias: bool = False, chunk_size: int = 64, dtype=jnp.float32, param_dtype=jnp.float32,
                 impl=None, sequence_parallel=None,
                 rngs: nnx.Rngs):
        self._common_init(d_model, num_heads, head_dim, key_dim, dtype=dtype, impl=impl, chunk_size=chunk_size,
                          sequence_parallel=sequence_parallel)
        gate_low_rank = _positive_int("GatedLinearAttention", "gate_low_rank", gate_low_rank)
        if (isinstance(gate_logit_normalizer, bool) or not isinstance(gate_logit_normalizer, (int, float))
                or not gate_logit_normalizer > 0):
            raise ValueError(f"GatedLinearAttention: gate_logit_normalizer must be a positive number; got "
                             f"{gate_logit_normalizer!r}")
        self.gate_logit_normalizer = float(gate_logit_normalizer)
        h, dk, dv = self.num_heads, self.key_dim, self.head_dim
        kw = dict(use_bias=use_bias, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.q_proj = nnx.Linear(d_model, h * dk, **kw)
        self.k_proj = nnx.Linear(d_model, h * dk, **kw)
        self.v_proj = nnx.Linear(d_model, h * dv, **kw)
        self.gk_down = nnx.Linear(d_model, gate_low_rank, use_bias=False, dtype=dtype, param_dtype=param_dtype,
                                  rngs=rngs)
        self.gk_up = nnx.Linear(gate_low_rank, h * dk, use_bias=True, dtype=dtype, param_dtype=param_dtype,
                                rngs=rngs)
        self.out = _GatedOutput(d_model, h, dv, dtype=dtype, param_dtype=param_dtype, rngs=rngs)

    def _features(self, x, positions, segment_ids, conv_caches):
        q = self._heads(self.q_proj(x), self.key_dim)
        k = self._heads(self.k_proj(x), self.key_dim)
        v = self._heads(self.v_proj(x), self.head_dim)
        logits = self._heads(self.gk_up(self.gk_down(x)), self.key_dim).astype(jnp.float32)
        g = jax.nn.log_sigmoid(logits) / self.gate_logit_normalizer
        return q, k, v, {"g": g}, conv_caches

    def _output(self, o, x):
        return self.out(o, x)


class SimpleGLA(_RecurrentLayer):
    """Simple GLA with a Mamba-2 style scalar gate per head and token (FAMILIES.md §2.6).

    ``g_t = −exp(A_log)·softplus(x_t W_a + dt_bias)`` (``[B, T, H]``, Mamba-2 init of ``A_log`` and
    ``dt_bias``); ``S_t = exp(g_t) S_{t−1} + k_t v_tᵀ``; output ``W_o(RMSNorm_head(o) ⊙ swish(x W_g))``.

    Args: d_model, num_heads, head_dim (``Dv``), key_dim (``Dk``, default head_dim), use_bias,
    chunk_size, dtype, param_dtype, impl, rngs.
    """

    _op = staticmethod(simple_gla)
    _family = "simple_gla"
    _step = staticmethod(simple_gla_step)

    def __init__(self, d_model: int, num_heads: int, *, head_dim: int | None = None, key_dim: int | None = None,
                 use_bias: bool = False, chunk_size: int = 64, dtype=jnp.float32, param_dtype=jnp.float32,
                 impl=None, sequence_parallel=None,
                 rngs: nnx.Rngs):
        self._common_init(d_model, num_heads, head_dim, key_dim, dtype=dtype, impl=impl, chunk_size=chunk_size,
                          sequence_parallel=sequence_parallel)
        h, dk, dv = self.num_heads, self.key_dim, self.head_dim
        kw = dict(use_bias=use_bias, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.q_proj = nnx.Linear(d_model, h * dk, **kw)
        self.k_proj = nnx.Linear(d_model, h * dk, **kw)
        self.v_proj = nnx.Linear(d_model, h * dv, **kw)
        self.a_proj = nnx.Linear(d_model, h, use_bias=False, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.A_log, self.dt_bias = _mamba_decay_params(rngs, h, param_dtype)
        self.out = _GatedOutput(d_model, h, dv, dtype=dtype, param_dtype=param_dtype, rngs=rngs)

    def _features(self, x, positions, segment_ids, conv_caches):
        q = self._heads(self.q_proj(x), self.key_dim)
        k = self._heads(self.k_proj(x), self.key_dim)
        v = self._heads(self.v_proj(x), self.head_dim)
        g = _mamba_gate(self.a_proj(x), self.A_log[...], self.dt_bias[...])
        return q, k, v, {"g": g}, conv_caches

    def _output(self, o, x):
        return self.out(o, x)


# ----------------------------------------------------------------------------- DeltaNet and Gated DeltaNet


class DeltaNet(_RecurrentLayer):
    """DeltaNet layer (2406.06484; FAMILIES.md §2.7).

    q, k, v projections → short causal depthwise conv (width ``conv_size``) + SiLU → q, k L2-normalized per
    head; ``β = σ(x W_b)`` per head (``2σ`` with ``allow_neg_eigval``);
    ``S_t = (I − β_t k_t k_tᵀ) S_{t−1} + β_t k_t v_tᵀ``; output ``W_o(RMSNorm_head(o) ⊙ swish(x W_g))``.
    The convolutions reset at segment starts (no taps across packed documents).

    Args: d_model, num_heads, conv_size (4), allow_neg_eigval (False), head_dim (``Dv``), key_dim
    (``Dk``, default head_dim), use_bias, chunk_size, dtype, param_dtype, impl, rngs.
    """

    _op = staticmethod(delta_rule)
    _family = "delta_rule"
    _step = staticmethod(delta_rule_step)
    _convs = ("q_conv", "k_conv", "v_conv")
    _gated = False

    def __init__(self, d_model: int, num_heads: int, *, conv_size: int = 4, allow_neg_eigval: bool = False,
                 head_dim: int | None = None, key_dim: int | None = None, use_bias: bool = False,
                 chunk_size: int = 64, dtype=jnp.float32, param_dtype=jnp.float32, impl=None,
                 sequence_parallel=None, rngs: nnx.Rngs):
        name = type(self).__name__
        self._common_init(d_model, num_heads, head_dim, key_dim, dtype=dtype, impl=impl, chunk_size=chunk_size,
                          sequence_parallel=sequence_parallel)
        conv_size = _positive_int(name, "conv_size", conv_size)
        if not isinstance(allow_neg_eigval, bool):
            raise ValueError(f"{name}: allow_neg_eigval must be a bool; got {allow_neg_eigval!r}")
        self.allow_neg_eigval = allow_neg_eigval
        h, dk, dv = self.num_heads, self.key_dim, self.head_dim
        kw = dict(use_bias=use_bias, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.q_proj = nnx.Linear(d_model, h * dk, **kw)
        self.k_proj = nnx.Linear(d_model, h * dk, **kw)
        self.v_proj = nnx.Linear(d_model, h * dv, **kw)
        conv_kw = dict(activation="silu", dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.q_conv = ShortConv(h * dk, conv_size, **conv_kw)
        self.k_conv = ShortConv(h * dk, conv_size, **conv_kw)
        self.v_conv = ShortConv(h * dv, conv_size, **conv_kw)
        self.b_proj = nnx.Linear(d_model, h, use_bias=False, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        if self._gated:
            self.a_proj = nnx.Linear(d_model, h, use_bias=False, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
            self.A_log, self.dt_bias = _mamba_decay_params(rngs, h, param_dtype)
        self.out = _GatedOutput(d_model, h, dv, dtype=dtype, param_dtype=param_dtype, rngs=rngs)

    def _features(self, x, positions, segment_ids, conv_caches):
        caches = (None,) * 3 if conv_caches is None else conv_caches
        q, cq = _run_conv(self.q_conv, self.q_proj(x), segment_ids, caches[0])
        k, ck = _run_conv(self.k_conv, self.k_proj(x), segment_ids, caches[1])
        v, cv = _run_conv(self.v_conv, self.v_proj(x), segment_ids, caches[2])
        q = _l2norm(self._heads(q, self.key_dim))
        k = _l2norm(self._heads(k, self.key_dim))
        v = self._heads(v, self.head_dim)
        beta = jax.nn.sigmoid(self.b_proj(x).astype(jnp.float32))
        if self.allow_neg_eigval:
            beta = 2.0 * beta
        per_token = {"beta": beta}
        if self._gated:
            per_token["g"] = _mamba_gate(self.a_proj(x), self.A_log[...], self.dt_bias[...])
        return q, k, v, per_token, (None if conv_caches is None else (cq, ck, cv))

    def _output(self, o, x):
        return self.out(o, x)


class GatedDeltaNet(DeltaNet):
    """Gated DeltaNet layer (2412.06464; FAMILIES.md §2.7): DeltaNet plus a Mamba-2 style decay
    ``g_t = −exp(A_log)·softplus(x_t W_a + dt_bias)`` per head:
    ``S_t = exp(g_t)(I − β_t k_t k_tᵀ) S_{t−1} + β_t k_t v_tᵀ``. Arguments as :class:`DeltaNet`."""

    _op = staticmethod(gated_delta_rule)
    _family = "gated_delta_rule"
    _step = staticmethod(gated_delta_rule_step)
    _gated = True


# ----------------------------------------------------------------------------- Based


@functools.partial(jax.tree_util.register_dataclass, data_fields=["linear", "window"], meta_fields=[])
@dataclasses.dataclass(frozen=True)
class BasedCache:
    """Based's decode cache: the Taylor branch's :class:`RecurrentCache` and the window's ``KVCache``."""

    linear: RecurrentCache
    window: KVCache


class _TaylorBranch(_RecurrentLayer):
    """Based's global branch: q, k ``[B, T, H, feature_dim]``, v ``[B, T, H, Dv]``, each through a short
    causal conv (no activation); normalized Taylor linear attention; ``W_o``."""

    _op = staticmethod(linear_attention)
    _family = "linear_attention"
    _step = staticmethod(linear_attention_step)
    _convs = ("q_conv", "k_conv", "v_conv")

    def __init__(self, d_model, num_heads, *, feature_dim, head_dim, conv_size, eps, chunk_size, dtype,
                 param_dtype, impl, sequence_parallel=None, rngs):
        self._common_init(d_model, num_heads, head_dim, feature_dim, dtype=dtype, impl=impl, chunk_size=chunk_size,
                          sequence_parallel=sequence_parallel)
        self.eps = eps
        h, dk, dv = self.num_heads, self.key_dim, self.head_dim
        kw = dict(use_bias=False, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.q_proj = nnx.Linear(d_model, h * dk, **kw)
        self.k_proj = nnx.Linear(d_model, h * dk, **kw)
        self.v_proj = nnx.Linear(d_model, h * dv, **kw)
        conv_kw = dict(activation=None, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.q_conv = ShortConv(h * dk, conv_size, **conv_kw)
        self.k_conv = ShortConv(h * dk, conv_size, **conv_kw)
        self.v_conv = ShortConv(h * dv, conv_size, **conv_kw)
        self.o_proj = nnx.Linear(h * dv, d_model, **kw)

    def _features(self, x, positions, segment_ids, conv_caches):
        caches = (None,) * 3 if conv_caches is None else conv_caches
        q, cq = _run_conv(self.q_conv, self.q_proj(x), segment_ids, caches[0])
        k, ck = _run_conv(self.k_conv, self.k_proj(x), segment_ids, caches[1])
        v, cv = _run_conv(self.v_conv, self.v_proj(x), segment_ids, caches[2])
        q, k, v = self._heads(q, self.key_dim), self._heads(k, self.key_dim), self._heads(v, self.head_dim)
        return q, k, v, {}, (None if conv_caches is None else (cq, ck, cv))

    def _static(self):
        return dict(feature_map="taylor", normalize=True, eps=self.eps)

    def _state_dims(self):
        return _feature_dim("taylor", self.key_dim), self.head_dim + 1

    def _output(self, o, x):
        b, t = o.shape[:2]
        return self.o_proj(o.reshape(b, t, self.num_heads * self.head_dim))


class Based(nnx.Module):
    """Based (2402.18668; FAMILIES.md §2.4): global Taylor linear attention plus local softmax attention.

    ``y = W_o(TaylorLinearAttention(conv(x W_q), conv(x W_k), conv(x W_v))) + SlidingWindowAttention(x)``:

    * global branch: q, k projected to ``feature_dim`` (16) per head, v to ``head_dim``, each through a
      short causal depthwise conv (width ``conv_size``, no activation; reset at segment starts); the
      2nd-order Taylor map ``φ(q)·φ(k) = 1 + s + s²/2`` (feature dim ``1 + d + d(d+1)/2`` = 153) with
      the normalizer (``eps`` 1e-6; the denominator is positive);
    * local branch: :class:`~seqmix.nn.Attention` with ``mask=LocalWindow(window)`` and RoPE (its own
      q/k/v/o projections);
    * the two branch outputs are summed.

    Args: d_model, num_heads, feature_dim (16), window (64), conv_size (4), head_dim (``Dv``, default
    ``d_model // num_heads``; even, for RoPE), eps, rope_theta, chunk_size, dtype, param_dtype, impl (the
    linear op's), sequence_parallel (both branches: LASP for the Taylor branch, the softmax strategy for the
    window), rngs.

    Decoding: :class:`BasedCache` (a recurrent state of ``[B, H, 153, Dv + 1]`` and a ring of ``window``
    keys).
    """

    def __init__(self, d_model: int, num_heads: int, *, feature_dim: int = 16, window: int = 64,
                 conv_size: int = 4, head_dim: int | None = None, eps: float = 1e-6, rope_theta: float = 10000.0,
                 chunk_size: int = 64, dtype=jnp.float32, param_dtype=jnp.float32, impl=None,
                 sequence_parallel=None, rngs: nnx.Rngs):
        d_model = _positive_int("Based", "d_model", d_model)
        num_heads = _positive_int("Based", "num_heads", num_heads)
        head_dim = _head_dim("Based", d_model, num_heads, head_dim)
        feature_dim = _positive_int("Based", "feature_dim", feature_dim)
        window = _positive_int("Based", "window", window)
        conv_size = _positive_int("Based", "conv_size", conv_size)
        if isinstance(eps, bool) or not isinstance(eps, (int, float)) or not eps > 0:
            raise ValueError(f"Based: eps must be a positive number; got {eps!r}")
        if head_dim % 2:
            raise ValueError(f"Based: the window attention's RoPE needs an even head_dim; got head_dim={head_dim}")
        self.d_model, self.num_heads, self.head_dim = d_model, num_heads, head_dim
        self.feature_dim, self.window = feature_dim, window
        self.linear = _TaylorBranch(d_model, num_heads, feature_dim=feature_dim, head_dim=head_dim,
                                    conv_size=conv_size, eps=float(eps), chunk_size=chunk_size, dtype=dtype,
                                    param_dtype=param_dtype, impl=impl, sequence_parallel=sequence_parallel,
                                    rngs=rngs)
        self.window_attn = Attention(d_model, num_heads, head_dim=head_dim, mask=masks_lib.LocalWindow(window),
                                     rope=True, rope_theta=rope_theta, dtype=dtype, param_dtype=param_dtype,
                                     sequence_parallel=sequence_parallel, rngs=rngs)

    def __call__(self, x, *, positions=None, segment_ids=None):
        """x ``[B, T, d_model]``; positions int ``[T]``; segment_ids int ``[B, T]`` or None -> ``[B, T, d_model]``."""
        x = self.linear._check_x(x)
        return (self.linear(x, positions=positions, segment_ids=segment_ids)
                + self.window_attn(x, positions=positions, segment_ids=segment_ids))

    def init_cache(self, batch: int, max_len: int) -> BasedCache:
        """The Taylor branch's recurrent cache and the window attention's ring KV cache."""
        return BasedCache(linear=self.linear.init_cache(batch, max_len),
                          window=self.window_attn.init_cache(batch, max_len))

    def decode(self, x, cache: BasedCache, *, segment_ids=None):
        """Feed ``x [B, T_new, d_model]``; returns ``(y [B, T_new, d_model], cache)``."""
        if not isinstance(cache, BasedCache):
            raise ValueError(f"Based.decode: cache must be a BasedCache (from init_cache); got {type(cache).__name__}")
        y1, lin = self.linear.decode(x, cache.linear, segment_ids=segment_ids)
        y2, win = self.window_attn.decode(x, cache.window, segment_ids=segment_ids)
        return y1 + y2, BasedCache(linear=lin, window=win)


# ----------------------------------------------------------------------------- capability matrix

for _family, _module in (("linear_attention", "LinearAttention"), ("linear_attention", "Based"),
                         ("retention", "Retention"), ("gla", "GatedLinearAttention"), ("simple_gla", "SimpleGLA"),
                         ("delta_rule", "DeltaNet"), ("gated_delta_rule", "GatedDeltaNet")):
    _registry.register_module(_family, _module)
del _family, _module
