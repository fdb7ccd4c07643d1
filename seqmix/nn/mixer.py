"""The mixer registry: named sequence mixers that a model builds one per layer (``"gdn,gdn,attn"``).

A mixer factory ``factory(dims: MixerDims, arg: str | None, *, rngs, sequence_parallel=None) -> module``
returns a module with the mixer protocol:

* ``__call__(x [B, T, d_model], *, positions=None, segment_ids=None) -> [B, T, d_model]``;
* ``init_cache(batch, max_len) -> cache`` (any pytree);
* ``decode(x [B, T_new, d_model], cache, *, segment_ids=None) -> (y, cache)``, whose outputs equal the
  parallel form's rows for those tokens.

Factories live beside their modules (``seqmix.nn.gla`` registers ``gla`` ...) and take a small
:class:`MixerDims`, not a model config. A family's record names the module file that registers each of
its mixers (``Family.mixers``), so :func:`lookup` finds every family's mixer whatever was imported first;
a user mixer outside any family is found once its module is imported, and :func:`mixer_modules` tells a
checkpoint which modules to import before it rebuilds a model.
"""

from __future__ import annotations

import dataclasses
import importlib
import inspect
from typing import Any, Callable

from flax import nnx

Factory = Callable[..., nnx.Module]
ArgCheck = Callable[[str, "str | None"], None]


@dataclasses.dataclass(frozen=True)
class MixerDims:
    """What a mixer factory may read: widths, heads, RoPE base, the short-conv width and dtypes (jnp dtypes).

    ``short_conv``: width of the causal depthwise convolution on every mixer's q, k, v projections
    (0 = none; docs/mqar.md says why every mixer has one by default).
    """

    d_model: int
    num_heads: int
    num_kv_heads: int | None = None
    rope_theta: float = 10000.0
    dtype: Any = None
    param_dtype: Any = None
    short_conv: int = 4

    def layer_kwargs(self, sequence_parallel=None) -> dict:
        """The keyword arguments every seqmix layer takes: short conv, dtypes and sequence parallelism."""
        return dict(short_conv=self.short_conv or None, dtype=self.dtype, param_dtype=self.param_dtype,
                    sequence_parallel=sequence_parallel)


@dataclasses.dataclass(frozen=True)
class MixerEntry:
    """A registered mixer: its factory, its argument check, a one-line description, its module, and an
    argument that builds a small layer (``None``: it builds without one; tests build every mixer so)."""

    name: str
    factory: Factory
    check_arg: ArgCheck
    doc: str = ""
    module: str = ""
    example: str | None = None


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


def optional_int_arg(name: str, arg: str | None) -> None:
    if arg is not None:
        int_arg(name, arg)


def register_mixer(name: str, factory: Factory, *, check_arg: ArgCheck | None = None, doc: str = "",
                   example: str | None = None, replace: bool = False) -> None:
    """Register ``factory(dims, arg, *, rngs, sequence_parallel=None) -> module`` under ``name``.

    ``check_arg(name, arg)`` raises ValueError for a bad ``:arg`` (default: any arg accepted); it runs
    when a spec is parsed, so a bad config fails before any module is built. ``example``: an argument
    ``check_arg`` accepts (required when it rejects none), e.g. ``"8"`` for ``swa:8``.
    """
    if not isinstance(name, str) or not name.strip() or any(c in name for c in ",:* \t\n"):
        raise ValueError(f"mixer name must be a non-empty string without ',', ':', '*' or spaces; got {name!r}")
    if name in MIXERS and not replace:
        raise ValueError(f"mixer {name!r} is already registered (pass replace=True to override)")
    check_arg = check_arg or (lambda n, a: None)
    check_arg(name, example)  # the example must pass the check (None for argument-free mixers)
    MIXERS[name] = MixerEntry(name, factory, check_arg, doc, getattr(factory, "__module__", ""), example)


def _declared() -> dict[str, str]:
    """Mixer name -> module path, from the family records."""
    from seqmix.ops._registry import FAMILIES

    out = {}
    for fam in FAMILIES.values():
        out.update(fam.mixers)
    return out


def lookup(name: str) -> MixerEntry | None:
    """The entry for ``name``, importing the module a family record names for it if needed."""
    if name not in MIXERS:
        module = _declared().get(name)
        if module is not None:
            importlib.import_module(module)
    return MIXERS.get(name)


def registered_mixers() -> list[str]:
    """Every mixer name known now: registered ones and those the family records declare."""
    return sorted(set(MIXERS) | set(_declared()))


def mixer_modules(names) -> dict[str, str]:
    """name -> module that registered it (what a checkpoint records to rebuild a model elsewhere)."""
    out = {}
    for n in names:
        entry = lookup(n)
        if entry is not None and entry.module:
            out[n] = entry.module
    return out


def accepts_sequence_parallel(factory: Factory) -> bool:
    """Whether ``factory`` takes a ``sequence_parallel`` keyword (or ``**kwargs``)."""
    try:
        params = inspect.signature(factory).parameters.values()
    except (TypeError, ValueError):  # pragma: no cover - builtins without a signature
        return False
    return any(p.name == "sequence_parallel" or p.kind is inspect.Parameter.VAR_KEYWORD for p in params)


def build_mixer(dims: MixerDims, name: str, arg: str | None, *, rngs: nnx.Rngs, sequence_parallel=None) -> nnx.Module:
    """The module for one spec entry (sequence-parallel when ``sequence_parallel`` is set)."""
    entry = lookup(name)
    if entry is None:
        raise ValueError(f"unknown mixer {name!r}; registered: {registered_mixers()}")
    entry.check_arg(name, arg)
    if sequence_parallel is None:
        return entry.factory(dims, arg, rngs=rngs)
    if not accepts_sequence_parallel(entry.factory):
        raise ValueError(f"mixer {name!r} does not support sequence parallelism (its factory takes no "
                         f"sequence_parallel keyword)")
    return entry.factory(dims, arg, rngs=rngs, sequence_parallel=sequence_parallel)
