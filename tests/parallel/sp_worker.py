"""Run a suite of sequence-parallel cases on 8 forced CPU devices; print one JSON line per case.

    python -m tests.parallel.sp_worker SUITE [CASE_ID ...]

The device count is fixed when JAX starts, so the pytest modules launch this in a subprocess (see
``tests/parallel/_subprocess.py``). Softmax and recurrent cases compare the sharded strategy with the
single-device op (forward and every gradient, ``"sharded"`` tolerances); jaxpr cases report the
collectives a strategy issues.
"""

from __future__ import annotations

import os
import sys

os.environ["JAX_PLATFORMS"] = "cpu"
from tests import _xla_flags  # noqa: E402

_xla_flags.add("--xla_force_host_platform_device_count=8", _xla_flags.FAST_COMPILE)

import json  # noqa: E402
import time  # noqa: E402
import traceback  # noqa: E402
from collections import Counter  # noqa: E402

import jax  # noqa: E402
import jax.extend  # noqa: E402,F401
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from jax.sharding import Mesh  # noqa: E402

jax.config.update("jax_default_matmul_precision", "highest")

import seqmix.parallel as sp  # noqa: E402
from seqmix import ops  # noqa: E402
from seqmix.ops._registry import FAMILIES  # noqa: E402
from seqmix.testing import check_close  # noqa: E402
from tests.ops.attention_cases import MASKS, NEIGHBORHOOD_MASKS, packed_segments, qkv  # noqa: E402
from tests.parallel.sp_cases import SUITES  # noqa: E402

F32 = jnp.float32


def make_mesh(kind: str, p: int) -> Mesh:
    devs = jax.devices()
    if kind == "1d":
        return sp.make_mesh({"seq": p}, devices=devs[:p])
    # "data2_seq4" -> axes in the written order (sequence outer or inner)
    names, sizes = [], []
    for part in kind.split("_"):
        name = part.rstrip("0123456789")
        names.append(name)
        sizes.append(int(part[len(name):]))
    assert dict(zip(names, sizes))["seq"] == p, kind
    arr = np.asarray(devs[: int(np.prod(sizes))], dtype=object).reshape(sizes)
    return Mesh(arr, tuple(names), axis_types=(jax.sharding.AxisType.Auto,) * len(names))


def rank_code(x, t_axis=1, scale=3.0):
    """Add the normalized global position to channel 0, so a misplaced chunk changes the result."""
    t = x.shape[t_axis]
    code = (jnp.arange(t, dtype=F32) / t * scale).reshape((1, t) + (1,) * (x.ndim - 2))
    return x.at[..., 0].add(code[..., 0].astype(x.dtype))


def segments(c):
    return None if c["seg"] is None else packed_segments(c["b"], c["t"], c["seg"])


# ----------------------------------------------------------------------------- softmax


_REF_CACHE: dict = {}


def direct_shard_map(c, mesh, q, k, v, sink, kw):
    """The strategy called the way a model calls it: inside the user's own ``jax.shard_map`` on permuted
    inputs, with one position array for q and kv and no precomputed relative positions (so the strategy
    derives global segment-relative positions itself)."""
    from jax.sharding import PartitionSpec as PS

    p = c["p"]
    perm = sp.layout.permutation(c["layout"], q.shape[1], p)
    inputs = sp.permute_inputs(perm, segment_ids=kw["segment_ids"], q=q, k=k, v=v)
    fn = sp.SOFTMAX_STRATEGIES[c["strategy"]]
    x = PS(None, "seq")

    def local(q, k, v, pos, seg, sink):
        return fn(q, k, v, axis_name="seq", mask=kw["mask"], q_positions=pos, kv_positions=pos, segment_ids=seg,
                  sink_logits=sink, soft_cap=kw["soft_cap"], return_lse=True)

    o, lse = jax.shard_map(local, mesh=mesh, in_specs=(x, x, x, PS("seq"), x, PS()),
                           out_specs=(x, PS(None, None, "seq")), check_vma=False)(
        inputs["q"], inputs["k"], inputs["v"], inputs["positions"], inputs["segment_ids"], sink)
    return sp.unpermute(o, perm), sp.unpermute(lse, perm, axis=2)


def softmax_case(c):
    dtype = jnp.dtype(c["dtype"])
    b, t, hq, hkv = c["b"], c["t"], c["hq"], c["hkv"]
    q, k, v = qkv(11, b, t, t, hq, hkv, 8)
    q, k, v = rank_code(q), rank_code(k, scale=1.0), rank_code(v)
    q, k, v = (x.astype(dtype) for x in (q, k, v))
    sink = jnp.linspace(-1.0, 1.5, hq).astype(dtype) if c["sink"] else None
    mask = {**MASKS, **NEIGHBORHOOD_MASKS}[c["mask"]](t, t)
    seg = segments(c)
    kw = dict(mask=mask, segment_ids=seg, soft_cap=c["soft_cap"], return_lse=True)
    kd, kl = jax.random.split(jax.random.PRNGKey(5))
    ct = (jax.random.normal(kd, (b, t, hq, 8), F32).astype(dtype), jax.random.normal(kl, (b, hq, t), F32))

    def grads(fn):
        out, vjp = jax.vjp(jax.jit(fn), q, k, v, sink)
        return out, vjp(ct)

    key = (c["dtype"], b, t, hq, hkv, c["sink"], c["mask"], tuple(c["seg"] or ()), c["soft_cap"])
    if key not in _REF_CACHE:
        _REF_CACHE[key] = grads(lambda q, k, v, s: ops.attention(q, k, v, sink_logits=s, **kw))
    (o_ref, lse_ref), g_ref = _REF_CACHE[key]
    mesh = make_mesh(c["mesh"], c["p"])
    if c.get("direct"):
        (o, lse), g = grads(lambda q, k, v, s: direct_shard_map(c, mesh, q, k, v, s, kw))
    else:
        (o, lse), g = grads(lambda q, k, v, s: sp.sequence_parallel_attention(
            q, k, v, mesh=mesh, strategy=c["strategy"], layout=c["layout"], sink_logits=s, **kw))
    kind = "sharded" if dtype == F32 else "softmax_bf16"
    assert o.dtype == dtype and lse.dtype == F32
    msgs = [check_close(o, o_ref, kind=kind, role="out", name="o"),
            check_close(lse, lse_ref, kind=kind, role="out", name="lse")]
    for name, a, r in zip(("dq", "dk", "dv"), g[:3], g_ref[:3]):
        msgs.append(check_close(a, r, kind=kind, role="grad", name=name))
    if c["sink"]:
        msgs.append(check_close(g[3], g_ref[3], kind=kind, role="gate", name="dsink"))
    msgs = [m for m in msgs if m]
    if msgs:
        raise AssertionError("; ".join(msgs))


# ----------------------------------------------------------------------------- MoBA


def moba_case(c):
    """``allgather_moba`` (the strategy the MoBA record names) inside ``shard_map`` on contiguous shards vs
    ``ops.moba``: o, lse, dq, dk, dv."""
    from jax.sharding import PartitionSpec as PS

    from seqmix.parallel.strategies import for_family

    b, t = 2, 64
    q, k, v = (rank_code(x) for x in qkv(13, b, t, t, c["hq"], c["hkv"], 8))
    seg = None if c["seg"] is None else packed_segments(b, t, c["seg"])
    kw = dict(block_size=c["block_size"], topk=c["topk"], return_lse=True, block_q=8, block_kv=8)
    kd, kl = jax.random.split(jax.random.PRNGKey(6))
    ct = (jax.random.normal(kd, (b, t, c["hq"], 8), F32), jax.random.normal(kl, (b, c["hq"], t), F32))
    fn = for_family("moba", "allgather")
    mesh = make_mesh("1d", c["p"])
    x = PS(None, "seq")

    def sharded(q, k, v):
        arrays = (q, k, v) + (() if seg is None else (seg,))

        def local(q, k, v, *s):
            return fn(q, k, v, axis_name="seq", segment_ids=s[0] if s else None, **kw)

        return jax.shard_map(local, mesh=mesh, in_specs=(x,) * len(arrays), out_specs=(x, PS(None, None, "seq")),
                             check_vma=False)(*arrays)

    def grads(f):
        out, vjp = jax.vjp(jax.jit(f), q, k, v)
        return out, vjp(ct)

    (o_ref, lse_ref), g_ref = grads(lambda q, k, v: ops.moba(q, k, v, segment_ids=seg, **kw))
    (o, lse), g = grads(sharded)
    msgs = [check_close(o, o_ref, kind="sharded", role="out", name="o"),
            check_close(lse, lse_ref, kind="sharded", role="out", name="lse")]
    msgs += [check_close(a, r, kind="sharded", role="grad", name=n) for n, a, r in zip(("dq", "dk", "dv"), g, g_ref)]
    msgs = [m for m in msgs if m]
    if msgs:
        raise AssertionError("; ".join(msgs))


# ----------------------------------------------------------------------------- recurrent


def recurrent_inputs(family, b, t, h=2, d=8, seed=0):
    """The family record's inputs (typical gates, an initial state), v rank-coded: (q, k, v, positional
    args, keyword arrays and options without the initial state, initial state)."""
    fam = FAMILIES[family]
    inputs = fam.make_inputs(fam, jax.random.PRNGKey(seed), batch=b, seq=t, heads=h, dk=d, dv=d)
    q, k, v = inputs.args[:3]
    kw = {n: x for n, x in inputs.arrays.items() if n != "initial_state"}
    kw.update(inputs.options)
    return q, k, rank_code(v), list(inputs.args[3:]), kw, inputs.arrays["initial_state"]


def recurrent_case(c):
    family, b, t = c["family"], c["b"], c["t"]
    fam = FAMILIES[family]
    q, k, v, args, kw, h0 = recurrent_inputs(family, b, t)
    h0 = h0 if c["h0"] else None
    seg = segments(c)
    op = fam.op
    mesh = make_mesh(c["mesh"], c["p"])

    def single(q, k, v, args, h0):
        return op(q, k, v, *args, segment_ids=seg, initial_state=h0, return_state=True, **kw)

    def par(q, k, v, args, h0):
        return sp.sequence_parallel_recurrent(family, q, k, v, *args, mesh=mesh, strategy=c["strategy"],
                                              segment_ids=seg, initial_state=h0, return_state=True, **kw)

    ref, vjp_ref = jax.vjp(jax.jit(single), q, k, v, args, h0)
    out, vjp = jax.vjp(jax.jit(par), q, k, v, args, h0)
    keys = jax.random.split(jax.random.PRNGKey(7), 2)
    ct = (jax.random.normal(keys[0], ref[0].shape, F32).astype(ref[0].dtype), jax.random.normal(keys[1], ref[1].shape, F32))
    g_ref, g = vjp_ref(ct), vjp(ct)
    msgs = [check_close(out[0], ref[0], kind="sharded", role="out", name="o"),
            check_close(out[1], ref[1], kind="sharded", role="out", name="final_state")]
    names = ["dq", "dk", "dv"] + [f"d{n}" for n in fam.positional] + (["dh0"] if h0 is not None else [])
    roles = ["grad"] * 3 + ["gate"] * len(fam.positional) + (["grad"] if h0 is not None else [])
    leaves, leaves_ref = jax.tree_util.tree_leaves(g), jax.tree_util.tree_leaves(g_ref)
    assert len(leaves) == len(names) == len(leaves_ref), (len(leaves), names)
    for name, role, a, r in zip(names, roles, leaves, leaves_ref):
        msgs.append(check_close(a, r, kind="sharded", role=role, name=name))
    msgs = [m for m in msgs if m]
    if msgs:
        raise AssertionError("; ".join(msgs))


# ----------------------------------------------------------------------------- jaxpr structure

COLLECTIVES = ("ppermute", "all_gather", "all_to_all", "reduce_scatter", "psum", "psum_invariant",
               "all_gather_invariant", "pmax", "pmin")


def _sub_jaxprs(eqn):
    for val in eqn.params.values():
        items = val if isinstance(val, (tuple, list)) else (val,)
        for it in items:
            if isinstance(it, jax.extend.core.ClosedJaxpr):
                yield it.jaxpr
            elif isinstance(it, jax.extend.core.Jaxpr):
                yield it


def count_collectives(jaxpr, mult=1, counts=None) -> Counter:
    """Counter of ``"prim dtype[shape]"`` -> executions per device (scan bodies × their length)."""
    counts = Counter() if counts is None else counts
    for eqn in jaxpr.eqns:
        name = eqn.primitive.name
        if name in COLLECTIVES:
            for var in eqn.invars:
                aval = var.aval
                counts[f"{name} {aval.dtype}{list(aval.shape)}"] += mult
        if name == "cond":
            branch_counts = [count_collectives(br.jaxpr, mult) for br in eqn.params["branches"]]
            merged = Counter()
            for bc in branch_counts:
                for key, val in bc.items():
                    merged[key] = max(merged[key], val)
            counts.update(merged)
            continue
        inner = mult * (eqn.params["length"] if name == "scan" else 1)
        if name == "while":
            inner = mult  # counted once; strategies use scans with static lengths
        for sub in _sub_jaxprs(eqn):
            count_collectives(sub, inner, counts)
    return counts


def jaxpr_case(c):
    p = c["p"]
    mesh = make_mesh("1d", p)
    b, t, d = 2, 64, 8
    bf = jnp.bfloat16
    if c["kind"] in ("ring", "ulysses", "allgather", "ulysses_bad_heads"):
        hq, hkv = 4, 4 if c["kind"] != "ulysses_bad_heads" else 2
        q, k, v = (x.astype(bf) for x in qkv(0, b, t, t, hq, hkv, d))
        seg = packed_segments(b, t, [5, 30])
        from seqmix.ops import masks as M

        def f(q, k, v):
            return sp.sequence_parallel_attention(q, k, v, mesh=mesh, strategy=c["kind"].replace("_bad_heads", ""),
                                                  mask=M.Causal(), segment_ids=seg, layout="zigzag")
        if c["kind"] == "ulysses_bad_heads":
            try:
                jax.make_jaxpr(f)(q, k, v)
            except NotImplementedError as err:
                return {"error": str(err)}
            return {"error": None}
        loss = lambda q, k, v: f(q, k, v).astype(F32).sum()  # noqa: E731
        fwd = count_collectives(jax.make_jaxpr(f)(q, k, v).jaxpr)
        total = count_collectives(jax.make_jaxpr(jax.grad(loss, argnums=(0, 1, 2)))(q, k, v).jaxpr)
        return {"forward": dict(fwd), "total": dict(total), "shapes": {"n": t // p, "b": b, "hkv": hkv, "d": d}}
    family = c["family"]
    q, k, v, args, kw, h0 = recurrent_inputs(family, b, t)
    seg = packed_segments(b, t, [21, 30])

    def f(q, k, v, args, h0):
        return sp.sequence_parallel_recurrent(family, q, k, v, *args, mesh=mesh, strategy=c["kind"], segment_ids=seg,
                                              initial_state=h0, return_state=True, **kw)

    def loss(q, k, v, args, h0):
        o, s = f(q, k, v, args, h0)
        return o.sum() + s.sum()

    fwd = count_collectives(jax.make_jaxpr(f)(q, k, v, args, h0).jaxpr)
    total = count_collectives(jax.make_jaxpr(jax.grad(loss, argnums=(0, 1, 2, 3, 4)))(q, k, v, args, h0).jaxpr)
    return {"forward": dict(fwd), "total": dict(total), "shapes": {"n": t // p, "b": b, "q": list(q.shape)}}


RUNNERS = {"softmax_a": softmax_case, "softmax_b": softmax_case, "recurrent": recurrent_case,
           "jaxpr": jaxpr_case, "moba": moba_case}


def main(argv):
    suite = argv[0]
    wanted = set(argv[1:])
    runner = RUNNERS[suite]
    for case in SUITES[suite]:
        if wanted and case["id"] not in wanted:
            continue
        t0 = time.time()
        rec = {"id": case["id"], "ok": True, "msg": ""}
        try:
            result = runner(case)
            if result is not None:
                rec["result"] = result
        except Exception as err:  # noqa: BLE001 - reported to the pytest side
            rec["ok"] = False
            rec["msg"] = f"{type(err).__name__}: {err}\n{traceback.format_exc(limit=4)}"
        rec["secs"] = round(time.time() - t0, 2)
        print("SPCASE " + json.dumps(rec), flush=True)


if __name__ == "__main__":
    main(sys.argv[1:])
