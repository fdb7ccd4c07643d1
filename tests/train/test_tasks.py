"""Training tasks: the byte corpus and its split, MQAR structure, determinism by step."""

import numpy as np
import pytest

from seqmix.train.tasks import get_task, load_stdlib_corpus, unigram_entropy_bits
from seqmix.train.tasks.mqar import generate

SMALL = 1_000_000  # corpus cap for tests: fast to load, still many files


@pytest.fixture(scope="module")
def bytes_task():
    return get_task("bytes", seed=3, max_bytes=SMALL, num_eval_batches=2)


def test_unknown_task():
    with pytest.raises(ValueError, match="unknown task 'nope'"):
        get_task("nope")


def test_corpus_is_python_source_and_split_by_file():
    corpus = load_stdlib_corpus(SMALL, 20)
    assert corpus.train.dtype == np.uint8 and corpus.val.dtype == np.uint8
    assert len(corpus.train) + len(corpus.val) <= SMALL
    assert corpus.train_files > 10 * corpus.val_files > 0
    text = corpus.train.tobytes()
    assert b"def " in text and b"import " in text
    # The split is by file: re-reading the same files gives the same split, and a long window of the
    # validation text does not occur in the training text.
    again = load_stdlib_corpus.__wrapped__(SMALL, 20)
    np.testing.assert_array_equal(again.train, corpus.train)
    np.testing.assert_array_equal(again.val, corpus.val)
    val = corpus.val.tobytes()
    for start in range(0, len(val) - 200, len(val) // 5):
        assert val[start:start + 200] not in text


def test_unigram_entropy():
    assert unigram_entropy_bits(np.zeros(100, np.uint8)) == 0.0
    assert abs(unigram_entropy_bits(np.arange(256, dtype=np.uint8)) - 8.0) < 1e-9
    h = unigram_entropy_bits(load_stdlib_corpus(SMALL, 20).train)
    assert 3.5 < h < 6.0, h  # English-like ASCII source code


def test_bytes_batches(bytes_task):
    b = bytes_task.batch(7, 4, 32)
    assert b["inputs"].shape == b["targets"].shape == b["loss_mask"].shape == (4, 32)
    assert b["inputs"].dtype == np.int32 and b["loss_mask"].dtype == np.float32
    np.testing.assert_array_equal(b["inputs"][:, 1:], b["targets"][:, :-1])  # next-byte targets
    assert (b["loss_mask"] == 1).all()
    again = get_task("bytes", seed=3, max_bytes=SMALL).batch(7, 4, 32)  # keyed by (seed, step) only
    for k in b:
        np.testing.assert_array_equal(b[k], again[k])
    assert not np.array_equal(bytes_task.batch(8, 4, 32)["inputs"], b["inputs"])
    assert not np.array_equal(get_task("bytes", seed=4, max_bytes=SMALL).batch(7, 4, 32)["inputs"], b["inputs"])


def test_bytes_eval_and_metrics(bytes_task):
    ev = bytes_task.eval_batches(4, 32)
    assert len(ev) == 2 and all(e["inputs"].shape == (4, 32) for e in ev)
    val = bytes_task.corpus.val.tobytes()
    assert ev[1]["inputs"][2].astype(np.uint8).tobytes() in val
    m = bytes_task.metrics(np.log(2) * 2.5, 0.5)
    assert abs(m["val_bpb"] - 2.5) < 1e-9
    s = bytes_task.summary()
    assert s["train_bytes"] > s["val_bytes"] > 0 and 3.5 < s["unigram_entropy_bpb"] < 6
    with pytest.raises(ValueError, match="seq_len"):
        bytes_task.batch(0, 2, 0)
    assert bytes_task.decode(bytes_task.encode("def f():")) == "def f():"


@pytest.mark.parametrize("p,t", [(8, 64), (4, 12), (1, 3)])
def test_mqar_structure(p, t):
    task = get_task("mqar", seed=1, num_kv_pairs=p)
    b = task.batch(5, 16, t)
    x, y, m = b["inputs"], b["targets"], b["loss_mask"]
    assert x.shape == y.shape == m.shape == (16, t)
    half = task.vocab_size // 2
    for row in range(16):
        keys, values = x[row, 0:2 * p:2], x[row, 1:2 * p:2]
        assert len(set(keys.tolist())) == p and (keys >= 1).all() and (keys < half).all()
        assert (values >= half).all() and (values < task.vocab_size).all()
        table = dict(zip(keys.tolist(), values.tolist()))
        q = np.flatnonzero(m[row])
        assert len(q) == p and (q >= 2 * p).all()  # one query per key, all after the pairs
        assert sorted(x[row, q].tolist()) == sorted(keys.tolist())  # every key queried once
        for pos in q:
            assert y[row, pos] == table[int(x[row, pos])]  # the target is the key's value
        rest = np.setdiff1d(np.arange(2 * p, t), q)
        assert (x[row, rest] == 0).all() and (m[row, :2 * p] == 0).all()
    again = get_task("mqar", seed=1, num_kv_pairs=p).batch(5, 16, t)
    for k in b:
        np.testing.assert_array_equal(b[k], again[k])
    assert not np.array_equal(task.batch(6, 16, t)["inputs"], x)


def test_mqar_eval_and_errors():
    task = get_task("mqar", num_kv_pairs=4, num_eval_examples=10)
    ev = task.eval_batches(4, 16)
    assert len(ev) == 3 and ev[-1]["loss_mask"][2:].sum() == 0  # padded rows count for nothing
    assert sum(e["loss_mask"].sum() for e in ev) == 10 * 4
    assert task.metrics(0.1, 0.75)["val_acc"] == 0.75
    with pytest.raises(ValueError, match="too short for num_kv_pairs=4"):
        task.batch(0, 2, 11)
    with pytest.raises(ValueError, match="num_kv_pairs"):
        get_task("mqar", num_kv_pairs=200)


def test_mqar_generate_small_vocab():
    b = generate(np.random.default_rng(0), 3, 9, vocab_size=8, num_kv_pairs=3)  # all 3 keys of [1, 4)
    assert sorted(b["inputs"][0, 0:6:2].tolist()) == [1, 2, 3]
