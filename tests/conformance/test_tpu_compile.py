"""Ahead-of-time Mosaic compiles of every recurrent ``pallas_tpu`` kernel for TPU v5e, v5p and v6e
(evidence ``tpu:aot``), generated from the registry.

For each recurrent family whose ``pallas_tpu`` implementation names ``tpu:aot`` evidence: forward and
backward (every differentiable input, cotangents on o and the final state) at ``[2, 8192, 16, 128]`` bf16
with an initial state, inside one ``jax.jit`` lowered for a one-chip mesh of that generation; the compiled
HLO must call the family's Mosaic kernels (``tpu_custom_call`` named ``seqmix_gla_*`` / ``seqmix_delta_*``)
and a VMEM overflow or an unsupported Mosaic op fails the compile. Attention's kernels have their own
production-shape compile test (``tests/kernels/test_flash_attention_tpu_compile.py``). Skipped, with the
reason, only where libtpu is not importable or cannot describe the topology.
"""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from seqmix.ops import _registry
from tests.conformance import plan

pytestmark = pytest.mark.tpu_compile

GENERATIONS = {"v5e": ("v5e:2x2", (2, 2, 1)), "v5p": ("v5p:2x2x1", (2, 2, 1)), "v6e": ("v6e:2x2", (2, 2, 1))}
B, T, H, D = 2, 8192, 16, 128
CELLS = plan.cells("recurrent", modes=("tpu:aot",))
_KERNEL_RE = re.compile(r"(seqmix_(?:gla|delta)_(?:fwd|bwd)\w*?)(?:\.\d+)? = .*custom_call_target=\"tpu_custom_call\"")


def tpu_mesh(gen):
    try:
        import libtpu  # noqa: F401
    except ImportError as err:
        pytest.skip(f"libtpu is not importable ({err}); install the tpu extra")
    from jax.experimental import topologies
    from jax.sharding import Mesh

    name, bounds = GENERATIONS[gen]
    try:
        topo = topologies.get_topology_desc(platform="tpu", topology_name=name, chips_per_host_bounds=bounds)
    except Exception as err:  # noqa: BLE001 - any libtpu failure means "cannot test here"
        pytest.skip(f"libtpu cannot describe topology {name}: {type(err).__name__}: {str(err)[:200]}")
    return Mesh(np.array(topo.devices[:1]), ("x",))


def kernels_in(compiled) -> set[str]:
    return {re.sub(r"_(none|scalar|channel)$", "", m.group(1).rstrip("_")) for m in _KERNEL_RE.finditer(compiled.as_text())}


# v5e in the default run; v5p and v6e in the slow tier (CI runs both)
@pytest.mark.parametrize("gen", [pytest.param(g, marks=() if g == "v5e" else pytest.mark.slow) for g in GENERATIONS])
@pytest.mark.parametrize("cell", CELLS, ids=[plan.cell_id(c) for c in CELLS])
def test_forward_and_backward_compile(cell, gen):
    from jax.sharding import NamedSharding, PartitionSpec as P

    family, impl, _ = cell
    fam = _registry.get_family(family)
    mesh = tpu_mesh(gen)
    sh = NamedSharding(mesh, P())
    holder = {}

    def arrays(key):
        inputs = fam.make_inputs(fam, key, batch=B, seq=T, heads=H, dk=D, dv=D, dtype=jnp.bfloat16)
        holder["options"] = inputs.options
        return inputs.args, inputs.arrays

    shapes = jax.eval_shape(arrays, jax.random.PRNGKey(0))
    spec = lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sh)  # noqa: E731
    args, kw = jax.tree_util.tree_map(spec, shapes)
    options = holder["options"]
    diff_kw = [n for n in kw if n == "initial_state" or fam.arg(n).differentiable]

    def fwd_bwd(args, kw):
        fixed = {n: x for n, x in kw.items() if n not in diff_kw}

        def loss(args, dkw):
            o, s = fam.op(*args, **dkw, **fixed, **options, return_state=True, impl=impl)
            return o.astype(jnp.float32).sum() + s.sum(), o
        (_, o), grads = jax.value_and_grad(loss, argnums=(0, 1), has_aux=True)(args, {n: kw[n] for n in diff_kw})
        return o, grads

    with jax.sharding.use_abstract_mesh(mesh.abstract_mesh):
        compiled = jax.jit(fwd_bwd).lower(args, kw).compile()
    found = kernels_in(compiled)
    assert any({f"{p}_fwd", f"{p}_bwd"} <= found for p in ("seqmix_gla", "seqmix_delta")), found
    assert compiled.memory_analysis() is not None
