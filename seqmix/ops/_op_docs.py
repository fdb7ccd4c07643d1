"""User-facing docstrings of the ops (``help(seqmix.ops.gla)``), composed from one text per argument.

The arguments every recurrent op shares are written once here; each family's record gives its summary,
its recurrence, its own arguments and a runnable example (``tests/ops/test_op_docs.py`` runs every
example and checks that each parameter of the signature is documented).
"""

from __future__ import annotations

import textwrap

RECURRENT_LEADING = {
    "q": "float ``[B, T, H, Dk]`` queries (float32, bfloat16 or float16; q, k, v share one dtype).",
    "k": "``[B, T, H, Dk]`` keys.",
    "v": "``[B, T, H, Dv]`` values.",
}

RECURRENT_TRAILING = {
    "scale": "query scale; default ``Dk ** -0.5``.",
    "initial_state": "float32 ``[B, H, Dk, Dv]`` state before the first token (default zeros); the "
                     "``final_state`` of a previous call continues it exactly.",
    "return_state": "also return the state after the last token.",
    "segment_ids": "int ``[B, T]``: packed documents; the state restarts at 0 where the id changes.",
    "chunk_size": "tokens per chunk of the chunked forms (a performance knob: results agree to fp32 "
                  "rounding).",
    "impl": "``None`` (the fastest implementation with test evidence on this platform, else ``\"xla\"``), "
            "or a name: ``\"reference\"`` (fp32 token loop), ``\"xla\"`` (chunked), ``\"pallas_tpu\"``. "
            "``seqmix.ops.explain`` says which runs and why.",
}

RECURRENT_RETURNS = ("``o`` ``[B, T, H, Dv]`` in the input dtype, or ``(o, final_state)`` with "
                     "``final_state`` float32 ``[B, H, Dk, Dv]`` when ``return_state=True``.")


def _section(title: str, items: dict[str, str]) -> str:
    lines = [f"{title}:"]
    for name, text in items.items():
        body = textwrap.fill(text, 96, initial_indent=" " * 4 + f"{name}: ", subsequent_indent=" " * 8)
        lines.append(body)
    return "\n".join(lines)


def compose(summary: str, body: str, args: dict[str, str], returns: str, example: str) -> str:
    """A Google-style docstring: summary, body, Args, Returns, Example (indented code)."""
    parts = [summary.strip(), textwrap.dedent(body).strip(), _section("Args", args),
             "Returns:\n" + textwrap.fill(returns, 96, initial_indent=" " * 4, subsequent_indent=" " * 4),
             "Example::\n\n" + textwrap.indent(textwrap.dedent(example).strip(), " " * 4)]
    return "\n\n".join(p for p in parts if p) + "\n"


def recurrent_doc(summary: str, body: str, args: dict[str, str], example: str, *,
                  returns: str = RECURRENT_RETURNS) -> str:
    """The docstring of a recurrent op: shared q/k/v and options around the family's own ``args``."""
    return compose(summary, body, {**RECURRENT_LEADING, **args, **RECURRENT_TRAILING}, returns, example)


EXAMPLE_INPUTS = """\
import jax, jax.numpy as jnp
from seqmix import ops
B, T, H, D = 2, 100, 4, 32
kq, kk, kv, kg = jax.random.split(jax.random.key(0), 4)
q, k, v = (jax.random.normal(x, (B, T, H, D)) for x in (kq, kk, kv))
"""

LOG_GATE = ("natural-log decay, <= 0 (0 keeps the state, ``-inf`` resets it; any value <= -30 acts as a "
            "reset to fp32 precision in the chunked forms)")
