"""The markdown tables (``gpu_bench.md``, and the console's summary)."""

from __future__ import annotations

from typing import TYPE_CHECKING

from .common import SCRIPT

if TYPE_CHECKING:
    from .budget import Output


def markdown(output: Output) -> str:
    env = output.env
    lines = [f"GPU device run ({SCRIPT}{', CPU smoke' if output.smoke else ''}): {env.get('device_kind')}, "
             f"jax {env.get('jax')}, torch {env.get('torch')}, triton {env.get('triton')}, fla {env.get('fla')}, "
             f"{env.get('date')}; measured bf16 matmul "
             + (f"{env['matmul_bf16_tflops']:.0f} TF/s" if env.get("matmul_bf16_tflops") else "n/a") + ".", "",
             "Median of N synchronized calls (host clock) after compile and warm-up, implementations interleaved; "
             "TF/s = the family record's useful FLOPs (the same for every row of a group) / median time.", "",
             "| family | impl | shape | dtype | mask | mode | ms | TF/s | × xla | status |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in output.rows:
        shape = "×".join(str(x) for x in r.get("shape", [])) or "-"
        ms = f"{r['ms']:.3f}" if r.get("ms") else "-"
        tf = (f"{r['tflops']:.1f}" if r["tflops"] >= 1 else f"{r['tflops']:.2g}") if r.get("tflops") else "-"
        sp = f"{r['speedup_vs_xla']:.2f}" if r.get("speedup_vs_xla") else "-"
        status = str(r.get("status", "")).replace("|", "/")
        lines.append(f"| {r['family']} | {r['impl']} | {shape} | {r.get('dtype', '-')} | {r.get('mask', '-')} | "
                     f"{r.get('mode', '-')} | {ms} | {tf} | {sp} | {status[:200]} |")
    if output.fla_checks:
        lines += ["", "fla numerics check against seqmix's reference (before timing):", "",
                  "| family | status | max abs error |", "|---|---|---|"]
        for fam, c in output.fla_checks.items():
            err = f"{c['max_abs_error']:.3g}" if c.get("max_abs_error") is not None else "-"
            lines.append(f"| {fam} | {str(c['status'])[:200].replace('|', '/')} | {err} |")
    summary = {s: sum(1 for c in output.cases if c["status"] == s) for s in ("passed", "failed", "skipped")}
    lines += ["", f"Conformance: {summary['passed']} passed, {summary['failed']} failed, {summary['skipped']} skipped "
                  f"calls; recorded cases: " + (", ".join(f"{e['family']}/{e['impl']} {e['case']}"
                                                         for e in output.recorded) or "none")]
    return "\n".join(lines) + "\n"
