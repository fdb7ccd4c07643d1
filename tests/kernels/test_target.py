"""The backend/target layer (``pallas_kernels._target``): dispatch knows what a trace is for.

* under an abstract mesh of GPU devices, a named ``pallas_tpu`` fails loudly (it used to run the TPU
  interpreter) and automatic dispatch runs ``xla``;
* under an abstract mesh of TPU devices (ahead-of-time lowering on this CPU host), the target is that TPU
  and automatic dispatch picks the Pallas kernels (the ring / LASP-2 AOT tests check the compiled HLO).
"""

import jax
import jax.numpy as jnp
import pytest

from pallas_kernels import _target
from seqmix import ops
from seqmix.ops import masks as M


def _abstract_mesh(platform, kind):
    sharding = jax.sharding
    if not hasattr(sharding, "AbstractDevice"):
        pytest.skip("this jax has no jax.sharding.AbstractDevice")
    dev = sharding.AbstractDevice(device_kind=kind, num_cores=1, platform=platform)
    return sharding.AbstractMesh((1,), ("x",), abstract_device=dev)


def test_cpu_target_interprets_tpu_kernels():
    t = _target.current()
    assert t.platform == "cpu" and not t.ahead_of_time
    assert _target.backend_problem("tpu") is None and _target.is_interpreting()


def test_pallas_tpu_on_a_gpu_fails_loudly():
    q, g = jnp.ones((1, 128, 2, 16)), -jnp.ones((1, 128, 2, 16))  # concrete arrays before the abstract mesh
    with jax.sharding.use_abstract_mesh(_abstract_mesh("cuda", "NVIDIA H100 80GB HBM3")):
        target = _target.current()
        assert target.platform == "gpu" and target.ahead_of_time
        with pytest.raises(NotImplementedError, match="need a TPU"):
            jax.eval_shape(lambda q: ops.attention(q, q, q, mask=M.Causal(), impl="pallas_tpu"), q)
        text = ops.explain(ops.gla, q, q, q, g)
        assert "skip pallas_tpu" in text and "run  xla" in text


def test_tpu_target_picks_the_kernels():
    q = jnp.ones((1, 256, 2, 128), jnp.bfloat16)
    with jax.sharding.use_abstract_mesh(_abstract_mesh("tpu", "TPU v5 lite")):
        assert _target.current().platform == "tpu" and not _target.is_interpreting()
        text = ops.explain(ops.attention, q, q, q, mask=M.Causal())
        assert "run  pallas_tpu" in text and "[v5e]" in text, text
