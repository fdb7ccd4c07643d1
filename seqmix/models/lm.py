"""A small decoder-only language model: embeddings, one pre-norm block per mixer entry, RMSNorm, logits.

``LMConfig`` is a frozen, JSON-safe dataclass (saved with checkpoints). ``LM(config, rngs=...)``:

* ``lm(tokens [B, T], positions=[T], segment_ids=[B, T]) -> logits [B, T, vocab]`` (fp32);
* ``caches = lm.init_cache(B, max_len)``; ``logits, caches = lm.decode(tokens [B, T_new], caches)``;
* ``lm.generate(prompt [B, T0], n, temperature=0, top_k=None, key=None) -> [B, T0 + n]`` (greedy, or
  sampled with a temperature and top-k; jitted: prefill then a loop of steps).

Token ids must lie in ``[0, vocab_size)``: outside jit anything else is a ValueError; under jit (ids not
known) an invalid id's rows get NaN logits, never the embedding of a clamped or wrapped id.
"""

from __future__ import annotations

import dataclasses
import functools
import importlib
import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from seqmix.models import mixers as mixers_lib
from seqmix.nn.blocks import Block
from seqmix.nn.norm import RMSNorm
from seqmix.ops import _checks

_COMPUTE_DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}
_PARAM_DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}


def _int_at_least(name: str, value, low: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise ValueError(f"LMConfig.{name} must be an int >= {low}; got {value!r}")


@dataclasses.dataclass(frozen=True)
class LMConfig:
    """Hyperparameters of :class:`LM`. Every field is JSON-safe (``to_dict`` / ``from_dict``).

    mixers: the layers' mixer spec (``seqmix.models.mixers``), e.g. ``"attn,swa:128,attn"`` or ``"gla*2"``.
    short_conv: width of the causal depthwise conv on every mixer's q, k, v projections (0 = none).
    mlp_hidden: SwiGLU width; None = ``8/3·d_model`` rounded up to a multiple of 32 (``mlp_dim``).
    max_len: the longest sequence ``generate`` and ``init_cache`` serve by default.
    dtype: compute dtype name (``"float32"``, ``"bfloat16"``, ``"float16"``);
    param_dtype: parameter dtype name (``"float32"``, ``"bfloat16"``).
    """

    vocab_size: int = 256
    d_model: int = 128
    num_heads: int = 4
    num_kv_heads: int | None = None
    mixers: str = "attn,attn"
    short_conv: int = 4
    mlp_hidden: int | None = None
    max_len: int = 1024
    rope_theta: float = 10000.0
    tie_embeddings: bool = True
    dtype: str = "float32"
    param_dtype: str = "float32"

    def __post_init__(self):
        _int_at_least("vocab_size", self.vocab_size, 1)
        _int_at_least("d_model", self.d_model, 1)
        _int_at_least("num_heads", self.num_heads, 1)
        _int_at_least("max_len", self.max_len, 1)
        _int_at_least("short_conv", self.short_conv, 0)
        if self.d_model % self.num_heads:
            raise ValueError(f"LMConfig.num_heads must divide d_model; got num_heads={self.num_heads}, "
                             f"d_model={self.d_model}")
        if (self.d_model // self.num_heads) % 2:
            raise ValueError(f"LMConfig: head_dim = d_model / num_heads must be even for RoPE; got "
                             f"{self.d_model} / {self.num_heads} = {self.d_model // self.num_heads}")
        if self.num_kv_heads is not None:
            _int_at_least("num_kv_heads", self.num_kv_heads, 1)
            if self.num_heads % self.num_kv_heads:
                raise ValueError(f"LMConfig.num_kv_heads must divide num_heads; got num_kv_heads="
                                 f"{self.num_kv_heads}, num_heads={self.num_heads}")
        if self.mlp_hidden is not None:
            _int_at_least("mlp_hidden", self.mlp_hidden, 1)
        if isinstance(self.rope_theta, bool) or not isinstance(self.rope_theta, (int, float)) or not self.rope_theta > 0:
            raise ValueError(f"LMConfig.rope_theta must be a positive number; got {self.rope_theta!r}")
        if not isinstance(self.tie_embeddings, bool):
            raise ValueError(f"LMConfig.tie_embeddings must be a bool; got {self.tie_embeddings!r}")
        if self.dtype not in _COMPUTE_DTYPES:
            raise ValueError(f"LMConfig.dtype must be one of {sorted(_COMPUTE_DTYPES)}; got {self.dtype!r}")
        if self.param_dtype not in _PARAM_DTYPES:
            raise ValueError(f"LMConfig.param_dtype must be one of {sorted(_PARAM_DTYPES)}; got {self.param_dtype!r}")
        try:
            mixers_lib.parse_mixers(self.mixers)
        except ValueError as err:
            raise ValueError(f"LMConfig.mixers: {err}") from None

    # ------------------------------------------------------------------ derived values

    @property
    def num_layers(self) -> int:
        return len(self.mixer_specs)

    @property
    def mixer_specs(self) -> list[tuple[str, str | None]]:
        return mixers_lib.parse_mixers(self.mixers)

    @property
    def head_dim(self) -> int:
        return self.d_model // self.num_heads

    @property
    def mlp_dim(self) -> int:
        if self.mlp_hidden is not None:
            return self.mlp_hidden
        return 32 * math.ceil(8 * self.d_model / 3 / 32)

    @property
    def dims(self) -> mixers_lib.MixerDims:
        """What the mixer factories read (they never see the whole config)."""
        return mixers_lib.MixerDims(self.d_model, self.num_heads, self.num_kv_heads, self.rope_theta,
                                    self.compute_dtype, self.parameter_dtype, self.short_conv)

    @property
    def compute_dtype(self):
        return _COMPUTE_DTYPES[self.dtype]

    @property
    def parameter_dtype(self):
        return _PARAM_DTYPES[self.param_dtype]

    # ------------------------------------------------------------------ serialization

    def to_dict(self) -> dict[str, Any]:
        """A JSON-safe dict of the fields plus ``mixer_modules`` (the modules that register the mixers it
        names, so ``from_dict`` rebuilds a model with user mixers in a fresh process)."""
        d = dataclasses.asdict(self)
        d["mixer_modules"] = mixers_lib.mixer_modules(sorted({n for n, _ in self.mixer_specs}))
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "LMConfig":
        """Build from ``to_dict``'s output; missing fields take their defaults, unknown ones raise."""
        if not isinstance(d, dict):
            raise ValueError(f"LMConfig.from_dict expects a dict; got {type(d).__name__}")
        d = dict(d)
        d.setdefault("short_conv", 0)  # saved before short convs existed: the model had none
        for module in sorted(set((d.pop("mixer_modules", None) or {}).values())):
            importlib.import_module(module)
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"LMConfig.from_dict: unknown fields {unknown}; expected a subset of {sorted(known)}")
        return cls(**d)


class LM(nnx.Module):
    """Decoder-only LM over :class:`LMConfig`: token embedding, ``num_layers`` pre-norm blocks (mixer +
    SwiGLU), final RMSNorm, logits by the tied embedding (or a separate head).

    ``sequence_parallel`` (a :class:`seqmix.parallel.SequenceParallel`, or None) is passed to every
    mixer: the parallel form then runs each mixer's op sequence-parallel over the mesh (LASP-2H by
    default), on global arrays, with the same parameters and results. It is not part of ``config``
    (a mesh is not serializable); decoding and ``generate`` stay single-device."""

    def __init__(self, config: LMConfig, *, rngs: nnx.Rngs, sequence_parallel=None):
        if not isinstance(config, LMConfig):
            raise ValueError(f"LM: config must be an LMConfig; got {type(config).__name__}")
        if sequence_parallel is not None:
            from seqmix.parallel.config import check_sequence_parallel

            check_sequence_parallel(sequence_parallel, "LM")
        self.config = config
        self.sequence_parallel = sequence_parallel
        dtype, pdtype = config.compute_dtype, config.parameter_dtype
        self.embed = nnx.Embed(config.vocab_size, config.d_model, dtype=dtype, param_dtype=pdtype,
                               embedding_init=nnx.initializers.normal(0.02), rngs=rngs)
        self.blocks = nnx.List([
            Block(mixers_lib.build_mixer(config.dims, name, arg, rngs=rngs, sequence_parallel=sequence_parallel),
                  config.d_model, config.mlp_dim,
                  dtype=dtype, param_dtype=pdtype, rngs=rngs)
            for name, arg in config.mixer_specs])
        self.norm = RMSNorm(config.d_model, dtype=dtype, param_dtype=pdtype)
        self.head = None if config.tie_embeddings else nnx.Linear(
            config.d_model, config.vocab_size, use_bias=False, dtype=dtype, param_dtype=pdtype, rngs=rngs)

    # ------------------------------------------------------------------ helpers

    def _check_tokens(self, tokens, name: str = "tokens"):
        tokens = jnp.asarray(tokens)
        if tokens.ndim != 2 or not jnp.issubdtype(tokens.dtype, jnp.integer):
            raise ValueError(f"LM: {name} must be an int array [batch, seq]; got {tokens.dtype}{list(tokens.shape)}")
        if tokens.shape[1] < 1:
            raise ValueError(f"LM: {name} must hold at least one token per row; got shape {list(tokens.shape)}")
        if _checks.is_concrete(tokens) and tokens.size:
            values = np.asarray(tokens)  # numpy: a jnp reduction would be traced inside a caller's jit
            lo, hi = int(values.min()), int(values.max())
            if lo < 0 or hi >= self.config.vocab_size:
                raise ValueError(f"LM: {name} must be ids in [0, vocab_size={self.config.vocab_size}); "
                                 f"got values in [{lo}, {hi}]")
        # Under jit the ids are not known: send every invalid one (negative ids included, which a gather
        # would wrap) past the table, where the embedding gather fills NaN, so its logits are NaN.
        vocab = self.config.vocab_size
        return jnp.where((tokens < 0) | (tokens >= vocab), vocab, tokens).astype(jnp.int32)

    def _logits(self, h):
        h = self.norm(h)
        if self.head is not None:
            return self.head(h).astype(jnp.float32)
        table = self.embed.embedding[...].astype(h.dtype)
        return jnp.einsum("btd,vd->btv", h, table, preferred_element_type=jnp.float32)

    # ------------------------------------------------------------------ parallel form

    def __call__(self, tokens, *, positions=None, segment_ids=None):
        """tokens int ``[B, T]``; positions int ``[T]`` (default ``arange(T)``); segment_ids int
        ``[B, T]`` (packed documents) or None. Returns fp32 logits ``[B, T, vocab_size]``."""
        tokens = self._check_tokens(tokens)
        h = self.embed(tokens)
        for block in self.blocks:
            h = block(h, positions=positions, segment_ids=segment_ids)
        return self._logits(h)

    # ------------------------------------------------------------------ decoding

    def init_cache(self, batch: int, max_len: int | None = None) -> list:
        """Per-layer caches for sequences of up to ``max_len`` tokens (default ``config.max_len``)."""
        max_len = self.config.max_len if max_len is None else max_len
        return [block.init_cache(batch, max_len) for block in self.blocks]

    def decode(self, tokens, caches, *, segment_ids=None):
        """Feed ``tokens [B, T_new]`` after the cached ones. Returns ``(logits [B, T_new, vocab] fp32,
        caches)``; the logits equal ``__call__``'s rows for these tokens."""
        tokens = self._check_tokens(tokens)
        if not isinstance(caches, (list, tuple)) or len(caches) != len(self.blocks):
            got = f"{type(caches).__name__} of {len(caches)}" if isinstance(caches, (list, tuple)) else type(caches).__name__
            raise ValueError(f"LM.decode: caches must be a list of {len(self.blocks)} per-layer caches "
                             f"(from init_cache); got {got}")
        h = self.embed(tokens)
        new_caches = []
        for block, cache in zip(self.blocks, caches):
            h, cache = block.decode(h, cache, segment_ids=segment_ids)
            new_caches.append(cache)
        return self._logits(h), new_caches

    def generate(self, prompt, max_new_tokens: int, *, temperature: float = 0.0, top_k: int | None = None,
                 key=None):
        """Continue ``prompt`` int ``[B, T0]`` -> ``[B, T0 + max_new_tokens]`` int32.

        ``temperature = 0`` (default) is greedy; ``temperature > 0`` samples from
        ``softmax(logits / temperature)``, restricted to the ``top_k`` most likely tokens when given,
        with ``key`` (a ``jax.random`` key; default ``jax.random.key(0)``). Jitted (one compilation per
        prompt shape, ``max_new_tokens`` and sampling settings): prefill the prompt through the caches,
        then ``max_new_tokens - 1`` single-token decode steps in a ``fori_loop``.
        """
        prompt = self._check_tokens(prompt, "prompt")
        if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 0:
            raise ValueError(f"LM.generate: max_new_tokens must be an int >= 0; got {max_new_tokens!r}")
        if isinstance(temperature, bool) or not isinstance(temperature, (int, float)) or not temperature >= 0:
            raise ValueError(f"LM.generate: temperature must be a number >= 0; got {temperature!r}")
        if top_k is not None and (isinstance(top_k, bool) or not isinstance(top_k, int)
                                  or not 1 <= top_k <= self.config.vocab_size):
            raise ValueError(f"LM.generate: top_k must be None or an int in [1, vocab_size="
                             f"{self.config.vocab_size}]; got {top_k!r}")
        total = prompt.shape[1] + max_new_tokens
        if total > self.config.max_len:
            raise ValueError(f"LM.generate: prompt length {prompt.shape[1]} + max_new_tokens {max_new_tokens} "
                             f"= {total} exceeds config.max_len={self.config.max_len}")
        if max_new_tokens == 0:
            return prompt
        key = jax.random.key(0) if key is None else key
        graphdef, state = nnx.split(self)
        return _generate(graphdef, state, prompt, max_new_tokens, float(temperature), top_k, key)


def _next_token(logits, temperature: float, top_k: int | None, key):
    """Greedy (``temperature == 0``) or a sample from the tempered, top-k-restricted distribution."""
    if temperature == 0:
        return jnp.argmax(logits, axis=-1).astype(jnp.int32)
    logits = logits.astype(jnp.float32) / temperature
    if top_k is not None:
        kth = jax.lax.top_k(logits, top_k)[0][..., -1:]
        logits = jnp.where(logits >= kth, logits, -jnp.inf)
    return jax.random.categorical(key, logits, axis=-1).astype(jnp.int32)


@functools.partial(jax.jit, static_argnums=(0, 3, 4, 5))
def _generate(graphdef, state, prompt, max_new_tokens: int, temperature: float, top_k, key):
    model = nnx.merge(graphdef, state)
    b, t0 = prompt.shape
    caches = model.init_cache(b, t0 + max_new_tokens)
    logits, caches = model.decode(prompt, caches)
    tok = _next_token(logits[:, -1], temperature, top_k, jax.random.fold_in(key, 0))
    out = jnp.zeros((b, max_new_tokens), jnp.int32).at[:, 0].set(tok)

    def step(i, carry):
        out, tok, caches = carry
        logits, caches = model.decode(tok[:, None], caches)
        tok = _next_token(logits[:, -1], temperature, top_k, jax.random.fold_in(key, i))
        return out.at[:, i].set(tok), tok, caches

    out, _, _ = jax.lax.fori_loop(1, max_new_tokens, step, (out, tok, caches))
    return jnp.concatenate([prompt, out], axis=1)
