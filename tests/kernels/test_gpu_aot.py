"""The ahead-of-time GPU compile route (``pallas_kernels.gpu.aot``).

Default run (no extra needed): ptxas report parsing, and a clear error naming the ``gpu-compile`` extra
where it is missing. With the extra (marked ``gpu_compile`` and ``slow``): the H100 context makes
``pallas_kernels._target`` report the H100, and a small Mosaic GPU kernel compiles through ptxas with its
registers, spills and shared memory reported.
"""

import jax
import jax.numpy as jnp
import pytest

from pallas_kernels import _target
from pallas_kernels.gpu import aot

PTXAS = """ptxas info    : 0 bytes gmem
ptxas info    : Compiling entry function 'body_mosaic_gpu_kernel' for 'sm_90a'
ptxas info    : Function properties for body_mosaic_gpu_kernel
    8 bytes stack frame, 16 bytes spill stores, 24 bytes spill loads
ptxas info    : Used 168 registers, used 2 barriers, 1 bytes smem
ptxas info    : Compile time = 8.572 ms
"""


def test_parse_ptxas():
    (k,) = aot.parse_ptxas(PTXAS, smem_bytes=32768)
    assert k == aot.KernelStats("body_mosaic_gpu_kernel", registers=168, spill_stores=16, spill_loads=24,
                                shared_bytes=1, smem_bytes=32768, stack_bytes=8)


def test_missing_extra_is_named():
    problem = aot.missing()
    if problem is None:
        aot.require()  # the extra is installed: nothing to name
        return
    assert "`gpu-compile` extra" in problem
    with pytest.raises(aot.GpuCompileUnavailable, match="gpu-compile"):
        aot.require()
    with pytest.raises(aot.GpuCompileUnavailable, match="gpu-compile"):
        aot.compile_for_h100(lambda x: x, [((8,), jnp.float32)])


def _need_extra():
    problem = aot.missing()
    if problem:
        pytest.skip(problem)


@pytest.mark.gpu_compile
@pytest.mark.slow
def test_h100_context_is_the_trace_target():
    _need_extra()
    with aot.h100():
        target = _target.current()
        assert _target.backend_problem("gpu") is None
        assert "need a TPU" in _target.backend_problem("tpu")
    assert target == _target.Target("gpu", "NVIDIA H100 80GB HBM3", True)
    assert _target.current().platform == "cpu"


@pytest.mark.gpu_compile
@pytest.mark.slow
def test_mosaic_gpu_kernel_reports_ptxas_figures():
    _need_extra()
    from jax.experimental.pallas import mosaic_gpu as plgpu

    def add_one(x):  # x: f32[8192], through a 32 KiB shared-memory buffer
        def body(x_ref, o_ref, scratch):
            scratch[...] = x_ref[...] + 1.0
            o_ref[...] = scratch[...]

        return plgpu.kernel(body, out_type=jax.ShapeDtypeStruct(x.shape, x.dtype),
                            scratch_types=[plgpu.SMEM(x.shape, x.dtype)])(x)

    report = aot.compile_for_h100(add_one, [((8192,), jnp.float32)])
    assert report.ok, report.error
    assert "mosaic_gpu_v2" in report.custom_calls, report.custom_calls
    (k,) = report.kernels
    assert 0 < k.registers <= 255 and k.spill_stores == 0 and k.spill_loads == 0, k
    assert k.smem_bytes is not None and k.smem_bytes >= 8192 * 4, k
    assert report.memory["argument_size_in_bytes"] == 8192 * 4


@pytest.mark.gpu_compile
@pytest.mark.slow
def test_a_failed_compile_is_reported_not_raised():
    _need_extra()
    from jax.experimental.pallas import mosaic_gpu as plgpu

    def too_much_smem(x):
        def body(x_ref, o_ref, scratch):
            o_ref[...] = x_ref[...]

        return plgpu.kernel(body, out_type=jax.ShapeDtypeStruct(x.shape, x.dtype),
                            scratch_types=[plgpu.SMEM((300 * 1024 // 4,), jnp.float32)])(x)

    report = aot.compile_for_h100(too_much_smem, [((128,), jnp.float32)])
    assert not report.ok and "shared memory" in report.error.lower(), report.error
