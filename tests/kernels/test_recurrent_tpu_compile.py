"""Ahead-of-time compilation of the Pallas TPU recurrent kernels for TPU v5e, v5p and v6e on a CPU host.

The Mosaic TPU compiler from ``libtpu`` (``jax.experimental.topologies``) compiles the forward and the
backward of ``gla`` (the per-channel gated-linear kernels, the largest of that family) and
``gated_delta_rule`` (the WY / Neumann kernels) at ``[2, 8192, 16, 128]`` bf16 inside one ``jax.jit``;
a VMEM overflow or an unsupported Mosaic op fails the compile. Skipped, with the reason, where libtpu is
not importable or cannot describe the topology. ``experiments/tpu_compile_report_recurrent.py`` covers
every family and writes the VMEM / cost table.
"""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from seqmix import ops
from seqmix.ops import recurrent_pallas  # noqa: F401 - registers "pallas_tpu"

pytestmark = pytest.mark.tpu_compile

GENERATIONS = {"v5e": ("v5e:2x2", (2, 2, 1)), "v5p": ("v5p:2x2x1", (2, 2, 1)), "v6e": ("v6e:2x2", (2, 2, 1))}
B, T, H, D = 2, 8192, 16, 128
_KERNEL_RE = re.compile(r"(seqmix_(?:gla|delta)_(?:fwd|bwd)\w*?)(?:\.\d+)? = .*custom_call_target=\"tpu_custom_call\"")


def _mesh(gen):
    try:
        import libtpu  # noqa: F401
    except ImportError as err:
        pytest.skip(f"libtpu is not importable ({err}); put it on PYTHONPATH or install the tpu extra")
    from jax.experimental import topologies
    from jax.sharding import Mesh

    name, bounds = GENERATIONS[gen]
    try:
        topo = topologies.get_topology_desc(platform="tpu", topology_name=name, chips_per_host_bounds=bounds)
    except Exception as err:  # noqa: BLE001 - any libtpu failure means "cannot test here"
        pytest.skip(f"libtpu cannot describe topology {name}: {type(err).__name__}: {str(err)[:200]}")
    return Mesh(np.array(topo.devices[:1]), ("x",))


@pytest.mark.parametrize("gen", list(GENERATIONS))
@pytest.mark.parametrize("family", ["gla", "gated_delta_rule"])
def test_forward_and_backward_compile(family, gen):
    from jax.sharding import NamedSharding, PartitionSpec as P

    mesh = _mesh(gen)
    sh = NamedSharding(mesh, P())
    x = jax.ShapeDtypeStruct((B, T, H, D), jnp.bfloat16, sharding=sh)
    s3 = jax.ShapeDtypeStruct((B, T, H), jnp.float32, sharding=sh)
    gates = (jax.ShapeDtypeStruct((B, T, H, D), jnp.float32, sharding=sh),) if family == "gla" else (s3, s3)
    op = ops.get_family(family).op

    def fwd_bwd(q, k, v, *gates):
        def loss(*args):
            o, s = op(*args, return_state=True, impl="pallas_tpu")
            return o.astype(jnp.float32).sum() + s.sum(), o
        (_, o), grads = jax.value_and_grad(loss, argnums=tuple(range(3 + len(gates))), has_aux=True)(
            q, k, v, *gates)
        return o, grads

    with jax.sharding.use_abstract_mesh(mesh.abstract_mesh):
        compiled = jax.jit(fwd_bwd).lower(x, x, x, *gates).compile()
    kernels = {m.group(1).rstrip("_") for m in _KERNEL_RE.finditer(compiled.as_text())}
    prefix = "seqmix_gla" if family == "gla" else "seqmix_delta"
    assert {f"{prefix}_fwd", f"{prefix}_bwd"} <= {re.sub(r"_(none|scalar|channel)$", "", k) for k in kernels}, kernels
    assert compiled.memory_analysis() is not None
