"""Tile sizes of ``attention``'s ``xla`` form, side by side in one process: the measurement behind
``seqmix.ops.xla_tiles`` (its docstring quotes a run of this script).

For each mask and length, every candidate ``(block_q, block_kv)`` runs forward and forward+backward
(``grad`` of ``sum(o)`` over q, k, v), jitted, interleaved candidate by candidate over ``--repeats``
rounds (best of the rounds), with an fp32 2048³ matmul timed in each round for the fraction of matmul
throughput. Also reports each candidate's compiled temp memory and the policy's choice. Writes JSON.

    python experiments/xla_tiles_probe.py --lengths 4096 8192 --masks causal window:1024 \
        --out docs/bench/xla_tiles_cpu.json
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

from seqmix import ops  # noqa: E402
from seqmix.ops import _registry, xla_tiles  # noqa: E402
from seqmix.ops import masks as M  # noqa: E402

CANDIDATES = ((128, 128), (256, 256), (512, 128), (512, 256), (512, 512), (1024, 256))


def parse_mask(spec: str):
    if spec == "causal":
        return M.Causal()
    kind, _, arg = spec.partition(":")
    if kind == "window":
        return M.LocalWindow(int(arg))
    if kind == "chunk":
        return M.ChunkedCausal(int(arg))
    if kind == "na2d":  # na2d:SIDE:KERNEL, a SIDE x SIDE grid flattened row-major (T = SIDE²)
        side, kernel = (int(x) for x in arg.split(":"))
        return ops.neighborhood((side, side), kernel)
    raise ValueError(f"unknown mask {spec!r} (causal, window:W, chunk:C, na2d:SIDE:K)")


def _time(fn, *args) -> float:
    t0 = time.perf_counter()
    jax.block_until_ready(fn(*args))
    return time.perf_counter() - t0


def probe(mask_spec: str, t: int, candidates, repeats: int, b: int = 1, h: int = 4, d: int = 64) -> list[dict]:
    mask = parse_mask(mask_spec)
    q, k, v = (jax.random.normal(key, (b, t, h, d), jnp.float32) for key in jax.random.split(jax.random.PRNGKey(0), 3))
    fns = {}
    for bq, bk in candidates:
        def f(q, k, v, bq=bq, bk=bk):
            return ops.attention(q, k, v, mask=mask, impl="xla", block_q=bq, block_kv=bk)
        fwd = jax.jit(f)
        fb = jax.jit(jax.grad(lambda q, k, v, f=f: f(q, k, v).sum(), argnums=(0, 1, 2)))
        temp = fb.lower(q, k, v).compile().memory_analysis().temp_size_in_bytes
        _time(fwd, q, k, v), _time(fb, q, k, v)  # compile and warm up
        fns[(bq, bk)] = (fwd, fb, temp)
    a = jnp.ones((2048, 2048), jnp.float32)
    mm = jax.jit(lambda a: jnp.dot(a, a, precision=jax.lax.Precision.HIGHEST))
    _time(mm, a)
    best = {c: [float("inf"), float("inf")] for c in candidates}
    matmul = 0.0
    for _ in range(repeats):
        matmul = max(matmul, 2 * 2048 ** 3 / _time(mm, a))
        for c in candidates:
            fwd, fb, _ = fns[c]
            best[c][0] = min(best[c][0], _time(fwd, q, k, v))
            best[c][1] = min(best[c][1], _time(fb, q, k, v))
    useful = _registry.useful_flops("attention", q, k, v, mask=mask)
    chosen = xla_tiles.choose(mask, t, t, b * h)
    rows = []
    for c in candidates:
        f, fb = best[c]
        rows.append({"mask": mask_spec, "T": t, "block_q": c[0], "block_kv": c[1], "chosen": c == chosen,
                     "fwd_ms": f * 1e3, "fwd_bwd_ms": fb * 1e3, "fwd_of_matmul": useful / f / matmul,
                     "fwd_bwd_of_matmul": _registry.with_backward(useful) / fb / matmul,
                     "temp_mib_fwd_bwd": fns[c][2] / 2 ** 20, "matmul_gflops": matmul / 1e9,
                     "band_fill": xla_tiles.band_fill(mask, t, t, *c)})
        r = rows[-1]
        print(f"{mask_spec:12s} T={t:5d} {str(c):11s}{' *' if r['chosen'] else '  '} fwd {r['fwd_ms']:7.0f} ms "
              f"({r['fwd_of_matmul']:4.0%})  fwd+bwd {r['fwd_bwd_ms']:7.0f} ms ({r['fwd_bwd_of_matmul']:4.0%})  "
              f"temp {r['temp_mib_fwd_bwd']:5.1f} MiB  fill {r['band_fill']:.2f}", flush=True)
    return rows


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--lengths", type=int, nargs="+", default=[4096, 8192])
    p.add_argument("--masks", nargs="+", default=["causal", "window:1024"])
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--candidates", nargs="+", default=None, help="e.g. 128x128 512x256")
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)
    cands = CANDIDATES if not args.candidates else tuple(tuple(int(x) for x in c.split("x")) for c in args.candidates)
    rows = [r for m in args.masks for t in args.lengths for r in probe(m, t, cands, args.repeats)]
    if args.out:
        Path(args.out).write_text(json.dumps({"jax": jax.__version__, "rows": rows}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
