"""Mixer spec strings: ``"attn,swa:128,attn"`` -> one (name, arg) per layer.

A spec is a comma-separated list of entries; an entry is ``name`` or ``name:arg``, optionally followed
by ``*N`` for N consecutive layers of it (``"gla*2"`` = ``"gla,gla"``; ``"swa:64*3,attn"``). Whitespace
around names, colons, stars and commas is ignored. Names are those of the mixer registry
(:mod:`seqmix.nn.mixer`, where factories live beside their modules and take a ``MixerDims``); every
family's mixers are found whatever was imported first, because the family records name the modules
that register them.
"""

from __future__ import annotations

from seqmix.nn.mixer import (MIXERS, MixerDims, build_mixer, int_arg, lookup, mixer_modules, no_arg,
                             register_mixer, registered_mixers)

__all__ = ["MIXERS", "MixerDims", "build_mixer", "int_arg", "mixer_modules", "no_arg", "parse_mixers",
           "register_mixer", "registered_mixers"]


def parse_mixers(spec: str) -> list[tuple[str, str | None]]:
    """``"attn, swa:128*2"`` -> ``[("attn", None), ("swa", "128"), ("swa", "128")]`` (one pair per layer).

    Raises ValueError for an empty spec or entry, an unknown name (listing the registered ones), an
    argument its mixer rejects or a repeat count that is not a positive integer.
    """
    if not isinstance(spec, str) or not spec.strip():
        raise ValueError(f"mixers spec must be a non-empty string like 'attn,swa:128'; got {spec!r}")
    out = []
    for i, entry in enumerate(spec.split(",")):
        entry, star, count = (part.strip() for part in entry.partition("*"))
        if star and not (count.isdigit() and int(count) >= 1):
            raise ValueError(f"mixers spec {spec!r}: entry {i} ({entry}*{count}) needs a positive integer "
                             f"repeat count after '*', e.g. {entry or 'gla'}*2")
        name, sep, arg = (part.strip() for part in entry.partition(":"))
        if not name:
            raise ValueError(f"mixers spec {spec!r}: entry {i} is empty; expected 'name' or 'name:arg'")
        found = lookup(name)
        if found is None:
            raise ValueError(f"mixers spec {spec!r}: unknown mixer {name!r}; registered: {registered_mixers()}")
        if sep and not arg:
            raise ValueError(f"mixers spec {spec!r}: entry {i} ({entry.strip()!r}) has ':' but no argument")
        arg = arg if sep else None
        found.check_arg(name, arg)
        out.extend([(name, arg)] * (int(count) if star else 1))
    return out
