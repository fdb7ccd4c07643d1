"""The capability matrix, read from the family records (``seqmix info`` and the README print it).

Every cell names the evidence behind it, and the conformance suite (``tests/conformance``) is generated
from the same records: an implementation's evidence labels are the modes the suite runs it in
(``cpu``: natively against the reference; ``tpu:interpret``: the Pallas TPU interpreter on CPU;
``tpu:aot``: ahead-of-time Mosaic compiles for v5e, v5p and v6e at ``[2, 8192, 16, 128]`` bf16); every
family with a decode step gets decode-vs-parallel cases, and every sequence-parallel strategy it names
gets cases on 8 simulated CPU devices. ``gpu:aot``: an ahead-of-time compile for an H100 at production
shapes (``tests/conformance/test_gpu_compile.py``); ``gpu:device``: real-GPU passes recorded in
``seqmix/ops/gpu/device_results.json``. ``-`` means nothing is claimed (also for an implementation whose
evidence is empty: registered, callable by name, never chosen automatically).
"""

from __future__ import annotations

from seqmix.ops._registry import FAMILIES, evidence_of

BASE_IMPL_COLUMNS = ("reference", "xla", "pallas_tpu", "pallas_gpu")  # always shown, in this order
OTHER_COLUMNS = ("decode", "sequence parallel", "modules (mixers)")


def impl_columns(families=None) -> tuple[str, ...]:
    """The base implementation columns, then every other implementation name registered for
    ``families`` (default: all), by rank then name."""
    names = {}
    for name in sorted(FAMILIES) if families is None else families:
        for impl in FAMILIES[name].implementations.values():
            if impl.name not in BASE_IMPL_COLUMNS:
                names[impl.name] = min(impl.rank, names.get(impl.name, impl.rank))
    return BASE_IMPL_COLUMNS + tuple(sorted(names, key=lambda n: (names[n], n)))


def evidence_cell(evidence) -> str:
    """``("tpu:interpret", "tpu:aot")`` -> ``"tpu:interpret+aot"``; ``("cpu",)`` -> ``"cpu"``; ``()`` -> ``"-"``."""
    if not evidence:
        return "-"
    groups: dict[str, list[str]] = {}
    for label in evidence:
        platform, _, mode = label.partition(":")
        groups.setdefault(platform, [])
        if mode:
            groups[platform].append(mode)
    return ", ".join(p + (":" + "+".join(m) if m else "") for p, m in groups.items())


def shipped_families() -> list[str]:
    """The families defined inside the ``seqmix`` package (not a user's or a test's)."""
    return sorted(n for n, f in FAMILIES.items() if f.prepare.__module__.startswith("seqmix."))


def capability_rows(families=None) -> list[dict[str, str]]:
    """One row per family (default: every registered one; see the module docstring for the cells)."""
    rows = []
    columns = impl_columns(families)
    for name in sorted(FAMILIES) if families is None else families:
        fam = FAMILIES[name]
        row = {"family": name}
        for col in columns:
            impl = fam.implementations.get(col)
            row[col] = evidence_cell(evidence_of(name, impl)) if impl else "-"
        decode = fam.decode_doc or (getattr(fam.decode, "__name__", "") if fam.decode else "")
        row["decode"] = f"{decode} · cpu" if decode else "-"
        row["sequence parallel"] = (", ".join(sorted(fam.sequence_parallel)) + " · cpu×8") if fam.sequence_parallel else "-"
        mods = ", ".join(m.rsplit(".", 1)[-1] for m in fam.modules)
        mixers = ", ".join(f"`{m}`" for m in sorted(fam.mixers))
        row["modules (mixers)"] = (f"{mods} ({mixers})" if mixers else mods) or "-"
        rows.append(row)
    return rows


def capability_markdown(families=None) -> str:
    header = ("family",) + impl_columns(families) + OTHER_COLUMNS
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for row in capability_rows(families):
        lines.append("| " + " | ".join(f"`{row['family']}`" if c == "family" else row[c] for c in header) + " |")
    return "\n".join(lines)
