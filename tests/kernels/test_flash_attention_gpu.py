"""Mosaic GPU flash attention (``pallas_kernels.gpu.flash_attention``) in the Mosaic GPU interpreter on CPU.

Forward (o, lse) and VJP (dq, dk, dv, d sink; cotangents on o and lse) against a plain-jnp softmax with
materialized fp32 scores (``tests/kernels/gpu_cases.py``), at small shapes with the interpreter tiles
(64-row q blocks, 64-key kv blocks, one compute warpgroup, 2-slot TMA rings): lengths that are not block
multiples, full / causal / sliding-window masks, packed documents, GQA 4:2, a fully masked row, sinks,
soft cap, fp32 and bf16. One case runs the race detector. Larger tiles (two compute warpgroups, three
stages, D = 128) are ``slow``. Lowering for H100 (no GPU needed) is checked by ``jax.export``.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels import gpu as gpu_pkg
from pallas_kernels.gpu import flash_attention as fa
from tests.kernels import gpu_cases as C

pytestmark = pytest.mark.interpret


_PROBLEM = C.interpreter_problem()
needs_interpreter = pytest.mark.skipif(_PROBLEM is not None, reason=str(_PROBLEM))

TOL = {jnp.float32: 2e-5, jnp.bfloat16: 2.5e-2}  # max |err| / max(1, max |ref|)


@pytest.fixture(autouse=True)
def _interpreter():
    with C.kernel_session(precision=None):
        yield


def _close(name, got, want, tol):
    got, want = np.asarray(got, np.float32), np.asarray(want, np.float32)
    assert got.shape == want.shape, (name, got.shape, want.shape)
    fin = np.isfinite(want)
    np.testing.assert_array_equal(np.isfinite(got), fin, err_msg=f"{name}: non-finite entries differ")
    np.testing.assert_array_equal(got[~fin], want[~fin], err_msg=f"{name}: infinities differ")
    err = np.abs(np.where(fin, got, 0.0) - np.where(fin, want, 0.0)).max(initial=0.0)
    scale = max(1.0, np.abs(np.where(fin, want, 0.0)).max(initial=0.0))
    assert err <= tol * scale, f"{name}: max |err| {err:.3g} > {tol:g} * {scale:.3g}"


def compare(*, b=1, hq=1, hkv=1, t=100, s=None, d=64, dtype=jnp.float32, pred=C.Pred("causal"),
            seg_lens=None, sinks=False, soft_cap=None, tiles=fa.INTERPRET_TILES, races=False, seed=0):
    """Kernel vs reference for o, lse, dq, dk, dv (and d sinks). Returns the kernel's (o, lse)."""
    s = t if s is None else s
    ks = jax.random.split(jax.random.PRNGKey(seed), 6)
    q = jax.random.normal(ks[0], (b, hq, t, d), jnp.float32).astype(dtype)
    k = jax.random.normal(ks[1], (b, hkv, s, d), jnp.float32).astype(dtype)
    v = jax.random.normal(ks[2], (b, hkv, s, d), jnp.float32).astype(dtype)
    do = jax.random.normal(ks[3], (b, hq, t, d), jnp.float32).astype(dtype)
    dlse = jax.random.normal(ks[4], (b, hq, t), jnp.float32)
    sink = jax.random.normal(ks[5], (hq,), jnp.float32) if sinks else None
    qc, kc = C.coords(b, t, seg_lens), C.coords(b, s, seg_lens)
    scale = d ** -0.5
    cfg = fa.FlashConfig(scale=scale, pair_fn=pred, soft_cap=soft_cap, has_sinks=sinks, tiles=tiles,
                         interpret=fa.interpret_params(detect_races=races))

    def run(f):
        @jax.jit
        def go(q, k, v, sink):
            out, vjp = jax.vjp(f, q, k, v, sink)
            return out, vjp((do, dlse))
        return go(q, k, v, sink)

    (o, lse), grads = run(lambda q, k, v, sink: C.kernel_attention(cfg, q, k, v, sink, qc, kc))
    ok = jnp.asarray(C.allowed(pred, qc, kc))
    (o_r, lse_r), grads_r = run(lambda q, k, v, sink: C.reference(q, k, v, ok, scale=scale,
                                                                   soft_cap=soft_cap, sinks=sink))
    tol = TOL[dtype]
    assert o.dtype == dtype and lse.dtype == jnp.float32
    _close("o", o, o_r, tol)
    _close("lse", lse, lse_r, tol)
    for name, g, g_r in zip(("dq", "dk", "dv"), grads[:3], grads_r[:3]):
        assert g.dtype == dtype, (name, g.dtype)
        _close(name, g, g_r, tol)
    if sinks:
        _close("dsinks", grads[3], grads_r[3], tol)
    return o, lse


# ----------------------------------------------------------------------------- metadata (no interpreter)


def test_block_kinds_match_tpu_module():
    """One packing for both backends: the TPU module's constants (imported only here: it pulls Pallas TPU)."""
    tpu = pytest.importorskip("pallas_kernels.tpu.flash_attention", reason="Pallas TPU not importable")
    assert (fa.EMPTY, fa.PARTIAL, fa.FULL, fa.KIND_BITS) == (tpu.EMPTY, tpu.PARTIAL, tpu.FULL, tpu.KIND_BITS)
    assert fa.step_entry(5, fa.PARTIAL) == tpu.step_entry(5, tpu.PARTIAL)


def test_make_meta_packs_live_blocks_first():
    kinds = np.array([[fa.EMPTY, fa.FULL, fa.EMPTY, fa.PARTIAL],
                      [fa.EMPTY, fa.EMPTY, fa.EMPTY, fa.EMPTY],
                      [fa.FULL, fa.FULL, fa.PARTIAL, fa.FULL]], np.int32)
    meta = fa.make_meta(kinds)
    np.testing.assert_array_equal(meta.counts, [2, 0, 4])
    np.testing.assert_array_equal(meta.steps[0, :2], [fa.step_entry(1, fa.FULL), fa.step_entry(3, fa.PARTIAL)])
    np.testing.assert_array_equal(meta.steps[0, 2:] & fa.KIND_MASK, [fa.EMPTY, fa.EMPTY])
    np.testing.assert_array_equal(meta.steps[2] >> fa.KIND_BITS, [0, 1, 2, 3])
    np.testing.assert_array_equal(meta.counts_t, [1, 2, 1, 2])
    np.testing.assert_array_equal(meta.steps_t[3, :2], [fa.step_entry(0, fa.PARTIAL), fa.step_entry(2, fa.FULL)])
    jitted = jax.jit(fa.make_meta)(jnp.asarray(kinds))  # traceable: metadata may be built under jit
    for a, r in zip(jitted, meta):
        np.testing.assert_array_equal(a, r)


def test_tiles_validation_and_smem_budget():
    with pytest.raises(ValueError):
        fa.FlashTiles(block_q=96)
    with pytest.raises(ValueError):
        fa.FlashTiles(block_q=64, compute_wgs=2)  # 32 rows per warpgroup
    for name, nbytes in fa.smem_bytes(fa.H100_TILES, 128, 128, jnp.bfloat16).items():
        assert nbytes <= fa.MAX_SMEM_BYTES - 1024, (name, nbytes)


# ----------------------------------------------------------------------------- numerics (interpreter)


@needs_interpreter
def test_full_mask_ragged_lengths():
    compare(t=100, s=90, pred=C.Pred("full"))  # 2 q blocks, 2 kv blocks, padded keys in the tail


@needs_interpreter
@pytest.mark.slow  # the registry-level cases (test_attention_pallas_gpu.py) cover it in the default run
def test_causal_gqa():
    compare(hq=4, hkv=2, t=96, pred=C.Pred("causal"), seed=1)


@needs_interpreter
@pytest.mark.slow  # the registry-level cases (test_attention_pallas_gpu.py) cover it in the default run
def test_sliding_window_three_blocks():
    # window 40 < block: the first kv block of the third q block is EMPTY, diagonal blocks PARTIAL
    compare(t=150, pred=C.Pred("window", window=40), seed=2)


@needs_interpreter
@pytest.mark.slow  # the registry-level cases (test_attention_pallas_gpu.py) cover it in the default run
def test_packed_documents():
    compare(b=2, t=120, pred=C.Pred("causal", segments=True), seg_lens=[[50, 70], [30, 31, 59]], seed=3)


@needs_interpreter
def test_fully_masked_row():
    o, lse = compare(t=70, pred=C.Pred("strict"), seed=4)  # query 0 has no key at all
    assert np.all(np.asarray(lse)[:, :, 0] == -np.inf)
    assert np.all(np.asarray(o, np.float32)[:, :, 0] == 0.0)


@needs_interpreter
def test_sinks_soft_cap_fully_masked_row():
    _, lse = compare(hq=2, hkv=1, t=70, pred=C.Pred("strict"), sinks=True, soft_cap=4.0, seed=5)
    assert np.all(np.isfinite(np.asarray(lse)))  # the sink alone gives query 0 a finite lse


@needs_interpreter
def test_bf16_gqa_sinks():
    compare(hq=4, hkv=2, t=100, dtype=jnp.bfloat16, pred=C.Pred("causal"), sinks=True, seed=6)


@needs_interpreter
def test_race_detector_clean():
    compare(hq=2, hkv=1, t=100, s=120, pred=C.Pred("causal"), races=True, seed=7)


_WIDE = fa.FlashTiles(block_q=128, block_kv=64, compute_wgs=2, num_stages=3, block_q_bwd=128,
                      block_kv_bwd=128, compute_wgs_dq=2, compute_wgs_dkv=2, num_stages_bwd=3)


@needs_interpreter
@pytest.mark.slow
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_two_warpgroups_three_stages(dtype):
    compare(b=2, hq=4, hkv=1, t=300, d=128, dtype=dtype, pred=C.Pred("window", window=100),
            seg_lens=[[300], [120, 180]], sinks=True, tiles=_WIDE, races=True, seed=8)


@needs_interpreter
@pytest.mark.slow
def test_sweep_masks_and_lengths():
    for t, s, pred in [(64, 64, C.Pred("full")), (200, 130, C.Pred("full")),
                       (257, 257, C.Pred("causal")), (190, 190, C.Pred("window", window=64))]:
        compare(hq=2, hkv=2, t=t, s=s, pred=pred, seed=t)


# ----------------------------------------------------------------------------- lowering for H100


def _causal_meta(t, bq, bkv):
    i, j = np.arange(t // bq)[:, None], np.arange(t // bkv)[None]
    full = (j + 1) * bkv - 1 <= i * bq
    live = j * bkv <= (i + 1) * bq - 1
    return fa.make_meta(np.where(full, fa.FULL, np.where(live, fa.PARTIAL, fa.EMPTY)).astype(np.int32))


@pytest.mark.skipif(gpu_pkg.available() is not None, reason=str(gpu_pkg.available()))
@pytest.mark.parametrize("grad", [False, True], ids=["fwd", "fwd_bwd"])
def test_lowers_for_h100(grad):
    """Pallas -> Mosaic GPU lowering for sm_90 (SMEM <= 227 KiB, TMA boxes <= 256) at [2, 8192, 16, 128]
    bf16, GQA 16:4, causal, sinks, H100 tiles: ``jax.export`` needs no GPU and no extra package."""
    b, t, hq, hkv, d = 2, 8192, 16, 4, 128
    tl = fa.H100_TILES
    cfg = fa.FlashConfig(scale=d ** -0.5, pair_fn=C.Pred("causal"), has_sinks=True, tiles=tl)
    metas = (_causal_meta(t, tl.block_q, tl.block_kv), _causal_meta(t, tl.block_q_bwd, tl.block_kv_bwd))

    def f(q, k, v, sinks, qc, kc):
        def attn(q, k, v, sinks):
            o, lse = fa.flash_attention(cfg, q, k, v, sinks, qc, kc, *metas)
            return o.astype(jnp.float32).sum() + lse.sum()
        return jax.grad(attn, argnums=(0, 1, 2, 3))(q, k, v, sinks) if grad else attn(q, k, v, sinks)

    sds = jax.ShapeDtypeStruct
    args = (sds((b, hq, t, d), jnp.bfloat16), sds((b, hkv, t, d), jnp.bfloat16),
            sds((b, hkv, t, d), jnp.bfloat16), sds((hq,), jnp.float32), sds((b, 3, t), jnp.int32),
            sds((b, 3, t), jnp.int32))
    text = jax.export.export(jax.jit(f), platforms=["cuda"])(*args).mlir_module()
    assert text.count("mosaic_gpu") >= (3 if grad else 1)
