"""MoBA's Pallas TPU kernels (``impl="pallas_tpu"``) in interpret mode on CPU, against the reference.

Forward (o, lse) and VJP (dq, dk, dv with cotangents on o and lse) on random inputs: lengths that are
not multiples of the tiles (interpret tiles: 32-row q blocks, 64-key kv blocks in 32-key chunks) or of
MoBA's block size, GQA and MQA, packed documents, top-1 (own block only) and a top-k larger than the
number of blocks (= causal attention), bf16. Also: the per-(batch, kv head) tables list exactly the
chunks some query of the group attends to (sound: nothing needed is skipped; tight: nothing else is
loaded), and ``supports`` refuses what the kernels cannot serve.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels import _target
from pallas_kernels.tpu import flash_attention as fa
from seqmix import ops
from seqmix.ops import masks as M
from seqmix.ops.tpu import attention as tpu_attention
from seqmix.ops.tpu import moba as tpu_moba
from seqmix.ops.tpu import tiles as tpu_blocks
from seqmix.testing import assert_close, tolerance_kind

pytestmark = pytest.mark.interpret


@pytest.fixture(autouse=True)
def _pinned_interpret():
    with _target.force("tpu"), tpu_blocks.pinned(tpu_blocks.TABLE["interpret"]):
        yield


def _inputs(b, t, hq, hkv, d, dtype=jnp.float32, seed=0):
    ks = jax.random.split(jax.random.PRNGKey(seed), 5)
    q = jax.random.normal(ks[0], (b, t, hq, d), jnp.float32).astype(dtype)
    k = jax.random.normal(ks[1], (b, t, hkv, d), jnp.float32).astype(dtype)
    v = jax.random.normal(ks[2], (b, t, hkv, d), jnp.float32).astype(dtype)
    do = jax.random.normal(ks[3], (b, t, hq, d), jnp.float32).astype(dtype)
    dlse = jax.random.normal(ks[4], (b, hq, t), jnp.float32)
    return q, k, v, do, dlse


def _run(impl, q, k, v, do, dlse, kw):
    @jax.jit
    def go(q, k, v):
        out, vjp = jax.vjp(lambda q, k, v: ops.moba(q, k, v, return_lse=True, impl=impl, **kw), q, k, v)
        return out, vjp((do, dlse))

    return go(q, k, v)


def _packed(b, lengths):
    return jnp.asarray(np.repeat(np.arange(len(lengths)), lengths)[None].repeat(b, 0), jnp.int32)


CASES = {  # (B, T, Hq, Hkv, D, block_size, topk, document lengths or None)
    "ragged": (1, 100, 2, 1, 16, 16, 3, None),
    "gqa_packed": (2, 150, 4, 2, 16, 24, 2, (40, 70, 40)),
    "many_choices": (1, 96, 2, 2, 8, 8, 4, None),
    "top1": (1, 80, 2, 1, 16, 12, 1, None),
    "topk_all": (1, 90, 2, 1, 16, 20, 8, None),
    "mqa_ragged_docs": (1, 130, 4, 1, 16, 10, 3, (33, 97)),
}
SLOW = {"many_choices", "topk_all", "mqa_ragged_docs"}


@pytest.mark.parametrize("name", [pytest.param(n, marks=pytest.mark.slow) if n in SLOW else n for n in CASES])
def test_matches_reference(name):
    b, t, hq, hkv, d, bs, topk, docs = CASES[name]
    q, k, v, do, dlse = _inputs(b, t, hq, hkv, d)
    kw = {"block_size": bs, "topk": topk}
    if docs:
        kw["segment_ids"] = _packed(b, docs)
    (o, lse), grads = _run("pallas_tpu", q, k, v, do, dlse, kw)
    (o_ref, lse_ref), grads_ref = _run("reference", q, k, v, do, dlse, kw)
    kind = tolerance_kind(q.dtype, "softmax")
    assert_close(o, o_ref, kind=kind, role="out", name="o")
    assert_close(lse, lse_ref, kind=kind, role="out", name="lse")
    for n, a, r in zip(("dq", "dk", "dv"), grads, grads_ref):
        assert_close(a, r, kind=kind, role="grad", name=n)


def test_topk_at_least_the_blocks_is_causal_attention():
    q, k, v, do, dlse = _inputs(1, 90, 2, 1, 16, seed=3)
    (o, lse), grads = _run("pallas_tpu", q, k, v, do, dlse, {"block_size": 20, "topk": 5})

    @jax.jit
    def causal(q, k, v):
        f = lambda q, k, v: ops.attention(q, k, v, mask=M.Causal(), return_lse=True, impl="reference")  # noqa: E731
        out, vjp = jax.vjp(f, q, k, v)
        return out, vjp((do, dlse))

    (o_ref, lse_ref), grads_ref = causal(q, k, v)
    assert_close(o, o_ref, kind=tolerance_kind(q.dtype, "softmax"), role="out", name="o")
    assert_close(lse, lse_ref, kind=tolerance_kind(q.dtype, "softmax"), role="out", name="lse")
    for n, a, r in zip(("dq", "dk", "dv"), grads, grads_ref):
        assert_close(a, r, kind=tolerance_kind(q.dtype, "softmax"), role="grad", name=n)


def test_bf16():
    q, k, v, do, dlse = _inputs(1, 96, 4, 2, 16, jnp.bfloat16, seed=5)
    kw = {"block_size": 16, "topk": 3}
    (o, lse), grads = _run("pallas_tpu", q, k, v, do, dlse, kw)
    (o_ref, lse_ref), grads_ref = _run("reference", q, k, v, do, dlse, kw)
    assert o.dtype == jnp.bfloat16
    assert_close(o, o_ref, kind="softmax_bf16", role="out", name="o")
    assert_close(lse, lse_ref, kind="softmax_bf16", role="out", name="lse")
    for n, a, r in zip(("dq", "dk", "dv"), grads, grads_ref):
        assert_close(a, r, kind="softmax_bf16", role="grad", name=n)


def test_tables_list_exactly_the_chunks_the_group_attends_to():
    """Live (q block, kv chunk) entries of every (batch, kv head) table, forward and backward tiles, equal
    those where the kernel's own predicate allows some pair for some head of the group; and most chunks
    are skipped at this sparsity (8 blocks of 32, top-2)."""
    b, t, hq, hkv, d = 2, 256, 4, 2, 8
    q, k, v, _, _ = _inputs(b, t, hq, hkv, d, seed=7)
    call = ops.get_family("moba").prepare(q, k, v, block_size=32, topk=2, segment_ids=_packed(b, (96, 160)))
    p = tpu_attention.plan(call.attention)
    chosen, _ = tpu_moba.gate(call)
    (fwd, bwd), q_coords = tpu_moba._metadata(call, p, chosen)
    kc = fwd[2]  # [B, Sp/chunk, R, chunk] -> [B, R, Sp]
    kv_coords = kc.transpose(0, 2, 1, 3).reshape(b, kc.shape[2], -1)
    pair = tpu_moba.MoBAPair(chosen.shape[-1])
    allowed = pair(tuple(q_coords[:, :, :, r, :, None] for r in range(q_coords.shape[3])),
                   tuple(kv_coords[:, None, None, r, None, :] for r in range(kv_coords.shape[1])))
    allowed = allowed & (jnp.arange(p.padded_q) < t)[:, None]  # [B, Hkv, G, Tp, Sp]
    t_ = p.tiles
    for chunks, bq, bkc in ((fwd[1], t_.block_q, t_.block_kv_compute), (bwd[2], t_.block_q_bwd, t_.block_kv_compute_bwd)):
        need = allowed.reshape(b, hkv, -1, p.padded_q // bq, bq, p.padded_kv // bkc, bkc).any((2, 4, 6))
        live = chunks.reshape(need.shape) != fa.EMPTY
        np.testing.assert_array_equal(np.asarray(live), np.asarray(need))
        assert float(live.mean()) < 0.5, float(live.mean())


def test_supports_names_what_the_kernels_cannot_serve():
    q, k, v, _, _ = _inputs(1, 40, 2, 1, 8)
    call = ops.get_family("moba").prepare(q, k, v, block_size=8, topk=2)
    assert "q length 40" in tpu_moba.supports(call)
    q16 = jnp.zeros((1, 128, 2, 8), jnp.float16)
    call = ops.get_family("moba").prepare(q16, q16[:, :, :1], q16[:, :, :1], block_size=8, topk=2)
    assert "float16" in tpu_moba.supports(call)
    with pytest.raises(NotImplementedError, match="no implementation can serve"):
        ops.moba(q, k, v, block_size=8, topk=2, impl="pallas_tpu")
