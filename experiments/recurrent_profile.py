"""Where a chunked recurrent form spends its time on this platform: `simple_gla` (`xla`) forward against
its parts, and the rate of the batched chunk-sized matmuls against one large matmul, in one run.

The parts are the chunked form's own operations on its own layout (``[Z = B·H, N, C, D]`` fp32): the
intra-chunk scores ``Q Kᵀ`` and their decay ``Γ = exp(G_i − G_j)`` (masked), ``P V``, the chunk summaries
``(K ⊙ w)ᵀ V``, the inter-chunk term ``(Q ⊙ w) S`` and the sequential state scan ``S ← a S + ΔS``. Each is
timed alone (compiled, median of ``--repeats`` interleaved calls), so their sum next to the whole op shows
what fusion and the remaining elementwise work add. Then the batched ``[Z, N, C, C] × [Z, N, C, D]``
product at C = 64, 128, 256 and a 2048³ matmul give the rate a chunk-sized matmul reaches here.

    python experiments/recurrent_profile.py [--seq 8192] [--out docs/bench/recurrent_profile_cpu.json]
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from seqmix import ops  # noqa: E402

HI = jax.lax.Precision.HIGHEST


def _time_all(named, repeats: int) -> dict[str, float]:
    """Median seconds of each ``(name, fn, args)``, compiled first, calls interleaved."""
    compiled = [(n, jax.jit(f).lower(*a).compile(), a) for n, f, a in named]
    for _, c, a in compiled:
        jax.block_until_ready(c(*a))
    times = {n: [] for n, _, _ in compiled}
    for _ in range(repeats):
        for n, c, a in compiled:
            t0 = time.perf_counter()
            jax.block_until_ready(c(*a))
            times[n].append(time.perf_counter() - t0)
    return {n: float(np.median(t)) for n, t in times.items()}


def parts(b: int, t: int, h: int, d: int, c: int):
    """(name, fn, args, flops) for the whole op and each part."""
    ks = jax.random.split(jax.random.PRNGKey(0), 5)
    q, k, v = (jax.random.normal(ks[i], (b, t, h, d), jnp.float32) for i in range(3))
    g = jax.nn.log_sigmoid(jax.random.normal(ks[3], (b, t, h)) + 3.0)
    z, n = b * h, t // c
    chunked = lambda x: jnp.moveaxis(x.reshape(b, n, c, h, -1), 3, 1).reshape(z, n, c, -1)  # noqa: E731
    qc, kc, vc = chunked(q), chunked(k), chunked(v)
    big_g = jnp.cumsum(chunked(g[..., None])[..., 0], axis=-1)
    ok = jnp.arange(c)[:, None] >= jnp.arange(c)[None, :]
    p = jnp.einsum("znid,znjd->znij", qc, kc)
    s = jax.random.normal(ks[4], (z, n, d, d), jnp.float32)
    mm = 2 * z * n * c * c * d

    def scan(ds, a):
        def body(carry, x):
            return x[1][..., None, None] * carry + x[0], carry
        return jax.lax.scan(body, jnp.zeros((z, d, d)), (jnp.moveaxis(ds, 1, 0), jnp.moveaxis(a, 1, 0)))

    return [
        ("simple_gla (whole op, fwd)", lambda q, k, v, g: ops.simple_gla(q, k, v, g, impl="xla"), (q, k, v, g), None),
        ("Q Kᵀ", lambda a, b_: jnp.einsum("znid,znjd->znij", a, b_, precision=HI), (qc, kc), mm),
        ("Γ = exp(G_i − G_j), masked", lambda x: jnp.exp(jnp.where(ok, x[..., :, None] - x[..., None, :], -jnp.inf)),
         (big_g,), None),
        ("P V", lambda a, b_: jnp.einsum("znij,znje->znie", a, b_, precision=HI), (p, vc), mm),
        ("(K ⊙ w)ᵀ V (chunk summaries)", lambda a, b_: jnp.einsum("zncd,znce->znde", a, b_, precision=HI), (kc, vc),
         2 * z * n * c * d * d),
        ("(Q ⊙ w) S (inter-chunk)", lambda a, b_: jnp.einsum("zncd,znde->znce", a, b_, precision=HI), (qc, s),
         2 * z * n * c * d * d),
        ("state scan S ← a S + ΔS", scan, (s, big_g[..., -1]), None),
    ]


def matmul_rates(z: int, t: int, d: int):
    out = []
    for c in (64, 128, 256):
        n = t // c
        a = jax.random.normal(jax.random.PRNGKey(c), (z, n, c, c), jnp.float32)
        b = jax.random.normal(jax.random.PRNGKey(c + 1), (z, n, c, d), jnp.float32)
        out.append((f"batched [{z},{n},{c},{c}]×[{z},{n},{c},{d}]",
                    lambda x, y: jnp.einsum("znij,znje->znie", x, y, precision=HI), (a, b), 2 * z * n * c * c * d))
    big = jax.random.normal(jax.random.PRNGKey(0), (2048, 2048), jnp.float32)
    out.append(("matmul 2048³", lambda x, y: jnp.dot(x, y, precision=HI), (big, big), 2 * 2048 ** 3))
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--seq", type=int, default=8192)
    ap.add_argument("--heads", type=int, default=4)
    ap.add_argument("--head-dim", type=int, default=64)
    ap.add_argument("--chunk", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=15)
    ap.add_argument("--out", default=None, help="write the JSON here")
    args = ap.parse_args(argv)
    rows = parts(args.batch, args.seq, args.heads, args.head_dim, args.chunk)
    rows += matmul_rates(args.batch * args.heads, args.seq, args.head_dim)
    secs = _time_all([(n, f, a) for n, f, a, _ in rows], args.repeats)
    peak = rows[-1][3] / secs[rows[-1][0]]
    table = []
    for name, _, _, flops in rows:
        rate = None if flops is None else flops / secs[name]
        table.append({"part": name, "ms": secs[name] * 1e3, "gflop_per_s": None if rate is None else rate / 1e9,
                      "fraction_of_matmul": None if rate is None else rate / peak})
    print(f"{'part':44s} {'ms':>8s} {'GFLOP/s':>8s} {'of matmul':>9s}")
    for r in table:
        rate = "-" if r["gflop_per_s"] is None else f"{r['gflop_per_s']:.1f}"
        frac = "-" if r["fraction_of_matmul"] is None else f"{r['fraction_of_matmul']:.0%}"
        print(f"{r['part']:44s} {r['ms']:8.2f} {rate:>8s} {frac:>9s}")
    if args.out:
        meta = {"jax": jax.__version__, "backend": jax.default_backend(), "python": platform.python_version(),
                "argv": sys.argv[1:], "rows": table}
        Path(args.out).write_text(json.dumps(meta, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
