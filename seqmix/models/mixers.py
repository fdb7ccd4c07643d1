"""The mixer registry: per-layer sequence mixers named in a spec string such as ``"attn,swa:128,attn"``.

A spec is a comma-separated list with one entry per layer; an entry is ``name`` or ``name:arg``
(whitespace around names, colons and commas is ignored). ``parse_mixers`` turns it into
``[(name, arg or None), ...]``; ``build_mixer`` makes the module for one entry.

Mixer protocol. A factory ``factory(config: LMConfig, arg: str | None, *, rngs) -> nnx.Module`` returns
a module with

* ``__call__(x [B, T, d_model], *, positions=None, segment_ids=None) -> [B, T, d_model]``
  (``positions`` int ``[T]``, default ``arange(T)``; ``segment_ids`` int ``[B, T]`` packs documents);
* ``init_cache(batch, max_len) -> cache`` (any pytree: a KV cache, a recurrent state, ...);
* ``decode(x [B, T_new, d_model], cache, *, segment_ids=None) -> (y [B, T_new, d_model], cache)``,
  whose outputs equal the parallel form's rows for those tokens.

Sequence parallelism: a factory that also accepts ``sequence_parallel=`` (a
:class:`seqmix.parallel.SequenceParallel`) builds its module sequence-parallel; ``build_mixer`` passes
the keyword only when it is set, so factories written for the plain protocol keep working (and say so
clearly if asked for sequence parallelism).

Built in: ``attn`` (causal softmax), ``swa:W`` (sliding window of W keys), ``chunk:C`` (chunked causal,
chunks of C), ``stream:W`` (StreamingLLM: window of W keys plus 4 sink tokens). Other families register
themselves with :func:`register_mixer` when their module is imported; a config naming them needs that
import first.
"""

from __future__ import annotations

import dataclasses
import inspect
from typing import TYPE_CHECKING, Callable

from flax import nnx

from seqmix.nn.attention import Attention
from seqmix.ops import masks as masks_lib

if TYPE_CHECKING:  # pragma: no cover
    from seqmix.models.lm import LMConfig

Factory = Callable[..., nnx.Module]
ArgCheck = Callable[[str, "str | None"], None]


@dataclasses.dataclass(frozen=True)
class MixerEntry:
    """A registered mixer: its factory, its argument check and a one-line description."""

    name: str
    factory: Factory
    check_arg: ArgCheck
    doc: str = ""


MIXERS: dict[str, MixerEntry] = {}


def no_arg(name: str, arg: str | None) -> None:
    """Argument check for mixers that take no ``:arg``."""
    if arg is not None:
        raise ValueError(f"mixer {name!r} takes no argument; got {name}:{arg}")


def int_arg(name: str, arg: str | None) -> None:
    """Argument check for mixers that need a positive integer ``:arg``."""
    if arg is None or not arg.isdigit() or int(arg) < 1:
        raise ValueError(f"mixer {name!r} needs a positive integer argument ({name}:N); got "
                         f"{name if arg is None else f'{name}:{arg}'}")


def register_mixer(name: str, factory: Factory, *, check_arg: ArgCheck | None = None, doc: str = "",
                   replace: bool = False) -> None:
    """Register ``factory(config, arg, *, rngs) -> module`` under ``name``.

    ``check_arg(name, arg)`` raises ValueError for a bad ``:arg`` (default: any arg accepted);
    it runs when a spec is parsed, so a bad config fails before any module is built.
    """
    if not isinstance(name, str) or not name.strip() or any(c in name for c in ",: \t\n"):
        raise ValueError(f"mixer name must be a non-empty string without ',', ':' or spaces; got {name!r}")
    if name in MIXERS and not replace:
        raise ValueError(f"mixer {name!r} is already registered (pass replace=True to override)")
    MIXERS[name] = MixerEntry(name, factory, check_arg or (lambda n, a: None), doc)


def registered_mixers() -> list[str]:
    return sorted(MIXERS)


def parse_mixers(spec: str) -> list[tuple[str, str | None]]:
    """``"attn, swa:128 ,attn"`` -> ``[("attn", None), ("swa", "128"), ("attn", None)]``.

    Raises ValueError for an empty spec or entry, an unknown name (listing the registered ones) or an
    argument its mixer rejects.
    """
    if not isinstance(spec, str) or not spec.strip():
        raise ValueError(f"mixers spec must be a non-empty string like 'attn,swa:128'; got {spec!r}")
    out = []
    for i, entry in enumerate(spec.split(",")):
        name, sep, arg = (part.strip() for part in entry.partition(":"))
        if not name:
            raise ValueError(f"mixers spec {spec!r}: entry {i} is empty; expected 'name' or 'name:arg'")
        if name not in MIXERS:
            raise ValueError(f"mixers spec {spec!r}: unknown mixer {name!r}; registered: {registered_mixers()}")
        if sep and not arg:
            raise ValueError(f"mixers spec {spec!r}: entry {i} ({entry.strip()!r}) has ':' but no argument")
        arg = arg if sep else None
        MIXERS[name].check_arg(name, arg)
        out.append((name, arg))
    return out


def accepts_sequence_parallel(factory: Factory) -> bool:
    """Whether ``factory`` takes a ``sequence_parallel`` keyword (or ``**kwargs``)."""
    try:
        params = inspect.signature(factory).parameters.values()
    except (TypeError, ValueError):  # pragma: no cover - builtins without a signature
        return False
    return any(p.name == "sequence_parallel" or p.kind is inspect.Parameter.VAR_KEYWORD for p in params)


def build_mixer(config: "LMConfig", name: str, arg: str | None, *, rngs: nnx.Rngs,
                sequence_parallel=None) -> nnx.Module:
    """The module for one parsed spec entry (sequence-parallel when ``sequence_parallel`` is set)."""
    if name not in MIXERS:
        raise ValueError(f"unknown mixer {name!r}; registered: {registered_mixers()}")
    MIXERS[name].check_arg(name, arg)
    factory = MIXERS[name].factory
    if sequence_parallel is None:
        return factory(config, arg, rngs=rngs)
    if not accepts_sequence_parallel(factory):
        raise ValueError(f"mixer {name!r} does not support sequence parallelism (its factory takes no "
                         f"sequence_parallel keyword)")
    return factory(config, arg, rngs=rngs, sequence_parallel=sequence_parallel)


# ----------------------------------------------------------------------------- softmax attention


def _attention_factory(make_mask: Callable[[str | None], masks_lib.Mask]) -> Factory:
    def factory(config: "LMConfig", arg: str | None, *, rngs: nnx.Rngs, sequence_parallel=None) -> Attention:
        return Attention(config.d_model, config.num_heads, num_kv_heads=config.num_kv_heads,
                         mask=make_mask(arg), rope=True, rope_theta=config.rope_theta,
                         dtype=config.compute_dtype, param_dtype=config.parameter_dtype,
                         sequence_parallel=sequence_parallel, rngs=rngs)
    return factory


register_mixer("attn", _attention_factory(lambda arg: masks_lib.Causal()), check_arg=no_arg,
               doc="causal softmax attention")
register_mixer("swa", _attention_factory(lambda arg: masks_lib.LocalWindow(int(arg))), check_arg=int_arg,
               doc="sliding-window softmax attention over the last W keys (swa:W)")
register_mixer("chunk", _attention_factory(lambda arg: masks_lib.ChunkedCausal(int(arg))), check_arg=int_arg,
               doc="chunked causal softmax attention, chunks of C tokens (chunk:C)")
register_mixer("stream", _attention_factory(lambda arg: masks_lib.streaming(int(arg), 4)), check_arg=int_arg,
               doc="StreamingLLM: window of W keys plus the first 4 tokens (stream:W)")
