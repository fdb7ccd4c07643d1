"""Helpers for the Mosaic GPU flash attention tests: predicates, padding, dense block classification and a
plain-jnp reference with materialized fp32 scores. Only jax / numpy and ``pallas_kernels``."""

from __future__ import annotations

import contextlib
import dataclasses
import inspect

import jax
import jax.numpy as jnp
import numpy as np

from pallas_kernels import gpu as gpu_pkg
from pallas_kernels.gpu import flash_attention as fa


def interpreter_problem() -> str | None:
    """None if the Mosaic GPU interpreter runs in this jax, else why not (a skip reason)."""
    if (why := gpu_pkg.available()) is not None:
        return why
    try:
        fa.interpret_params()
    except Exception as err:  # noqa: BLE001 - a jax without the Mosaic GPU interpreter
        return f"the Mosaic GPU interpreter (InterpretGPUParams) is unavailable: {type(err).__name__}: {err}"
    return None


# ----------------------------------------------------------------------------- predicates


@dataclasses.dataclass(frozen=True)
class Pred:
    """A hashable pair predicate on int32 tiles: ``kind`` in full / causal / strict (causal without the
    diagonal: query 0 sees nothing) / window (causal, last ``window`` keys), optionally same segment."""

    kind: str = "causal"
    window: int = 0
    segments: bool = False

    def __call__(self, q, kv):
        (q_pos, _, q_seg), (kv_pos, _, kv_seg) = q, kv
        ok = kv_pos >= 0
        if self.kind in ("causal", "window"):
            ok = ok & (q_pos >= kv_pos)
        if self.kind == "strict":
            ok = ok & (q_pos > kv_pos)
        if self.kind == "window":
            ok = ok & (q_pos - kv_pos < self.window)
        if self.segments:
            ok = ok & (q_seg == kv_seg)
        return ok


def coords(b: int, t: int, seg_lens=None):
    """int32 [B, 3, T]: pos, rel (= pos), seg (document id from ``seg_lens`` per batch row, else 0)."""
    pos = np.broadcast_to(np.arange(t, dtype=np.int32), (b, t))
    seg = np.zeros((b, t), np.int32)
    if seg_lens is not None:
        for bi, lens in enumerate(seg_lens):
            seg[bi] = np.repeat(np.arange(len(lens)), lens)[:t]
    return np.stack([pos, pos, seg], axis=1).astype(np.int32)


def pad_coords(c, tp: int, query: bool):
    """Pad [B, 3, T] to Tp: padded keys get pos -1 (never allowed), padded queries continue the positions
    in segment -1 (their rows are dropped)."""
    b, _, t = c.shape
    extra = tp - t
    if not extra:
        return c
    if query:
        pos = np.broadcast_to(np.arange(t, tp, dtype=np.int32), (b, extra))
        pad = np.stack([pos, pos, np.full((b, extra), -1, np.int32)], axis=1)
    else:
        pad = np.stack([np.full((b, extra), -1, np.int32), np.full((b, extra), -1, np.int32),
                        np.full((b, extra), -2, np.int32)], axis=1)
    return np.concatenate([c, pad], axis=2)


def allowed(pred, qc, kc):
    """Dense bool [B, T, S]."""
    ok = pred(tuple(qc[:, r, :, None] for r in range(3)), tuple(kc[:, r, None, :] for r in range(3)))
    return np.broadcast_to(np.asarray(ok), (qc.shape[0], qc.shape[2], kc.shape[2]))


def classify(pred, qc, kc, block_q: int, block_kv: int):
    """kinds [nq, nk] shared by every batch row: EMPTY if no pair is allowed, FULL if all are."""
    ok = allowed(pred, qc, kc)
    b, tp, sp = ok.shape
    blocks = ok.reshape(b, tp // block_q, block_q, sp // block_kv, block_kv)
    anyb = blocks.any(axis=(0, 2, 4))
    allb = blocks.all(axis=(0, 2, 4))
    return np.where(allb, fa.FULL, np.where(anyb, fa.PARTIAL, fa.EMPTY)).astype(np.int32)


def _pad(x, axis, size):
    widths = [(0, 0)] * x.ndim
    widths[axis] = (0, size - x.shape[axis])
    return jnp.pad(x, widths)


def padded_len(n: int, *blocks: int) -> int:
    m = max(blocks)  # powers of two times 64: the largest is a multiple of the others
    return -(-n // m) * m


def kernel_attention(cfg: fa.FlashConfig, q, k, v, sinks, qc, kc):
    """Pad [B, H, T, D] inputs to the tiles, classify, run the kernel's custom_vjp, crop. Returns (o, lse)."""
    tl = cfg.tiles
    t, s = q.shape[2], k.shape[2]
    tp, sp = padded_len(t, tl.block_q, tl.block_q_bwd), padded_len(s, tl.block_kv, tl.block_kv_bwd)
    qcp, kcp = pad_coords(qc, tp, True), pad_coords(kc, sp, False)
    fwd_meta = fa.make_meta(classify(cfg.pair_fn, qcp, kcp, tl.block_q, tl.block_kv))
    bwd_meta = fa.make_meta(classify(cfg.pair_fn, qcp, kcp, tl.block_q_bwd, tl.block_kv_bwd))
    if sinks is None:
        sinks = jnp.zeros((q.shape[1],), jnp.float32)
    o, lse = fa.flash_attention(cfg, _pad(q, 2, tp), _pad(k, 2, sp), _pad(v, 2, sp), sinks,
                                jnp.asarray(qcp), jnp.asarray(kcp), fwd_meta, bwd_meta)
    return o[:, :, :t], lse[:, :, :t]


# ----------------------------------------------------------------------------- reference


def reference(q, k, v, ok, *, scale, soft_cap=None, sinks=None):
    """Materialized fp32 softmax attention. q [B,Hq,T,D], k/v [B,Hkv,S,*], ok bool [B,T,S].
    Returns (o in q.dtype, lse fp32 [B,Hq,T]); rows with no allowed key (and no sink) give 0 / -inf."""
    hq, hkv = q.shape[1], k.shape[1]
    g = hq // hkv
    qf = q.astype(jnp.float32)
    kf = jnp.repeat(k.astype(jnp.float32), g, axis=1)
    vf = jnp.repeat(v.astype(jnp.float32), g, axis=1)
    s = jnp.einsum("bhtd,bhsd->bhts", qf, kf, precision=jax.lax.Precision.HIGHEST) * scale
    if soft_cap is not None:
        s = soft_cap * jnp.tanh(s / soft_cap)
    s = jnp.where(ok[:, None], s, -jnp.inf)
    m = s.max(-1)
    if sinks is not None:
        bias = jnp.broadcast_to(sinks.astype(jnp.float32)[None, :, None], m.shape)
        m = jnp.maximum(m, bias)
    m = jax.lax.stop_gradient(jnp.where(jnp.isfinite(m), m, 0.0))
    p = jnp.exp(s - m[..., None])
    l = p.sum(-1)
    if sinks is not None:
        l = l + jnp.exp(bias - m)
    live = l > 0
    l_safe = jnp.where(live, l, 1.0)
    o = jnp.einsum("bhts,bhsd->bhtd", p, vf, precision=jax.lax.Precision.HIGHEST) / l_safe[..., None]
    o = jnp.where(live[..., None], o, 0.0)
    lse = jnp.where(live, m + jnp.log(l_safe), -jnp.inf)
    return o.astype(q.dtype), lse


# ----------------------------------------------------------------------------- interpreter speed


@contextlib.contextmanager
def fast_interpreter():
    """Reuse the interpreter's compiled per-thread programs across grid points.

    jax 0.10's Mosaic GPU interpreter runs every (grid point, warpgroup) through
    ``thread_map._run_jaxpr``, which traces, lowers and compiles the thread's jaxpr anew each time
    (~0.7 s per CTA for these kernels). Caching the compiled program per (jaxpr, thread index) changes
    nothing it computes and makes the tests ~3x faster. A no-op where that internal does not exist.
    (Sharing one ``jax.jit`` across the concurrently running threads instead deadlocks: their ordered
    callbacks serialize the executions while the threads wait on each other's barriers.)
    """
    try:
        from jax._src.pallas.mosaic.interpret import thread_map as tm
        import jax.core as jax_core
        orig = tm._run_jaxpr
        code = orig.__code__
        if code.co_varnames[:2] != ("jaxpr", "consts") or not code.co_flags & inspect.CO_VARARGS:
            raise AttributeError("thread_map._run_jaxpr changed")
    except (ImportError, AttributeError):  # pragma: no cover - another jax: run unpatched
        yield
        return
    cache: dict = {}

    def _run(jaxpr, consts, *args):
        jax_core.eval_jaxpr(jaxpr, consts, *args)

    def run_jaxpr(jaxpr, consts, *args):
        key = (id(jaxpr), int(args[0]))  # args[0]: the thread index
        hit = cache.get(key)
        if hit is None or hit[1] is not jaxpr:
            hit = (jax.jit(_run, static_argnums=(0,)).trace(jaxpr, consts, *args).lower().compile(), jaxpr)
            cache[key] = hit
        hit[0](consts, *args)

    tm._run_jaxpr = run_jaxpr
    try:
        yield
    finally:
        tm._run_jaxpr = orig


@contextlib.contextmanager
def kernel_session(precision: str | None = "highest"):
    """A kernel test's interpreter scope: :func:`fast_interpreter`, the matmul precision of the references
    (None: jax's default) and, however the test ends, a reset of the interpreter's global state (a kernel
    that raised leaves it behind)."""
    with fast_interpreter(), jax.default_matmul_precision(precision):
        try:
            yield
        finally:
            if interpreter_problem() is None:
                fa.reset_interpreter()
