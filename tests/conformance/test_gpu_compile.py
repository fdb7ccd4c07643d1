"""Ahead-of-time compiles for an NVIDIA H100 (evidence ``gpu:aot``), generated from the registry.

For every implementation whose record names ``gpu:aot``: forward, and forward + backward
(``value_and_grad`` of ``sum(o)`` over q, k, v, and a recurrent family's gates and β), at production shapes
in bf16 (:data:`CONFIGS`: attention ``[2, 8192, H, 128]`` causal 16 heads, GQA 32:8, causal window 4096;
neighborhood attention 2-D ``[2, 64, 64, 8, 128]`` kernel 7; the recurrent families ``[2, 8192, 16, 128]``
with ``Dk = Dv = 128``, their gates and β from the family's input factory), lowered and compiled inside one ``jax.jit`` for the H100 target
described in ``pallas_kernels/gpu/h100_target_config.txtpb`` (``pallas_kernels.gpu.aot``; ptxas compiles
Mosaic GPU kernels, whose register / spill / shared-memory figures are checked). The named implementation
must serve the call (it fails loudly otherwise) and the compiled program must call a GPU kernel or library.
A cuDNN call stays opaque here (XLA builds cuDNN graphs only with a device): these cases check jax's
lowering and XLA's compile around it, not cuDNN's engine choice.

Needs the ``gpu-compile`` extra (``gpu-compile-cudnn`` for cuDNN); skipped, with the reason, without it.
"""

import dataclasses

import jax
import jax.numpy as jnp
import pytest

from pallas_kernels.gpu import aot
from seqmix.ops import _registry
from seqmix.ops import masks as M
from tests.conformance import plan

pytestmark = [pytest.mark.gpu_compile, pytest.mark.slow]

CELLS = plan.cells(modes=("gpu:aot",))
MAX_REGISTERS = 255  # per thread on sm_90
MAX_SMEM = 232448  # opt-in shared memory per block on an H100 (the target config)
_NO_CUDNN = ("cuDNN not found", "cuDNN is not detected")


@dataclasses.dataclass(frozen=True)
class Config:
    """One production call: q / kv shapes (bf16) and the op's keyword arguments."""

    q_shape: tuple[int, ...]
    kv_shape: tuple[int, ...]
    options: dict


def _mha(q_heads: int, kv_heads: int, mask) -> Config:
    return Config((2, 8192, q_heads, 128), (2, 8192, kv_heads, 128), {"mask": mask})


# Production shapes per family (a family with gpu:aot evidence and no entry here fails the plan).
CONFIGS = {
    "attention": {"causal": _mha(16, 16, M.Causal()), "gqa": _mha(32, 8, M.Causal()),
                  "window": _mha(16, 16, M.LocalWindow(4096))},
    "neighborhood_attention": {"2d_k7": Config((2, 64, 64, 8, 128), (2, 64, 64, 8, 128), {"kernel_size": 7})},
    **{family: {"d128": Config((2, 8192, 16, 128), (2, 8192, 16, 128), {})}
       for family in ("delta_rule", "gated_delta_rule", "gla", "linear_attention", "retention", "simple_gla")},
}
# Known limits, each a strict xfail (a fix makes the case pass and the xfail fail, so it is removed):
KNOWN: dict[tuple[str, str, str, str], str] = {}  # none now (the GQA dkv spill was the last)
CASES = [(cell, name, mode) for cell in CELLS for name in CONFIGS.get(cell[0], {"missing": None})
         for mode in ("fwd", "fwd+bwd")]


def _params():
    out = []
    for cell, name, mode in CASES:
        reason = KNOWN.get((cell[0], cell[1], name, mode))
        marks = [pytest.mark.xfail(reason=reason, strict=True)] if reason else []
        out.append(pytest.param(cell, name, mode, marks=marks, id=f"{plan.cell_id(cell)}-{name}-{mode}"))
    return out


def program(family, impl, cfg: Config, mode):
    """``(fn, argument shapes)``: the op (forward, or ``value_and_grad`` of ``sum(o)`` over every argument).

    Attention-like families take ``q, k, v``; a recurrent family also its positional gates / β, shaped by
    its input factory at 8 tokens and stretched to ``cfg.q_shape``'s length (a fixed per-head array such
    as retention's decay stays a keyword)."""
    fam = _registry.get_family(family)
    args = [(cfg.q_shape, jnp.bfloat16), (cfg.kv_shape, jnp.bfloat16), (cfg.kv_shape, jnp.bfloat16)]
    fixed = dict(cfg.options)
    if fam.kind == "recurrent":
        b, t, h, dk = cfg.q_shape
        small = fam.make_inputs(fam, jax.random.PRNGKey(0), batch=b, seq=8, heads=h, dk=dk, dv=cfg.kv_shape[-1],
                                dtype="bfloat16")
        per_token = {x.name for x in fam.per_token}
        stretch = lambda x: ((b, t) + x.shape[2:], x.dtype)  # noqa: E731
        args += [stretch(x) if n in per_token else (x.shape, x.dtype) for n, x in zip(fam.positional, small.args[3:])]
        fixed.update({n: x for n, x in small.arrays.items() if n != "initial_state"}, **small.options)

    def forward(*xs):
        return fam.op(*xs, **fixed, impl=impl)

    if mode == "fwd":
        return forward, args
    loss = lambda *xs: forward(*xs).astype(jnp.float32).sum()  # noqa: E731
    return jax.value_and_grad(loss, argnums=tuple(range(len(args)))), args


@pytest.mark.parametrize("cell, config, mode", _params())
def test_compiles_for_h100(cell, config, mode):
    problem = aot.missing()
    if problem:
        pytest.skip(problem)
    family, impl, _ = cell
    assert config in CONFIGS.get(family, {}), f"{family}: no production-shape gpu:aot config (add one to CONFIGS)"
    fn, args = program(family, impl, CONFIGS[family][config], mode)
    report = aot.compile_for_h100(fn, args)
    if not report.ok and any(s in report.error for s in _NO_CUDNN):
        pytest.skip(f"libcudnn is not loadable (jax checks its version while tracing): install the "
                    f"gpu-compile-cudnn extra ({report.error[:120]})")
    assert report.ok, report.error
    assert report.custom_calls, "the compiled program calls no GPU kernel or library"
    for k in report.kernels:  # Mosaic GPU kernels: ptxas's figures
        assert k.registers <= MAX_REGISTERS and k.spill_stores == 0 and k.spill_loads == 0, k
        assert (k.smem_bytes or 0) + k.shared_bytes <= MAX_SMEM, k
    assert report.memory.get("argument_size_in_bytes", 0) > 0, report.memory
