"""The training run's configuration (a frozen dataclass) and the helpers that build it from flags.

Every flag of ``seqmix train`` is a field of :class:`TrainConfig`; the defaults here are the main job
(a byte-level LM with softmax attention that trains on two CPU cores in a few minutes). Flags the user
does not give are left unset by the parser, so a resumed run takes its settings from the saved
``config.json`` and only the flags actually given override them.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
from typing import Any

from seqmix.parallel.mesh import AXES as MESH_AXES
from seqmix.parallel.strategies import SOFTMAX_STRATEGY_NAMES as SP_STRATEGIES  # recurrent layers: LASP-2

DTYPES = ("float32", "bfloat16")
SP_LAYOUTS = ("", "contiguous", "zigzag", "striped")  # "" = contiguous

DEFAULT_WARMUP = 30  # warmup steps when unset (and at least 10 steps per warmup step: steps // 10)

# Settings a resumed run may change; every other field must match the checkpoint.
RESUMABLE_FIELDS = frozenset({"steps", "eval_every", "eval_batches", "log_every", "ckpt_every",
                              "keep_checkpoints", "out", "sample_len", "mesh", "sp_strategy", "sp_layout"})


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """Everything that defines a training run (model, data, optimizer, schedule, bookkeeping)."""

    # task
    task: str = "bytes"
    num_kv_pairs: int = 8                  # mqar only
    # model (seqmix.models.LMConfig)
    mixers: str = "attn*2"
    short_conv: int = 4                    # width of the q/k/v causal conv in every mixer (0 = none)
    d_model: int = 128
    num_heads: int = 4
    num_kv_heads: int | None = None
    mlp_hidden: int | None = None
    rope_theta: float = 1e4
    tie_embeddings: bool = True
    dtype: str = "float32"                 # compute dtype; parameters stay float32
    # data
    batch_size: int = 32
    seq_len: int = 128
    # optimizer: AdamW, linear warmup then cosine decay to lr * min_lr_ratio, global-norm clipping
    steps: int = 300
    lr: float = 3e-3
    warmup: int | None = None              # None: 10% of steps, at most 30 (DEFAULT_WARMUP)
    min_lr_ratio: float = 0.1
    weight_decay: float = 0.1
    b1: float = 0.9
    b2: float = 0.95
    grad_clip: float = 1.0
    seed: int = 0
    # bookkeeping
    log_every: int = 10
    eval_every: int = 100
    eval_batches: int = 8
    ckpt_every: int = 100
    keep_checkpoints: int = 2
    mesh: str = ""                         # e.g. "data=2,seq=4"; unnamed axes have size 1
    sp_strategy: str = "allgather"         # with a seq axis > 1: softmax layers' strategy (recurrent: LASP-2)
    sp_layout: str = ""                    # with a seq axis > 1: "" (contiguous), "zigzag" or "striped"
    out: str | None = None                 # run directory; default runs/<task>-<timestamp>
    sample_len: int = 80                   # bytes task: length of the sample printed at the end

    @property
    def warmup_steps(self) -> int:
        """The warmup the schedule uses: ``warmup``, or when unset 10% of ``steps`` capped at 30."""
        return min(DEFAULT_WARMUP, self.steps // 10) if self.warmup is None else self.warmup

    @classmethod
    def for_task(cls, task: str = "bytes", **fields) -> "TrainConfig":
        """The config of a ``task`` run: the task's ``train_defaults`` (e.g. MQAR's 2 layers and 64
        tokens), then ``fields``. ``TrainConfig(task=...)`` alone keeps the main job's defaults."""
        from seqmix.train.tasks import TASKS

        if task not in TASKS:
            raise ValueError(f"unknown task {task!r}; available: {', '.join(sorted(TASKS))}")
        return cls(**{**getattr(TASKS[task], "train_defaults", {}), "task": task, **fields})

    def replace(self, **changes) -> "TrainConfig":
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "TrainConfig":
        names = {f.name for f in dataclasses.fields(cls)}
        d = {"short_conv": 0, **d}  # saved before short convs existed: the model had none
        unknown = sorted(set(d) - names)
        if unknown:
            raise ValueError(f"unknown TrainConfig fields: {', '.join(unknown)}")
        return cls(**d)

    def task_options(self) -> dict[str, Any]:
        opts: dict[str, Any] = {"seed": self.seed}
        if self.task == "mqar":  # a fixed validation set of eval_batches full batches
            opts.update(num_kv_pairs=self.num_kv_pairs, num_eval_examples=self.eval_batches * self.batch_size)
        if self.task == "bytes":
            opts["num_eval_batches"] = self.eval_batches
        return opts

    def validate(self) -> "TrainConfig":
        """Raise ValueError naming the first bad setting; return self. Checks needing devices or the
        model package (mesh size, mixer spec) happen when the run is built."""
        from seqmix.train.tasks import TASKS

        def need(ok: bool, msg: str):
            if not ok:
                raise ValueError(msg)

        need(self.task in TASKS, f"unknown task {self.task!r}; available: {', '.join(sorted(TASKS))}")
        for name in ("steps", "batch_size", "seq_len", "d_model", "num_heads", "log_every", "eval_every",
                     "eval_batches", "ckpt_every", "keep_checkpoints"):
            value = getattr(self, name)
            need(isinstance(value, int) and value >= 1, f"{name} must be a positive integer, got {value!r}")
        need(self.warmup is None or (isinstance(self.warmup, int) and 0 <= self.warmup <= self.steps),
             f"warmup must be in [0, steps={self.steps}], got {self.warmup}")
        need(self.lr > 0 and math.isfinite(self.lr), f"lr must be a positive number, got {self.lr}")
        need(0 <= self.min_lr_ratio <= 1, f"min_lr_ratio must be in [0, 1], got {self.min_lr_ratio}")
        need(self.weight_decay >= 0, f"weight_decay must be >= 0, got {self.weight_decay}")
        need(self.grad_clip > 0, f"grad_clip must be > 0, got {self.grad_clip}")
        need(0 <= self.b1 < 1 and 0 <= self.b2 < 1, f"b1, b2 must be in [0, 1), got {self.b1}, {self.b2}")
        need(self.dtype in DTYPES, f"dtype must be one of {', '.join(DTYPES)}, got {self.dtype!r}")
        need(self.d_model % self.num_heads == 0,
             f"d_model={self.d_model} is not divisible by num_heads={self.num_heads}")
        need((self.d_model // self.num_heads) % 2 == 0,
             f"head dim d_model/num_heads = {self.d_model // self.num_heads} must be even (RoPE)")
        if self.num_kv_heads is not None:
            need(self.num_kv_heads >= 1 and self.num_heads % self.num_kv_heads == 0,
                 f"num_heads={self.num_heads} must be a multiple of num_kv_heads={self.num_kv_heads}")
        need(isinstance(self.mixers, str) and bool(self.mixers.strip()),
             f"mixers must name at least one layer, got {self.mixers!r}")
        need(isinstance(self.short_conv, int) and self.short_conv >= 0,
             f"short_conv must be an integer >= 0 (0 = no convolution), got {self.short_conv!r}")
        need(self.sample_len >= 0, f"sample_len must be >= 0, got {self.sample_len}")
        need(self.sp_strategy in SP_STRATEGIES,
             f"sp_strategy must be one of {', '.join(SP_STRATEGIES)}, got {self.sp_strategy!r}")
        need(self.sp_layout in SP_LAYOUTS,
             f"sp_layout must be contiguous (or ''), zigzag or striped, got {self.sp_layout!r}")
        if self.task == "mqar":
            from seqmix.train.tasks.mqar import min_seq_len
            need(self.num_kv_pairs >= 1, f"num_kv_pairs must be >= 1, got {self.num_kv_pairs}")
            need(self.seq_len >= min_seq_len(self.num_kv_pairs),
                 f"mqar: seq_len={self.seq_len} is too short for num_kv_pairs={self.num_kv_pairs}: it needs "
                 f"at least {min_seq_len(self.num_kv_pairs)} (2 tokens per pair + 1 query per key)")
        parse_mesh(self.mesh)
        return self


# ----------------------------------------------------------------------------- mesh spec

def parse_mesh(spec: str | None, num_devices: int | None = None) -> dict[str, int]:
    """Parse ``"data=2,seq=4"`` into sizes for all of ``MESH_AXES`` (unnamed axes get 1).

    One axis may be ``-1``: it takes the devices the others leave. With ``num_devices``, the product
    must equal it. Raises ValueError with the reason.
    """
    sizes = {a: 1 for a in MESH_AXES}
    given: set[str] = set()
    for part in (spec or "").replace(" ", "").split(","):
        if not part:
            continue
        name, eq, value = part.partition("=")
        if not eq or name not in MESH_AXES:
            raise ValueError(f"bad mesh entry {part!r} in {spec!r}: expected AXIS=SIZE with AXIS in "
                             f"{', '.join(MESH_AXES)}, e.g. 'data=2,seq=4'")
        if name in given:
            raise ValueError(f"mesh axis {name!r} given twice in {spec!r}")
        try:
            size = int(value)
        except ValueError:
            raise ValueError(f"mesh axis {name!r}: size must be an integer, got {value!r}") from None
        if size < 1 and size != -1:
            raise ValueError(f"mesh axis {name!r}: size must be >= 1 (or -1 for the rest), got {size}")
        sizes[name] = size
        given.add(name)
    free = [a for a, s in sizes.items() if s == -1]
    if len(free) > 1:
        raise ValueError(f"mesh {spec!r}: only one axis may be -1, got {', '.join(free)}")
    if num_devices is not None:
        known = math.prod(s for s in sizes.values() if s != -1)
        if free:
            if num_devices % known:
                raise ValueError(f"mesh {spec!r}: {num_devices} devices do not divide by {known}")
            sizes[free[0]] = num_devices // known
        elif known != num_devices:
            shown = ",".join(f"{a}={s}" for a, s in sizes.items())
            raise ValueError(f"mesh {shown} needs {known} devices but {num_devices} are available "
                             f"(jax.device_count()); on CPU, XLA_FLAGS=--xla_force_host_platform_device_count"
                             f"={known} simulates {known}")
    return sizes


# ----------------------------------------------------------------------------- command-line flags

# (flag, field, type, help). Every flag's default is the TrainConfig field's default.
_FLAGS: tuple[tuple[str, str, Any, str], ...] = (
    ("--task", "task", str, "task: bytes (byte-level LM on the Python stdlib) or mqar (associative recall)"),
    ("--mixers", "mixers", str, "the layers' mixer spec: comma-separated entries NAME[:ARG][*N] (N layers of "
     "it), e.g. 'gla*2' or 'gdn,swa:128,gdn'"),
    ("--short-conv", "short_conv", int, "width of the causal depthwise conv on every mixer's q, k, v "
     "(0 = none)"),
    ("--d-model", "d_model", int, "model width"),
    ("--num-heads", "num_heads", int, "attention heads"),
    ("--steps", "steps", int, "optimizer steps (the learning-rate schedule spans them)"),
    ("--batch-size", "batch_size", int, "sequences per step (global, split over the data/fsdp mesh axes)"),
    ("--seq-len", "seq_len", int, "tokens per sequence"),
    ("--lr", "lr", float, "peak learning rate (AdamW)"),
    ("--warmup", "warmup", int, "linear warmup steps before the cosine decay (default: 10%% of --steps, at most "
     f"{DEFAULT_WARMUP})"),
    ("--weight-decay", "weight_decay", float, "AdamW weight decay (matrices only)"),
    ("--grad-clip", "grad_clip", float, "global gradient-norm clip"),
    ("--seed", "seed", int, "seed for parameters and data order"),
    ("--log-every", "log_every", int, "steps between metrics lines"),
    ("--eval-every", "eval_every", int, "steps between validation passes (and one at the end)"),
    ("--ckpt-every", "ckpt_every", int, "steps between checkpoints (and one at the end)"),
    ("--dtype", "dtype", str, "compute dtype: float32 or bfloat16 (parameters stay float32)"),
    ("--mesh", "mesh", str, "device mesh over axes data,fsdp,seq,tensor, e.g. 'data=2,seq=4' (default: 1 device)"),
    ("--sp-strategy", "sp_strategy", str, "sequence parallelism (mesh seq axis > 1) of the softmax layers: "
     "allgather, ring or ulysses; recurrent layers use LASP-2"),
    ("--sp-layout", "sp_layout", str, "sequence parallelism: token layout of the softmax layers: "
     "contiguous (default), zigzag or striped"),
    ("--out", "out", str, "run directory (default: runs/<task>-<timestamp>)"),
    ("--num-kv-pairs", "num_kv_pairs", int, "mqar: key-value pairs per sequence"),
)


def add_train_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Add the ``seqmix train`` flags. Unset flags stay absent from the namespace (see config_from_args)."""
    defaults = TrainConfig()
    for flag, field, typ, help_ in _FLAGS:
        kwargs: dict[str, Any] = {"dest": field, "type": typ, "default": argparse.SUPPRESS}
        if field == "task":
            from seqmix.train.tasks import TASKS
            kwargs["choices"] = sorted(TASKS)
            for name in sorted(TASKS):
                own = getattr(TASKS[name], "train_defaults", {})
                if own:
                    help_ += f"; {name}'s own defaults: " + " ".join(
                        f"--{k.replace('_', '-')} {v}" for k, v in own.items())
        if field == "dtype":
            kwargs["choices"] = DTYPES
        if field == "sp_strategy":
            kwargs["choices"] = SP_STRATEGIES
        if field == "sp_layout":
            kwargs["choices"] = SP_LAYOUTS[1:]  # "" is the unset default (contiguous)
        default = getattr(defaults, field)
        shown = "" if default in ("", None) else f" [default: {default}]"
        parser.add_argument(flag, help=help_ + shown,
                            metavar=None if "choices" in kwargs else field.upper(), **kwargs)
    parser.add_argument("--resume", action="store_true",
                        help="continue the run in --out from its latest checkpoint (flags given override "
                             "its saved config where allowed)")
    multi = parser.add_argument_group(
        "multi-process runs (TPU pod slices, several GPU hosts; docs/multihost.md)",
        "every process runs the same command; JAX joins them before training starts")
    multi.add_argument("--coordinator", default=None, metavar="HOST:PORT",
                       help="process 0's address (with --num-processes and --process-id)")
    multi.add_argument("--num-processes", dest="num_processes", type=int, default=None, metavar="N",
                       help="number of processes in the run")
    multi.add_argument("--process-id", dest="process_id", type=int, default=None, metavar="I",
                       help="this process's index in [0, N)")
    multi.add_argument("--distributed", default="auto", choices=("auto", "always", "never"),
                       help="auto (default): join when the environment names a multi-process job (SLURM, "
                            "Open MPI, a multi-host Cloud TPU slice, JAX_COORDINATOR_ADDRESS); always: let "
                            "jax.distributed.initialize() detect it (a TPU pod slice on GCE); never: one process")
    parser.add_argument("--stop-at", dest="stop_at", type=int, default=None, metavar="STEP",
                        help="stop after STEP steps (checkpointing there) while the schedule still spans "
                             "--steps; continue later with --resume")
    return parser


def overrides_from_args(args: argparse.Namespace) -> dict[str, Any]:
    """The TrainConfig fields the user set explicitly on the command line."""
    return {field: getattr(args, field) for _, field, _, _ in _FLAGS if hasattr(args, field)}


def merge_for_resume(saved: TrainConfig, overrides: dict[str, Any]) -> TrainConfig:
    """The saved config with ``overrides`` applied; overriding a non-resumable field raises ValueError."""
    for name, value in overrides.items():
        if name not in RESUMABLE_FIELDS and getattr(saved, name) != value:
            raise ValueError(f"cannot change {name} when resuming (the checkpoint was trained with "
                             f"{name}={getattr(saved, name)!r}, got {value!r})")
    return saved.replace(**overrides)
