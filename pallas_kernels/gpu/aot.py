"""Ahead-of-time compiles for an NVIDIA H100 on a machine without a GPU (docs/GPU.md §2b).

The route: an H100 topology from the repo's target description (``h100_target_config.txtpb``), a
one-device mesh on it, arguments as ``jax.ShapeDtypeStruct`` placed on that mesh, and
``jax.jit(fn).trace(*args).lower().compile()`` under ``jax.sharding.use_abstract_mesh`` (so
``pallas_kernels._target.current()`` reports platform ``"gpu"`` and the H100's device kind while
tracing). XLA's GPU compiler and, for Mosaic GPU kernels, ptxas (sm_90a) run on the CPU; nothing runs.

    report = compile_for_h100(lambda q, k, v: f(q, k, v), [((2, 8192, 16, 128), jnp.bfloat16)] * 3)
    report.ok, report.error, report.kernels, report.memory, report.custom_calls

Mosaic GPU kernels are reported per kernel from ptxas's own output (``MOSAIC_GPU_DUMP_TO`` +
``MOSAIC_GPU_DUMP_PTXAS=1``): registers, spill stores/loads, static shared memory. Library calls (cuDNN)
are listed by custom-call target only: XLA builds cuDNN graphs only when it has a device
(``RunCudnnCompilerPasses`` runs only with a stream executor), so a deviceless compile keeps them opaque.

Needs the ``gpu-compile`` extra (jax-cuda12-plugin of the installed jax's version + nvidia-cuda-nvcc-cu12
for ptxas); :func:`missing` says what is absent and :class:`GpuCompileUnavailable` names the extra.
Imports only jax (this module sits below ``seqmix``, DESIGN.md §1).
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import importlib.metadata
import importlib.util
import os
import re
import shutil
import tempfile
import threading
import time
from pathlib import Path
from typing import Any, Callable, Sequence

import jax

TARGET_CONFIG = Path(__file__).with_name("h100_target_config.txtpb")
EXTRA = "gpu-compile"
_PLUGINS = ("jax_cuda12_plugin", "jax_cuda13_plugin")
_ENV_LOCK = threading.Lock()  # the dump variables are process-wide


class GpuCompileUnavailable(RuntimeError):
    """The ahead-of-time GPU route cannot run here (a missing package of the ``gpu-compile`` extra)."""


def _ptxas() -> str | None:
    """Path of a ptxas XLA can use: the pip ``nvidia-cuda-nvcc-cu12`` one, else one on ``PATH``."""
    spec = importlib.util.find_spec("nvidia")
    for root in (spec.submodule_search_locations or []) if spec else []:
        candidate = Path(root) / "cuda_nvcc" / "bin" / "ptxas"
        if candidate.is_file():
            return str(candidate)
    return shutil.which("ptxas")


def missing() -> str | None:
    """None if the route can run, else what is missing (naming the extra to install)."""
    problems = []
    plugins = [p for p in _PLUGINS if importlib.util.find_spec(p) is not None]
    if not plugins:
        problems.append("jax-cuda12-plugin is not installed")
    else:
        dist = plugins[0].replace("_", "-")
        try:
            version = importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:  # pragma: no cover - a source build
            version = jax.__version__
        if version != jax.__version__:
            problems.append(f"{dist} {version} does not match jax {jax.__version__}")
    if _ptxas() is None:
        problems.append("ptxas is not available (nvidia-cuda-nvcc-cu12)")
    if not problems:
        return None
    return (f"ahead-of-time GPU compiles need the `{EXTRA}` extra (pip install -e '.[{EXTRA}]': "
            f"jax-cuda12-plugin=={jax.__version__} and nvidia-cuda-nvcc-cu12): " + "; ".join(problems))


def require() -> None:
    """Raise :class:`GpuCompileUnavailable` naming the missing pieces of the extra."""
    problem = missing()
    if problem:
        raise GpuCompileUnavailable(problem)


@functools.lru_cache(maxsize=None)
def h100_mesh() -> jax.sharding.Mesh:
    """A one-device mesh ``("x",)`` on the H100 described by :data:`TARGET_CONFIG`."""
    require()
    from jax.experimental import topologies

    try:
        topo = topologies.get_topology_desc(platform="cuda", target_config=TARGET_CONFIG.read_text(),
                                            topology="1x1x1")
    except Exception as err:  # noqa: BLE001 - any plugin failure: say which and why
        raise GpuCompileUnavailable(f"the CUDA plugin cannot describe an H100 topology from "
                                    f"{TARGET_CONFIG.name}: {type(err).__name__}: {err}") from err
    return topologies.make_mesh(topo, (1,), ("x",))


@contextlib.contextmanager
def h100():
    """Trace for the H100 inside the block (``_target.current()``: gpu, "NVIDIA H100 80GB HBM3").

    Yields the mesh; build arguments with :func:`placed`."""
    mesh = h100_mesh()
    with jax.sharding.use_abstract_mesh(mesh.abstract_mesh):
        yield mesh


def placed(args, mesh: jax.sharding.Mesh | None = None):
    """``(shape, dtype)`` pairs or ShapeDtypeStructs (any pytree) -> ShapeDtypeStructs on the H100 mesh
    (replicated over its one device). None leaves stay None."""
    mesh = h100_mesh() if mesh is None else mesh
    sharding = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())

    def place(x):
        if x is None:
            return None
        shape, dtype = (x.shape, x.dtype) if hasattr(x, "shape") else x
        return jax.ShapeDtypeStruct(tuple(shape), dtype, sharding=sharding)

    is_leaf = lambda x: x is None or hasattr(x, "shape") or (  # noqa: E731
        isinstance(x, tuple) and len(x) == 2 and isinstance(x[0], (tuple, list)))
    return jax.tree.map(place, args, is_leaf=is_leaf)


# ----------------------------------------------------------------------------- report


@dataclasses.dataclass(frozen=True)
class KernelStats:
    """ptxas's figures for one Mosaic GPU kernel entry function (sm_90a)."""

    name: str
    registers: int
    spill_stores: int
    spill_loads: int
    shared_bytes: int  # static shared memory ptxas saw (Mosaic GPU kernels use dynamic smem: see smem_bytes)
    smem_bytes: int | None  # dynamic shared memory the kernel launches with, when the dump states it
    stack_bytes: int


@dataclasses.dataclass
class CompileReport:
    """What one ahead-of-time compile gave.

    ok / error: compiled, or the exception's type and text; seconds: trace + lower + compile time;
    kernels: ptxas figures per Mosaic GPU kernel; custom_calls: the compiled HLO's custom-call targets
    (``"__cudnn$fmhaSoftmax"``, ``"mosaic_gpu_v2"``, ...); memory: ``compiled.memory_analysis()`` fields
    in bytes (argument, output, temp, generated code) where the backend reports them.
    """

    ok: bool
    seconds: float
    error: str | None = None
    kernels: list[KernelStats] = dataclasses.field(default_factory=list)
    custom_calls: list[str] = dataclasses.field(default_factory=list)
    memory: dict[str, int] = dataclasses.field(default_factory=dict)
    compiled: Any = dataclasses.field(default=None, repr=False)


_ENTRY = re.compile(r"Compiling entry function '([^']+)'")
_FRAME = re.compile(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads")
_REGS = re.compile(r"Used (\d+) registers(?:.*?(\d+) bytes smem)?")
_CUSTOM_CALL = re.compile(r'custom_call_target="([^"]+)"')
_DYN_SMEM = re.compile(r"dynamic_shared_memory_size\s+%?c?(\d+)_i32")


def parse_ptxas(text: str, smem_bytes: int | None = None) -> list[KernelStats]:
    """ptxas ``-v`` output (``ptxas info    : Used 154 registers, ... 0 bytes spill stores``) -> one
    :class:`KernelStats` per entry function."""
    out = []
    parts = _ENTRY.split(text)
    for name, body in zip(parts[1::2], parts[2::2]):
        frame = _FRAME.search(body)
        regs = _REGS.search(body)
        out.append(KernelStats(
            name=name, registers=int(regs.group(1)) if regs else -1,
            spill_stores=int(frame.group(2)) if frame else -1, spill_loads=int(frame.group(3)) if frame else -1,
            shared_bytes=int(regs.group(2)) if regs and regs.group(2) else 0, smem_bytes=smem_bytes,
            stack_bytes=int(frame.group(1)) if frame else -1))
    return out


def _dump_stats(directory: Path) -> list[KernelStats]:
    stats = []
    for ptxas in sorted(directory.glob("*.ptxas")):
        passes = ptxas.with_name(ptxas.name[: -len(".ptxas")] + ".mlir-passes.log")
        smem = None
        if passes.is_file():
            sizes = [int(m.group(1)) for m in _DYN_SMEM.finditer(passes.read_text(errors="replace"))]
            smem = max(sizes) if sizes else None
        stats.extend(parse_ptxas(ptxas.read_text(errors="replace"), smem))
    return stats


@contextlib.contextmanager
def _mosaic_dump(directory: Path):
    names = {"MOSAIC_GPU_DUMP_TO": str(directory), "MOSAIC_GPU_DUMP_PTXAS": "1"}
    with _ENV_LOCK:
        saved = {k: os.environ.get(k) for k in names}
        os.environ.update(names)
        try:
            yield
        finally:
            for k, v in saved.items():
                if v is None:
                    os.environ.pop(k, None)
                else:
                    os.environ[k] = v


def _memory(compiled) -> dict[str, int]:
    try:
        stats = compiled.memory_analysis()
    except Exception:  # noqa: BLE001 - not every backend / version reports it
        return {}
    fields = ("argument_size_in_bytes", "output_size_in_bytes", "temp_size_in_bytes",
              "alias_size_in_bytes", "generated_code_size_in_bytes")
    return {f: int(getattr(stats, f)) for f in fields if getattr(stats, f, None) is not None}


def compile_for_h100(fn: Callable, args: Sequence, *, keep_compiled: bool = False) -> CompileReport:
    """Compile ``jax.jit(fn)(*args)`` for the H100 ahead of time and report (never raises for a failed
    compile; raises :class:`GpuCompileUnavailable` when the route itself is missing).

    args: ``(shape, dtype)`` pairs or ShapeDtypeStructs (pytrees allowed; None passes through), e.g.
    ``[((2, 8192, 16, 128), jnp.bfloat16)] * 3`` for q, k, v ``[B, T, H, D]``.
    """
    mesh = h100_mesh()
    placed_args = placed(list(args), mesh)
    start = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="seqmix_mosaic_gpu_") as tmp, _mosaic_dump(Path(tmp)):
        try:
            with h100():
                compiled = jax.jit(fn).trace(*placed_args).lower().compile()
        except Exception as err:  # noqa: BLE001 - the report carries the compiler's message
            return CompileReport(False, time.perf_counter() - start, f"{type(err).__name__}: {err}",
                                 kernels=_dump_stats(Path(tmp)))
        seconds = time.perf_counter() - start
        kernels = _dump_stats(Path(tmp))
    text = compiled.as_text() or ""
    calls = sorted(set(_CUSTOM_CALL.findall(text)))
    return CompileReport(True, seconds, kernels=kernels, custom_calls=calls, memory=_memory(compiled),
                         compiled=compiled if keep_compiled else None)
