"""Did anything get slower? The same benchmark cases timed under two revisions of seqmix, interleaved.

Each revision runs in its own worker process (``--serve TREE`` imports ``seqmix`` from ``TREE``), so
the two never share a module; the parent asks them for one case at a time, alternating which goes first
from round to round, so a drift in this machine's speed (up to 1.5× between runs here) hits both arms
alike. A worker compiles each case once, then per request runs it untimed (refilling the caches its
neighbour evicted) and timed: over enough calls to last :data:`MIN_TIMED_SECONDS` (at most 20), their
mean per call; the table gives each arm's best request, and the ratio of the two arms' medians. Every arm
builds its inputs itself; the parent checks that both built the same ones (a digest of the arrays) and
refuses the comparison otherwise.

Each worker also reports a digest of the compiled program without its metadata
(:func:`program_digest`): where both revisions compiled the same program, a difference in time is this
machine's, not the code's, which calibrates the rest (a long token loop measured up to 1.17× apart on
identical programs here).

Cases are ``experiments/bench.py``'s: fp32, B = 1, H = 4, D = 64; ``fwd`` is the op, ``fwd+bwd`` the
value and gradient of ``sum(o)`` in every array argument (``bench.loss_and_grads``). The default list
is every (implementation, length) that the tables in docs/RESULTS.md listed when issue 11 was filed
(revision ``ade6500``): causal attention (``xla`` 512–8192, ``reference`` 512–2048), every recurrent
family (``xla`` 1k–32k, token-loop ``reference`` 1k–2k), plus the 1024-key window at 4096 and 8192.

    python experiments/revision_ab.py --base ade6500 --rounds 3 --out docs/bench/revision_ab_cpu.json

``--head`` defaults to this working tree. Writes JSON (both arms' best and median seconds per case, and
head / base) and prints a table.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
RECURRENT = ("delta_rule", "gated_delta_rule", "gla", "linear_attention", "retention", "simple_gla")
SHAPE = dict(B=1, H=4, D=64)
MIN_TIMED_SECONDS = 0.2  # a short case is timed over several calls (at most 20), its mean per call


def default_cases() -> list[dict]:
    cases = []
    for mode in ("fwd", "fwd+bwd"):
        cases += [dict(family="attention", impl="xla", mask="causal", T=t, mode=mode)
                  for t in (512, 1024, 2048, 4096, 8192)]
        cases += [dict(family="attention", impl="reference", mask="causal", T=t, mode=mode) for t in (512, 1024, 2048)]
        cases += [dict(family="attention", impl="xla", mask="window:1024", T=t, mode=mode) for t in (4096, 8192)]
        for family in RECURRENT:
            cases += [dict(family=family, impl="xla", T=t, mode=mode) for t in (1024, 2048, 4096, 8192, 16384, 32768)]
            cases += [dict(family=family, impl="reference", T=t, mode=mode) for t in (1024, 2048)]
    return cases


def case_name(c: dict) -> str:
    mask = f" {c['mask']}" if c.get("mask") else ""
    return f"{c['family']}{mask} {c['impl']} {c['mode']} T={c['T']}"


# ----------------------------------------------------------------------------------------------- worker
def program_digest(hlo_text: str) -> str:
    """A digest of a compiled program's HLO text without its metadata (source files, lines, op names, stack
    frames): equal digests mean both revisions compiled the same program, whatever the two times say."""
    body = re.sub(r"^(FileNames|FunctionNames|FileLocations|StackFrames)\n(\d+ .*\n)*", "", hlo_text, flags=re.M)
    body = re.sub(r", metadata=\{[^}]*\}|, stack_frame_id=\d+", "", body)
    return hashlib.sha1(body.encode()).hexdigest()[:12]


def _serve(tree: str) -> None:
    """Answer one JSON request per stdin line with one JSON line: compile (once) and time a case."""
    sys.path.insert(0, tree)
    import jax
    import jax.numpy as jnp
    import numpy as np

    from seqmix import ops
    from seqmix.ops import masks as M

    if not Path(ops.__file__).resolve().is_relative_to(Path(tree).resolve()):
        raise SystemExit(f"seqmix came from {ops.__file__}, not from {tree}")
    cache = {}

    # Inputs and fwd+bwd are built here rather than imported from experiments/bench.py (its
    # recurrent_inputs and loss_and_grads): bench.py imports this revision's seqmix APIs, which an older
    # base tree may lack; these calls exist in both.
    def build(c):
        b, h, d, t = SHAPE["B"], SHAPE["H"], SHAPE["D"], c["T"]
        if c["family"] == "attention":
            mask = M.Causal() if c["mask"] == "causal" else M.LocalWindow(int(c["mask"].split(":")[1]))
            args = tuple(jax.random.normal(k, (b, t, h, d), jnp.float32)
                         for k in jax.random.split(jax.random.PRNGKey(t), 3))
            f, closed_over = (lambda q, k, v: ops.attention(q, k, v, mask=mask, impl=c["impl"])), ()
        else:
            fam = ops.get_family(c["family"])
            inputs = fam.make_inputs(fam, jax.random.PRNGKey(t), batch=b, seq=t, heads=h, dk=d, dv=d,
                                     dtype=jnp.float32, initial_state=False)
            kwargs = {**inputs.arrays, **inputs.options}
            args, closed_over = tuple(inputs.args), tuple(inputs.arrays.values())
            f = lambda *a: fam.op(*a, impl=c["impl"], **kwargs)  # noqa: E731
        digest = hashlib.sha1(b"".join(np.asarray(a).tobytes() for a in args + closed_over)).hexdigest()[:12]
        g = f if c["mode"] == "fwd" else jax.value_and_grad(
            lambda *a: f(*a).astype(jnp.float32).sum(), argnums=tuple(range(len(args))))
        compiled = jax.jit(g).lower(*args).compile()
        return compiled, args, digest, program_digest(compiled.as_text())

    for line in sys.stdin:
        c = json.loads(line)
        key = json.dumps(c, sort_keys=True)
        if key not in cache:
            cache[key] = build(c)
        fn, args, digest, program = cache[key]
        t0 = time.perf_counter()
        jax.block_until_ready(fn(*args))
        calls = max(1, min(20, int(MIN_TIMED_SECONDS / (time.perf_counter() - t0))))
        t0 = time.perf_counter()
        for _ in range(calls):
            jax.block_until_ready(fn(*args))
        print(json.dumps(dict(seconds=(time.perf_counter() - t0) / calls, digest=digest, program=program)),
              flush=True)


class Arm:
    """A worker process serving one revision's tree."""

    def __init__(self, name: str, tree: Path, log: Path):
        self.name, self.tree, self.log = name, tree, log
        with open(log, "w") as err:
            self.proc = subprocess.Popen([sys.executable, __file__, "--serve", str(tree)], stdin=subprocess.PIPE,
                                         stdout=subprocess.PIPE, stderr=err, text=True)

    def time(self, case: dict) -> dict:
        self.proc.stdin.write(json.dumps(case) + "\n")
        self.proc.stdin.flush()
        line = self.proc.stdout.readline()
        if not line:
            tail = self.log.read_text()[-3000:]
            raise RuntimeError(f"the {self.name} worker ({self.tree}) died on {case_name(case)}:\n{tail}")
        return json.loads(line)

    def close(self) -> None:
        self.proc.stdin.close()
        self.proc.wait()


def _export(rev: str, dest: Path) -> Path:
    """The tree of git revision ``rev`` under ``dest``."""
    archive = subprocess.run(["git", "-C", str(REPO), "archive", rev], check=True, capture_output=True).stdout
    dest.mkdir(parents=True)
    subprocess.run(["tar", "-x", "-C", str(dest)], input=archive, check=True)
    return dest


def compare(cases, base: Arm, head: Arm, rounds: int) -> list[dict]:
    times = {case_name(c): {base.name: [], head.name: []} for c in cases}
    same = {}
    for r in range(rounds):
        for i, c in enumerate(cases):
            arms = (base, head) if (r + i) % 2 == 0 else (head, base)
            got = {a.name: a.time(c) for a in arms}
            if got[base.name]["digest"] != got[head.name]["digest"]:
                raise RuntimeError(f"{case_name(c)}: the two revisions built different inputs")
            for a in arms:
                times[case_name(c)][a.name].append(got[a.name]["seconds"])
            same[case_name(c)] = got[base.name]["program"] == got[head.name]["program"]
            t = times[case_name(c)]
            print(f"round {r + 1}/{rounds} {case_name(c)}: base {t[base.name][-1] * 1e3:.1f} ms, "
                  f"head {t[head.name][-1] * 1e3:.1f} ms", file=sys.stderr, flush=True)
    rows = []
    for c in cases:
        t = times[case_name(c)]
        best = {k: min(v) for k, v in t.items()}
        median = {k: float(np.median(v)) for k, v in t.items()}
        rows.append(dict(c, **SHAPE, base_seconds=t[base.name], head_seconds=t[head.name],
                         base_best=best[base.name], head_best=best[head.name],
                         head_over_base=best[head.name] / best[base.name],
                         median_head_over_base=median[head.name] / median[base.name],
                         same_program=same[case_name(c)]))
    return rows


def table(rows: list[dict]) -> str:
    lines = ["| case | base ms | head ms | head / base | of medians | same program |", "|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {case_name(r)} | {r['base_best'] * 1e3:.1f} | {r['head_best'] * 1e3:.1f} | "
                     f"{r['head_over_base']:.2f} | {r['median_head_over_base']:.2f} | "
                     f"{'yes' if r['same_program'] else 'no'} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--serve", help=argparse.SUPPRESS)
    p.add_argument("--base", default="ade6500", help="git revision to compare against")
    p.add_argument("--head", help="git revision (default: this working tree)")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--only", nargs="*", default=(),
                   help="keep the cases whose name (as the table prints it) contains one of these phrases")
    p.add_argument("--out", help="write the JSON here")
    args = p.parse_args(argv)
    if args.serve:
        _serve(args.serve)
        return 0
    cases = [c for c in default_cases() if not args.only or any(w in case_name(c) for w in args.only)]
    if not cases:
        p.error(f"no case matches {args.only}")
    with tempfile.TemporaryDirectory(prefix="seqmix_revision_ab_") as tmp:
        base_tree = _export(args.base, Path(tmp) / "base")
        head_tree = _export(args.head, Path(tmp) / "head") if args.head else REPO
        base, head = (Arm(n, tree, Path(tmp) / f"{n}.log") for n, tree in (("base", base_tree), ("head", head_tree)))
        try:
            rows = compare(cases, base, head, args.rounds)
        finally:
            base.close()
            head.close()
    print(table(rows))
    if args.out:
        meta = dict(base=args.base, head=args.head or "working tree", rounds=args.rounds,
                    head_commit=subprocess.run(["git", "-C", str(REPO), "rev-parse", "HEAD"], capture_output=True,
                                               text=True).stdout.strip())
        Path(args.out).write_text(json.dumps(dict(meta, rows=rows), indent=1) + "\n")
        print(f"\nwrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
