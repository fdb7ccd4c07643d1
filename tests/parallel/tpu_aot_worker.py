"""Ahead-of-time compilation of sequence-parallel strategies for a 4-chip TPU v5e (2x2) topology.

    PYTHONPATH=/path/to/libtpu python -m tests.parallel.tpu_aot_worker

Runs the XLA TPU compiler on this (CPU) machine through ``jax.experimental.topologies``; prints one
``SPCASE {json}`` line per case (the collectives found in the compiled HLO and memory use in
``result``), or a single ``__skip__`` record when libtpu or the topology is unavailable.
"""

from __future__ import annotations

import json
import os
import re
import sys
import time

os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("TPU_WORKER_HOSTNAMES", "localhost")  # silences libtpu's host discovery
os.environ.setdefault("TPU_ACCELERATOR_TYPE", "v5litepod-4")
os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")  # other processes may hold libtpu's lockfile


def _skip(reason):
    print("SPCASE " + json.dumps({"id": "__skip__", "ok": True, "msg": reason, "secs": 0}), flush=True)


def main():
    try:
        import libtpu  # noqa: F401
    except ImportError as err:
        _skip(f"libtpu not importable: {err}")
        return
    import jax
    import jax.numpy as jnp
    import numpy as np
    from jax.experimental import topologies
    from jax.sharding import Mesh, NamedSharding
    from jax.sharding import PartitionSpec as PS

    try:
        topo = topologies.get_topology_desc(platform="tpu", topology_name="v5e:2x2", chips_per_host_bounds=(2, 2, 1))
    except Exception as err:  # noqa: BLE001
        _skip(f"no TPU topology: {type(err).__name__}: {err}")
        return

    import seqmix.parallel as sp
    from seqmix.ops import masks as M
    from seqmix.parallel.hlo import collective_stats

    devices = np.asarray(topo.devices)
    mesh = Mesh(devices, ("seq",))
    p = devices.size
    seq = NamedSharding(mesh, PS(None, "seq"))
    rep = NamedSharding(mesh, PS())

    def spec(shape, dtype, sharding=seq):
        return jax.ShapeDtypeStruct(shape, dtype, sharding=sharding)

    def report(name, fn, *args):
        t0 = time.time()
        rec = {"id": name, "ok": True, "msg": ""}
        try:
            compiled = jax.jit(fn).lower(*args).compile()
            stats = collective_stats(compiled, p)
            mem = compiled.memory_analysis()
            rec["result"] = {"count": stats.count, "bytes_sent": stats.bytes_sent,
                             "unknown_trip_counts": stats.unknown_trip_counts, "devices": int(p),
                             "platform": str(devices.flat[0].platform),
                             "mosaic_kernels": sorted(set(k.rstrip("_") for k in re.findall(
                                 r"(seqmix_\w+?)(?:\.\d+)? = .*custom_call_target=\"tpu_custom_call\"",
                                 compiled.as_text()))),
                             "temp_bytes": getattr(mem, "temp_size_in_bytes", None)}
        except Exception as err:  # noqa: BLE001 - reported to the pytest side
            rec["ok"], rec["msg"] = False, f"{type(err).__name__}: {err}"
        rec["secs"] = round(time.time() - t0, 2)
        print("SPCASE " + json.dumps(rec), flush=True)

    b, n, h, d = 1, 1024, 4, 128
    bf = jnp.bfloat16

    def ring_loss(q, k, v):
        o = sp.sequence_parallel_attention(q, k, v, mesh=mesh, strategy="ring", mask=M.Causal())
        return o.astype(jnp.float32).sum()

    x = spec((b, n, h, d), bf)
    report("ring_fwd", lambda q, k, v: sp.sequence_parallel_attention(q, k, v, mesh=mesh, strategy="ring",
                                                                      mask=M.Causal()), x, x, x)
    report("ring_fwd_bwd", jax.grad(ring_loss, argnums=(0, 1, 2)), x, x, x)

    hk, dk, nl = 2, 128, 512
    xq = spec((b, nl, hk, dk), bf)
    g = spec((b, nl, hk), jnp.float32)
    h0 = spec((b, hk, dk, dk), jnp.float32, rep)

    def lasp_fwd(q, k, v, g, beta, h0):
        return sp.sequence_parallel_recurrent("gated_delta_rule", q, k, v, g, beta, mesh=mesh, strategy="lasp2",
                                              initial_state=h0, return_state=True)

    def lasp_loss(q, k, v, g, beta, h0):
        o, s = lasp_fwd(q, k, v, g, beta, h0)
        return o.astype(jnp.float32).sum() + s.sum()

    report("lasp2_gdn_fwd", lasp_fwd, xq, xq, xq, g, g, h0)
    report("lasp2_gdn_fwd_bwd", jax.grad(lasp_loss, argnums=(0, 1, 2, 3, 4, 5)), xq, xq, xq, g, g, h0)


if __name__ == "__main__":
    sys.exit(main())
