"""Train a tiny MQAR run that dies by SIGKILL in the middle of writing one checkpoint.

    python -m tests.train.kill_during_save_worker RUN_DIR KILL_AT_STEP

Checkpoints every 2 steps; when Orbax has written every file of step ``KILL_AT_STEP`` to its temporary
directory and is about to commit it (the atomic rename), the process kills itself with SIGKILL, so the
interrupted save is as complete as it can be without being finished.
"""

import os
import signal
import sys

os.environ["JAX_PLATFORMS"] = "cpu"

from orbax.checkpoint._src.path import atomicity  # noqa: E402

from tests.train.interrupt_cases import tiny_mqar  # noqa: E402


def main(out: str, kill_at: int) -> None:
    commit = atomicity.AtomicRenameTemporaryPath.finalize

    async def finalize(self, *args, **kwargs):
        if self.get_final().name == str(kill_at):
            os.kill(os.getpid(), signal.SIGKILL)
        return await commit(self, *args, **kwargs)

    atomicity.AtomicRenameTemporaryPath.finalize = finalize
    from seqmix.train.trainer import train

    train(tiny_mqar(out, steps=8), progress=False)


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]))
