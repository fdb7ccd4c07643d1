"""Collectives of a compiled program, read from its HLO text: how many run and how many bytes each device sends.

``collective_stats(compiled)`` walks the HLO module from its entry computation (:func:`executed_lines`,
which ``experiments/op_profile.py`` also counts dots with), multiplying by the known trip count of every
``while`` loop (``lax.scan`` lowers to one), and for each collective
instruction (async ``-start`` forms counted once, ``-done`` ignored) takes its operand bytes and the
size ``G`` of its replica groups. Bytes *sent* per device, per execution (ring / bandwidth-optimal
algorithms):

| collective | bytes sent per device |
|---|---|
| collective-permute | operand bytes × (pairs that move data / devices) |
| all-gather | operand bytes × (G − 1) |
| all-to-all, reduce-scatter | operand bytes × (G − 1) / G |
| all-reduce | operand bytes × 2 (G − 1) / G |

Used by ``experiments/bench_parallel.py`` and the TPU ahead-of-time compilation tests.
"""

from __future__ import annotations

import dataclasses
import re
from collections import defaultdict

DTYPE_BYTES = {"pred": 1, "s8": 1, "u8": 1, "s16": 2, "u16": 2, "f16": 2, "bf16": 2, "s32": 4, "u32": 4, "f32": 4,
               "s64": 8, "u64": 8, "f64": 8, "c64": 8, "c128": 16, "f8e4m3fn": 1, "f8e5m2": 1}
KINDS = ("collective-permute", "all-gather", "all-to-all", "reduce-scatter", "all-reduce")

_HEADER = re.compile(r"^\s*(ENTRY\s+)?%?([\w.\-]+)\s*\(.*\)\s*->\s*.*\{\s*$")
_INSTR = re.compile(r"=\s*(?P<type>.*?)\s(?P<op>[\w\-]+)\((?P<args>.*)$")
_SHAPE = re.compile(r"\b(" + "|".join(sorted(DTYPE_BYTES, key=len, reverse=True)) + r")\[([\d,]*)\]")
_CALLS = re.compile(r"(?:to_apply|body|calls|condition)=%?([\w.\-]+)")
_BRANCHES = re.compile(r"branch_computations=\{([^}]*)\}")
_TRIP = re.compile(r'"known_trip_count"\s*:\s*\{\s*"n"\s*:\s*"(\d+)"')
_PAIRS = re.compile(r"source_target_pairs=\{((?:\{\d+,\d+\},?)*)\}")
_GROUPS_LIST = re.compile(r"replica_groups=\{((?:\{[\d,]*\},?)*)\}")
_GROUPS_IOTA = re.compile(r"replica_groups=\[(\d+),(\d+)\]<=")


@dataclasses.dataclass
class CollectiveStats:
    """Per-kind execution counts and bytes sent per device (summed over executions)."""

    count: dict[str, int]
    bytes_sent: dict[str, float]
    unknown_trip_counts: int  # while loops without a known trip count (counted once)

    @property
    def total_bytes(self) -> float:
        return float(sum(self.bytes_sent.values()))

    @property
    def total_count(self) -> int:
        return int(sum(self.count.values()))


def _shapes_bytes(text: str) -> list[int]:
    out = []
    for dtype, dims in _SHAPE.findall(text):
        size = 1
        for d in filter(None, dims.split(",")):
            size *= int(d)
        out.append(size * DTYPE_BYTES[dtype])
    return out


def _operand_bytes(kind: str, op: str, result_type: str, args: str, group: int) -> float:
    """Operand bytes: from typed operands when the text has them, else from the result type."""
    depth, end = 1, len(args)
    for i, ch in enumerate(args):
        if ch == "(":
            depth += 1
        elif ch == ")":
            depth -= 1
            if depth == 0:
                end = i
                break
    typed = _shapes_bytes(args[:end])
    if typed:
        return float(sum(typed))
    shapes = [b for b in _shapes_bytes(result_type)]
    if op.endswith("-start") and result_type.lstrip().startswith("("):
        # async forms return (operands..., results..., [u32 contexts]): drop 4-byte scalars, keep the first half
        arrays = [b for b in shapes if b > 4] or shapes
        return float(sum(arrays[: max(len(arrays) // 2, 1)]))
    total = float(sum(shapes))
    if kind == "all-gather":
        return total / group
    if kind == "reduce-scatter":
        return total * group
    return total


def _group_size(line: str, num_devices: int) -> int:
    m = _GROUPS_IOTA.search(line)
    if m:
        return int(m.group(2))
    m = _GROUPS_LIST.search(line)
    if m and m.group(1):
        first = re.search(r"\{([\d,]*)\}", m.group(1))
        if first and first.group(1):
            return len(first.group(1).split(","))
    return num_devices


def _kind(op: str) -> str | None:
    if op.endswith("-done"):
        return None
    base = op[:-len("-start")] if op.endswith("-start") else op
    return base if base in KINDS else None


def _bytes_sent(kind: str, line: str, operand: float, num_devices: int) -> float:
    if kind == "collective-permute":
        m = _PAIRS.search(line)
        pairs = re.findall(r"\{(\d+),(\d+)\}", m.group(1)) if m else []
        moving = sum(1 for a, b in pairs if a != b)
        return operand * moving / max(num_devices, 1)
    g = _group_size(line, num_devices)
    if kind == "all-gather":
        return operand * (g - 1)
    if kind in ("all-to-all", "reduce-scatter"):
        return operand * (g - 1) / g
    return operand * 2 * (g - 1) / g  # all-reduce


def _trip_from_condition(comps, line: str) -> int | None:
    """Trip count of a scan-style loop whose condition is ``counter < constant`` (counter from 0, step 1).

    TPU executables do not always carry ``known_trip_count``; ``lax.scan`` loops count from 0.
    """
    m = re.search(r"condition=%?([\w.\-]+)", line)
    if not m or m.group(1) not in comps:
        return None
    body = comps[m.group(1)]
    consts = [int(c) for ln in body for c in re.findall(r"s32\[\][^=]*?constant\((\d+)\)", ln)]
    if len(consts) == 1 and any("direction=LT" in ln for ln in body):
        return consts[0]
    return None


def executed_lines(hlo) -> tuple[list[tuple[str, int]], int]:
    """Every instruction line of the computations a run of ``hlo`` (HLO text, or an object with
    ``as_text()``) executes, with how many times it runs: from the entry computation through calls, fusions
    and conditional branches (each counted as if it ran), a ``while`` body counted its known trip count
    times. Returns ``(lines, while loops without a known trip count: counted once)``."""
    text = hlo if isinstance(hlo, str) else hlo.as_text()
    comps: dict[str, list[str]] = {}
    entry, current = None, None
    for line in text.splitlines():
        m = _HEADER.match(line)
        if m:
            current = m.group(2)
            comps[current] = []
            if m.group(1):
                entry = current
            continue
        if current is not None:
            if line.strip() == "}":
                current = None
            else:
                comps[current].append(line)
    if entry is None:
        raise ValueError("no ENTRY computation found in the HLO text")
    out: list[tuple[str, int]] = []
    unknown = 0

    def walk(name: str, mult: int, stack: tuple):
        nonlocal unknown
        if name not in comps or name in stack:
            return
        for line in comps[name]:
            m = _INSTR.search(line)
            if not m:
                continue
            out.append((line, mult))
            op = m.group("op")
            inner = mult
            if op == "while":
                trip = _TRIP.search(line)
                n = int(trip.group(1)) if trip else _trip_from_condition(comps, line)
                if n is None:
                    unknown += 1
                else:
                    inner = mult * n
            callees = _CALLS.findall(line)
            b = _BRANCHES.search(line)
            if b:
                callees += [c.strip().lstrip("%") for c in b.group(1).split(",") if c.strip()]
            for callee in callees:
                if op == "while" and callee in re.findall(r"condition=%?([\w.\-]+)", line):
                    continue
                walk(callee, inner, stack + (name,))

    walk(entry, 1, ())
    return out, unknown


def collective_stats(hlo, num_devices: int) -> CollectiveStats:
    """Collectives of ``hlo`` (HLO text, or an object with ``as_text()``, e.g. a compiled executable)."""
    lines, unknown = executed_lines(hlo)
    count: dict[str, int] = defaultdict(int)
    sent: dict[str, float] = defaultdict(float)
    for line, mult in lines:
        m = _INSTR.search(line)
        op = m.group("op")
        kind = _kind(op)
        if kind is not None:
            group = _group_size(line, num_devices)
            operand = _operand_bytes(kind, op, m.group("type"), m.group("args"), group)
            count[kind] += mult
            sent[kind] += mult * _bytes_sent(kind, line, operand, num_devices)
    return CollectiveStats(dict(count), dict(sent), unknown)
