"""The training loop: one jitted step, a device mesh, AdamW, Orbax checkpoints, metrics and a plot.

Read top to bottom: :func:`prepare` turns a :class:`TrainConfig` into everything a run needs and
raises ``ValueError`` for any bad setting before work starts; :func:`train` runs it.

* Model: ``seqmix.models.LM`` split into a graph definition and its parameters (an NNX ``State``);
  the step is a pure function of ``(params, opt_state, batch)`` under ``jax.jit`` that donates its
  state buffers.
* Optimizer: optax AdamW (decay on matrices only) after global-norm clipping, learning rate with a
  linear warmup then a cosine decay to ``lr * min_lr_ratio``. ``--dtype bfloat16`` makes the model
  compute in bf16; parameters, gradients and optimizer state stay fp32, the loss is taken in fp32.
* Mesh: axes ``("data", "fsdp", "seq", "tensor")`` over all devices (all but ``data`` of size 1 by
  default). Batches are sharded over ``("data", "fsdp")``; parameters are replicated for now. With a
  ``seq`` axis of size > 1 the model is built with a :class:`seqmix.parallel.SequenceParallel` (softmax
  layers by ``--sp-strategy``, recurrent layers by LASP-2) and the token batch's sequence dimension is
  sharded over ``seq`` as well.
* Data: ``task.batch(step, ...)`` is a pure function of ``(seed, step)``, so the data-loader position
  is the step and a resumed run continues the very loss curve of an uninterrupted one.
* Outputs in the run directory: ``config.json``, ``metrics.jsonl``, ``metrics.png``, ``summary.json``
  and ``checkpoints/<step>/``.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import signal
import sys
import time
from pathlib import Path
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from seqmix.train.checkpoint import Checkpointer
from seqmix.train.config import MESH_AXES, RESUMABLE_FIELDS, TrainConfig, parse_mesh
from seqmix.train.interrupt import StopOnSignal, TrainingInterrupted
from seqmix.train.metrics import MetricsWriter, plot_metrics, read_metrics
from seqmix.train.tasks import get_task

BATCH_AXES = ("data", "fsdp")  # mesh axes the batch dimension is split over
SAMPLING = {"temperature": 0.8, "top_k": 40}  # the end-of-run sample (also `seqmix generate`'s default)
# optax.global_norm is deprecated in favour of optax.tree.norm (newer optax); support both.
_global_norm = getattr(getattr(optax, "tree", None), "norm", None) or optax.global_norm


# ----------------------------------------------------------------------------- set-up

def make_mesh(spec: str | None = "", devices=None) -> Mesh:
    """A ``Mesh`` over ``devices`` (default: all) with axes ``MESH_AXES`` sized by ``spec``."""
    devices = list(jax.devices() if devices is None else devices)
    sizes = parse_mesh(spec, len(devices))
    return Mesh(np.asarray(devices, dtype=object).reshape([sizes[a] for a in MESH_AXES]), MESH_AXES)


def model_config(cfg: TrainConfig, vocab_size: int):
    """The ``LMConfig`` of a run (compute dtype from ``cfg.dtype``; parameters always fp32)."""
    from seqmix.models import LMConfig

    return LMConfig(vocab_size=vocab_size, d_model=cfg.d_model, num_heads=cfg.num_heads,
                    num_kv_heads=cfg.num_kv_heads, mixers=cfg.mixers, short_conv=cfg.short_conv,
                    mlp_hidden=cfg.mlp_hidden,
                    max_len=cfg.seq_len, rope_theta=cfg.rope_theta, tie_embeddings=cfg.tie_embeddings,
                    dtype=cfg.dtype, param_dtype="float32")


def learning_rate_schedule(cfg) -> optax.Schedule:
    """Linear warmup from ``lr / warmup`` to ``lr`` over ``warmup`` steps, cosine decay to
    ``lr * min_lr_ratio`` at ``steps``."""
    warmup = cfg.warmup_steps
    return optax.warmup_cosine_decay_schedule(
        init_value=cfg.lr / max(warmup, 1), peak_value=cfg.lr, warmup_steps=warmup,
        decay_steps=max(cfg.steps, warmup + 1), end_value=cfg.lr * cfg.min_lr_ratio)


def make_optimizer(cfg) -> optax.GradientTransformation:
    """Global-norm clipping, then AdamW with weight decay on matrices (ndim >= 2) only.

    ``cfg``: a TrainConfig or OptimizerSettings."""
    decay_mask = lambda params: jax.tree.map(lambda p: p.ndim >= 2, params)  # noqa: E731
    return optax.chain(
        optax.clip_by_global_norm(cfg.grad_clip),
        optax.adamw(learning_rate_schedule(cfg), b1=cfg.b1, b2=cfg.b2, weight_decay=cfg.weight_decay,
                    mask=decay_mask))


def masked_loss(logits, targets, mask):
    """Mean cross entropy (nats) over positions with ``mask`` > 0; also the sums for aggregation."""
    logits = logits.astype(jnp.float32)
    nll = optax.softmax_cross_entropy_with_integer_labels(logits, targets)
    correct = (jnp.argmax(logits, axis=-1) == targets).astype(jnp.float32)
    sums = {"nll": jnp.sum(nll * mask), "correct": jnp.sum(correct * mask), "count": jnp.sum(mask)}
    return sums["nll"] / jnp.maximum(sums["count"], 1.0), sums


@dataclasses.dataclass
class Setup:
    """Everything :func:`train` needs, built and validated by :func:`prepare`."""

    cfg: TrainConfig
    task: Any
    lm_config: Any
    mesh: Mesh
    out: Path
    resume_step: int | None
    sequence_parallel: Any = None  # seqmix.parallel.SequenceParallel when the mesh's seq axis is > 1


def default_out(task: str) -> Path:
    return Path("runs") / f"{task}-{time.strftime('%Y%m%d-%H%M%S')}"


def load_run_config(out: str | Path) -> TrainConfig:
    """The TrainConfig saved in a run directory's ``config.json``."""
    path = Path(out) / "config.json"
    if not path.exists():
        raise ValueError(f"cannot resume: {path} does not exist (is --out the run directory?)")
    return TrainConfig.from_dict(json.loads(path.read_text())["train"])


def prepare(cfg: TrainConfig, *, resume: bool = False) -> Setup:
    """Validate ``cfg`` against the task, the model package and the devices; find the checkpoint to
    resume. Raises ValueError (with the reason) for anything that would fail later."""
    cfg.validate()
    if resume and not cfg.out:
        raise ValueError("resume needs the run directory (--out RUN_DIR)")
    out = Path(cfg.out) if cfg.out else default_out(cfg.task)
    cfg = cfg.replace(out=str(out))
    mesh = make_mesh(cfg.mesh)
    shards = math.prod(mesh.shape[a] for a in BATCH_AXES)
    if cfg.batch_size % shards:
        raise ValueError(f"batch_size={cfg.batch_size} must divide evenly over the mesh's data x fsdp = "
                         f"{shards} devices")
    task = get_task(cfg.task, **cfg.task_options())
    task.check(cfg.seq_len)
    lm_config = model_config(cfg, task.vocab_size)
    sp = sequence_parallel_for(cfg, mesh, lm_config)
    ckpt_dir = out / "checkpoints"
    # Orbax lists finished checkpoints only: one interrupted mid-save (kill -9) is never picked.
    steps = []
    if ckpt_dir.is_dir():
        with Checkpointer(ckpt_dir) as existing:
            steps = sorted(existing.all_steps())
    resume_step = None
    if resume:
        saved = load_run_config(out)
        for f in dataclasses.fields(TrainConfig):
            if f.name not in RESUMABLE_FIELDS and getattr(saved, f.name) != getattr(cfg, f.name):
                raise ValueError(f"cannot change {f.name} when resuming (the run was started with "
                                 f"{f.name}={getattr(saved, f.name)!r}, got {getattr(cfg, f.name)!r})")
        if not steps:
            raise ValueError(f"cannot resume: no checkpoint in {ckpt_dir}")
        resume_step = steps[-1]
    elif steps:
        raise ValueError(f"{out} already holds checkpoints (latest step {steps[-1]}); pass --resume to "
                         f"continue that run or choose another --out")
    return Setup(cfg=cfg, task=task, lm_config=lm_config, mesh=mesh, out=out, resume_step=resume_step,
                 sequence_parallel=sp)


def _ulysses_mixers() -> set[str]:
    """Mixers of the families that run under Ulysses (their records list "ulysses"): they split heads."""
    from seqmix.ops._registry import FAMILIES

    return {m for fam in FAMILIES.values() if "ulysses" in fam.sequence_parallel for m in fam.mixers}


def sequence_parallel_for(cfg: TrainConfig, mesh: Mesh, lm_config):
    """The model's :class:`seqmix.parallel.SequenceParallel` when ``mesh`` has a ``seq`` axis > 1, else None.

    Raises ValueError when ``cfg.seq_len`` does not split over the axis (or the layout's stronger
    condition fails), or Ulysses cannot split the heads."""
    p = int(mesh.shape["seq"])
    if p == 1:
        return None
    from seqmix.parallel import SequenceParallel

    layout = None if cfg.sp_layout in ("", "contiguous") else cfg.sp_layout
    sp = SequenceParallel(mesh, axis="seq", strategy=cfg.sp_strategy, layout=layout,
                          batch_axes=tuple(a for a in BATCH_AXES if mesh.shape[a] > 1))
    try:
        sp.check_seq_len(cfg.seq_len)
    except ValueError as err:
        raise ValueError(f"--mesh {cfg.mesh!r} splits the sequence over seq={p} devices: seq_len={cfg.seq_len} "
                         f"does not fit ({err})") from None
    names = [name for name, _ in lm_config.mixer_specs]
    if cfg.sp_strategy == "ulysses" and set(names) & _ulysses_mixers():
        kv = lm_config.num_kv_heads or lm_config.num_heads
        if lm_config.num_heads % p or kv % p:
            raise ValueError(f"--sp-strategy ulysses over seq={p} devices needs num_heads ({lm_config.num_heads}) "
                             f"and num_kv_heads ({kv}) divisible by {p}; use allgather or ring")
    return sp


# ----------------------------------------------------------------------------- compiled programs

@dataclasses.dataclass(frozen=True)
class OptimizerSettings:
    """The TrainConfig fields the optimizer depends on (hashable: a cache key for compiled steps)."""

    lr: float
    warmup: int
    steps: int
    min_lr_ratio: float
    weight_decay: float
    b1: float
    b2: float
    grad_clip: float

    @property
    def warmup_steps(self) -> int:
        return self.warmup

    @classmethod
    def of(cls, cfg: TrainConfig) -> "OptimizerSettings":
        values = {f.name: getattr(cfg, f.name) for f in dataclasses.fields(cls)}
        return cls(**{**values, "warmup": cfg.warmup_steps})


@dataclasses.dataclass(frozen=True)
class Programs:
    """The jitted functions of a run and the model's graph definition.

    ``init(jax.random.key(seed)) -> (params, opt_state)``, replicated over the mesh;
    ``train_step(params, opt_state, batch) -> (params, opt_state, {"loss", "grad_norm"})`` (donates its
    state); ``eval_step(params, batch) -> {"nll", "correct", "count"}`` (sums over masked positions).
    """

    graphdef: Any
    rest: Any
    init: Callable
    train_step: Callable
    eval_step: Callable
    batch_sharding: NamedSharding


@functools.lru_cache(maxsize=8)
def compiled_programs(lm_config, opt: OptimizerSettings, mesh: Mesh, sequence_parallel=None) -> Programs:
    """Build (and cache, so repeated runs in one process compile once) the jitted programs.

    With ``sequence_parallel``, the model's mixers run sequence-parallel and batches are sharded
    ``[batch over data/fsdp, sequence over seq]``."""
    from seqmix.models import LM

    sp = sequence_parallel
    replicated = NamedSharding(mesh, P())
    batch_sharding = NamedSharding(mesh, P(BATCH_AXES, sp.axis) if sp is not None else P(BATCH_AXES))
    graphdef, abstract_params, rest = nnx.split(
        nnx.eval_shape(lambda: LM(lm_config, rngs=nnx.Rngs(0), sequence_parallel=sp)), nnx.Param, ...)
    if jax.tree.leaves(rest):
        raise NotImplementedError("the trainer expects a model whose only state is nnx.Param")
    tx = make_optimizer(opt)

    def init(key):
        params = nnx.split(LM(lm_config, rngs=nnx.Rngs(key), sequence_parallel=sp), nnx.Param, ...)[1]
        return params, tx.init(params)

    def loss_and_sums(params, batch):
        logits = nnx.merge(graphdef, params, rest)(batch["inputs"])
        return masked_loss(logits, batch["targets"], batch["loss_mask"])

    def train_step(params, opt_state, batch):
        (loss, _), grads = jax.value_and_grad(loss_and_sums, has_aux=True)(params, batch)
        grad_norm = _global_norm(grads)
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, {"loss": loss, "grad_norm": grad_norm}

    def eval_step(params, batch):
        return loss_and_sums(params, batch)[1]

    return Programs(
        graphdef=graphdef, rest=rest, batch_sharding=batch_sharding,
        init=jax.jit(init, out_shardings=replicated),
        train_step=jax.jit(train_step, in_shardings=(replicated, replicated, batch_sharding),
                           out_shardings=replicated, donate_argnums=(0, 1)),
        eval_step=jax.jit(eval_step, in_shardings=(replicated, batch_sharding), out_shardings=replicated))


# ----------------------------------------------------------------------------- the run

@dataclasses.dataclass
class RunResult:
    """What a run produced: paths, the metric records of this process, the final evaluation."""

    out: Path
    metrics_path: Path
    plot_path: Path | None
    checkpoint_path: Path | None
    records: list[dict[str, Any]]
    final: dict[str, Any]
    summary: dict[str, Any]
    sample: dict[str, str]
    wall_s: float
    steps_done: int
    model: Any = None  # the trained seqmix.models.LM

    @property
    def train_losses(self) -> dict[int, float]:
        return {r["step"]: r["loss"] for r in self.records if r["kind"] == "train"}


def _shard_batch(batch: dict[str, np.ndarray], sharding: NamedSharding) -> dict[str, jax.Array]:
    # Every process holds the whole (deterministic) global batch; each device takes its slice.
    return {k: jax.make_array_from_callback(v.shape, sharding, lambda idx, v=v: v[idx]) for k, v in batch.items()}


def _all_agree(flag: bool) -> bool:
    """``flag`` on one process; on several, whether any process raised it, so that all of them stop (and
    save, a collective) at the same step whichever received the signal first."""
    if jax.process_count() == 1:
        return flag
    from jax.experimental import multihost_utils

    return bool(np.any(multihost_utils.process_allgather(np.asarray(flag, np.int32))))


def train(cfg: TrainConfig, *, resume: bool = False, stop_at: int | None = None, progress: bool = True,
          log: Callable[[str], None] | None = None, setup: Setup | None = None) -> RunResult:
    """Train per ``cfg``; with ``resume``, continue the run in ``cfg.out`` from its latest checkpoint.

    ``stop_at``: stop (and checkpoint) after that step while the schedule still spans ``cfg.steps``, as
    a preempted job would. ``log``: where messages go (default: print, or beside the progress bar).
    """
    from tqdm.auto import tqdm

    t_start = time.perf_counter()
    s = setup or prepare(cfg, resume=resume)
    cfg, task, mesh, out = s.cfg, s.task, s.mesh, s.out
    end = cfg.steps if stop_at is None else max(0, min(int(stop_at), cfg.steps))
    is_main = jax.process_index() == 0  # on several hosts, process 0 writes the files and the progress
    out.mkdir(parents=True, exist_ok=True)
    progress = progress and is_main
    bar = tqdm(total=cfg.steps, initial=s.resume_step or 0, desc=f"train {cfg.task}", unit="step",
               disable=not progress, dynamic_ncols=True, file=sys.stderr)
    say = log or (lambda msg: bar.write(msg) if progress else print(msg) if is_main else None)

    # Model, optimizer, shardings: compiled once per (model config, optimizer settings, mesh).
    prog = compiled_programs(s.lm_config, OptimizerSettings.of(cfg), mesh, s.sequence_parallel)
    batch_sharding = prog.batch_sharding
    params, opt_state = prog.init(jax.random.key(cfg.seed))
    schedule = learning_rate_schedule(cfg)
    n_params = sum(int(np.prod(p.shape)) for p in jax.tree.leaves(params))
    train_step, eval_step = prog.train_step, prog.eval_step

    # Run directory, checkpoint, metrics.
    start, prior_elapsed = 0, 0.0
    ckpt = Checkpointer(out / "checkpoints", max_to_keep=cfg.keep_checkpoints)
    if s.resume_step is not None:
        state, meta = ckpt.restore({"params": params, "opt_state": opt_state}, s.resume_step)
        params, opt_state = state["params"], state["opt_state"]
        start, prior_elapsed = int(meta["step"]), float(meta.get("elapsed_s", 0.0))
        say(f"resumed {out} from step {start}")
    writer = None
    if is_main:
        (out / "config.json").write_text(json.dumps({"train": cfg.to_dict(), "model": s.lm_config.to_dict()},
                                                    indent=2, sort_keys=True) + "\n")
        writer = MetricsWriter(out / "metrics.jsonl", truncate_after=start if s.resume_step is not None else None)
    records: list[dict[str, Any]] = []
    summary = {"params": n_params, "devices": jax.device_count(), "backend": jax.default_backend(),
               "mesh": dict(mesh.shape), **task.summary()}
    if s.sequence_parallel is not None:
        sp = s.sequence_parallel
        summary["sequence_parallel"] = {"axis": sp.axis, "size": sp.size, "softmax": sp.strategy,
                                        "recurrent": sp.recurrent_strategy, "layout": sp.layout or "contiguous"}
    if s.resume_step is None:
        say(f"{cfg.task}: {n_params / 1e6:.2f}M parameters, mixers {cfg.mixers}, {jax.device_count()} "
            f"{jax.default_backend()} device(s), mesh {dict(mesh.shape)}, run dir {out}")
        say(task.describe())

    def emit(record):
        records.append(record)
        if writer is not None:
            writer.write(record)

    eval_data = [_shard_batch(b, batch_sharding) for b in task.eval_batches(cfg.batch_size, cfg.seq_len)]

    def evaluate(step: int) -> dict[str, Any]:
        totals = {"nll": 0.0, "correct": 0.0, "count": 0.0}
        for batch in eval_data:
            for k, v in jax.device_get(eval_step(params, batch)).items():
                totals[k] += float(v)
        count = max(totals["count"], 1.0)
        record = {"kind": "eval", "step": step, **task.metrics(totals["nll"] / count, totals["correct"] / count),
                  "elapsed_s": prior_elapsed + time.perf_counter() - t_start}
        emit(record)
        return record

    def save(step: int):
        meta = {"step": step, "data": {"seed": cfg.seed, "next_step": step},
                "elapsed_s": prior_elapsed + time.perf_counter() - t_start,
                "train_config": cfg.to_dict(), "model_config": s.lm_config.to_dict()}
        ckpt.save(step, {"params": params, "opt_state": opt_state}, meta)

    # The loop. Step s (1-based) trains on task.batch(s - 1) with learning rate schedule(s - 1).
    tokens_per_step = cfg.batch_size * cfg.seq_len
    pending: list[dict[str, jax.Array]] = []
    last_eval: dict[str, Any] | None = None
    compile_s = None
    t_interval, tokens_interval = time.perf_counter(), 0
    postfix: dict[str, str] = {}

    def show(refresh: bool = False):
        if last_eval is not None:
            postfix[task.primary_metric] = f"{last_eval[task.primary_metric]:.3f}"
        bar.set_postfix(postfix, refresh=refresh)

    def log_train(step: int):
        nonlocal pending, t_interval, tokens_interval
        host = jax.device_get(pending)
        pending = []
        loss = float(np.mean([h["loss"] for h in host]))
        if not math.isfinite(loss):
            raise FloatingPointError(f"training diverged: loss {loss} at step {step} (try a lower --lr)")
        now = time.perf_counter()
        tps = tokens_interval / (now - t_interval) if tokens_interval else None
        emit({"kind": "train", "step": step, "loss": loss, "lr": float(schedule(step - 1)),
              "grad_norm": float(np.mean([h["grad_norm"] for h in host])), "tokens_per_s": tps,
              "elapsed_s": prior_elapsed + now - t_start})
        t_interval, tokens_interval = now, 0
        postfix["loss"] = f"{loss:.3f}"
        if tps:
            postfix["tok/s"] = f"{tps:,.0f}"
        show()

    stop = StopOnSignal()
    try:
        with stop:
            for step in range(start + 1, end + 1):
                batch = _shard_batch(task.batch(step - 1, cfg.batch_size, cfg.seq_len), batch_sharding)
                params, opt_state, stats = train_step(params, opt_state, batch)
                pending.append(stats)
                if compile_s is None:  # the first step of this process compiles: keep it out of tokens/s
                    jax.block_until_ready(stats)
                    compile_s = time.perf_counter() - t_interval
                    t_interval, tokens_interval = time.perf_counter(), 0
                else:
                    tokens_interval += tokens_per_step
                bar.update(1)
                stopping = _all_agree(stop.signum is not None)
                if step % cfg.log_every == 0 or step == end or (stopping and pending):
                    log_train(step)
                if step % cfg.eval_every == 0 or step == end:
                    last_eval = evaluate(step)
                    show(refresh=True)
                    say(f"step {step}: " + ", ".join(f"{k} {v:.4f}" for k, v in last_eval.items()
                                                      if k.startswith("val_")))
                if step % cfg.ckpt_every == 0 or step == end or stopping:
                    save(step)
                if stopping:
                    # a process that got no signal itself stops because another one got SIGTERM
                    raise TrainingInterrupted(step, stop.signum or signal.SIGTERM, out)
        steps_done = max(end - start, 0)
        if last_eval is None:  # nothing left to train (resumed at the end): report the model as it is
            done = [r for r in read_metrics(out / "metrics.jsonl") if r["kind"] == "eval" and r["step"] == start] \
                if is_main else []
            last_eval = done[-1] if done else evaluate(start)
        latest = ckpt.latest_step()
    finally:
        bar.refresh()  # the last line shows the final values
        bar.close()
        if writer is not None:
            writer.close()
        ckpt.close()

    # Plot, sample, summary.
    plot_path = None
    if is_main:
        bpb = task.primary_metric == "val_bpb"
        plot_path = plot_metrics(read_metrics(out / "metrics.jsonl"), out / "metrics.png",
                                 metric=task.primary_metric,
                                 baseline=summary.get("unigram_entropy_bpb" if bpb else "chance_acc"),
                                 baseline_label="unigram entropy" if bpb else "chance",
                                 title=f"{cfg.task} · {cfg.mixers} · d_model {cfg.d_model}")
    model = nnx.merge(prog.graphdef, params, prog.rest)
    sample = {}
    if getattr(task, "sample_prompts", ()) and cfg.sample_len > 0:
        for prompt in task.sample_prompts:
            n = min(cfg.sample_len, s.lm_config.max_len - len(prompt))
            if n > 0:  # sampled: greedy decoding of a small LM loops on its most frequent word
                tokens = model.generate(jnp.asarray(task.encode(prompt))[None], n, key=jax.random.key(cfg.seed),
                                        **SAMPLING)
                sample[prompt.decode()] = task.decode(np.asarray(tokens[0]))
    wall_s = time.perf_counter() - t_start
    ckpt_path = out / "checkpoints" / str(latest) if latest is not None else None
    final = {k: v for k, v in last_eval.items() if k != "kind"}
    summary.update({"final": final, "steps": max(start, end), "wall_s": wall_s, "compile_s": compile_s,
                    "total_elapsed_s": prior_elapsed + wall_s, "sample": sample})
    if is_main:
        (out / "summary.json").write_text(json.dumps(summary, indent=2, default=str) + "\n")
    return RunResult(out=out, metrics_path=out / "metrics.jsonl", plot_path=plot_path, checkpoint_path=ckpt_path,
                     records=records, final=final, summary=summary, sample=sample, wall_s=wall_s,
                     steps_done=steps_done, model=model)


def format_report(result: RunResult, task_name: str) -> str:
    """The end-of-run lines: where things were written and the headline numbers."""
    s, f = result.summary, result.final
    lines = [f"metrics    {result.metrics_path}", f"plot       {result.plot_path}",
             f"checkpoint {result.checkpoint_path}", f"summary    {result.out / 'summary.json'}"]
    minutes, seconds = divmod(result.wall_s, 60)
    head = f"{task_name}: step {s['steps']}, wall {int(minutes)}m{seconds:04.1f}s"
    if s.get("compile_s") is not None:
        head += f" (first step incl. compile {s['compile_s']:.1f}s)"
    if "val_bpb" in f:
        head += (f"; val {f['val_bpb']:.3f} bits/byte vs unigram entropy "
                 f"{s.get('unigram_entropy_bpb', float('nan')):.3f} bits/byte")
    elif "val_acc" in f:
        head += f"; val accuracy {f['val_acc']:.4f} (chance {s.get('chance_acc', float('nan')):.4f})"
    lines.append(head)
    for prompt, text in result.sample.items():
        lines.append(f"sample {prompt!r} -> {text!r} (temperature {SAMPLING['temperature']}, "
                     f"top-k {SAMPLING['top_k']})")
    return "\n".join(lines)
