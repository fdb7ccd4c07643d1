"""The family registry: one record per attention family and the dispatch between implementations.

An op is a thin function that validates its arguments into a *call* (a small dataclass of arrays and
static settings, built by the family's ``prepare``) and hands it to the implementation chosen here.
Every implementation is a record with ``supports(call) -> None | reason`` and the platforms its tests
cover, so automatic dispatch is fail-closed: it picks the first implementation (by declared speed
rank) that is tested on this platform and accepts the call, else the family's XLA implementation.
"""

from __future__ import annotations

import dataclasses
import inspect
from typing import Any, Callable

import jax

Supports = Callable[[Any], "str | None"]


def _always(call) -> str | None:
    return None


@dataclasses.dataclass(frozen=True)
class Implementation:
    """One way of computing a family's op.

    name: registry key (``"reference"``, ``"xla"``, ``"pallas_tpu"``, ...).
    fn: ``fn(call) -> result`` where ``call`` is the family's prepared call.
    platforms: jax backends on which the implementation's tests run (``"cpu"``, ``"gpu"``, ``"tpu"``).
    rank: lower is faster; automatic dispatch tries implementations in increasing rank.
    supports: ``supports(call) -> None`` if it can serve the call, else a reason (str).
    auto: whether automatic dispatch may pick it (the reference never is: it is the spec).
    """

    name: str
    fn: Callable[[Any], Any]
    platforms: tuple[str, ...]
    rank: int
    supports: Supports = _always
    auto: bool = True
    describe: Callable[[Any], str] | None = None


@dataclasses.dataclass
class Family:
    """A registered attention family: its op, prepare step and implementations."""

    name: str
    prepare: Callable[..., Any]
    summary: str = ""
    implementations: dict[str, Implementation] = dataclasses.field(default_factory=dict)
    decode: str | None = None  # name of the decode entry point (documentation / capability matrix)
    parallel: dict[str, Callable] = dataclasses.field(default_factory=dict)  # strategy name -> fn
    modules: tuple[str, ...] = ()  # seqmix.nn modules built on the op
    op: Callable | None = None


FAMILIES: dict[str, Family] = {}

FALLBACK = "xla"  # "slower, never wrong": the implementation automatic dispatch ends on


def register_family(name: str, prepare: Callable[..., Any], *, summary: str = "",
                    decode: str | None = None) -> Family:
    """Declare a family. ``prepare(*args, **kwargs)`` validates the op's arguments into a call."""
    if name in FAMILIES:
        raise ValueError(f"family {name!r} is already registered")
    family = Family(name=name, prepare=prepare, summary=summary, decode=decode)
    FAMILIES[name] = family
    return family


def register_implementation(family: str, impl: Implementation) -> Implementation:
    fam = get_family(family)
    if impl.name in fam.implementations:
        raise ValueError(f"{family}: implementation {impl.name!r} is already registered")
    fam.implementations[impl.name] = impl
    return impl


def register_parallel(family: str, strategy: str, fn: Callable) -> None:
    get_family(family).parallel[strategy] = fn


def register_module(family: str, module_name: str) -> None:
    fam = get_family(family)
    if module_name not in fam.modules:
        fam.modules = fam.modules + (module_name,)


def get_family(name: str) -> Family:
    try:
        return FAMILIES[name]
    except KeyError:
        raise ValueError(f"unknown family {name!r}; registered: {sorted(FAMILIES)}") from None


def current_platform() -> str:
    return jax.default_backend()


def _candidates(fam: Family, impl) -> tuple[list[str], bool]:
    """Implementation names to try and whether the choice is automatic."""
    if impl is None:
        auto = sorted((i for i in fam.implementations.values() if i.auto), key=lambda i: i.rank)
        return [i.name for i in auto], True
    names = [impl] if isinstance(impl, str) else list(impl)
    if not names or not all(isinstance(n, str) for n in names):
        raise ValueError(f"impl must be None, a name or a tuple of names; got {impl!r}")
    for n in names:
        if n not in fam.implementations:
            raise ValueError(f"{fam.name}: unknown impl {n!r}; available: {sorted(fam.implementations)}")
    return names, False


def _reason(fam: Family, name: str, call, platform: str, automatic: bool) -> str | None:
    impl = fam.implementations[name]
    if automatic and platform not in impl.platforms:
        return f"not tested on platform {platform!r} (tested on {', '.join(impl.platforms)})"
    return impl.supports(call)


def resolve(family: str, impl, call) -> tuple[Implementation, list[tuple[str, str]]]:
    """Choose the implementation for ``call``. Returns it and the (name, reason) pairs skipped.

    Raises NotImplementedError when a named implementation (or every one of a tuple) cannot serve it.
    """
    fam = get_family(family)
    names, automatic = _candidates(fam, impl)
    platform = current_platform()
    skipped: list[tuple[str, str]] = []
    for name in names:
        reason = _reason(fam, name, call, platform, automatic)
        if reason is None:
            return fam.implementations[name], skipped
        skipped.append((name, reason))
    if automatic and FALLBACK in fam.implementations:
        reason = fam.implementations[FALLBACK].supports(call)
        if reason is None:
            return fam.implementations[FALLBACK], skipped
    detail = "; ".join(f"{n}: {r}" for n, r in skipped)
    raise NotImplementedError(f"{family}: no implementation can serve this call ({detail})")


def dispatch(family: str, impl, call):
    chosen, _ = resolve(family, impl, call)
    return chosen.fn(call)


def make_op(family: str) -> Callable:
    """The op entry point for ``family``: prepare (validate) then dispatch."""
    fam = get_family(family)

    def op(*args, impl=None, **kwargs):
        call = fam.prepare(*args, **kwargs)
        return dispatch(family, impl, call)

    op.__name__ = family
    op.__qualname__ = family
    op.__doc__ = fam.prepare.__doc__ if not fam.summary else f"{fam.summary}\n\n{fam.prepare.__doc__ or ''}"
    sig = inspect.signature(fam.prepare)
    params = list(sig.parameters.values()) + [inspect.Parameter("impl", inspect.Parameter.KEYWORD_ONLY, default=None)]
    op.__signature__ = sig.replace(parameters=params, return_annotation=inspect.Signature.empty)
    op.family = family
    fam.op = op
    return op


ALL_PLATFORMS = ("cpu", "gpu", "tpu")


def define_family(name: str, prepare: Callable[..., Any], *, summary: str, decode: str,
                  reference: Callable[[Any], Any], xla: Callable[[Any], Any],
                  describe: Callable[[Any], str] | None = None) -> Callable:
    """Register a family with its two portable implementations and return its op.

    ``reference`` (the spec; never chosen automatically) and ``xla`` (the "slower, never wrong"
    fallback) run everywhere. Accelerator kernels add themselves with :func:`register_implementation`.
    """
    register_family(name, prepare, summary=summary, decode=decode)
    register_implementation(name, Implementation("reference", reference, ALL_PLATFORMS, rank=1000, auto=False))
    register_implementation(name, Implementation("xla", xla, ALL_PLATFORMS, rank=100, describe=describe))
    return make_op(name)


def explain(op, *args, impl=None, **kwargs) -> str:
    """Say which implementation ``op(*args, **kwargs, impl=impl)`` would run, and why not the others."""
    family = getattr(op, "family", op)
    fam = get_family(family)
    call = fam.prepare(*args, **kwargs)
    platform = current_platform()
    lines = [f"{family} on {platform}:"]
    try:
        chosen, skipped = resolve(family, impl, call)
    except NotImplementedError as err:
        return "\n".join(lines + [f"  no implementation: {err}"])
    for name, reason in skipped:
        lines.append(f"  skip {name}: {reason}")
    extra = f" ({chosen.describe(call)})" if chosen.describe else ""
    lines.append(f"  run  {chosen.name}{extra}")
    return "\n".join(lines)


# ----------------------------------------------------------------------------- capability matrix

MATRIX_COLUMNS = ("reference", "xla", "pallas_tpu", "pallas_gpu", "decode", "sequence parallel", "module")


def capability_rows() -> list[dict[str, str]]:
    """One row per family: which implementations exist (and on which platforms), decode, SP, modules."""
    rows = []
    for name in sorted(FAMILIES):
        fam = FAMILIES[name]
        row = {"family": name}
        for col in ("reference", "xla", "pallas_tpu", "pallas_gpu"):
            impl = fam.implementations.get(col)
            row[col] = "/".join(impl.platforms) if impl else "-"
        row["decode"] = fam.decode or "-"
        row["sequence parallel"] = ", ".join(sorted(fam.parallel)) or "-"
        row["module"] = ", ".join(fam.modules) or "-"
        rows.append(row)
    return rows


def capability_markdown() -> str:
    header = ("family",) + MATRIX_COLUMNS
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for row in capability_rows():
        lines.append("| " + " | ".join(f"`{row['family']}`" if c == "family" else row[c] for c in header) + " |")
    return "\n".join(lines)
