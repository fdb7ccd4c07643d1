"""Sequence-parallel strategies side by side: bytes each device sends per layer, and time.

    python experiments/bench_parallel.py                       # 8 forced CPU devices, N = 2048
    python experiments/bench_parallel.py --seq 4096 --devices 4 --out bench_parallel.json
    python experiments/bench.py --parallel [args]              # same, through the main bench script

For every strategy (ring with contiguous / zigzag / striped layouts, Ulysses, all-gather KV for causal
softmax attention; LASP-1 and LASP-2 for recurrent families) the layer is compiled once under
``jax.shard_map`` over a ``("seq",)`` mesh, forward and forward+backward. From each compiled program's
HLO the script counts the collectives (loop bodies × trip counts) and the bytes each device sends
(:mod:`seqmix.parallel.hlo`), and prints them beside the FAMILIES.md §4.9 formula and the median wall
time of ``--repeats`` runs. Load-balancing permutations are applied to the inputs beforehand (they are
a one-time cost of the input pipeline, not of a layer).

Caveats: on CPU, XLA upcasts bf16 collectives to fp32, so use ``--dtype float32`` (the default) to
compare with the formula; CPU "devices" share the host's cores, so times show overheads and the
serial structure of a strategy, not interconnect speed. Results go to JSON (``--out``).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path


sys.path.insert(0, str(Path(__file__).resolve().parent))  # for `from bench import _timed`


def _force_devices(n: int) -> None:
    flag = f"--xla_force_host_platform_device_count={n}"
    flags = os.environ.get("XLA_FLAGS", "")
    if "xla_force_host_platform_device_count" not in flags:
        os.environ["XLA_FLAGS"] = (flags + " " + flag).strip()


def _timed(fn, args, repeats: int) -> float:
    from bench import _timed as timed  # lazily: XLA_FLAGS must be set before jax is imported

    return timed(fn, args, repeats)


def softmax_layers(mesh, args):
    """name -> (fn(q, k, v), inputs, formula bytes fwd) for the softmax strategies."""
    import jax
    import jax.numpy as jnp
    from jax.sharding import PartitionSpec as PS

    import seqmix.parallel as sp
    from seqmix.ops import masks as M

    p = mesh.shape["seq"]
    b, n, hq, hkv, d = args.batch, args.seq, args.heads, args.kv_heads, args.head_dim
    dtype = jnp.dtype(args.dtype)
    key = jax.random.split(jax.random.PRNGKey(0), 3)
    q = jax.random.normal(key[0], (b, n, hq, d), jnp.float32).astype(dtype)
    k = jax.random.normal(key[1], (b, n, hkv, d), jnp.float32).astype(dtype)
    v = jax.random.normal(key[2], (b, n, hkv, d), jnp.float32).astype(dtype)
    nbytes = dtype.itemsize
    kv_formula = 2 * b * n * hkv * d * (p - 1) / p * nbytes
    ulysses_formula = b * (n / p) * (2 * hq + 2 * hkv) * d * (p - 1) / p * nbytes
    out = {}
    for strategy, layout in (("ring", None), ("ring", "zigzag"), ("ring", "striped"), ("ulysses", None),
                             ("allgather", None)):
        if strategy == "ulysses" and (hq % p or hkv % p):
            continue
        perm = sp.layout.permutation(layout, n, p)
        qp, kp, vp = (sp.permute(x, perm) for x in (q, k, v))
        pos = jnp.asarray(perm)
        fn = sp.SOFTMAX_STRATEGIES[strategy]

        def local(q, k, v, pos, fn=fn):
            return fn(q, k, v, axis_name="seq", mask=M.Causal(), q_positions=pos, kv_positions=pos)

        spec = PS(None, "seq")
        layer = jax.shard_map(local, mesh=mesh, in_specs=(spec, spec, spec, PS("seq")), out_specs=spec,
                              check_vma=False)
        name = strategy if layout is None else f"{strategy}+{layout}"
        out[name] = (layer, (qp, kp, vp, pos), ulysses_formula if strategy == "ulysses" else kv_formula)
    return out


def recurrent_layers(mesh, args):
    import jax
    import jax.numpy as jnp
    from jax.sharding import PartitionSpec as PS

    import seqmix.parallel as sp
    from seqmix.ops import _registry

    p = mesh.shape["seq"]
    b, n, h, d = args.batch, args.seq, args.heads, args.head_dim
    out = {}
    for family in args.families:
        fam = _registry.get_family(family)
        inputs = fam.make_inputs(fam, jax.random.PRNGKey(1), batch=b, seq=n, heads=h, dk=d, dv=d, initial_state=False)
        q, k, v = inputs.args[:3]
        fargs = inputs.args[3:]
        kwargs = {**inputs.arrays, **inputs.options}
        # summary bytes from the record's own summary (FAMILIES.md §4.9): S_ext plus the transition
        call = fam.prepare(*inputs.args, **kwargs)
        def summary_arrays(c=call, fam=fam):  # a Summary is not a pytree: return its arrays
            s = fam.sp_summary(c, lambda cc: fam.run("xla", cc))
            return s.transition, s.s_ext

        transition, s_ext = jax.eval_shape(summary_arrays)
        state = s_ext.size * 4
        trans = transition.size * 4
        for strategy in ("lasp2", "lasp1"):
            fn = sp.RECURRENT_STRATEGIES[strategy]

            def local(q, k, v, *fa, fn=fn, family=family, kwargs=kwargs):
                return fn(family, q, k, v, *fa, axis_name="seq", **kwargs)

            spec = PS(None, "seq")
            layer = jax.shard_map(local, mesh=mesh, in_specs=(spec,) * (3 + len(fargs)), out_specs=spec,
                                  check_vma=False)
            formula = (p - 1) * (state + trans) if strategy == "lasp2" else (p - 1) / p * state
            out[f"{strategy}:{family}"] = (layer, (q, k, v) + tuple(fargs), formula)
    return out


def run(args) -> dict:
    _force_devices(args.devices)
    import jax
    import jax.numpy as jnp

    import seqmix.parallel as sp
    from seqmix.parallel.hlo import collective_stats

    devices = jax.devices()[: args.devices]
    if len(devices) < args.devices:
        raise SystemExit(f"need {args.devices} devices, have {len(jax.devices())}")
    mesh = sp.make_mesh({"seq": args.devices}, devices=devices)
    layers = {}
    if args.suite in ("all", "softmax"):
        layers.update(softmax_layers(mesh, args))
    if args.suite in ("all", "recurrent"):
        layers.update(recurrent_layers(mesh, args))
    rows = []
    for name, (layer, inputs, formula) in layers.items():
        floats = [jnp.issubdtype(x.dtype, jnp.floating) for x in inputs]

        def fwd_bwd(*xs, layer=layer):
            def f(*fl):  # differentiate w.r.t. the float inputs only (positions are int)
                it = iter(fl)
                return layer(*(next(it) if is_f else x for x, is_f in zip(xs, floats)))
            o, vjp = jax.vjp(f, *(x for x, is_f in zip(xs, floats) if is_f))
            return o, vjp(o)  # cotangent = o: no extra collective for a loss reduction

        fwd = jax.jit(layer).lower(*inputs).compile()
        both = jax.jit(fwd_bwd).lower(*inputs).compile()
        s_fwd, s_both = collective_stats(fwd, args.devices), collective_stats(both, args.devices)
        row = dict(strategy=name, formula_fwd_bytes=formula,
                   fwd_bytes=s_fwd.total_bytes, fwd_collectives=s_fwd.count,
                   fwd_bwd_bytes=s_both.total_bytes, fwd_bwd_collectives=s_both.count,
                   fwd_ms=_timed(fwd, inputs, args.repeats) * 1e3,
                   fwd_bwd_ms=_timed(both, inputs, args.repeats) * 1e3)
        rows.append(row)
        print(f"  {name}: fwd {row['fwd_bytes'] / 1024:.1f} KiB, {row['fwd_ms']:.1f} ms", flush=True)
    return dict(jax=jax.__version__, backend=jax.default_backend(), device=str(devices[0].device_kind),
                devices=args.devices, python=platform.python_version(), shape=dict(
                    batch=args.batch, seq=args.seq, heads=args.heads, kv_heads=args.kv_heads,
                    head_dim=args.head_dim, dtype=args.dtype), rows=rows)


def _collectives(counts: dict) -> str:
    short = {"collective-permute": "permute", "all-gather": "all-gather", "all-to-all": "all-to-all",
             "reduce-scatter": "reduce-scatter", "all-reduce": "all-reduce"}
    return ", ".join(f"{v}× {short.get(k, k)}" for k, v in sorted(counts.items())) or "-"


def markdown_table(result: dict) -> str:
    kib = lambda x: f"{x / 1024:.1f}"  # noqa: E731
    lines = ["| strategy | fwd KiB sent / device (HLO) | §4.9 formula KiB | fwd collectives | fwd+bwd KiB "
             "| fwd+bwd collectives | fwd ms | fwd+bwd ms |", "|---|---|---|---|---|---|---|---|"]
    for r in result["rows"]:
        lines.append(f"| {r['strategy']} | {kib(r['fwd_bytes'])} | {kib(r['formula_fwd_bytes'])} | "
                     f"{_collectives(r['fwd_collectives'])} | {kib(r['fwd_bwd_bytes'])} | "
                     f"{_collectives(r['fwd_bwd_collectives'])} | {r['fwd_ms']:.1f} | {r['fwd_bwd_ms']:.1f} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--devices", type=int, default=8)
    p.add_argument("--seq", type=int, default=2048, help="global sequence length N")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--heads", type=int, default=8)
    p.add_argument("--kv-heads", type=int, default=8)
    p.add_argument("--head-dim", type=int, default=64)
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    p.add_argument("--families", nargs="+", default=["simple_gla", "gated_delta_rule"])
    p.add_argument("--suite", choices=["all", "softmax", "recurrent"], default="all")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--out", default="bench_parallel.json")
    args = p.parse_args(argv)
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
    result = run(args)
    Path(args.out).write_text(json.dumps(result, indent=2))
    s = result["shape"]
    print(f"\njax {result['jax']} on {result['backend']}, {result['devices']} devices; B={s['batch']} N={s['seq']} "
          f"Hq={s['heads']} Hkv={s['kv_heads']} d={s['head_dim']} {s['dtype']}, causal softmax")
    print(markdown_table(result))
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
