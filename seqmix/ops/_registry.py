"""The family registry: one record per attention family, and dispatch between its implementations.

A family's record (:class:`Family`) is the only place a per-family fact lives: its op and argument
specs, its implementations (each with ``supports(call)`` and the evidence that backs it), its state
structure, its decode step, its sequence-parallel strategies and summary, its Flax modules and mixer
names, and an input factory for tests and benchmarks. A family registers itself, completely, from its
own op file with :func:`define_family`; tests, benchmarks, compile reports, the sequence-parallel
strategies, the layers and the capability matrix read the record.

An op is a thin function that validates its arguments into a *call* (a small dataclass of arrays and
static settings, built by the family's ``prepare``) and hands it to the implementation chosen here.
Automatic dispatch is fail-closed: it tries implementations by speed rank, takes the first whose
evidence covers this platform (:data:`AUTO_EVIDENCE`) and that accepts the call, and otherwise runs
the family's ``xla`` implementation ("slower, never wrong"). The platform is the *trace's* target
(``pallas_kernels._target``), which is right under ahead-of-time lowering for a TPU topology.
"""

from __future__ import annotations

import dataclasses
import inspect
from typing import Any, Callable

import jax

from pallas_kernels import _target
from seqmix.ops.gpu import device_results

Supports = Callable[[Any], "str | None"]

# Evidence labels: how the conformance suite exercises an implementation (tests/conformance).
#   cpu            run natively on this CPU machine against the reference
#   tpu:interpret  Pallas TPU interpreter on CPU against the reference
#   tpu:aot        ahead-of-time Mosaic compile for TPU v5e, v5p, v6e at production shapes (libtpu)
#   gpu:aot        ahead-of-time compile for an H100 at production shapes (the gpu-compile extra)
#   gpu:interpret, tpu:device: reserved for the GPU backend and lent devices
#   gpu:device     real-GPU passes, recorded per call case in seqmix/ops/gpu/device_results.json (never
#                  claimed in code: :func:`evidence_of` adds it from the record, dispatch checks the case)
EVIDENCE = ("cpu", "tpu:interpret", "tpu:aot", "gpu:interpret", "gpu:aot", "tpu:device", "gpu:device")
# Which evidence lets automatic dispatch choose an implementation on a platform (numerics checked for it).
AUTO_EVIDENCE = {"cpu": ("cpu",), "tpu": ("tpu:interpret", "tpu:device"), "gpu": ("gpu:device",)}
FALLBACK = "xla"  # "slower, never wrong": the implementation automatic dispatch ends on
KINDS = ("softmax", "recurrent")
ROLES = ("sequence", "per_head", "option")


def _always(call) -> str | None:
    return None


@dataclasses.dataclass(frozen=True)
class Implementation:
    """One way of computing a family's op.

    name: registry key (``"reference"``, ``"xla"``, ``"pallas_tpu"``, ...).
    fn: ``fn(call) -> result`` where ``call`` is the family's prepared call.
    rank: lower is faster; automatic dispatch tries implementations in increasing rank.
    backend: None for portable jnp/XLA code; ``"tpu"`` for kernels that need a TPU target (or the CPU
      interpreter). A named implementation whose backend cannot run for the trace's target fails loudly.
    evidence: the conformance modes that exercise it (:data:`EVIDENCE`); the capability matrix prints them.
    supports: ``supports(call) -> None`` if it can serve the call, else a reason (str).
    auto: whether automatic dispatch may pick it (the reference never is: it is the spec).
    describe: ``describe(call) -> str``, the settings it would use (for :func:`explain`).
    device_case: ``device_case(call) -> str``, the key a real-device test records for a call it passed
      (``seqmix/ops/gpu/device_results.json``); None: the implementation as a whole (key ``"*"``).
    any_mask: whether it evaluates any mask predicate (families that run on ``attention`` with a mask of
      their own, like neighborhood attention, take only these); False for a library call that knows a
      fixed set of mask kinds (cuDNN).
    """

    name: str
    fn: Callable[[Any], Any]
    rank: int
    backend: str | None = None
    evidence: tuple[str, ...] = ("cpu",)
    supports: Supports = _always
    auto: bool = True
    describe: Callable[[Any], str] | None = None
    device_case: Callable[[Any], str] | None = None
    any_mask: bool = True

    def __post_init__(self):
        unknown = [e for e in self.evidence if e not in EVIDENCE]
        if unknown:
            raise ValueError(f"implementation {self.name!r}: unknown evidence {unknown}; known: {list(EVIDENCE)}")
        if device_results.LABEL in self.evidence:
            raise ValueError(f"implementation {self.name!r}: {device_results.LABEL} evidence comes only from "
                             f"recorded real-GPU results ({device_results.RESULTS.name}), not from code")

    def tested_for(self, platform: str) -> bool:
        return any(e in AUTO_EVIDENCE.get(platform, ()) for e in self.evidence)


@dataclasses.dataclass(frozen=True)
class ArgSpec:
    """One argument of a family's op besides q, k, v.

    role: ``"sequence"`` (an array with time on axis 1), ``"per_head"`` (an array ``[H]``) or
      ``"option"`` (a static Python value).
    shape: symbolic layout relative to q (``("B", "T", "H")``, ``("B", "T", "H", "Dk")``, ``("H",)``).
    positional: passed positionally after (q, k, v) (else by keyword).
    gate: ``"scalar"`` or ``"channel"`` for a log-space decay (``<= 0``); None otherwise.
    bounds: the closed interval the values lie in, e.g. β in ``(0, 2)``.
    differentiable: whether the op passes a gradient to it (retention's decay does not).
    example: an option's typical value (input factories use it).
    """

    name: str
    role: str
    shape: tuple[str, ...] = ()
    positional: bool = False
    gate: str | None = None
    bounds: tuple[float, float] | None = None
    differentiable: bool = True
    example: Any = None

    def __post_init__(self):
        if self.role not in ROLES:
            raise ValueError(f"ArgSpec {self.name!r}: role must be one of {ROLES}; got {self.role!r}")


@dataclasses.dataclass(frozen=True)
class Inputs:
    """Arguments for one call of a family's op: ``op(*args, **arrays, **options)``.

    args: positional arrays (q, k, v, then the positional arguments); arrays: keyword arrays
    (``decay``, ``initial_state``, ``sink_logits`` ...); options: static keyword values.
    """

    args: tuple
    arrays: dict
    options: dict

    def call(self, op, **extra):
        return op(*self.args, **self.arrays, **self.options, **extra)


@dataclasses.dataclass
class Family:
    """Everything seqmix knows about one attention family (see the module docstring).

    kind: ``"softmax"`` (returns ``o`` or ``(o, lse)``) or ``"recurrent"`` (``o`` or ``(o, state)``).
    prepare: ``prepare(*args, **kwargs) -> call``; validates the op's arguments.
    args: the op's arguments besides q, k, v (:class:`ArgSpec`).
    state: ``state(call) -> pytree of jax.ShapeDtypeStruct``, the recurrent state (None for softmax).
    decode: the decode step, ``decode(q_t, k_t, v_t, state, **per-token arguments by the op's names,
      **options) -> (o_t, state)`` (None when decoding goes through a KV cache; ``decode_doc`` says how).
    sequence_parallel: names of the ``seqmix.parallel`` strategies that serve it.
    sp_functions: strategy name -> the family's own strategy function, for a softmax family that is not
      ``attention`` with a mask (MoBA's gate needs the gathered keys); the others use the strategy table.
    sp_summary: ``sp_summary(call, run) -> Summary`` for LASP (recurrent families; ``run(call)`` runs
      the op's chosen implementation on a prepared call).
    modules: Flax modules built on the op (``"seqmix.nn.GatedLinearAttention"``).
    mixers: mixer name -> import path of the module file that registers its factory.
    make_inputs: ``make_inputs(key, *, batch, seq, heads, dk, dv, dtype, regime) -> Inputs``.
    flops: ``flops(call) -> float``, the *useful* forward FLOPs of a prepared call (matmul work on
      allowed pairs only; docs/FAMILIES.md §7 gives each family's formula). Benchmarks divide it by the
      time to report the fraction of matmul throughput; :func:`useful_flops` adds the backward.
    doc: the op's user docstring (``help(seqmix.ops.<name>)``: arguments with shapes and dtypes, returns,
      a runnable example; :mod:`seqmix.ops._op_docs` composes them).
    """

    name: str
    kind: str
    prepare: Callable[..., Any]
    summary: str = ""
    doc: str = ""
    args: tuple[ArgSpec, ...] = ()
    state: Callable[[Any], Any] | None = None
    decode: Callable | None = None
    decode_doc: str = ""
    sequence_parallel: tuple[str, ...] = ()
    sp_summary: Callable | None = None
    sp_functions: dict[str, Callable] = dataclasses.field(default_factory=dict)
    modules: tuple[str, ...] = ()
    mixers: dict[str, str] = dataclasses.field(default_factory=dict)
    make_inputs: Callable | None = None
    flops: Callable[[Any], float] | None = None
    implementations: dict[str, Implementation] = dataclasses.field(default_factory=dict)
    op: Callable | None = None

    @property
    def positional(self) -> tuple[str, ...]:
        """Names of the op's positional arguments after (q, k, v)."""
        return tuple(a.name for a in self.args if a.positional)

    @property
    def per_token(self) -> tuple[ArgSpec, ...]:
        """The arguments with time on axis 1 (sliced per token when decoding, sharded under SP)."""
        return tuple(a for a in self.args if a.role == "sequence")

    def arg(self, name: str) -> ArgSpec:
        for a in self.args:
            if a.name == name:
                return a
        raise KeyError(f"{self.name}: no argument {name!r}")

    def run(self, impl, call):
        """Run a prepared call on the implementation ``impl`` would choose."""
        chosen, _ = resolve(self.name, impl, call)
        return chosen.fn(call)


FAMILIES: dict[str, Family] = {}


def register_family(family: Family) -> Family:
    if family.name in FAMILIES:
        raise ValueError(f"family {family.name!r} is already registered")
    if family.kind not in KINDS:
        raise ValueError(f"family {family.name!r}: kind must be one of {KINDS}; got {family.kind!r}")
    FAMILIES[family.name] = family
    return family


def register_implementation(family: str, impl: Implementation) -> Implementation:
    fam = get_family(family)
    if impl.name in fam.implementations:
        raise ValueError(f"{family}: implementation {impl.name!r} is already registered")
    fam.implementations[impl.name] = impl
    return impl


def get_family(name: str) -> Family:
    try:
        return FAMILIES[name]
    except KeyError:
        raise ValueError(f"unknown family {name!r}; registered: {sorted(FAMILIES)}") from None


# Useful backward work per unit of forward work: every forward matmul C = A·B costs two of the same size
# backward (dA = dC·Bᵀ, dB = Aᵀ·dC). Recomputation (flash attention's second QKᵀ) is not useful work.
BACKWARD_FLOPS = 2.0


def useful_flops(family: str, *args, backward: bool = False, **kwargs) -> float:
    """Useful FLOPs of ``op(*args, **kwargs)`` (forward, or forward + backward), from the family record."""
    fam = get_family(family)
    if fam.flops is None:
        raise ValueError(f"{family}: the family record has no flops formula")
    forward = float(fam.flops(fam.prepare(*args, **kwargs)))
    return with_backward(forward) if backward else forward


def with_backward(forward: float) -> float:
    """Useful forward + backward FLOPs from the forward's."""
    return forward * (1.0 + BACKWARD_FLOPS)


def current_platform() -> str:
    """The platform the current trace compiles for (``"cpu"``, ``"gpu"``, ``"tpu"``)."""
    return _target.platform()


def _candidates(fam: Family, impl) -> tuple[list[str], bool]:
    """Implementation names to try and whether the choice is automatic."""
    if impl is None:
        auto = sorted((i for i in fam.implementations.values() if i.auto and i.name != FALLBACK),
                      key=lambda i: i.rank)
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
    if impl.backend is not None:
        problem = _target.backend_problem(impl.backend)
        if problem:
            return problem
    if automatic and not impl.tested_for(platform):
        if platform == "gpu":
            reason = impl.supports(call)  # a call it cannot serve needs no device record
            if reason is not None:
                return reason
            case = impl.device_case(call) if impl.device_case else None
            return device_results.problem(fam.name, name, case, _target.current().device_kind)
        return (f"no conformance evidence for platform {platform!r} (evidence: {', '.join(impl.evidence) or 'none'}; "
                f"automatic dispatch needs one of {', '.join(AUTO_EVIDENCE.get(platform, ()))})")
    return impl.supports(call)


def evidence_of(family: str, impl: Implementation) -> tuple[str, ...]:
    """The evidence the capability matrix shows: the implementation's own labels plus ``gpu:device``
    where real-GPU passes are recorded for it (``seqmix.ops.gpu.device_results``)."""
    recorded = device_results.evidence(family, impl.name)
    return impl.evidence + tuple(e for e in recorded if e not in impl.evidence)


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
        skipped.append((FALLBACK, reason))
    detail = "; ".join(f"{n}: {r}" for n, r in skipped)
    raise NotImplementedError(f"{family}: no implementation can serve this call ({detail})")


def dispatch(family: str, impl, call):
    chosen, _ = resolve(family, impl, call)
    return chosen.fn(call)


def _make_op(fam: Family) -> Callable:
    """The op entry point for ``fam``: prepare (validate) then dispatch."""
    from seqmix.ops import _debug

    def op(*args, impl=None, **kwargs):
        call = fam.prepare(*args, **kwargs)
        _debug.check_call(fam, call)
        return dispatch(fam.name, impl, call)

    op.__name__ = fam.name
    op.__qualname__ = fam.name
    op.__doc__ = fam.doc or fam.summary
    sig = inspect.signature(fam.prepare)
    params = list(sig.parameters.values()) + [inspect.Parameter("impl", inspect.Parameter.KEYWORD_ONLY, default=None)]
    op.__signature__ = sig.replace(parameters=params, return_annotation=inspect.Signature.empty)
    op.family = fam.name
    fam.op = op
    return op


def define_family(name: str, *, kind: str, prepare: Callable[..., Any], summary: str,
                  reference: Callable[[Any], Any], xla: Callable[[Any], Any],
                  describe: Callable[[Any], str] | None = None, kernels: tuple[Implementation, ...] = (),
                  **record) -> Callable:
    """Register a family, completely, and return its op.

    ``reference`` (the spec; never chosen automatically) and ``xla`` (the "slower, never wrong"
    fallback) run everywhere; ``kernels`` are backend implementations (e.g. ``pallas_tpu``) built by the
    backend glue in ``seqmix/ops/<backend>/``. ``record`` holds the remaining :class:`Family` fields.
    """
    fam = register_family(Family(name=name, kind=kind, prepare=prepare, summary=summary, **record))
    register_implementation(name, Implementation("reference", reference, rank=1000, auto=False))
    register_implementation(name, Implementation("xla", xla, rank=100, describe=describe))
    for impl in kernels:
        register_implementation(name, impl)
    return _make_op(fam)


def explain(op, *args, impl=None, **kwargs) -> str:
    """Say which implementation ``op(*args, **kwargs, impl=impl)`` would run, and why not the others.

    The call is traced, not run (so it also explains a call under an abstract mesh, ahead of time)."""
    family = getattr(op, "family", op)
    text = []
    jax.eval_shape(lambda: text.append(_explain(family, impl, args, kwargs)))
    return text[0]


def _explain(family: str, impl, args, kwargs) -> str:
    fam = get_family(family)
    call = fam.prepare(*args, **kwargs)
    target = _target.current()
    where = f"{target.platform}" + (f" ({target.device_kind}, ahead of time)" if target.ahead_of_time else "")
    lines = [f"{family} on {where}:"]
    try:
        chosen, skipped = resolve(family, impl, call)
    except NotImplementedError as err:
        return "\n".join(lines + [f"  no implementation: {err}"])
    for name, reason in skipped:
        lines.append(f"  skip {name}: {reason}")
    extra = f" ({chosen.describe(call)})" if chosen.describe else ""
    lines.append(f"  run  {chosen.name}{extra}")
    return "\n".join(lines)
