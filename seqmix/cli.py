"""The ``seqmix`` command.

* ``seqmix train [flags]``: the main job. With no flags it trains a small byte-level LM with softmax
  attention on the Python standard library's source, on CPU in a few minutes (see
  ``seqmix.train.config.TrainConfig`` for every default and ``seqmix train --help`` for the flags).
* ``seqmix generate --out RUN_DIR --prompt TEXT``: continue a prompt with a trained run's model
  (sampled with ``--temperature``/``--top-k``, or ``--temperature 0`` for greedy).
* ``seqmix info``: versions, devices, and the capability matrix of the registered attention families.
* ``seqmix bench [args]``: runs ``experiments/bench.py`` of a source checkout with ``args``.

Bad flags or settings print one ``error:`` line and exit with status 2. Ctrl-C or SIGTERM during
``seqmix train`` saves a checkpoint at the current step, prints how to resume and exits with
``128 + signal`` (no traceback).
"""

from __future__ import annotations

import argparse
import runpy
import sys
from importlib import metadata
from pathlib import Path


class _Parser(argparse.ArgumentParser):
    """An ArgumentParser whose errors are one line (no usage dump) and exit with status 2."""

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message} (see '{self.prog} --help')\n")


def build_parser() -> argparse.ArgumentParser:
    from seqmix.train.config import add_train_arguments

    parser = _Parser(prog="seqmix", description="seqmix: attention families as JAX/Flax NNX modules.")
    sub = parser.add_subparsers(dest="command", metavar="{train,generate,info,bench}")
    train = sub.add_parser("train", help="train a small LM on a task (default: byte-level LM on CPU)",
                           description="Train a small LM. With no flags: the main job (byte-level LM on the "
                                       "Python stdlib, softmax attention, a few minutes on CPU).")
    add_train_arguments(train)
    train.set_defaults(subparser=train)
    gen = sub.add_parser("generate", help="continue a prompt with a trained run's model",
                         description="Continue --prompt with the model of a `seqmix train` run directory.")
    add_generate_arguments(gen)
    gen.set_defaults(subparser=gen)
    sub.add_parser("info", help="versions, devices and the capability matrix")
    sub.add_parser("bench", help="run experiments/bench.py from the repository (arguments pass through)",
                   add_help=False)
    return parser


def add_generate_arguments(parser: argparse.ArgumentParser) -> None:
    from seqmix.train.trainer import SAMPLING

    parser.add_argument("--out", required=True, metavar="RUN_DIR", help="the run directory (seqmix train --out)")
    parser.add_argument("--prompt", required=True, help="text to continue (byte-level tasks)")
    parser.add_argument("--max-new-tokens", type=int, default=200, metavar="N",
                        help="tokens to add (capped by the model's max_len) [default: 200]")
    parser.add_argument("--temperature", type=float, default=SAMPLING["temperature"],
                        help=f"sampling temperature; 0 = greedy [default: {SAMPLING['temperature']}]")
    parser.add_argument("--top-k", type=int, default=SAMPLING["top_k"], metavar="K",
                        help=f"sample among the K most likely tokens; 0 = all [default: {SAMPLING['top_k']}]")
    parser.add_argument("--seed", type=int, default=0, help="sampling seed [default: 0]")
    parser.add_argument("--step", type=int, default=None, help="checkpoint step [default: the latest]")


def run_generate(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    import jax
    import numpy as np

    from seqmix.train.loading import load_run
    from seqmix.train.tasks import TASKS

    try:
        run = load_run(args.out, args.step)
    except (FileNotFoundError, ValueError) as err:
        parser.error(str(err))
    task = TASKS[run.train_config.task]
    if not hasattr(task, "encode"):
        parser.error(f"the run trained task {run.train_config.task!r}, which has no text encoding; "
                     f"generate needs a byte-level run (--task bytes)")
    prompt = task.encode(args.prompt)
    room = run.model.config.max_len - len(prompt)
    if len(prompt) == 0 or room < 1:
        parser.error(f"--prompt must hold 1 to {run.model.config.max_len - 1} bytes (the model's max_len is "
                     f"{run.model.config.max_len}); got {len(prompt)}")
    n = min(args.max_new_tokens, room)
    try:
        tokens = run.model.generate(jax.numpy.asarray(prompt)[None], n, temperature=args.temperature,
                                    top_k=args.top_k or None, key=jax.random.key(args.seed))
    except ValueError as err:
        parser.error(str(err))
    print(task.decode(np.asarray(tokens[0])))
    return 0


def _version(dist: str) -> str:
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return "not installed"


def info() -> int:
    import platform

    import jax

    import seqmix

    print(f"seqmix {seqmix.__version__} ({Path(seqmix.__file__).parent})")
    print(f"python {platform.python_version()}, jax {jax.__version__}, jaxlib {_version('jaxlib')}, "
          f"flax {_version('flax')}, optax {_version('optax')}, orbax-checkpoint {_version('orbax-checkpoint')}")
    devices = jax.devices()
    print(f"backend {jax.default_backend()}: {len(devices)} device(s): "
          + ", ".join(sorted({d.device_kind for d in devices})))
    try:
        from seqmix.models import registered_mixers
        print("mixers: " + ", ".join(registered_mixers()))
    except ImportError as err:  # the model package is optional for the capability matrix
        print(f"mixers: unavailable ({err})")
    from seqmix.train.tasks import TASKS
    print("tasks: " + ", ".join(sorted(TASKS)))
    print()
    print(seqmix.capability_matrix())
    return 0


def bench(args: list[str]) -> int:
    import seqmix

    script = Path(seqmix.__file__).resolve().parents[1] / "experiments" / "bench.py"
    if not script.is_file():
        print(f"seqmix bench: error: {script} not found; bench runs from a source checkout of the seqmix "
              f"repository (git clone, then pip install -e .)", file=sys.stderr)
        return 2
    saved_argv = sys.argv
    sys.argv = [str(script), *args]
    try:
        runpy.run_path(str(script), run_name="__main__")
    except SystemExit as stop:
        code = stop.code
        return code if isinstance(code, int) else (0 if code is None else 1)
    finally:
        sys.argv = saved_argv
    return 0


def run_train(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    from seqmix.train.config import TrainConfig, merge_for_resume, overrides_from_args
    from seqmix.train.interrupt import TrainingInterrupted
    from seqmix.train import distributed
    from seqmix.train.trainer import format_report, load_run_config, prepare, train

    overrides = overrides_from_args(args)
    try:
        if args.stop_at is not None and args.stop_at < 1:
            raise ValueError(f"--stop-at must be >= 1, got {args.stop_at}")
        distributed.check_join_arguments(args.coordinator, args.num_processes, args.process_id, args.distributed)
    except ValueError as err:
        parser.error(str(err))
    joined = distributed.join(args.coordinator, args.num_processes, args.process_id, mode=args.distributed)
    try:
        if args.resume:
            if "out" not in overrides:
                raise ValueError("--resume needs --out RUN_DIR (the run directory to continue)")
            cfg = merge_for_resume(load_run_config(overrides["out"]), overrides)
        else:
            cfg = TrainConfig.for_task(**overrides)
        setup = prepare(cfg, resume=args.resume)
    except ValueError as err:
        parser.error(str(err))
    import jax

    main_process = jax.process_index() == 0  # on several processes, process 0 alone prints
    if joined and main_process:
        print(f"joined a run of {jax.process_count()} processes ({joined}), {jax.device_count()} devices",
              file=sys.stderr)
    try:
        result = train(setup.cfg, resume=args.resume, stop_at=args.stop_at, setup=setup)
    except TrainingInterrupted as stop:
        if main_process:
            print(f"{stop}\nresume with: seqmix train --out {stop.out} --resume", file=sys.stderr)
        return 128 + stop.signum
    if main_process:
        print(format_report(result, setup.cfg.task))
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] == "bench":  # everything after "bench" belongs to the script
        return bench(argv[1:])
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command == "info":
        return info()
    if args.command == "train":
        return run_train(args, args.subparser)
    if args.command == "generate":
        return run_generate(args, args.subparser)
    parser.print_help()
    return 2


if __name__ == "__main__":
    sys.exit(main())
