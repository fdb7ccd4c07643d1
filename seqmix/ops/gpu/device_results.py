"""Real-GPU test results, the only source of ``gpu:device`` evidence (fail-closed GPU dispatch).

``device_results.json`` (beside this file) lists the calls that passed their tests on a real GPU; the
GPU device run writes it and the repository keeps it. Each entry names a family, an implementation,
a *case* (the implementation's ``device_case(call)``, a short key such as ``"bfloat16/causal/gqa/d128"``,
or ``"*"`` for an implementation without one) and the ``device_kind`` it passed on.

Automatic dispatch on a GPU (``seqmix.ops._registry``) asks :func:`problem` for every GPU implementation
without static ``gpu:device`` evidence: it may run only a call whose case passed on the same device
kind. The capability matrix adds ``gpu:device`` to an implementation with any recorded pass
(:func:`evidence`). Nothing here is family-specific.
"""

from __future__ import annotations

import functools
import json
from pathlib import Path

RESULTS = Path(__file__).with_name("device_results.json")
LABEL = "gpu:device"
ANY_CASE = "*"


@functools.lru_cache(maxsize=None)
def _load(path: str) -> tuple[dict, ...]:
    data = json.loads(Path(path).read_text())
    passed = data.get("passed", [])
    if not isinstance(passed, list) or not all(isinstance(e, dict) for e in passed):
        raise ValueError(f"{path}: 'passed' must be a list of objects")
    return tuple(passed)


def passed(family: str, impl: str, path: Path | None = None) -> list[dict]:
    """The recorded passes of ``family``/``impl`` (empty when none)."""
    return [e for e in _load(str(path or RESULTS)) if e.get("family") == family and e.get("impl") == impl]


def evidence(family: str, impl: str, path: Path | None = None) -> tuple[str, ...]:
    """``("gpu:device",)`` if any real-GPU pass is recorded for ``family``/``impl``, else ``()``."""
    return (LABEL,) if passed(family, impl, path) else ()


def problem(family: str, impl: str, case: str | None, device_kind: str | None,
            path: Path | None = None) -> str | None:
    """None if a real-GPU pass covers this call (its ``case`` on ``device_kind``), else why not.

    case: the implementation's ``device_case(call)``, or None for an implementation without one
    (then only an entry with case ``"*"`` covers it)."""
    where = f"{family}/{impl}"
    entries = passed(family, impl, path)
    if not entries:
        return f"no real-GPU test result recorded for {where} ({RESULTS.name}; evidence {LABEL} comes only from it)"
    key = ANY_CASE if case is None else case
    cases = [e for e in entries if e.get("case") in (key, ANY_CASE)]
    if not cases:
        known = ", ".join(sorted({str(e.get("case")) for e in entries}))
        return f"no real-GPU test result recorded for {where} case {key!r} (recorded cases: {known})"
    if not any(e.get("device_kind") == device_kind for e in cases):
        kinds = ", ".join(sorted({str(e.get("device_kind")) for e in cases}))
        return f"{where} case {key!r} passed on {kinds}, not on {device_kind!r}: no real-GPU test result recorded for it"
    return None
