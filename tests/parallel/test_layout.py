"""Single-device tests: layouts (zigzag / striped permutations), meshes, registry, the P = 1 path."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import seqmix.parallel as sp
from seqmix import ops
from seqmix.ops import masks as M
from seqmix.ops import capability_rows
from seqmix.ops._registry import FAMILIES
from seqmix.parallel import layout
from seqmix.testing import assert_close
from tests.ops.attention_cases import packed_segments, qkv


def test_zigzag_matches_documented_example():
    np.testing.assert_array_equal(layout.zigzag_permutation(8, 2), [0, 1, 6, 7, 2, 3, 4, 5])


def test_striped_matches_documented_example():
    np.testing.assert_array_equal(layout.striped_permutation(8, 2), [0, 2, 4, 6, 1, 3, 5, 7])


@pytest.mark.parametrize("p", [1, 2, 4, 8])
def test_zigzag_pairs_chunks(p):
    n = 4 * 2 * p
    perm = layout.zigzag_permutation(n, p)
    c = n // (2 * p)
    for i, shard in enumerate(perm.reshape(p, -1)):
        chunks = sorted(set((shard // c).tolist()))
        assert chunks == sorted({i, 2 * p - 1 - i}), (i, shard)
    # every device holds the same causal work: sum of (position + 1) over its tokens
    work = (perm.reshape(p, -1) + 1).sum(1)
    assert len(set(work.tolist())) == 1


@pytest.mark.parametrize("scheme", ["zigzag", "striped", "contiguous", None])
def test_permute_roundtrip(scheme):
    perm = layout.permutation(scheme, 24, 3 if scheme != "zigzag" else 2)
    x = jnp.arange(2 * 24 * 3).reshape(2, 24, 3)
    np.testing.assert_array_equal(layout.unpermute(layout.permute(x, perm), perm), x)
    inv = layout.inverse_permutation(perm)
    np.testing.assert_array_equal(perm[inv], np.arange(24))
    tree = {"a": x, "b": None}
    back = layout.unpermute_tree(layout.permute_tree(tree, perm), perm)
    np.testing.assert_array_equal(back["a"], x)
    assert back["b"] is None


def test_striped_puts_token_t_on_device_t_mod_p():
    p, n = 4, 16
    perm = layout.striped_permutation(n, p)
    for dev, shard in enumerate(perm.reshape(p, -1)):
        assert all(t % p == dev for t in shard.tolist())


@pytest.mark.parametrize("fn, n, p, need", [(layout.zigzag_permutation, 12, 4, 8), (layout.striped_permutation, 10, 4, 4),
                                             (layout.zigzag_permutation, 6, 2, 4)])
def test_layout_divisibility_errors(fn, n, p, need):
    with pytest.raises(ValueError, match=f"divisible by {need}"):
        fn(n, p)


def test_layout_bad_arguments():
    with pytest.raises(ValueError, match="layout must be one of"):
        layout.permutation("diagonal", 8, 2)
    with pytest.raises(ValueError, match="positive int"):
        layout.zigzag_permutation(8, 0)
    with pytest.raises(ValueError, match="permutation of range"):
        layout.inverse_permutation([0, 0, 1])
    with pytest.raises(ValueError, match="has length"):
        layout.permute(jnp.zeros((1, 5)), layout.striped_permutation(4, 2))


def test_permute_inputs_keeps_global_relative_positions():
    seg = packed_segments(1, 16, [3, 9])  # documents [0,3), [3,12), [12,16)
    perm = layout.zigzag_permutation(16, 2)
    out = layout.permute_inputs(perm, segment_ids=seg, tokens=jnp.arange(16)[None], targets=jnp.arange(1, 17)[None])
    np.testing.assert_array_equal(out["positions"], perm)
    np.testing.assert_array_equal(out["tokens"][0], perm)
    np.testing.assert_array_equal(out["targets"][0], perm + 1)
    rel = np.asarray(M.segment_relative(jnp.arange(16), seg))[0]
    np.testing.assert_array_equal(out["relative_positions"][0], rel[perm])
    np.testing.assert_array_equal(out["segment_ids"][0], np.asarray(seg)[0][perm])


def test_make_mesh_validation():
    m = sp.make_mesh({"seq": 1})
    assert m.axis_names == ("seq",)
    m = sp.make_mesh({"seq": 1, "data": 1})
    assert m.axis_names == ("data", "seq")  # canonical order
    with pytest.raises(ValueError, match="unknown mesh axis"):
        sp.make_mesh({"sequence": 1})
    with pytest.raises(ValueError, match="needs 4 devices"):
        sp.make_mesh({"seq": 4})
    with pytest.raises(ValueError, match="int size >= 1"):
        sp.make_mesh({"seq": 0})
    with pytest.raises(ValueError, match="no axis"):
        sp.mesh.axis_size(m, "tensor")


def test_registry_has_parallel_strategies():
    rows = {r["family"]: r for r in capability_rows()}
    assert rows["attention"]["sequence parallel"] == "allgather, ring, ulysses · cpu×8"
    for fam in ("linear_attention", "retention", "simple_gla", "gla", "delta_rule", "gated_delta_rule"):
        assert rows[fam]["sequence parallel"] == "lasp1, lasp2 · cpu×8", fam
        fn = sp.lasp2h(fam)
        assert fn.func is sp.lasp2 and fn.args == (fam,)
    assert sp.lasp2h("attention") is sp.allgather_attention
    with pytest.raises(ValueError, match="served by strategies"):
        sp.for_family("attention", "lasp2")


def test_wrapper_validation():
    mesh = sp.make_mesh({"seq": 1})
    q, k, v = qkv(0, 1, 8, 8, 2, 2, 8)
    with pytest.raises(ValueError, match="strategy must be one of"):
        sp.sequence_parallel_attention(q, k, v, mesh=mesh, strategy="tree")
    with pytest.raises(ValueError, match="no axis"):
        sp.sequence_parallel_attention(q, k, v, mesh=mesh, axis="tensor")
    with pytest.raises(ValueError, match="layout must be one of"):
        sp.sequence_parallel_attention(q, k, v, mesh=mesh, layout="spiral")
    with pytest.raises(ValueError, match="no LASP summary"):
        sp.lasp2("attention", q, k, v, axis_name="seq")


@pytest.mark.parametrize("strategy", ["ring", "ulysses", "allgather"])
def test_single_device_axis_equals_op(strategy):
    """P = 1: every strategy reduces to the op (one shard, no communication)."""
    mesh = sp.make_mesh({"seq": 1})
    q, k, v = qkv(3, 2, 16, 16, 4, 2, 8)
    seg = packed_segments(2, 16, [5, 6])
    kw = dict(mask=M.streaming(4, 2), segment_ids=seg, return_lse=True)
    o_ref, lse_ref = jax.jit(lambda q, k, v: ops.attention(q, k, v, **kw))(q, k, v)
    o, lse = jax.jit(lambda q, k, v: sp.sequence_parallel_attention(q, k, v, mesh=mesh, strategy=strategy,
                                                                   layout="zigzag", **kw))(q, k, v)
    assert_close(o, o_ref, kind="sharded", name="o")
    assert_close(lse, lse_ref, kind="sharded", name="lse")


def test_single_device_lasp_equals_op():
    if "gla" not in FAMILIES:
        pytest.skip("gla not registered")
    mesh = sp.make_mesh({"seq": 1})
    q, k, v = qkv(4, 1, 16, 16, 2, 2, 8)
    g = jax.nn.log_sigmoid(jax.random.normal(jax.random.PRNGKey(1), (1, 16, 2, 8)) + 2.0)
    o_ref, s_ref = jax.jit(lambda q, k, v, g: FAMILIES["gla"].op(q, k, v, g, return_state=True))(q, k, v, g)
    for strategy in ("lasp1", "lasp2"):
        o, s = jax.jit(lambda q, k, v, g: sp.sequence_parallel_recurrent(
            "gla", q, k, v, g, mesh=mesh, strategy=strategy, return_state=True))(q, k, v, g)
        assert_close(o, o_ref, kind="sharded", name="o")
        assert_close(s, s_ref, kind="sharded", name="final_state")
