"""Side-by-side timings of seqmix implementations (ratios in one run, not lone absolute times).

    python experiments/bench.py                       # softmax attention, several lengths
    python experiments/bench.py --lengths 1024 4096 --out results.json
    python experiments/bench.py --suite recurrent --lengths 1024 2048 4096 8192 16384 32768 --plot scaling.png
    python experiments/bench.py --parallel            # sequence-parallel strategies (bench_parallel.py)

Suite ``recurrent``: every recurrent family's chunked ``xla`` form against its token-loop
``reference`` and against causal softmax attention (``xla``), forward and forward+backward, to show
that the chunked forms scale linearly in T. The PNG is a log-log plot of time against T.

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

    platform = jax.default_backend()  # time only what runs natively here (interpret mode is for numerics)
    cands = {f"seqmix:{n}": seqmix_impl(n) for n, impl in ops.get_family("attention").implementations.items()
             if impl.backend in (None, platform) and (platform != "cpu" or "cpu" in impl.evidence)}
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


def recurrent_inputs(family: str, b: int, t: int, h: int, d: int, dtype):
    """The family record's inputs (typical gates, no initial state): (positional args, keyword arguments)."""
    fam = ops.get_family(family)
    inputs = fam.make_inputs(fam, jax.random.PRNGKey(t), batch=b, seq=t, heads=h, dk=d, dv=d, dtype=dtype,
                             initial_state=False)
    return inputs.args, {**inputs.arrays, **inputs.options}


RECURRENT = tuple(n for n in sorted(ops.FAMILIES) if ops.FAMILIES[n].kind == "recurrent")


def bench_recurrent(lengths, batch, heads, head_dim, dtype, repeats, max_reference_len, max_softmax_len,
                    families=RECURRENT):
    rows = []
    for t in lengths:
        for family in families:
            if family not in ops.FAMILIES:
                continue
            op = ops.get_family(family).op
            args, kwargs = recurrent_inputs(family, batch, t, heads, head_dim, dtype)
            for impl in ("xla", "reference"):
                if impl == "reference" and t > max_reference_len:
                    continue
                f = lambda *a, impl=impl: op(*a, impl=impl, **kwargs)  # noqa: E731
                rows += _measure(f, args, family, f"seqmix:{impl}", t, batch, heads, head_dim, dtype, repeats)
        if t <= max_softmax_len:
            q, k, v = recurrent_inputs("linear_attention", batch, t, heads, head_dim, dtype)[0]
            f = lambda q, k, v: ops.attention(q, k, v, mask=M.Causal(), impl="xla")  # noqa: E731
            rows += _measure(f, (q, k, v), "attention", "seqmix:xla", t, batch, heads, head_dim, dtype, repeats)
    return rows


def _measure(f, args, family, name, t, batch, heads, head_dim, dtype, repeats):
    rows = []
    for mode in ("fwd", "fwd+bwd"):
        n = len(args) if family != "attention" else 3
        g = f if mode == "fwd" else jax.grad(lambda *a: f(*a).astype(jnp.float32).sum(), argnums=tuple(range(n)))
        compiled = jax.jit(g).lower(*args).compile()
        mem = compiled.memory_analysis()
        seconds = _timed(compiled, args, repeats)
        row = dict(family=family, impl=name, mode=mode, T=t, B=batch, H=heads, D=head_dim,
                   dtype=jnp.dtype(dtype).name, seconds=seconds, temp_bytes=int(getattr(mem, "temp_size_in_bytes", -1)))
        rows.append(row)
        print(f"  {family:18s} {name:16s} {mode:8s} T={t:6d} {seconds * 1e3:10.2f} ms  temp {row['temp_bytes'] / 2**20:8.1f} MiB",
              flush=True)
    return rows


def scaling_table(rows) -> str:
    """Time per token (µs) by family/impl/mode across T, and the slope of log time vs log T."""
    import math

    lengths = sorted({r["T"] for r in rows})
    keys = sorted({(r["family"], r["impl"], r["mode"]) for r in rows})
    lines = ["| family | impl | mode | " + " | ".join(f"T={t}" for t in lengths) + " | slope |",
             "|---|---|---|" + "---|" * (len(lengths) + 1)]
    for key in keys:
        pts = {r["T"]: r["seconds"] for r in rows if (r["family"], r["impl"], r["mode"]) == key}
        cells = [f"{pts[t] * 1e3:.1f} ms" if t in pts else "-" for t in lengths]
        ts = sorted(pts)
        slope = (math.log(pts[ts[-1]] / pts[ts[0]]) / math.log(ts[-1] / ts[0])) if len(ts) > 1 else float("nan")
        lines.append(f"| {key[0]} | {key[1]} | {key[2]} | " + " | ".join(cells) + f" | {slope:.2f} |")
    return "\n".join(lines)


def plot_scaling(rows, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(13, 5), sharey=True)
    for ax, mode in zip(axes, ("fwd", "fwd+bwd")):
        keys = sorted({(r["family"], r["impl"]) for r in rows if r["mode"] == mode})
        for fam, impl in keys:
            pts = sorted((r["T"], r["seconds"]) for r in rows if (r["family"], r["impl"], r["mode"]) == (fam, impl, mode))
            style = "--" if impl.endswith("reference") else ("-." if fam == "attention" else "-")
            ax.loglog([p[0] for p in pts], [p[1] for p in pts], style, marker="o", label=f"{fam} ({impl.split(':')[-1]})")
        ax.set_title(f"{mode} on {jax.default_backend()}")
        ax.set_xlabel("sequence length T")
        ax.grid(True, which="both", alpha=0.3)
    axes[0].set_ylabel("seconds")
    axes[1].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    print(f"wrote {path}")


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
    p.add_argument("--max-softmax-len", type=int, default=16384, help="recurrent suite: longest softmax baseline")
    p.add_argument("--suite", choices=["attention", "recurrent"], default="attention")
    p.add_argument("--families", nargs="+", default=list(RECURRENT), help="recurrent suite: families to run")
    p.add_argument("--parallel", action="store_true", help="run experiments/bench_parallel.py instead")
    p.add_argument("--plot", default=None, help="write a log-log PNG of time vs T")
    p.add_argument("--out", default="bench_results.json")
    args, rest = p.parse_known_args(argv)
    if args.parallel:
        import runpy

        sys.argv = [str(Path(__file__).with_name("bench_parallel.py"))] + rest
        runpy.run_path(sys.argv[0], run_name="__main__")
        return 0
    if rest:
        p.error(f"unrecognized arguments: {' '.join(rest)}")
    print(f"jax {jax.__version__} on {jax.default_backend()} ({jax.devices()[0].device_kind})", flush=True)
    if args.suite == "attention":
        rows = bench_attention(args.lengths, args.batch, args.heads, args.kv_heads, args.head_dim,
                               jnp.dtype(args.dtype), not args.non_causal, args.repeats, args.max_reference_len)
    else:
        rows = bench_recurrent(args.lengths, args.batch, args.heads, args.head_dim, jnp.dtype(args.dtype),
                               args.repeats, args.max_reference_len, args.max_softmax_len, tuple(args.families))
    result = dict(jax=jax.__version__, backend=jax.default_backend(), device=jax.devices()[0].device_kind,
                  python=platform.python_version(), argv=sys.argv[1:] if argv is None else argv, rows=rows)
    Path(args.out).write_text(json.dumps(result, indent=2))
    print(markdown_table(rows) if args.suite == "attention" else scaling_table(rows))
    if args.plot:
        plot_scaling(rows, args.plot)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
