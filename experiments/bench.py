"""Side-by-side timings of seqmix implementations (ratios in one run, not lone absolute times).

    python experiments/bench.py                       # softmax attention (causal), several lengths
    python experiments/bench.py --lengths 4096 8192 --mask window:1024 --out results.json
    python experiments/bench.py --suite recurrent --lengths 1024 2048 4096 8192 16384 32768 --plot scaling.png
    python experiments/bench.py --parallel            # sequence-parallel strategies (bench_parallel.py)

Suite ``attention``: the attention family's implementations that run natively here against
``jax.nn.dot_product_attention`` (``--mask causal``, ``full`` or ``window:W``, a causal window of W keys).
Suite ``recurrent``: every recurrent family's chunked ``xla`` form against its token-loop ``reference``
and against causal softmax attention (``xla``), forward and forward+backward.

Forward+backward is what a training step runs: the value and gradient of ``sum(o)`` (:func:`loss_and_grads`).
For every length and mode (forward, forward+backward) each implementation is compiled once; then the
group's candidates and the roofline matmuls are timed in turns (``--repeats`` rounds, each running every
candidate twice, untimed then timed, so a drift in the machine's speed hits them alike and each is timed with
warm caches), and each is reported as its median time, the ratio to the baseline
(``jax.nn.dot_product_attention``, XLA), the compiled program's temporary memory
(``memory_analysis().temp_size_in_bytes``) and the **roofline**: the useful FLOPs of the call (the family
record's ``flops`` formula, docs/FAMILIES.md §7: only allowed pairs count; the backward is 2× the
forward) per second, as a fraction of the platform's dense matmul throughput measured in the same run,
interleaved with the candidates: an ``N³`` matmul (``--matmul-size``) in fp32 (``HIGHEST`` precision,
as the ``xla`` forms use) and bf16, timed in turns with every (length, mode) group; a row's fraction uses
the measurement of its own group and dtype. Results go to JSON; ``--plot`` writes time and fraction of
matmul against T.
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


def _round_robin(runs, repeats: int) -> list[float]:
    """Median seconds of each ``(fn, args)`` in ``runs``, timed in turns: every round runs each candidate
    twice in a row, untimed then timed, ``repeats`` rounds. The turns make a drift in the machine's speed (up
    to 1.5× between runs on the 2-core CPU machines) hit every candidate alike, so the ratios hold when
    absolute times move; the untimed call refills the caches the other candidates evicted (a token-loop
    reference's fwd+bwd holds up to 850 MiB), so each is timed warm, as when run alone."""
    times = [[] for _ in runs]
    for _ in range(repeats):
        for i, (fn, args) in enumerate(runs):
            jax.block_until_ready(fn(*args))
            t0 = time.perf_counter()
            jax.block_until_ready(fn(*args))
            times[i].append(time.perf_counter() - t0)
    return [statistics.median(t) for t in times]


def _timed(fn: Callable, args, repeats: int) -> float:
    return _round_robin([(fn, args)], repeats)[0]


def matmul_runs(size: int) -> dict[str, tuple[Callable, tuple]]:
    """A compiled dense ``size³`` matmul and its operands per dtype: fp32 at HIGHEST precision (as the ``xla``
    forms use) and bf16 at default precision."""
    runs = {}
    for dtype, precision in ((jnp.float32, jax.lax.Precision.HIGHEST), (jnp.bfloat16, None)):
        a = jax.random.normal(jax.random.PRNGKey(0), (size, size), dtype)
        b = jax.random.normal(jax.random.PRNGKey(1), (size, size), dtype)
        f = jax.jit(lambda a, b, p=precision: jnp.dot(a, b, precision=p)).lower(a, b).compile()
        runs[jnp.dtype(dtype).name] = (f, (a, b))
    return runs


class Roofline:
    """The matmul measurements of one run: one per (length, mode) group, timed in turns with its candidates."""

    def __init__(self, size: int, repeats: int):
        self.size, self.repeats, self.samples, self.current = size, repeats, [], {}
        self._matmuls = None

    def time_group(self, runs) -> list[float]:
        """Median seconds of each ``(fn, args)``, timed round-robin with the matmuls, whose rates become the
        group's roofline."""
        if self._matmuls is None:
            self._matmuls = matmul_runs(self.size)
        secs = _round_robin(list(self._matmuls.values()) + list(runs), self.repeats)
        self.current = {name: 2.0 * self.size ** 3 / s for name, s in zip(self._matmuls, secs)}
        self.samples.append(self.current)
        print("  matmul " + ", ".join(f"{k} {v / 1e9:7.1f} GFLOP/s" for k, v in self.current.items()), flush=True)
        return secs[len(self._matmuls):]

    def measure(self) -> None:
        """The matmul rates alone (for a group whose candidates are timed separately)."""
        self.time_group([])

    def annotate(self, row: dict, flops: float) -> dict:
        rate = self.current[row["dtype"]]
        row.update(useful_flops=flops, useful_flops_per_s=flops / row["seconds"], matmul_flops_per_s=rate,
                   fraction_of_matmul=flops / row["seconds"] / rate)
        return row

    def summary(self) -> dict:
        out = {"size": self.size}
        for dtype in (self.samples[0] if self.samples else {}):
            vals = [s[dtype] for s in self.samples]
            out[dtype] = {"median": statistics.median(vals), "min": min(vals), "max": max(vals), "n": len(vals)}
        return out


def parse_mask(text: str):
    """``causal`` | ``full`` | ``window:W`` (a causal window of W keys) -> a mask (None for full)."""
    if text == "causal":
        return M.Causal()
    if text == "full":
        return None
    if text.startswith("window:") and text[7:].isdigit():
        return M.LocalWindow(int(text[7:]))
    raise argparse.ArgumentTypeError(f"--mask must be causal, full or window:W; got {text!r}")


def _reference_baseline(mask):
    """``jax.nn.dot_product_attention`` with the same mask (a causal window through local_window_size)."""
    if mask is None:
        return lambda q, k, v: jax.nn.dot_product_attention(q, k, v)
    left = mask.left
    window = None if left is None else (left, 0)
    return lambda q, k, v: jax.nn.dot_product_attention(q, k, v, is_causal=True, local_window_size=window)


def attention_candidates(mask, block=None) -> dict[str, Callable]:
    blocks = {} if block is None else {"block_q": block, "block_kv": block}

    def seqmix_impl(name):
        return lambda q, k, v: ops.attention(q, k, v, mask=mask, impl=name, **blocks)

    platform = jax.default_backend()  # time only what runs natively here (interpret mode is for numerics)
    cands = {f"seqmix:{n}": seqmix_impl(n) for n, impl in ops.get_family("attention").implementations.items()
             if impl.backend in (None, platform) and (platform != "cpu" or "cpu" in impl.evidence)}
    cands["jax.nn.dot_product_attention"] = _reference_baseline(mask)
    return cands


BASELINE = "jax.nn.dot_product_attention"


def bench_attention(lengths, batch, heads, kv_heads, head_dim, dtype, mask, max_reference_len, roofline, block=None):
    rows = []
    for t in lengths:
        kq, kk, kv = jax.random.split(jax.random.PRNGKey(t), 3)
        q = jax.random.normal(kq, (batch, t, heads, head_dim), dtype)
        k = jax.random.normal(kk, (batch, t, kv_heads, head_dim), dtype)
        v = jax.random.normal(kv, (batch, t, kv_heads, head_dim), dtype)
        flops = ops.useful_flops("attention", q, k, v, mask=mask)
        for mode in ("fwd", "fwd+bwd"):
            group = [_compile(f, (q, k, v), "attention", name, mode, t, dtype, flops)
                     for name, f in attention_candidates(mask, block).items()
                     if not (name == "seqmix:reference" and t > max_reference_len)]
            group = [row | dict(H_kv=kv_heads, mask=_mask_name(mask), block=block)
                     for row in _time_group(group, roofline)]
            base = next((r["seconds"] for r in group if r["impl"] == BASELINE), None)
            for row in group:
                if base:
                    row["ratio_to_baseline"] = row["seconds"] / base
            rows += group
    return rows


def _mask_name(mask) -> str:
    if mask is None:
        return "full"
    return "causal" if mask.left is None else f"window:{mask.left + 1}"


def recurrent_inputs(family: str, b: int, t: int, h: int, d: int, dtype):
    """The family record's inputs (typical gates, no initial state): (positional args, keyword arguments)."""
    fam = ops.get_family(family)
    inputs = fam.make_inputs(fam, jax.random.PRNGKey(t), batch=b, seq=t, heads=h, dk=d, dv=d, dtype=dtype,
                             initial_state=False)
    return inputs.args, {**inputs.arrays, **inputs.options}


RECURRENT = tuple(n for n in sorted(ops.FAMILIES) if ops.FAMILIES[n].kind == "recurrent")


def bench_recurrent(lengths, batch, heads, head_dim, dtype, max_reference_len, max_softmax_len, roofline,
                    families=RECURRENT):
    rows = []
    for t in lengths:
        for mode in ("fwd", "fwd+bwd"):
            group = []
            for family in families:
                if family not in ops.FAMILIES:
                    continue
                op = ops.get_family(family).op
                args, kwargs = recurrent_inputs(family, batch, t, heads, head_dim, dtype)
                flops = ops.useful_flops(family, *args, **kwargs)
                for impl in ("xla", "reference"):
                    if impl == "reference" and t > max_reference_len:
                        continue
                    f = lambda *a, impl=impl: op(*a, impl=impl, **kwargs)  # noqa: E731
                    group.append(_compile(f, args, family, f"seqmix:{impl}", mode, t, dtype, flops))
            if t <= max_softmax_len:
                q, k, v = recurrent_inputs("linear_attention", batch, t, heads, head_dim, dtype)[0]
                f = lambda q, k, v: ops.attention(q, k, v, mask=M.Causal(), impl="xla")  # noqa: E731
                flops = ops.useful_flops("attention", q, k, v, mask=M.Causal())
                group.append(_compile(f, (q, k, v), "attention", "seqmix:xla", mode, t, dtype, flops))
            rows += _time_group(group, roofline)
    return rows


def loss_and_grads(f, n: int):
    """``value_and_grad`` of ``sum(f(*a))`` in its first ``n`` arguments: what a training step runs, the
    "fwd+bwd" of every benchmark here. ``jax.grad`` alone lets XLA drop the forward's output wherever the
    backward does not read it, as in the chunked recurrent forms, which then timed a backward without most
    of their forward (simple_gla at T = 8192: 2.97 of the 3.77 GFLOP of dots)."""
    return jax.value_and_grad(lambda *a: f(*a).astype(jnp.float32).sum(), argnums=tuple(range(n)))


def _compile(f, args, family, name, mode, t, dtype, forward_flops):
    """Compile ``f`` (or :func:`loss_and_grads` in every array argument): (its row without timings,
    (compiled, args), its useful FLOPs)."""
    n = 3 if family == "attention" else len(args)
    g = f if mode == "fwd" else loss_and_grads(f, n)
    compiled = jax.jit(g).lower(*args).compile()
    mem = compiled.memory_analysis()
    b, _, h, d = args[0].shape
    row = dict(family=family, impl=name, mode=mode, T=t, B=b, H=h, D=d, dtype=jnp.dtype(dtype).name,
               temp_bytes=int(getattr(mem, "temp_size_in_bytes", -1)))
    flops = ops.with_backward(forward_flops) if mode == "fwd+bwd" else forward_flops
    return row, (compiled, args), flops


def _time_group(group, roofline) -> list[dict]:
    """Time one (length, mode) group's compiled candidates in turns with the roofline matmuls; their rows."""
    rows = []
    for (row, _, flops), seconds in zip(group, roofline.time_group([run for _, run, _ in group])):
        row = roofline.annotate(row | dict(seconds=seconds), flops)
        print(f"  {row['family']:18s} {row['impl']:30s} {row['mode']:8s} T={row['T']:6d} {seconds * 1e3:10.2f} ms  "
              f"{row['useful_flops_per_s'] / 1e9:7.1f} GFLOP/s = {row['fraction_of_matmul']:5.1%} of matmul  "
              f"temp {row['temp_bytes'] / 2**20:8.1f} MiB", flush=True)
        rows.append(row)
    return rows


def _series(rows):
    return sorted({(r["family"], r["impl"], r["mode"]) for r in rows})


def scaling_table(rows) -> str:
    """Time (and fraction of matmul) by family/impl/mode across T, and the slope of log time vs log T."""
    import math

    lengths = sorted({r["T"] for r in rows})
    lines = ["| family | impl | mode | " + " | ".join(f"T={t}" for t in lengths) + " | slope |",
             "|---|---|---|" + "---|" * (len(lengths) + 1)]
    for key in _series(rows):
        pts = {r["T"]: r for r in rows if (r["family"], r["impl"], r["mode"]) == key}
        cells = [f"{pts[t]['seconds'] * 1e3:.1f} ms ({pts[t]['fraction_of_matmul']:.0%})" if t in pts else "-"
                 for t in lengths]
        ts = sorted(pts)
        slope = (math.log(pts[ts[-1]]["seconds"] / pts[ts[0]]["seconds"]) / math.log(ts[-1] / ts[0])
                 if len(ts) > 1 else float("nan"))
        lines.append(f"| {key[0]} | {key[1]} | {key[2]} | " + " | ".join(cells) + f" | {slope:.2f} |")
    return "\n".join(lines)


def plot_scaling(rows, path: str) -> None:
    """Time (top) and fraction of matmul (bottom) against T, forward and forward+backward."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, 2, figsize=(13, 9), sharex=True)
    for col, mode in enumerate(("fwd", "fwd+bwd")):
        for fam, impl, m in _series(rows):
            if m != mode:
                continue
            pts = sorted((r["T"], r["seconds"], r["fraction_of_matmul"]) for r in rows
                         if (r["family"], r["impl"], r["mode"]) == (fam, impl, mode))
            style = "--" if impl.endswith("reference") else ("-." if fam == "attention" else "-")
            label = f"{fam} ({impl.split(':')[-1]})"
            axes[0, col].loglog([p[0] for p in pts], [p[1] for p in pts], style, marker="o", label=label)
            axes[1, col].semilogx([p[0] for p in pts], [p[2] for p in pts], style, marker="o", label=label)
        axes[0, col].set_title(f"{mode} on {jax.default_backend()}")
        axes[1, col].set_xlabel("sequence length T")
        axes[1, col].axhline(1.0, color="k", lw=0.8)
        for ax in axes[:, col]:
            ax.grid(True, which="both", alpha=0.3)
    axes[0, 0].set_ylabel("seconds")
    axes[1, 0].set_ylabel("useful FLOP/s ÷ matmul FLOP/s (same run)")
    axes[0, 1].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    print(f"wrote {path}")


def markdown_table(rows) -> str:
    lines = ["| impl | mode | T | ms | × jax.nn | useful GFLOP/s | of matmul | temp MiB |",
             "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['impl']} | {r['mode']} | {r['T']} | {r['seconds'] * 1e3:.2f} | "
                     f"{r.get('ratio_to_baseline', float('nan')):.2f} | {r['useful_flops_per_s'] / 1e9:.1f} | "
                     f"{r['fraction_of_matmul']:.0%} | {r['temp_bytes'] / 2**20:.1f} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--lengths", type=int, nargs="+", default=[512, 1024, 2048, 4096])
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--kv-heads", type=int, default=4)
    p.add_argument("--head-dim", type=int, default=64)
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    p.add_argument("--mask", type=parse_mask, default=M.Causal(), help="causal | full | window:W (attention suite)")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--max-reference-len", type=int, default=4096)
    p.add_argument("--max-softmax-len", type=int, default=16384, help="recurrent suite: longest softmax baseline")
    p.add_argument("--suite", choices=["attention", "recurrent"], default="attention")
    p.add_argument("--families", nargs="+", default=list(RECURRENT), help="recurrent suite: families to run")
    p.add_argument("--parallel", action="store_true", help="run experiments/bench_parallel.py instead")
    p.add_argument("--block", type=int, default=None, help="attention suite: block_q = block_kv of seqmix's forms")
    p.add_argument("--matmul-size", type=int, default=None,
                   help="N of the N³ roofline matmul (default 2048 on CPU, 8192 on accelerators)")
    p.add_argument("--plot", default=None, help="write a PNG of time and fraction of matmul vs T")
    p.add_argument("--out", default="bench_results.json")
    args, rest = p.parse_known_args(argv)
    if args.parallel:
        import runpy

        # every argument but --parallel goes to bench_parallel.py (options both scripts share, --out among
        # them, would otherwise stay with this parser)
        forwarded = [a for a in (sys.argv[1:] if argv is None else argv) if a != "--parallel"]
        sys.argv = [str(Path(__file__).with_name("bench_parallel.py"))] + forwarded
        runpy.run_path(sys.argv[0], run_name="__main__")
        return 0
    if rest:
        p.error(f"unrecognized arguments: {' '.join(rest)}")
    print(f"jax {jax.__version__} on {jax.default_backend()} ({jax.devices()[0].device_kind})", flush=True)
    size = args.matmul_size or (2048 if jax.default_backend() == "cpu" else 8192)
    roofline = Roofline(size, args.repeats)
    if args.suite == "attention":
        rows = bench_attention(args.lengths, args.batch, args.heads, args.kv_heads, args.head_dim,
                               jnp.dtype(args.dtype), args.mask, args.max_reference_len, roofline,
                               args.block)
    else:
        rows = bench_recurrent(args.lengths, args.batch, args.heads, args.head_dim, jnp.dtype(args.dtype),
                               args.max_reference_len, args.max_softmax_len, roofline,
                               tuple(args.families))
    result = dict(jax=jax.__version__, backend=jax.default_backend(), device=jax.devices()[0].device_kind,
                  python=platform.python_version(), argv=sys.argv[1:] if argv is None else argv,
                  matmul=roofline.summary(), rows=rows)
    Path(args.out).write_text(json.dumps(result, indent=2))
    print(markdown_table(rows) if args.suite == "attention" else scaling_table(rows))
    if args.plot:
        plot_scaling(rows, args.plot)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
