"""Ahead-of-time compilation of the Pallas TPU attention kernels for v5e, v5p and v6e on a CPU host.

The Mosaic compiler inside ``libtpu`` compiles forward and backward inside ``jax.jit`` for an
abstract TPU topology (``jax.experimental.topologies``); nothing runs. Checks: every kernel lowers,
its scoped VMEM fits the limit seqmix sets (and the chip), and XLA's cost analysis sees the kernels'
cost estimates. Skipped when libtpu is not importable or cannot describe a topology. The full
table (more configs) is ``experiments/tpu_compile_report.py`` -> ``docs/tpu_compile_report.md``.
"""

import importlib.util
import os
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import pytest

from seqmix import ops
from seqmix.ops.tpu import attention as attention_pallas
from seqmix.ops import masks as M

pytestmark = pytest.mark.tpu_compile

# Compiling touches no TPU device: let several processes (parallel test runs) load libtpu at once
# instead of failing on its single-process lockfile.
os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
pytest.importorskip("libtpu", reason="libtpu is not importable (install the `tpu` extra "
                                     "or put it on PYTHONPATH)")

_spec = importlib.util.spec_from_file_location(
    "tpu_compile_report", Path(__file__).resolve().parents[2] / "experiments" / "tpu_compile_report.py")
report = sys.modules.setdefault("tpu_compile_report", importlib.util.module_from_spec(_spec))
if not hasattr(report, "compile_one"):
    _spec.loader.exec_module(report)

PHYSICAL_VMEM = {"v5e": 128 << 20, "v5p": 64 << 20, "v6e": 128 << 20}  # per TensorCore


@pytest.fixture(scope="module")
def meshes():
    out = {}

    def get(gen):
        if gen not in out:
            try:
                out[gen] = report.tpu_mesh(gen)
            except Exception as err:  # noqa: BLE001
                pytest.skip(f"libtpu cannot describe a {gen} topology here: {type(err).__name__}: {err}")
        return out[gen]

    return get


def _compile_train_step(mesh, q_shape, kv_shape, dtype, *, segments=False, sinks=False, **kwargs):
    """Compile value_and_grad of sum(attention) (forward + dq + dkv kernels in one jit)."""
    from jax.sharding import NamedSharding, PartitionSpec as P

    sh = NamedSharding(mesh, P())
    q = jax.ShapeDtypeStruct(q_shape, dtype, sharding=sh)
    kv = jax.ShapeDtypeStruct(kv_shape, dtype, sharding=sh)
    sink = jax.ShapeDtypeStruct((q_shape[2],), jnp.float32, sharding=sh) if sinks else None
    seg = jax.ShapeDtypeStruct(q_shape[:2], jnp.int32, sharding=sh) if segments else None

    def loss(q, k, v, sink, seg):
        o = ops.attention(q, k, v, sink_logits=sink, segment_ids=seg, impl="pallas_tpu", **kwargs)
        return o.astype(jnp.float32).sum()

    fn = jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2, 3) if sinks else (0, 1, 2)))
    with jax.sharding.use_abstract_mesh(mesh.abstract_mesh):
        return fn.lower(q, kv, kv, sink, seg).compile()


def _check_kernels(compiled, gen):
    vmem = report.kernel_vmem(compiled.as_text())
    assert set(vmem) == {"seqmix_flash_fwd", "seqmix_flash_dq", "seqmix_flash_dkv"}, vmem
    for name, (used, limit) in vmem.items():
        assert 0 < used <= limit <= PHYSICAL_VMEM[gen], (name, used, limit)
    return vmem


@pytest.mark.parametrize("config,gen", [("causal", "v5e"), pytest.param("gqa", "v5p", marks=pytest.mark.slow),
                                        pytest.param("window", "v6e", marks=pytest.mark.slow)])
def test_production_shapes_compile(meshes, config, gen):
    cfg = report.CONFIGS[config]
    compiled = _compile_train_step(meshes(gen), (cfg.batch, cfg.seq, cfg.q_heads, cfg.head_dim),
                                   (cfg.batch, cfg.seq, cfg.kv_heads, cfg.head_dim), jnp.bfloat16,
                                   mask=cfg.mask())
    _check_kernels(compiled, gen)
    # The kernels' cost estimates reach XLA: at least the non-empty half of the dense attention flops
    # (forward 2 matmuls + backward 5, causal / window 4096 of 8192 ≈ half the pairs).
    dense = 2 * cfg.batch * cfg.q_heads * cfg.seq * cfg.seq * cfg.head_dim * 7
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    assert cost["flops"] > 0.4 * dense, (cost["flops"], dense)
    assert compiled.memory_analysis().temp_size_in_bytes > 0


def test_every_feature_lowers(meshes):
    """fp32 (exact matmuls), ragged T, head_dim 64, GQA 2:1, segments, sinks, soft cap, and masks
    that use segment-relative positions (streaming, prefix-LM) and integer division (chunked)."""
    b, t, hq, hkv, d = 1, 300, 4, 2, 64
    mask = (M.streaming(128, 4) & M.ChunkedCausal(512)) | M.PrefixLM(64)
    with jax.default_matmul_precision("float32"):
        compiled = _compile_train_step(meshes("v5e"), (b, t, hq, d), (b, t, hkv, d), jnp.float32,
                                       segments=True, sinks=True, mask=mask, soft_cap=30.0)
    _check_kernels(compiled, "v5e")


@pytest.mark.slow
@pytest.mark.parametrize("gen, grid, batch, opts", [("v5e", (64, 64), 2, dict(kernel_size=7)),
                                                    ("v5e", (64, 64), 2, dict(kernel_size=13, dilation=2)),
                                                    ("v5e", (16, 32, 32), 1, dict(kernel_size=(3, 7, 7))),
                                                    ("v5p", (64, 64), 2, dict(kernel_size=7)),
                                                    ("v6e", (64, 64), 2, dict(kernel_size=7))])
def test_neighborhood_attention_compiles(meshes, gen, grid, batch, opts):
    """2-D and 3-D neighborhood attention (bf16, 8 heads of 128) forward + backward: every shape on v5e,
    2-D kernel 7 on v5p and v6e."""
    from jax.sharding import NamedSharding, PartitionSpec as P

    mesh = meshes(gen)
    x = jax.ShapeDtypeStruct((batch,) + grid + (8, 128), jnp.bfloat16, sharding=NamedSharding(mesh, P()))

    def loss(q, k, v):
        return ops.neighborhood_attention(q, k, v, impl="pallas_tpu", **opts).astype(jnp.float32).sum()

    with jax.sharding.use_abstract_mesh(mesh.abstract_mesh):
        compiled = jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2))).lower(x, x, x).compile()
    _check_kernels(compiled, gen)


@pytest.mark.parametrize("impl,gen", [pytest.param("pallas_tpu", "v5e"),
                                      *(pytest.param(i, g, marks=pytest.mark.slow)
                                        for i in ("pallas_tpu", "xla") for g in ("v5e", "v5p", "v6e")
                                        if (i, g) != ("pallas_tpu", "v5e"))])
def test_moba_compiles_at_the_issue_shape(meshes, impl, gen):
    """MoBA forward + backward at ``[1, 32768, 16, 128]`` bf16, block 512, top-3: the Pallas kernels (per
    (batch, kv head) step tables) and the ``xla`` form compile, the kernels within their VMEM limits, and
    the temporaries fit the smallest chip's HBM (v5e, 16 GiB) with room for the model (well under half)."""
    from jax.sharding import NamedSharding, PartitionSpec as P

    mesh = meshes(gen)
    x = jax.ShapeDtypeStruct((1, 32768, 16, 128), jnp.bfloat16, sharding=NamedSharding(mesh, P()))

    def loss(q, k, v):
        return ops.moba(q, k, v, block_size=512, topk=3, impl=impl).astype(jnp.float32).sum()

    with jax.sharding.use_abstract_mesh(mesh.abstract_mesh):
        compiled = jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2))).lower(x, x, x).compile()
    if impl == "pallas_tpu":
        vmem = _check_kernels(compiled, gen)
        print(f"moba pallas_tpu {gen} VMEM used/limit MiB: "
              + ", ".join(f"{n} {u / 2**20:.1f}/{lim / 2**20:.0f}" for n, (u, lim) in vmem.items()))
    temp = compiled.memory_analysis().temp_size_in_bytes
    print(f"moba {impl} {gen} [1, 32768, 16, 128] bf16 block 512 top-3 fwd+bwd: temp {temp / 2**30:.2f} GiB")
    assert 0 < temp < 8 << 30, temp
