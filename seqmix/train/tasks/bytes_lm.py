"""Byte-level language modeling on the Python standard library's own source code.

Every machine that runs seqmix has this corpus: the ``*.py`` files under
``sysconfig.get_paths()["stdlib"]`` (tests, vendored packages and generated data tables left out).
Files are read in sorted path order up to a size cap, so the corpus is the same on every run with the
same Python. Every ``val_every``-th file is held out for validation, so no window of validation text
was seen in training.

Training batches are random windows of ``seq_len + 1`` bytes whose offsets are drawn from a generator
seeded by ``(seed, step)``. Validation uses fixed, evenly spaced windows of the held-out files.
Validation loss is reported in bits per byte (nats / ln 2) beside the training split's unigram
entropy, the bits per byte of a model that ignores context.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import os
import sysconfig
from pathlib import Path

import numpy as np

# Directories that are not ordinary library code: tests, third-party packages, generated tables.
_SKIP_DIRS = frozenset({"site-packages", "dist-packages", "test", "tests", "__pycache__", "encodings",
                        "pydoc_data", "idle_test"})


@dataclasses.dataclass(frozen=True)
class Corpus:
    """The byte corpus split by file: ``train`` and ``val`` are uint8 arrays of concatenated files."""

    root: str
    train: np.ndarray
    val: np.ndarray
    train_files: int
    val_files: int


def _source_files(root: Path) -> list[Path]:
    files = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = [d for d in dirnames if d not in _SKIP_DIRS and not d.startswith(("config-", "."))]
        files.extend(Path(dirpath) / f for f in filenames
                     if f.endswith(".py") and not f.startswith("_sysconfigdata"))  # generated, per machine
    return sorted(files, key=lambda p: p.relative_to(root).parts)


@functools.lru_cache(maxsize=4)
def load_stdlib_corpus(max_bytes: int = 8_000_000, val_every: int = 20, root: str | None = None) -> Corpus:
    """Read the standard library's ``*.py`` files (sorted by path) until ``max_bytes``; split by file.

    File ``i`` (in sorted order) goes to validation when ``i % val_every == val_every - 1``.
    """
    if max_bytes < 100_000:
        raise ValueError(f"bytes: max_bytes must be at least 100000 for a usable corpus, got {max_bytes}")
    if val_every < 2:
        raise ValueError(f"bytes: val_every must be >= 2 (every n-th file is held out), got {val_every}")
    base = Path(root if root is not None else sysconfig.get_paths()["stdlib"])
    if not base.is_dir():
        raise ValueError(f"bytes: the Python standard library is not a directory here: {base}")
    train, val, total = [], [], 0
    for i, path in enumerate(_source_files(base)):
        if total >= max_bytes:
            break
        data = path.read_bytes()[: max_bytes - total]
        total += len(data)
        (val if i % val_every == val_every - 1 else train).append(data)
    if sum(map(len, val)) < 4096:
        raise ValueError(f"bytes: too little held-out source under {base} ({total} bytes read, "
                         f"{sum(map(len, val))} held out); raise max_bytes")
    as_array = lambda parts: np.frombuffer(b"".join(parts), dtype=np.uint8)  # noqa: E731
    return Corpus(root=str(base), train=as_array(train), val=as_array(val),
                  train_files=len(train), val_files=len(val))


def unigram_entropy_bits(data: np.ndarray) -> float:
    """Entropy in bits per byte of the byte histogram of ``data`` (uint8): the context-free baseline."""
    counts = np.bincount(np.asarray(data, np.uint8).ravel(), minlength=256).astype(np.float64)
    p = counts[counts > 0] / counts.sum()
    return float(-(p * np.log2(p)).sum())


def _windows(data: np.ndarray, offsets: np.ndarray, seq_len: int) -> dict[str, np.ndarray]:
    w = data[offsets[:, None] + np.arange(seq_len + 1)[None, :]].astype(np.int32)
    return {"inputs": w[:, :-1], "targets": w[:, 1:], "loss_mask": np.ones((len(offsets), seq_len), np.float32)}


class BytesLM:
    """Next-byte prediction on standard-library Python source (vocabulary: the 256 byte values).

    Options: ``seed`` (training window order), ``max_bytes`` (corpus size cap), ``val_every`` (hold out
    every n-th file), ``num_eval_batches`` (validation windows = this many batches).
    """

    name = "bytes"
    vocab_size = 256
    primary_metric = "val_bpb"
    sample_prompts = (b"def ",)

    def __init__(self, *, seed: int = 0, max_bytes: int = 8_000_000, val_every: int = 20,
                 num_eval_batches: int = 8):
        if num_eval_batches < 1:
            raise ValueError(f"bytes: num_eval_batches must be >= 1, got {num_eval_batches}")
        self.seed = int(seed)
        self.num_eval_batches = int(num_eval_batches)
        self.corpus = load_stdlib_corpus(int(max_bytes), int(val_every))

    def check(self, seq_len: int) -> None:
        limit = min(len(self.corpus.train), len(self.corpus.val)) - 1
        if not 1 <= seq_len <= limit:
            raise ValueError(f"bytes: seq_len must be in [1, {limit}] for this corpus, got {seq_len}")

    def batch(self, step: int, batch_size: int, seq_len: int) -> dict[str, np.ndarray]:
        """Random training windows; a pure function of ``(seed, step)``."""
        self.check(seq_len)
        rng = np.random.default_rng([self.seed, 0, int(step)])
        offsets = rng.integers(0, len(self.corpus.train) - seq_len, size=batch_size)
        return _windows(self.corpus.train, offsets, seq_len)

    def eval_batches(self, batch_size: int, seq_len: int) -> list[dict[str, np.ndarray]]:
        """``num_eval_batches`` batches of evenly spaced windows over the held-out files."""
        self.check(seq_len)
        n = self.num_eval_batches * batch_size
        offsets = np.linspace(0, len(self.corpus.val) - seq_len - 1, n).astype(np.int64)
        w = _windows(self.corpus.val, offsets, seq_len)
        return [{k: v[i * batch_size:(i + 1) * batch_size] for k, v in w.items()}
                for i in range(self.num_eval_batches)]

    def metrics(self, loss: float, accuracy: float) -> dict[str, float]:
        return {"val_loss": float(loss), "val_bpb": float(loss) / math.log(2), "val_acc": float(accuracy)}

    def summary(self) -> dict:
        c = self.corpus
        return {"corpus": f"{c.root}/**/*.py", "train_bytes": int(len(c.train)), "val_bytes": int(len(c.val)),
                "train_files": c.train_files, "val_files": c.val_files,
                "unigram_entropy_bpb": unigram_entropy_bits(c.train)}

    def describe(self) -> str:
        s = self.summary()
        return (f"corpus {s['corpus']}: {s['train_files']} files ({s['train_bytes'] / 1e6:.2f} MB) for training, "
                f"{s['val_files']} held out ({s['val_bytes'] / 1e6:.2f} MB); unigram entropy "
                f"{s['unigram_entropy_bpb']:.3f} bits/byte")

    @staticmethod
    def encode(text: bytes | str) -> np.ndarray:
        data = text.encode() if isinstance(text, str) else bytes(text)
        return np.frombuffer(data, np.uint8).astype(np.int32)

    @staticmethod
    def decode(tokens) -> str:
        return bytes(np.asarray(tokens, np.int64).clip(0, 255).astype(np.uint8).tolist()).decode("utf-8", "replace")
