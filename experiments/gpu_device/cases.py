"""The conformance cases: per family, the calls each GPU implementation is checked on."""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np

from seqmix.ops import _registry
from seqmix.ops import masks as M
from seqmix.testing import packed_segments

from .common import BF16, FP16, FP32


@dataclasses.dataclass
class Case:
    """One call of a family's op: ``build(key) -> (args, kwargs)``, compared with ``ref``."""

    family: str
    desc: str
    tier: int
    build: Callable[[Any], tuple[tuple, dict]]
    ref: str = "reference"


def _normal(key, shape, dtype):
    return jax.random.normal(key, shape, jnp.float32).astype(dtype)




def _mask(name: str, t: int):
    if name == "causal":
        return M.Causal()
    if name == "full":
        return None
    if name == "window":
        return M.LocalWindow(max(8, t // 3))
    if name.startswith("window:"):
        return M.LocalWindow(int(name[7:]))
    raise ValueError(name)


def attention_case(tier: int, desc: str, *, b=2, tq=197, s=None, hq=8, hkv=8, d=128, dtype=BF16, mask="causal",
                   **extra) -> Case:
    s = tq if s is None else s

    def build(key):
        kq, kk, kv, ks = jax.random.split(key, 4)
        q = _normal(kq, (b, tq, hq, d), dtype)
        k, v = _normal(kk, (b, s, hkv, d), dtype), _normal(kv, (b, s, hkv, d), dtype)
        kwargs = dict(mask=_mask(mask, tq) if isinstance(mask, str) else mask)
        for name, value in extra.items():
            kwargs[name] = value(ks) if callable(value) else value
        return (q, k, v), kwargs

    heads = "mha" if hq == hkv else f"gqa {hq}:{hkv}"
    return Case("attention", f"{desc}: B={b} Tq={tq} S={s} {heads} d{d} {dtype.name}", tier, build)


def attention_cases(smoke: bool) -> list[Case]:
    if smoke:
        return [attention_case(1, "causal", b=1, tq=37, hq=2, hkv=2, d=16),
                attention_case(2, "window, packed documents", b=1, tq=37, hq=4, hkv=2, d=16, dtype=FP16,
                               mask="window", segment_ids=packed_segments(1, 37, [1, 15, 16]))]
    cases = []
    # (tier, dtype, head_dim, lengths): the benchmark's dtype and head_dim first, with a ragged length (197:
    # two blocks of 128, the second partial) and a longer one; then one ragged length (333) for the rest.
    plan = [(1, BF16, 128, (197, 1024)), (2, FP16, 128, (333,)), (3, BF16, 64, (333,)), (3, FP16, 64, (333,))]
    for tier, dtype, d, lengths in plan:
        for mask in ("causal", "full", "window"):
            for hq, hkv in ((8, 8), (8, 2)):
                for t in lengths:
                    cases.append(attention_case(tier, mask, tq=t, hq=hq, hkv=hkv, d=d, dtype=dtype, mask=mask))
        cases.append(attention_case(tier, "full, cross-attention", tq=128, s=300, d=d, dtype=dtype, mask="full"))
    feature = dict(tq=300, hq=8, hkv=2)
    cases += [
        attention_case(4, "packed documents, causal", segment_ids=packed_segments(2, 300, [1, 127, 128, 17]), **feature),
        attention_case(4, "soft cap 30, causal", soft_cap=30.0, **feature),
        attention_case(4, "sink logits, causal", sink_logits=lambda key: jax.random.normal(key, (8,), jnp.float32),
                       **feature),
        attention_case(4, "return_lse, causal", return_lse=True, **feature),
        attention_case(4, "chunked causal 64", mask=M.ChunkedCausal(64), **feature),
        attention_case(4, "streaming window 64 + 4 sinks", mask=M.streaming(64, 4), **feature),
        attention_case(4, "causal fp32", dtype=FP32, **feature),
        attention_case(4, "causal, head_dim 256", tq=300, hq=4, hkv=4, d=256),
    ]
    return cases


def recurrent_case(fam: _registry.Family, tier: int, desc: str, *, b=2, t=300, h=4, d=128, dtype=BF16,
                   regime="typical", initial_state=True, segments=None, chunk_size=None) -> Case:
    def build(key):
        inputs = fam.make_inputs(fam, key, batch=b, seq=t, heads=h, dk=d, dv=d, dtype=dtype, regime=regime,
                                 initial_state=initial_state)
        kwargs = dict(inputs.arrays, **inputs.options, return_state=True)
        if segments:
            kwargs["segment_ids"] = packed_segments(b, t, segments)
        if chunk_size:
            kwargs["chunk_size"] = chunk_size
        return tuple(inputs.args), kwargs

    extra = (", initial state" if initial_state else "") + (", packed documents" if segments else "")
    return Case(fam.name, f"{desc}{extra}: B={b} T={t} H={h} D={d} {jnp.dtype(dtype).name} ({regime} gates)",
                tier, build)


def recurrent_cases(fam: _registry.Family, smoke: bool) -> list[Case]:
    if smoke:
        return [recurrent_case(fam, 1, "chunked", b=1, t=37, h=2, d=16, chunk_size=16)]
    return [recurrent_case(fam, 1, "chunked", t=300),
            recurrent_case(fam, 1, "long", t=2048, initial_state=False),
            recurrent_case(fam, 2, "stress gates", t=197, d=64, regime="stress", segments=[1, 63, 64, 20]),
            recurrent_case(fam, 2, "chunked", t=300, dtype=FP16),
            recurrent_case(fam, 3, "chunked", t=130, d=64, dtype=FP32)]


def generic_cases(fam: _registry.Family, smoke: bool) -> list[Case]:
    """Families without cases of their own: the record's input factory at two lengths."""

    def case(t, dtype):
        def build(key):
            inputs = fam.make_inputs(fam, key, batch=1 if smoke else 2, seq=t, heads=4, dk=16 if smoke else 64,
                                     dv=16 if smoke else 64, dtype=dtype)
            return tuple(inputs.args), dict(inputs.arrays, **inputs.options)
        return Case(fam.name, f"record inputs: T={t} {dtype.name}", 1, build)

    return [case(37, BF16)] if smoke else [case(197, BF16), case(1024, BF16), case(197, FP16)]


def family_cases(fam: _registry.Family, smoke: bool) -> list[Case]:
    if fam.name == "attention":
        return attention_cases(smoke)
    if fam.kind == "recurrent":
        return recurrent_cases(fam, smoke)
    return generic_cases(fam, smoke)
