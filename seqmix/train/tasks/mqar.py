"""Multi-query associative recall (MQAR), as in Zoology (Arora et al., 2023) and Based.

Each sequence starts with ``num_kv_pairs`` key-value pairs ``k1 v1 k2 v2 ...`` (keys distinct within a
sequence, drawn from the lower half of the vocabulary; values from the upper half, so the two never
collide). Every key is then queried once, in a random order, at random positions of the rest of the
sequence; the other positions hold the pad token 0. At a query position the input is the key and the
target is its value; the loss mask is 1 there and 0 everywhere else, so loss and accuracy measure
recall only.

    inputs   k1 v1 k2 v2 k3 v3  0 k2  0  0 k1 k3  0
    targets   .  .  .  .  .  .  . v2  .  .  v1 v3 .
    mask      0  0  0  0  0  0  0  1  0  0  1  1  0

Training sequences are a pure function of ``(seed, step)``; the validation set is fixed by ``seed``
and drawn from a different stream.
"""

from __future__ import annotations

import math

import numpy as np

PAD = 0


def min_seq_len(num_kv_pairs: int) -> int:
    """Two tokens per key-value pair plus one query per key."""
    return 3 * num_kv_pairs


def generate(rng: np.random.Generator, n: int, seq_len: int, *, vocab_size: int,
             num_kv_pairs: int) -> dict[str, np.ndarray]:
    """``n`` MQAR sequences of length ``seq_len`` (inputs, targets, loss_mask)."""
    p, half = num_kv_pairs, vocab_size // 2
    rows = np.arange(n)[:, None]
    # Distinct keys in [1, half) per row: the first p of a random permutation.
    keys = np.argsort(rng.random((n, half - 1)), axis=1)[:, :p] + 1
    values = rng.integers(half, vocab_size, size=(n, p))
    inputs = np.full((n, seq_len), PAD, np.int32)
    targets = np.full((n, seq_len), PAD, np.int32)
    mask = np.zeros((n, seq_len), np.float32)
    inputs[:, 0:2 * p:2] = keys
    inputs[:, 1:2 * p:2] = values
    order = np.argsort(rng.random((n, p)), axis=1)  # which pair each query asks for
    slots = np.sort(np.argsort(rng.random((n, seq_len - 2 * p)), axis=1)[:, :p], axis=1) + 2 * p
    inputs[rows, slots] = keys[rows, order]
    targets[rows, slots] = values[rows, order]
    mask[rows, slots] = 1.0
    return {"inputs": inputs, "targets": targets, "loss_mask": mask}


class MQAR:
    """Multi-query associative recall with ``num_kv_pairs`` pairs over a ``vocab_size`` vocabulary.

    Options: ``seed``, ``vocab_size`` (default 256, so byte-LM configs fit), ``num_kv_pairs`` (default 8),
    ``num_eval_examples`` (size of the fixed validation set, default 512).
    """

    name = "mqar"
    primary_metric = "val_acc"
    sample_prompts = ()
    # What ``seqmix train --task mqar`` uses for flags not given: the Zoology setting (2 layers, 64
    # tokens, 8 pairs) at a CPU-sized budget; docs/mqar.md gives what each mixer reaches with it.
    train_defaults = {"mixers": "attn*2", "seq_len": 64, "num_kv_pairs": 8, "steps": 1000, "eval_every": 250,
                      "ckpt_every": 500}

    def __init__(self, *, seed: int = 0, vocab_size: int = 256, num_kv_pairs: int = 8,
                 num_eval_examples: int = 512):
        if vocab_size < 6:
            raise ValueError(f"mqar: vocab_size must be >= 6, got {vocab_size}")
        if not 1 <= num_kv_pairs <= vocab_size // 2 - 1:
            raise ValueError(f"mqar: num_kv_pairs must be in [1, {vocab_size // 2 - 1}] (distinct keys from "
                             f"the lower half of a {vocab_size}-token vocabulary), got {num_kv_pairs}")
        if num_eval_examples < 1:
            raise ValueError(f"mqar: num_eval_examples must be >= 1, got {num_eval_examples}")
        self.seed = int(seed)
        self.vocab_size = int(vocab_size)
        self.num_kv_pairs = int(num_kv_pairs)
        self.num_eval_examples = int(num_eval_examples)

    def check(self, seq_len: int) -> None:
        need = min_seq_len(self.num_kv_pairs)
        if seq_len < need:
            raise ValueError(f"mqar: seq_len {seq_len} is too short for num_kv_pairs={self.num_kv_pairs}: "
                             f"it needs at least {need} (2 tokens per pair + 1 query per key)")

    def _generate(self, rng, n, seq_len):
        return generate(rng, n, seq_len, vocab_size=self.vocab_size, num_kv_pairs=self.num_kv_pairs)

    def batch(self, step: int, batch_size: int, seq_len: int) -> dict[str, np.ndarray]:
        """Fresh training sequences; a pure function of ``(seed, step)``."""
        self.check(seq_len)
        return self._generate(np.random.default_rng([self.seed, 0, int(step)]), batch_size, seq_len)

    def eval_batches(self, batch_size: int, seq_len: int) -> list[dict[str, np.ndarray]]:
        """The fixed validation set in batches; the last one is padded with all-masked rows."""
        self.check(seq_len)
        data = self._generate(np.random.default_rng([self.seed, 1]), self.num_eval_examples, seq_len)
        nb = math.ceil(self.num_eval_examples / batch_size)
        pad = nb * batch_size - self.num_eval_examples
        data = {k: np.concatenate([v, np.zeros((pad, seq_len), v.dtype)]) for k, v in data.items()}
        return [{k: v[i * batch_size:(i + 1) * batch_size] for k, v in data.items()} for i in range(nb)]

    def metrics(self, loss: float, accuracy: float) -> dict[str, float]:
        return {"val_loss": float(loss), "val_acc": float(accuracy)}

    def summary(self) -> dict:
        return {"vocab_size": self.vocab_size, "num_kv_pairs": self.num_kv_pairs,
                "val_examples": self.num_eval_examples, "chance_acc": 1.0 / (self.vocab_size - self.vocab_size // 2)}

    def describe(self) -> str:
        return (f"mqar: {self.num_kv_pairs} key-value pairs per sequence, keys and values from disjoint halves of "
                f"{self.vocab_size} tokens, {self.num_eval_examples} validation sequences "
                f"(chance {self.summary()['chance_acc']:.4f})")
