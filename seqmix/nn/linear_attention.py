"""``LinearAttention``: linear attention with a feature map (elu, identity, relu, Taylor, learnable Hedgehog).

Mixers: ``linear`` (``linear:MAP``), ``hedgehog``.
"""

from __future__ import annotations

import jax.numpy as jnp
from flax import nnx

from seqmix.nn._recurrent_layer import RecurrentLayer
from seqmix.nn.feature_maps import FEATURE_MAP_NAMES, HedgehogFeatureMap, attention_distillation_loss
from seqmix.nn.mixer import no_arg, register_mixer
from seqmix.nn.norm import RMSNorm
from seqmix.ops.linear_attention import feature_dim as _feature_dim


class LinearAttention(RecurrentLayer):
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
      short_conv: width of the causal conv + SiLU on the q, k, v projections (before the map); None = none.

    q, k ``[B, T, H, key_dim]``, v ``[B, T, H, Dv]``; the state is ``[B, H, D', Dv (+1 with normalize)]``.
    """

    _family = "linear_attention"

    def __init__(self, d_model: int, num_heads: int, *, feature_map: str = "elu", normalize: bool | None = None,
                 output_norm: bool | None = None, head_dim: int | None = None, key_dim: int | None = None,
                 eps: float = 1e-6, short_conv: int | None = None, use_bias: bool = False, chunk_size: int = 64, dtype=jnp.float32,
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
        self._init_qkv(d_model, short_conv=short_conv, use_bias=use_bias, dtype=dtype, param_dtype=param_dtype,
                       rngs=rngs)
        self.o_proj = nnx.Linear(h * dv, d_model, use_bias=use_bias, dtype=dtype, param_dtype=param_dtype,
                                 rngs=rngs)
        self.o_norm = RMSNorm(dv, dtype=dtype, param_dtype=param_dtype) if output_norm else None
        if feature_map == "hedgehog":
            self.q_map = HedgehogFeatureMap(h, dk, dtype=dtype, param_dtype=param_dtype)
            self.k_map = HedgehogFeatureMap(h, dk, dtype=dtype, param_dtype=param_dtype)
        else:
            self.q_map = self.k_map = None

    def _features(self, x, positions, segment_ids, conv_caches):
        q, k, v, conv_caches = self._qkv(x, segment_ids, conv_caches)
        if self.q_map is not None:
            q, k = self.q_map(q), self.k_map(k)
        return q, k, v, {}, conv_caches

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
    q, k, _, _ = layer._qkv(x, segment_ids, None)  # raw (pre-feature-map) q, k [B, T, H, key_dim]
    return attention_distillation_loss(q, k, layer.q_map(q), layer.k_map(k), scale=layer.key_dim ** -0.5,
                                       segment_ids=segment_ids)


def _feature_map_arg(name: str, arg: str | None) -> None:
    if arg is not None and arg not in FEATURE_MAP_NAMES:
        raise ValueError(f"mixer {name!r}: unknown feature map {arg!r}; expected {name} or {name}:MAP with MAP "
                         f"one of {list(FEATURE_MAP_NAMES)}")


def linear_mixer(dims, arg, *, rngs: nnx.Rngs, sequence_parallel=None):
    return LinearAttention(dims.d_model, dims.num_heads, feature_map=arg or "elu",
                           **dims.layer_kwargs(sequence_parallel), rngs=rngs)


def hedgehog_mixer(dims, arg, *, rngs: nnx.Rngs, sequence_parallel=None):
    return LinearAttention(dims.d_model, dims.num_heads, feature_map="hedgehog",
                           **dims.layer_kwargs(sequence_parallel), rngs=rngs)


register_mixer("linear", linear_mixer, check_arg=_feature_map_arg,
               doc="linear attention; linear:MAP picks the feature map (elu (default), identity, relu, taylor, hedgehog)")
register_mixer("hedgehog", hedgehog_mixer, check_arg=no_arg, doc="linear attention with Hedgehog's learnable feature map")
