"""Shared settings of the interruption tests (a tiny MQAR run: no corpus to load, milliseconds a step)."""

from seqmix.train.config import TrainConfig


def tiny_mqar(out, *, steps: int, ckpt_every: int = 2) -> TrainConfig:
    return TrainConfig(task="mqar", num_kv_pairs=4, d_model=32, num_heads=2, mixers="attn", seq_len=32,
                       batch_size=4, steps=steps, log_every=1, eval_every=1000, ckpt_every=ckpt_every,
                       eval_batches=1, sample_len=0, out=str(out))


CLI_FLAGS = ["--task", "mqar", "--num-kv-pairs", "4", "--d-model", "32", "--num-heads", "2", "--mixers", "attn",
             "--seq-len", "32", "--batch-size", "4", "--log-every", "1", "--eval-every", "1000",
             "--ckpt-every", "1000"]
