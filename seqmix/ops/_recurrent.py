"""What every recurrent family shares: the validated call, segment resets and the token-loop reference.

Conventions (FAMILIES.md §0): q, k ``[B, T, H, Dk]``, v ``[B, T, H, Dv]``; states fp32 ``[B, H, Dk, Dv]``;
``o_t = S_tᵀ (scale·q_t)``; gates in natural-log space (``g <= 0``); ``segment_ids [B, T]`` reset the state
to 0 at every ``t >= 1`` whose segment differs from ``t - 1``; ``initial_state`` feeds the tokens before
the first reset of each row; ``final_state`` is the state after the row's last token.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np

from seqmix.ops import _checks

Array = Any
HIGHEST = jax.lax.Precision.HIGHEST


@dataclasses.dataclass(frozen=True)
class RecurrentCall:
    """A validated call of a recurrent family.

    q, k: ``[B, T, H, Dk]``; v: ``[B, T, H, Dv]`` (input dtype). g: fp32 log decay, ``[B, T, H]``
    (scalar per head) or ``[B, T, H, Dk]`` (per channel) or None (no decay). beta: fp32 ``[B, T, H]`` or
    None. initial_state: fp32 ``[B, H, Dk, Dv]`` or None. resets: bool ``[B, T]``, True where the state
    restarts (t >= 1 and the segment changes) or None. options: hashable family options.
    """

    q: Array
    k: Array
    v: Array
    scale: float
    initial_state: Array | None
    return_state: bool
    segment_ids: Array | None
    resets: Array | None
    chunk_size: int
    g: Array | None = None
    beta: Array | None = None
    options: tuple = ()
    gate_grad: bool = True  # False: g is a fixed hyperparameter (retention's decay), no gradient needed
    post: Callable | None = None  # post(call, o fp32) -> o, applied by every implementation (a normalizer)

    def option(self, name: str, default=None):
        return dict(self.options).get(name, default)

    def finish(self, o, final_state):
        """The op's return value: ``o`` (input dtype) or ``(o, final_state)``; applies ``post`` first."""
        if self.post is not None:
            o = self.post(self, o.astype(jnp.float32))
        o = o.astype(self.q.dtype)
        return (o, final_state) if self.return_state else o

    def replace(self, **changes) -> "RecurrentCall":
        return dataclasses.replace(self, **changes)


def to_chunks(x, c: int, n: int):
    """``[B, T, H, ...]`` -> ``[Z = B·H, N, C, ...]``, zero-padded to ``N·C`` tokens (the chunked forms' layout).

    Batch and heads share one axis: XLA:CPU (jax 0.10.2) runs a reduction over fused elementwise work many
    times slower when an operand has a size-1 axis, and B = 1 is the common case (gla's secondary-chunking
    diagonal 677 → 75 ms at T = 8192; the delta rule's ``Σ_j`` reductions 55 → a few ms of instruction time;
    gone in jax 0.12's XLA, docs/RESULTS.md)."""
    b, t, h = x.shape[:3]
    if n * c != t:
        x = jnp.pad(x, [(0, 0), (0, n * c - t)] + [(0, 0)] * (x.ndim - 2))
    x = x.reshape((b, n, c, h) + x.shape[3:])
    return rows(jnp.moveaxis(x, 3, 1))


def from_chunks(x, t: int, heads: int):
    """``[Z = B·H, N, C, ...]`` -> ``[B, T, H, ...]`` (padding dropped)."""
    x = by_head(x, heads)
    b, h, n, c = x.shape[:4]
    x = jnp.moveaxis(x, 1, 3).reshape((b, n * c, h) + x.shape[4:])
    return x[:, :t]


def resets_to_chunks(resets, heads: int, c: int, n: int):
    """Per-batch resets bool ``[B, T]`` -> per-row int32 ``[Z = B·H, N, C]`` (a row's heads share them)."""
    return to_chunks(jnp.repeat(resets.astype(jnp.int32)[:, :, None], heads, axis=2), c, n)


def rows(x):
    """``[B, H, ...]`` -> ``[Z = B·H, ...]`` (states, their cotangents, chunked arrays)."""
    return x.reshape((-1,) + x.shape[2:])


def by_head(x, heads: int):
    """``[Z = B·H, ...]`` -> ``[B, H, ...]``."""
    return x.reshape((-1, heads) + x.shape[1:])


def chunked_flops(call: RecurrentCall, delta: bool = False) -> float:
    """Useful forward FLOPs of the chunkwise-parallel form at the call's chunk size C (FAMILIES.md §7).

    Per chunk and head, with P = C(C+1)/2 causal pairs: ``Q S`` and ``Kᵀ V`` (2·2·C·Dk·Dv) and the
    causal intra-chunk ``(Q Kᵀ) V`` (2·P·(Dk + Dv)). The delta rule adds its WY form: the strictly lower
    ``(βK) Kᵀ`` (2·(P − C)·Dk), the triangular inverse (C³/3), ``W = T βK`` and ``U = T βV``
    (2·P·(Dk + Dv)) and the correction ``U − W S`` (2·C·Dk·Dv). Gates and feature maps are elementwise
    and not counted. Scales as T/C chunks (padding is not useful work)."""
    b, t, h, dk = call.q.shape
    dv = call.v.shape[-1]
    c = min(call.chunk_size, t)
    pairs = c * (c + 1) / 2
    per_chunk = 4 * c * dk * dv + 2 * pairs * (dk + dv)
    if delta:
        per_chunk += 2 * (pairs - c) * dk + c ** 3 / 3 + 2 * pairs * (dk + dv) + 2 * c * dk * dv
    return b * h * (t / c) * per_chunk


def resets_from_segments(segment_ids: Array) -> Array:
    """bool ``[B, T]``: True at t >= 1 where ``segment_ids[:, t] != segment_ids[:, t - 1]``."""
    first = jnp.zeros_like(segment_ids[:, :1], dtype=bool)
    return jnp.concatenate([first, segment_ids[:, 1:] != segment_ids[:, :-1]], axis=1)


def prepare_recurrent(q, k, v, *, scale=None, initial_state=None, return_state=False, segment_ids=None,
                      chunk_size=64, g=None, g_kinds=(), beta=None, beta_range=None,
                      options=(), gate_grad=True, post=None) -> RecurrentCall:
    """Validate the arguments shared by recurrent ops.

    g_kinds: which gate shapes the family accepts, from ``"scalar"`` (``[B, T, H]``), ``"channel"``
    (``[B, T, H, Dk]``) and ``"head"`` (``[H]``, a constant per-head decay broadcast over B and T).
    beta_range: ``(lo, hi)`` closed interval beta must lie in, checked only on concrete (non-traced) input.
    """
    for name, x in (("q", q), ("k", k), ("v", v)):
        _checks.require_rank(name, x, 4, "[batch, seq, heads, head_dim]")
        _checks.require_float(name, x)
    _checks.require_same_dtype(q=q, k=k, v=v)
    b, t, h, dk = q.shape
    if k.shape != q.shape:
        raise ValueError(f"k must have q's shape {list(q.shape)} [batch, seq, heads, d_k]; got k {list(k.shape)}")
    if v.shape[:3] != q.shape[:3]:
        raise ValueError(f"v must match q in [batch, seq, heads] = {list(q.shape[:3])}; got v {list(v.shape)}")
    if t == 0:
        raise ValueError("sequence length must be >= 1")
    dv = v.shape[3]
    scale = 1.0 / math.sqrt(dk) if scale is None else _checks.require_positive("scale", scale, allow_none=False)
    if initial_state is not None:
        _checks.require_float("initial_state", initial_state)
        _checks.require_shape("initial_state", initial_state, (b, h, dk, dv), "[batch, heads, d_k, d_v]")
        initial_state = jnp.asarray(initial_state, jnp.float32)
    resets = None
    if segment_ids is not None:
        segment_ids = _checks.require_int_array("segment_ids", segment_ids, (b, t), "[batch, seq]")
        resets = resets_from_segments(segment_ids)
    if not isinstance(chunk_size, int) or chunk_size < 1:
        raise ValueError(f"chunk_size must be a positive int; got {chunk_size!r}")
    if g is not None:
        g = _check_gate(g, g_kinds, b, t, h, dk)
    elif g_kinds:
        raise ValueError(f"this op needs a log-space gate g of shape {_gate_layouts(g_kinds, b, t, h, dk)}")
    if beta is not None:
        _checks.require_float("beta", beta)
        _checks.require_shape("beta", beta, (b, t, h), "[batch, seq, heads]")
        if beta_range is not None and _checks.is_concrete(beta):
            lo, hi = beta_range
            values = np.asarray(beta, np.float32)
            bmin, bmax = float(values.min()), float(values.max())
            if not (bmin >= lo and bmax <= hi):  # NaN fails both comparisons
                raise ValueError(f"beta must lie in [{lo}, {hi}]; got values in [{bmin:.4g}, {bmax:.4g}]")
        beta = jnp.asarray(beta, jnp.float32)
    return RecurrentCall(q, k, v, scale, initial_state, bool(return_state), segment_ids, resets,
                         chunk_size, g, beta, tuple(options), gate_grad, post)


def _gate_layouts(kinds, b, t, h, dk) -> str:
    shapes = {"scalar": [b, t, h], "channel": [b, t, h, dk], "head": [h]}
    return " or ".join(str(shapes[k]) for k in kinds)


def _check_gate(g, kinds, b, t, h, dk):
    _checks.require_float("g", g)
    shape = tuple(jnp.shape(g))
    allowed = {"scalar": (b, t, h), "channel": (b, t, h, dk), "head": (h,)}
    if not any(shape == allowed[kd] for kd in kinds):
        raise ValueError(f"g (log-space gate) must have shape {_gate_layouts(kinds, b, t, h, dk)}; "
                         f"got {_checks.shape_str(g)}")
    if _checks.is_concrete(g) and not bool(np.all(np.asarray(g, np.float32) <= 0)):  # also catches NaN
        raise ValueError(f"g is a log decay and must be <= 0 (no NaN); got max {float(np.max(np.asarray(g))):.4g}")
    g = jnp.asarray(g, jnp.float32)
    if shape == (h,):
        g = jnp.broadcast_to(g[None, None, :], (b, t, h))
    return g


def scan_reference(call: RecurrentCall, step: Callable) -> tuple[Array, Array]:
    """Run ``step`` token by token in fp32: the oracle for every recurrent family.

    ``step(state [B, H, Dk, Dv], x) -> (state, o_t [B, H, Dv])`` where ``x`` is a dict of fp32 per-token
    slices: ``q`` (already scaled), ``k`` ``[B, H, Dk]``, ``v`` ``[B, H, Dv]``, and ``g``, ``beta`` when
    the call has them. The state is zeroed before a token whose ``resets`` flag is set.
    Returns ``o [B, T, H, Dv]`` fp32 and ``final_state [B, H, Dk, Dv]`` fp32.
    """
    b, t, h, dk = call.q.shape
    dv = call.v.shape[-1]
    f32 = lambda x: jnp.moveaxis(jnp.asarray(x, jnp.float32), 1, 0)  # noqa: E731  [T, B, ...]
    xs = {"q": f32(call.q) * call.scale, "k": f32(call.k), "v": f32(call.v)}
    if call.g is not None:
        xs["g"] = f32(call.g)
    if call.beta is not None:
        xs["beta"] = f32(call.beta)
    reset = f32(call.resets if call.resets is not None else jnp.zeros((b, t), bool)) > 0

    def body(state, inputs):
        x, r = inputs
        state = jnp.where(r[:, None, None, None], 0.0, state)
        return step(state, x)

    s0 = jnp.zeros((b, h, dk, dv), jnp.float32) if call.initial_state is None else call.initial_state
    with jax.default_matmul_precision("highest"):
        final, o = jax.lax.scan(body, s0, (xs, reset))
    return jnp.moveaxis(o, 0, 1), final


# ----------------------------------------------------------------------------- record helpers


def state_spec(call: RecurrentCall):
    """The state of a one-matrix recurrent family: fp32 ``[B, H, Dk', Dv']`` from the prepared call
    (after feature maps and value padding, so linear attention's ``Dk'`` / ``Dv + 1`` come out right)."""
    b, _, h, dk = call.q.shape
    return jax.ShapeDtypeStruct((b, h, dk, call.v.shape[-1]), jnp.float32)


@dataclasses.dataclass(frozen=True)
class Summary:
    """A shard's affine state map ``S ↦ T(S) + s_ext`` (FAMILIES.md §4.5), fp32.

    kind ``"decay"``: ``transition`` is ``log a`` ``[B, H]`` (scalar) or ``[B, H, Dk]`` (per channel);
    kind ``"matrix"``: ``transition`` is ``M`` ``[B, H, Dk, Dk]``. ``-inf`` / 0 after a reset.
    """

    kind: str
    transition: Array
    s_ext: Array


def apply_summary(kind: str, transition, state):
    """``T(state)`` for a summary's transition (fp32)."""
    if kind == "matrix":
        return jnp.einsum("bhde,bhev->bhdv", transition, state, precision=HIGHEST)
    a = jnp.exp(transition)
    return (a[..., None, None] if a.ndim == 2 else a[..., :, None]) * state


def gated_summary(call: RecurrentCall, run) -> Summary:
    """LASP summary of the gated-linear families: ``log a = Σ_t g_t`` (0 without a gate) and the final
    state from a zero state (``run(call)`` runs the op's implementation); ``-inf`` if the shard resets."""
    _, s_ext = run(call.replace(initial_state=None, return_state=True, post=None))
    b, h = s_ext.shape[:2]
    log_a = jnp.zeros((b, h), jnp.float32) if call.g is None else jnp.sum(call.g, axis=1)
    if call.resets is not None:
        reset = jnp.any(call.resets[:, 1:], axis=1).reshape((b,) + (1,) * (log_a.ndim - 1))
        log_a = jnp.where(reset, -jnp.inf, log_a)
    return Summary("decay", log_a, s_ext.astype(jnp.float32))


# ----------------------------------------------------------------------------- shared argument specs and inputs

def _gate_values(key, shape, regime: str):
    """Log gates: ``logsigmoid(x + 2)`` ("typical"); "stress": head 0 moderate, the others extreme
    (``logsigmoid(x)/0.01``, down to ~ -500) with a fifth exactly 0 (FAMILIES.md §5.4 rule 9)."""
    k1, k2 = jax.random.split(key)
    x = jax.random.normal(k1, shape, jnp.float32)
    mild = jax.nn.log_sigmoid(x + 2.0)
    if regime == "typical":
        return mild
    extreme = jnp.where(jax.random.uniform(k2, shape) < 0.2, 0.0, jax.nn.log_sigmoid(x) / 0.01)
    head = jnp.arange(shape[2]).reshape((1, 1, -1) + (1,) * (len(shape) - 3))
    return jnp.where(head == 0, mild, extreme)


def recurrent_inputs(fam, key, *, batch: int = 2, seq: int = 64, heads: int = 2, dk: int = 16, dv: int = 16,
                     dtype=jnp.float32, regime: str = "typical", l2_qk: bool = False, initial_state: bool = True):
    """Random inputs for a recurrent family's op, built from its argument specs.

    q, k ``[B, T, H, Dk]``, v ``[B, T, H, Dv]`` (``dtype``; q, k L2-normalized per head when ``l2_qk``,
    as the delta rules need); gates from :func:`_gate_values`; per-head decays ``log(1 − 2^{−3−h})``
    ("stress": ``[-0.05, -3, ...]``); β = σ(2x) clipped into the spec's bounds; options take their
    ``example``; an fp32 ``initial_state`` of the family's state shape (scaled by 0.3).
    Returns :class:`~seqmix.ops._registry.Inputs`.
    """
    from seqmix.ops._registry import Inputs

    ks = jax.random.split(key, 5 + len(fam.args))
    q = jax.random.normal(ks[0], (batch, seq, heads, dk), jnp.float32)
    k = jax.random.normal(ks[1], (batch, seq, heads, dk), jnp.float32)
    v = jax.random.normal(ks[2], (batch, seq, heads, dv), jnp.float32)
    if l2_qk:
        q, k = (x / jnp.linalg.norm(x, axis=-1, keepdims=True) for x in (q, k))
    dims = {"B": batch, "T": seq, "H": heads, "Dk": dk, "Dv": dv}
    positional, arrays, options = [], {}, {}
    for i, arg in enumerate(fam.args):
        kk = ks[5 + i]
        if arg.role == "option":
            options[arg.name] = arg.example
            continue
        shape = tuple(dims[s] for s in arg.shape)
        if arg.gate is not None and arg.role == "per_head":
            val = jnp.log1p(-(2.0 ** (-3.0 - jnp.arange(heads, dtype=jnp.float32))))
            if regime != "typical":
                val = jnp.array([-0.05] + [-3.0] * (heads - 1), jnp.float32)
        elif arg.gate is not None:
            val = _gate_values(kk, shape, regime)
        else:
            val = jax.nn.sigmoid(2.0 * jax.random.normal(kk, shape, jnp.float32))
        (positional.append(val) if arg.positional else arrays.__setitem__(arg.name, val))
    q, k, v = (x.astype(dtype) for x in (q, k, v))
    if initial_state:
        call = fam.prepare(q, k, v, *positional, **arrays, **options)
        spec = fam.state(call)
        arrays["initial_state"] = 0.3 * jax.random.normal(ks[3], spec.shape, jnp.float32)
        if dict(call.options).get("normalize"):  # the normalizer column must stay positive
            arrays["initial_state"] = jnp.abs(arrays["initial_state"])
    return Inputs((q, k, v, *positional), arrays, options)


def gate_arg(kind: str, *, positional: bool = True, name: str = "g") -> "Any":
    """The ArgSpec of a log-space gate: ``"scalar"`` ``[B, T, H]`` or ``"channel"`` ``[B, T, H, Dk]``."""
    from seqmix.ops._registry import ArgSpec

    shape = ("B", "T", "H") if kind == "scalar" else ("B", "T", "H", "Dk")
    return ArgSpec(name, "sequence", shape, positional=positional, gate=kind)


def beta_arg(bounds=(0.0, 2.0)):
    """The ArgSpec of the delta rules' write strength β ``[B, T, H]``."""
    from seqmix.ops._registry import ArgSpec

    return ArgSpec("beta", "sequence", ("B", "T", "H"), positional=True, bounds=bounds)
