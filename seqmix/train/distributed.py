"""Joining a multi-process run (a Cloud TPU pod slice, several GPU hosts, SLURM) before JAX starts.

``seqmix train`` calls :func:`join` first. Three ways in, in this order:

* explicit: ``coordinator`` (``host:port`` of process 0), ``num_processes`` and ``process_id`` all given
  (``--coordinator/--num-processes/--process-id``);
* automatic (``mode="auto"``, the default): when the environment names a multi-process job that
  ``jax.distributed.initialize()`` knows how to read (see :func:`detect_cluster`), JAX reads the
  coordinator, the process count and this process's id from it;
* ``mode="always"``: call ``jax.distributed.initialize()`` even when no variable says so (a Cloud TPU
  pod slice on GCE, where JAX asks the TPU metadata server); ``mode="never"``: stay one process.

CPU collectives go over gloo (``jax_cpu_collectives_implementation``), so the same path runs on
localhost with forced CPU devices (what the tests do); the option has no effect on TPU or GPU.
After joining, every process runs the same program: the trainer builds one global mesh over every
process's devices, each process puts its share of each global batch on its own devices, process 0
alone prints and writes metrics, and Orbax saves and restores across processes (docs/multihost.md).
"""

from __future__ import annotations

import os

MODES = ("auto", "always", "never")


def detect_cluster(environ=None) -> str | None:
    """The multi-process job the environment describes (one that ``jax.distributed.initialize()`` reads
    without arguments), or None for a single-process run. Checks, in order: ``JAX_COORDINATOR_ADDRESS``;
    SLURM with more than one task; Open MPI with more than one rank; a multi-host Cloud TPU slice on
    GKE (``TPU_WORKER_HOSTNAMES`` naming several hosts) or with ``MEGASCALE_COORDINATOR_ADDRESS``."""
    env = os.environ if environ is None else environ
    if env.get("JAX_COORDINATOR_ADDRESS"):
        return "JAX_COORDINATOR_ADDRESS"
    if env.get("SLURM_JOB_ID") and int((env.get("SLURM_NTASKS") or "1").split("(")[0]) > 1:
        return f"SLURM job {env['SLURM_JOB_ID']} ({env['SLURM_NTASKS']} tasks)"
    if int(env.get("OMPI_COMM_WORLD_SIZE") or 1) > 1:
        return f"Open MPI ({env['OMPI_COMM_WORLD_SIZE']} ranks)"
    hosts = [h for h in (env.get("TPU_WORKER_HOSTNAMES") or "").split(",") if h.strip()]
    if len(hosts) > 1:
        return f"Cloud TPU slice ({len(hosts)} hosts)"
    if env.get("MEGASCALE_COORDINATOR_ADDRESS"):
        return "Cloud TPU multislice (MEGASCALE_COORDINATOR_ADDRESS)"
    return None


def check_join_arguments(coordinator, num_processes, process_id, mode: str = "auto") -> None:
    """Raise ValueError for an incomplete or inconsistent set of join arguments."""
    if mode not in MODES:
        raise ValueError(f"--distributed must be one of {', '.join(MODES)}; got {mode!r}")
    given = [a is not None for a in (coordinator, num_processes, process_id)]
    if any(given) and not all(given):
        raise ValueError("a multi-process run needs all of --coordinator HOST:PORT, --num-processes N and "
                         "--process-id I (or none of them, to let JAX read them from the cluster)")
    if all(given):
        if mode == "never":
            raise ValueError("--distributed never contradicts --coordinator/--num-processes/--process-id")
        host, sep, port = str(coordinator).rpartition(":")
        if not sep or not host or not port.isdigit():
            raise ValueError(f"--coordinator must be HOST:PORT (process 0's address); got {coordinator!r}")
        if num_processes < 1:
            raise ValueError(f"--num-processes must be >= 1; got {num_processes}")
        if not 0 <= process_id < num_processes:
            raise ValueError(f"--process-id must be in [0, {num_processes}); got {process_id}")


def join(coordinator: str | None = None, num_processes: int | None = None, process_id: int | None = None, *,
         mode: str = "auto", timeout_s: int = 300) -> str | None:
    """Join the multi-process run the arguments or the environment describe; return how (None: one
    process). Must run before anything touches a JAX device."""
    check_join_arguments(coordinator, num_processes, process_id, mode)
    explicit = coordinator is not None
    if explicit:
        how = f"{num_processes} processes via {coordinator}" if num_processes > 1 else None
    elif mode == "never":
        how = None
    else:
        how = detect_cluster() or ("jax.distributed auto-detection" if mode == "always" else None)
    if how is None:
        return None
    import jax

    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    kwargs = dict(coordinator_address=coordinator, num_processes=num_processes, process_id=process_id) \
        if explicit else {}
    jax.distributed.initialize(initialization_timeout=timeout_s, **kwargs)
    return how
