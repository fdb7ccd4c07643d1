"""Side-by-side timings of seqmix implementations (ratios in one run, not lone absolute times).

    python experiments/bench.py                       # softmax attention, several lengths
    python experiments/bench.py --lengths 1024 4096 --out results.json

For every length and mode (forward, forward+backward) each implementation is compiled once, run
``--repeats`` times after a warm-up, and reported as the median time, the ratio to the baseline
(``jax.nn.dot_product_attention``, XLA) and the compiled program's peak temporary memory
(``memory_analysis().temp_size_in_bytes``). Results go to JSON (and a log-log PNG with --plot).
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from pathlib import Path
from typing import Callable

import jax
import jax.numpy as jnp

from seqmix import ops
from seqmix.ops import masks as M


def _timed(fn: Callable, args, repeats: int) -> float:
    jax.block_until_ready(fn(*args))
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def attention_candidates(causal: bool) -> dict[str, Callable]:
    mask = M.Causal() if causal else None

    def seqmix_impl(name):
        return lambda q, k, v: ops.attention(q, k, v, mask=mask, impl=name)

    cands = {f"seqmix:{n}": seqmix_impl(n) for n in ops.get_family("attention").implementations}
    cands["jax.nn.dot_product_attention"] = lambda q, k, v: jax.nn.dot_product_attention(q, k, v, is_causal=causal)
    return cands


def bench_attention(lengths, batch, heads, kv_heads, head_dim, dtype, causal, repeats, max_reference_len):
    rows = []
    for t in lengths:
        key = jax.random.PRNGKey(t)
        kq, kk, kv = jax.random.split(key, 3)
        q = jax.random.normal(kq, (batch, t, heads, head_dim), dtype)
        k = jax.random.normal(kk, (batch, t, kv_heads, head_dim), dtype)
        v = jax.random.normal(kv, (batch, t, kv_heads, head_dim), dtype)
        for mode in ("fwd", "fwd+bwd"):
            base = None
            for name, f in attention_candidates(causal).items():
                if name == "seqmix:reference" and t > max_reference_len:
                    continue
                if name == "jax.nn.dot_product_attention" and kv_heads != heads and False:
                    continue
                g = f if mode == "fwd" else jax.grad(lambda q, k, v, f=f: f(q, k, v).astype(jnp.float32).sum(), argnums=(0, 1, 2))
                compiled = jax.jit(g).lower(q, k, v).compile()
                mem = compiled.memory_analysis()
                seconds = _timed(compiled, (q, k, v), repeats)
                row = dict(family="attention", impl=name, mode=mode, T=t, B=batch, H=heads, H_kv=kv_heads,
                           D=head_dim, dtype=jnp.dtype(dtype).name, causal=causal, seconds=seconds,
                           temp_bytes=int(getattr(mem, "temp_size_in_bytes", -1)))
                if name == "jax.nn.dot_product_attention":
                    base = seconds
                rows.append(row)
                print(f"  {name:34s} {mode:8s} T={t:6d} {seconds * 1e3:9.2f} ms  temp {row['temp_bytes'] / 2**20:8.1f} MiB",
                      flush=True)
            for row in rows:
                if row["T"] == t and row["mode"] == mode and base:
                    row["ratio_to_baseline"] = row["seconds"] / base
    return rows


def markdown_table(rows) -> str:
    lines = ["| impl | mode | T | ms | × jax.nn | temp MiB |", "|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['impl']} | {r['mode']} | {r['T']} | {r['seconds'] * 1e3:.2f} | "
                     f"{r.get('ratio_to_baseline', float('nan')):.2f} | {r['temp_bytes'] / 2**20:.1f} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--lengths", type=int, nargs="+", default=[512, 1024, 2048, 4096])
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--kv-heads", type=int, default=4)
    p.add_argument("--head-dim", type=int, default=64)
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    p.add_argument("--non-causal", action="store_true")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--max-reference-len", type=int, default=4096)
    p.add_argument("--out", default="bench_results.json")
    args = p.parse_args(argv)
    print(f"jax {jax.__version__} on {jax.default_backend()} ({jax.devices()[0].device_kind})", flush=True)
    rows = bench_attention(args.lengths, args.batch, args.heads, args.kv_heads, args.head_dim,
                           jnp.dtype(args.dtype), not args.non_causal, args.repeats, args.max_reference_len)
    result = dict(jax=jax.__version__, backend=jax.default_backend(), device=jax.devices()[0].device_kind,
                  python=platform.python_version(), argv=sys.argv[1:] if argv is None else argv, rows=rows)
    Path(args.out).write_text(json.dumps(result, indent=2))
    print(markdown_table(rows))
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
