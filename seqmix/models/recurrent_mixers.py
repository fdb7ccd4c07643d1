"""Mixer registrations for the recurrent layers of ``seqmix.nn.linear`` (imported for its side effect).

Names: ``linear`` (``linear:MAP`` with MAP one of elu (default), identity, relu, taylor, hedgehog),
``hedgehog``, ``retnet``, ``gla``, ``simple_gla``, ``deltanet``, ``gdn``, ``based`` (``based:W`` sets the
sliding window, default 64). Each uses ``config.d_model``, ``config.num_heads``, the config's dtypes
(and ``config.rope_theta`` where RoPE is used); each factory takes ``sequence_parallel=`` (see
``seqmix.models.mixers``).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from flax import nnx

from seqmix.models.mixers import int_arg, no_arg, register_mixer
from seqmix.nn import linear as layers
from seqmix.nn.feature_maps import FEATURE_MAP_NAMES

if TYPE_CHECKING:  # pragma: no cover
    from seqmix.models.lm import LMConfig


def _dtypes(config: "LMConfig", sequence_parallel=None) -> dict:
    return dict(dtype=config.compute_dtype, param_dtype=config.parameter_dtype,
                sequence_parallel=sequence_parallel)


def _feature_map_arg(name: str, arg: str | None) -> None:
    if arg is not None and arg not in FEATURE_MAP_NAMES:
        raise ValueError(f"mixer {name!r}: unknown feature map {arg!r}; expected {name} or {name}:MAP with MAP "
                         f"one of {list(FEATURE_MAP_NAMES)}")


def _optional_int_arg(name: str, arg: str | None) -> None:
    if arg is not None:
        int_arg(name, arg)


def _linear(config, arg, *, rngs: nnx.Rngs, sequence_parallel=None):
    return layers.LinearAttention(config.d_model, config.num_heads, feature_map=arg or "elu",
                                  **_dtypes(config, sequence_parallel), rngs=rngs)


def _hedgehog(config, arg, *, rngs: nnx.Rngs, sequence_parallel=None):
    return layers.LinearAttention(config.d_model, config.num_heads, feature_map="hedgehog",
                                  **_dtypes(config, sequence_parallel), rngs=rngs)


def _retnet(config, arg, *, rngs: nnx.Rngs, sequence_parallel=None):
    return layers.Retention(config.d_model, config.num_heads, rope_theta=config.rope_theta,
                            **_dtypes(config, sequence_parallel), rngs=rngs)


def _gla(config, arg, *, rngs: nnx.Rngs, sequence_parallel=None):
    return layers.GatedLinearAttention(config.d_model, config.num_heads, **_dtypes(config, sequence_parallel),
                                       rngs=rngs)


def _simple_gla(config, arg, *, rngs: nnx.Rngs, sequence_parallel=None):
    return layers.SimpleGLA(config.d_model, config.num_heads, **_dtypes(config, sequence_parallel), rngs=rngs)


def _deltanet(config, arg, *, rngs: nnx.Rngs, sequence_parallel=None):
    return layers.DeltaNet(config.d_model, config.num_heads, **_dtypes(config, sequence_parallel), rngs=rngs)


def _gdn(config, arg, *, rngs: nnx.Rngs, sequence_parallel=None):
    return layers.GatedDeltaNet(config.d_model, config.num_heads, **_dtypes(config, sequence_parallel), rngs=rngs)


def _based(config, arg, *, rngs: nnx.Rngs, sequence_parallel=None):
    return layers.Based(config.d_model, config.num_heads, window=int(arg) if arg else 64,
                        rope_theta=config.rope_theta, **_dtypes(config, sequence_parallel), rngs=rngs)


_ENTRIES = (
    ("linear", _linear, _feature_map_arg,
     "linear attention; linear:MAP picks the feature map (elu (default), identity, relu, taylor, hedgehog)"),
    ("hedgehog", _hedgehog, no_arg, "linear attention with Hedgehog's learnable feature map"),
    ("retnet", _retnet, no_arg, "RetNet retention (fixed per-head decay, RoPE, gated output)"),
    ("gla", _gla, no_arg, "Gated Linear Attention (low-rank per-channel gate)"),
    ("simple_gla", _simple_gla, no_arg, "simple GLA (Mamba-2 style scalar gate per head)"),
    ("deltanet", _deltanet, no_arg, "DeltaNet (delta rule, short convs, L2-normalized q/k)"),
    ("gdn", _gdn, no_arg, "Gated DeltaNet (gated delta rule, short convs, L2-normalized q/k)"),
    ("based", _based, _optional_int_arg,
     "Based: Taylor linear attention + sliding-window softmax (based:W, default W = 64) + short convs"),
)

for _name, _factory, _check, _doc in _ENTRIES:
    register_mixer(_name, _factory, check_arg=_check, doc=_doc)
del _name, _factory, _check, _doc
