"""Sequence-parallel ``LM`` vs the single-device ``LM`` on 8 forced CPU devices; one JSON line per case.

    python -m tests.parallel.sp_model_worker [CASE ...]

Run by ``tests/parallel/test_sp_model.py`` in a subprocess (the device count is fixed when JAX starts).
"""

from __future__ import annotations

import os
import sys

os.environ["JAX_PLATFORMS"] = "cpu"
_FLAGS = "--xla_force_host_platform_device_count=8"
if _FLAGS not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = " ".join([os.environ.get("XLA_FLAGS", ""), _FLAGS]).strip()

import json  # noqa: E402
import traceback  # noqa: E402

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from flax import nnx  # noqa: E402

jax.config.update("jax_default_matmul_precision", "highest")

from seqmix.models import LM, LMConfig  # noqa: E402
from seqmix.parallel import SequenceParallel, make_mesh  # noqa: E402

MIXERS = "attn,swa:16,gdn,gla"
# (case id, mesh shape, softmax strategy, layout, packed segments, check gradients[, mixers])
CASES = {  # moba: its own all-gather strategy; duo: a call per head group
    "seq4_other_families": ({"seq": 4}, "allgather", None, True, False,
                            "based:8,retnet,simple_gla,deltanet,linear,hedgehog,stream:8,moba:6:3,duo:8:1,power:4"),
    "seq8_allgather": ({"seq": 8}, "allgather", None, False, True),
    "seq8_ring_segments": ({"seq": 8}, "ring", None, True, False),
    "data2_seq4_ulysses": ({"data": 2, "seq": 4}, "ulysses", None, False, False),
    "seq4_zigzag_segments": ({"seq": 4}, "allgather", "zigzag", True, False),
}


def run(case):
    shape, strategy, layout, packed, grads, *rest = CASES[case]
    mixers = rest[0] if rest else MIXERS
    n = int(np.prod(list(shape.values())))
    mesh = make_mesh(shape, devices=jax.devices()[:n])
    sp = SequenceParallel(mesh, strategy=strategy, layout=layout)
    cfg = LMConfig(vocab_size=64, d_model=32, num_heads=4, mixers=mixers, max_len=64)
    ref = LM(cfg, rngs=nnx.Rngs(0))
    par = LM(cfg, rngs=nnx.Rngs(0), sequence_parallel=sp)
    b, t = 2, 64
    tokens = jax.random.randint(jax.random.key(1), (b, t), 0, cfg.vocab_size)
    seg = None
    if packed:  # documents of uneven lengths, boundaries inside and on shard edges
        seg = jnp.asarray([[0] * 13 + [1] * 19 + [2] * 32, [0] * 8 + [1] * 40 + [2] * 16], jnp.int32)
    y_ref = jax.jit(lambda m, x: m(x, segment_ids=seg))(ref, tokens)
    y_sp = jax.jit(lambda m, x: m(x, segment_ids=seg))(par, tokens)
    rec = {"fwd_max_abs": float(jnp.max(jnp.abs(y_ref - y_sp))), "fwd_scale": float(jnp.max(jnp.abs(y_ref)))}
    if grads:
        def loss(m):
            return jnp.mean(jax.nn.log_softmax(m(tokens))[..., 0])

        g_ref = nnx.state(jax.jit(nnx.grad(loss))(ref), nnx.Param)
        g_sp = nnx.state(jax.jit(nnx.grad(loss))(par), nnx.Param)
        rel = lambda a, c: float(jnp.max(jnp.abs(a - c)) / (jnp.max(jnp.abs(a)) + 1e-12))  # noqa: E731
        diffs = jax.tree.leaves(jax.tree.map(rel, g_ref, g_sp))
        rec["grad_max_rel"] = max(diffs)
    return rec


def main(argv):
    for case in argv or list(CASES):
        try:
            rec = {"id": case, "ok": True, **run(case)}
        except Exception:  # noqa: BLE001 - reported to the test
            rec = {"id": case, "ok": False, "error": traceback.format_exc()[-3000:]}
        print("SPMODEL " + json.dumps(rec), flush=True)


if __name__ == "__main__":
    main(sys.argv[1:])
