"""Mosaic GPU WY kernels of the (gated) delta rule (``pallas_kernels.gpu.delta_wy``: the forward and its two
backward kernels) in the Mosaic GPU interpreter on CPU, against ``seqmix.ops._delta_chunk.kernel_operands``
(the same operands in plain jnp: blocked forward substitution for the inverse, fp32 ``HIGHEST`` matmuls,
differentiated by JAX).

Forward and every input's gradient at lengths that are not chunk multiples, with documents ending inside a
chunk and on a chunk boundary, Dv over one, two and three 64-column value blocks (the V ring wraps), and
the input that breaks a Neumann series: β = 1 with one repeated unit key (``A`` all ones below the
diagonal). bf16 operands are checked at the fp32 tolerance: the kernel's split products keep the fp32
accuracy of ``T`` (the inputs are bf16 values given as fp32, so both sides multiply the same numbers).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from seqmix.ops import _delta_chunk
from seqmix.testing import assert_close
from tests.kernels.gpu_cases import interpreter_problem, kernel_session

pytestmark = pytest.mark.interpret

_PROBLEM = interpreter_problem()
if _PROBLEM is not None:
    pytest.skip(_PROBLEM, allow_module_level=True)

from pallas_kernels.gpu import delta_wy as wyk  # noqa: E402
from pallas_kernels.gpu import flash_attention as fa  # noqa: E402

SCALE = 0.125
OUTPUTS = ("qg", "p", "kd", "u", "w", "a")
INPUTS = ("q", "k", "v", "beta", "g")


@pytest.fixture(autouse=True)
def _interpreter():
    with kernel_session():
        yield


def _cfg(dtype, races=False):
    return wyk.WYConfig(scale=SCALE, dtype=jnp.dtype(dtype).name, interpret=fa.interpret_params(detect_races=races))


def _inputs(b, t, h, dk, dv, seed, operand_dtype):
    """Unit-norm q, k (the layers' L2 norm), β in (0, 1), log gates near 0: fp32 arrays holding
    ``operand_dtype`` values."""
    ks = jax.random.split(jax.random.PRNGKey(seed), 5)
    unit = lambda x: x / jnp.linalg.norm(x, axis=-1, keepdims=True)  # noqa: E731
    rounded = lambda x: x.astype(operand_dtype).astype(jnp.float32)  # noqa: E731
    q = rounded(unit(jax.random.normal(ks[0], (b, t, h, dk))))
    k = rounded(unit(jax.random.normal(ks[1], (b, t, h, dk))))
    v = rounded(jax.random.normal(ks[2], (b, t, h, dv)))
    beta = jax.nn.sigmoid(jax.random.normal(ks[3], (b, t, h)))
    g = jax.nn.log_sigmoid(jax.random.normal(ks[4], (b, t, h)) + 3.0)
    return q, k, v, beta, g


def _resets(b, t, starts):
    r = np.zeros((b, t), bool)
    r[:, list(starts)] = True
    return jnp.asarray(r)


def _check(dtype, b, t, h, dk, dv, seed, gated=True, resets=None, args=None, races=False):
    q, k, v, beta, g = args if args is not None else _inputs(b, t, h, dk, dv, seed, dtype)
    cfg = _cfg(dtype, races=races)

    def kernel(q, k, v, beta, g):
        return tuple(wyk.state_pass_operands(cfg, q, k, v, beta, g if gated else None, resets))

    def reference(q, k, v, beta, g):
        return tuple(_delta_chunk.kernel_operands(q, k, v, beta, g if gated else None, resets, scale=SCALE, chunk=64))

    out, vjp = jax.vjp(jax.jit(kernel), q, k, v, beta, g)
    ref, rvjp = jax.vjp(jax.jit(reference), q, k, v, beta, g)
    for name, got, want in zip(OUTPUTS, out, ref):
        assert got.shape == want.shape and got.dtype == jnp.float32, name
        assert_close(got, want, kind="fp32", role="out", name=name)
    keys = jax.random.split(jax.random.PRNGKey(seed + 100), len(ref))
    cts = tuple(jax.random.normal(key, x.shape) for key, x in zip(keys, ref))
    for name, got, want in zip(INPUTS, vjp(cts), rvjp(cts)):
        if name == "g" and not gated:
            continue
        assert_close(got, want, kind="fp32", role="gate" if name in ("beta", "g") else "grad", name="d" + name)
    if races:
        from jax._src.pallas.mosaic_gpu.interpret import gpu_callbacks

        state = getattr(gpu_callbacks, "_races", None)
        assert state is None or not state.races_found


def test_fp32_documents_partial_chunk_two_value_blocks():
    """T = 150 (the last chunk partial), documents starting at 40 (inside a chunk) and 64 (on a boundary)."""
    _check(jnp.float32, 1, 150, 2, 64, 128, seed=0, resets=_resets(1, 150, (40, 64)))


def test_bf16_operands_keep_fp32_accuracy():
    """bf16 ``wgmma`` operands: T, U, W from hi / lo split products within the fp32 tolerance."""
    _check(jnp.bfloat16, 2, 100, 1, 128, 64, seed=1, resets=_resets(2, 100, (70,)))


def test_delta_rule_without_gate_three_value_blocks():
    """DeltaNet (g = None): Γ is the causal same-segment mask; Dv = 192 wraps the 2-slot V ring. Under the
    interpreter's race detector."""
    _check(jnp.float32, 1, 64, 1, 64, 192, seed=2, gated=False, races=True)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_repeated_unit_keys_beta_one(dtype):
    """β = 1 and one key repeated: every entry of A below the diagonal is 1, T is bidiagonal, and the
    powers of A reach C(63, 31) (a Neumann series would cancel catastrophically)."""
    q, k, v, beta, g = _inputs(1, 128, 1, 64, 64, 3, dtype)
    k = jnp.broadcast_to(k[:, :1], k.shape)
    args = (q, k, v, jnp.ones_like(beta), jnp.zeros_like(g))
    _check(dtype, 1, 128, 1, 64, 64, seed=3, args=args)


def test_inverse_is_exact_on_the_repeated_key_chunk():
    """The saved T of that input is the bidiagonal (I + A)⁻¹ (1 on the diagonal, −1 below it)."""
    _, k, v, beta, _ = _inputs(1, 64, 1, 64, 64, 4, jnp.float32)
    k = jnp.broadcast_to(k[:, :1], k.shape)
    tok, _ = wyk.chunk_lanes(None, None, 1, 1, 64, 64, 64)
    kk = jnp.moveaxis(k, 2, 1)
    _, _, _, t = wyk._fwd_call(_cfg(jnp.float32), kk, kk, jnp.moveaxis(v, 2, 1), tok, jnp.ones((1, 1, 64)),
                               save_t=True)
    kk_diag = float(jnp.sum(k[0, 0, 0] ** 2))  # A_ij = kᵀk, 1 up to rounding of the normalization
    want = np.eye(64) - kk_diag * np.eye(64, k=-1)
    np.testing.assert_allclose(np.asarray(t[0, 0]), want, atol=1e-5)


def test_refusals_block_ids_and_shared_memory():
    q = jnp.zeros((1, 1, 64, 64), jnp.float32)
    tok, _ = wyk.chunk_lanes(None, None, 1, 1, 64, 64, 64)
    beta = jnp.zeros((1, 1, 64), jnp.float32)
    cfg = _cfg(jnp.float32)
    with pytest.raises(ValueError, match="float32"):
        wyk.wy(cfg, q.astype(jnp.bfloat16), q, q, tok, beta)
    with pytest.raises(ValueError, match="multiple of 64"):
        wyk.wy(cfg, q, q, q[..., :32], tok, beta)
    with pytest.raises(ValueError, match="chunk must be 64"):
        wyk.wy(wyk.WYConfig(scale=1.0, chunk=128, dtype="float32"), q, q, q, tok, beta)
    ids = np.asarray(wyk.block_ids(64))
    assert ids.shape == (7, 64)
    np.testing.assert_array_equal(ids[3], np.arange(64) // 8)
    for dtype in (jnp.bfloat16, jnp.float16):  # Dk = 128 fits (the production head; 192 does not: bwd_k)
        assert max(wyk.smem_bytes(64, 128, dtype).values()) <= fa.MAX_SMEM_BYTES
        assert wyk.smem_bytes(64, 192, dtype)["bwd_k"] > fa.MAX_SMEM_BYTES


def test_compiled_calls_refused_where_shared_memory_runs_out():
    """On a GPU target ``supports()`` refuses head sizes whose kernels exceed an H100 block's shared memory
    (a compile error otherwise), naming the kernel: the delta rule's and gated-linear's at Dk = 256."""
    from seqmix.ops._recurrent import RecurrentCall
    from seqmix.ops.gpu import recurrent as gpu_recurrent

    def call(dk, gated):
        x = jnp.zeros((1, 64, 1, dk), jnp.bfloat16)
        gate = jnp.zeros((1, 64, 1), jnp.float32)
        return RecurrentCall(x, x, x, 1.0, None, False, None, None, 64, g=gate, beta=None if gated else gate)

    for smem, gated in ((gpu_recurrent._smem_delta, False), (gpu_recurrent._smem_gated_linear, True)):
        assert gpu_recurrent.shared_memory_problem(call(128, gated), smem) is None
        why = gpu_recurrent.shared_memory_problem(call(256, gated), smem)
        assert why is not None and why.startswith("head_dim 256: the ") and "shared memory" in why, why
