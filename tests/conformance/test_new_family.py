"""A new family is its op file, its module file and one import line: shown with a toy family.

``toy_decay`` (a scalar decay per head and token, ``S_t = exp(g_t)·S_{t-1} + k_t v_tᵀ``, written here
from scratch as its own reference and "xla" token loop) is registered inside this test with
``define_family``; its module (a projection layer) and mixer name are registered here too. With no edit
anywhere else it gets: dispatch and ``explain``, the generated conformance checks (forward and VJP vs the
reference with packed documents and an initial state, packed vs per-document, chained halves, decode),
LASP-2 on 4 simulated devices (``tests/parallel`` worker, subprocess) through its record's summary, a
capability-matrix row, and a mixer name an LM is built from.
"""

import os
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import pytest
from flax import nnx

from seqmix import ops
from seqmix.ops import _recurrent, _registry
from tests.conformance import recurrent_checks as rc

ROOT = Path(__file__).resolve().parents[2]
TOY = "toy_decay"


def define_toy():
    """The toy family's whole "op file" (and "module file"); returns the op."""
    if TOY in _registry.FAMILIES:
        return _registry.FAMILIES[TOY].op

    def prepare(q, k, v, g, *, scale=None, initial_state=None, return_state=False, segment_ids=None,
                chunk_size=64):
        return _recurrent.prepare_recurrent(q, k, v, scale=scale, initial_state=initial_state,
                                            return_state=return_state, segment_ids=segment_ids,
                                            chunk_size=chunk_size, g=g, g_kinds=("scalar",))

    def recurrence(state, x):
        state = jnp.exp(x["g"])[..., None, None] * state + x["k"][..., :, None] * x["v"][..., None, :]
        return state, jnp.einsum("bhkv,bhk->bhv", state, x["q"])

    def reference(call):
        o, s = _recurrent.scan_reference(call, recurrence)
        return call.finish(o, s)

    def step(q_t, k_t, v_t, state, *, g, scale=None):
        scale = q_t.shape[-1] ** -0.5 if scale is None else scale
        state = jnp.zeros(q_t.shape + v_t.shape[-1:], jnp.float32) if state is None else state
        x = {"q": q_t.astype(jnp.float32) * scale, "k": k_t.astype(jnp.float32), "v": v_t.astype(jnp.float32),
             "g": g}
        state, o = recurrence(state, x)
        return o.astype(q_t.dtype), state

    op = _registry.define_family(
        TOY, kind="recurrent", prepare=prepare, summary="toy scalar decay (a test family)",
        reference=reference, xla=reference,
        args=(_recurrent.gate_arg("scalar"),), state=_recurrent.state_spec, decode=step,
        sequence_parallel=("lasp2",), sp_summary=_recurrent.gated_summary,
        modules=("tests.conformance.test_new_family.ToyLayer",),
        mixers={"toy": "tests.conformance.test_new_family"}, make_inputs=_recurrent.recurrent_inputs,
        flops=_recurrent.chunked_flops)
    return op


class ToyLayer(nnx.Module):
    """q, k, v, gate projections around the toy op (the family's "module file")."""

    def __init__(self, d_model, num_heads, *, rngs, dtype=None, param_dtype=None, sequence_parallel=None):
        self.h, self.d = num_heads, d_model // num_heads
        self.qkv = nnx.Linear(d_model, 3 * d_model, rngs=rngs)
        self.gate = nnx.Linear(d_model, num_heads, rngs=rngs)
        self.out = nnx.Linear(d_model, d_model, rngs=rngs)

    def __call__(self, x, *, positions=None, segment_ids=None):
        b, t, _ = x.shape
        q, k, v = jnp.split(self.qkv(x).reshape(b, t, self.h, 3 * self.d), 3, axis=-1)
        g = jax.nn.log_sigmoid(self.gate(x) + 3.0)
        return self.out(ops.get_family(TOY).op(q, k, v, g, segment_ids=segment_ids).reshape(b, t, -1))


def _toy_mixer(dims, arg, *, rngs, sequence_parallel=None):
    return ToyLayer(dims.d_model, dims.num_heads, rngs=rngs)


define_toy()
from seqmix.nn.mixer import MIXERS, register_mixer  # noqa: E402  (the module file registers its mixer)

if "toy" not in MIXERS:
    register_mixer("toy", _toy_mixer, doc="toy decay (test family)")


def test_dispatch_and_explain():
    fam = _registry.get_family(TOY)
    inputs = fam.make_inputs(fam, jax.random.PRNGKey(0), seq=20)
    text = ops.explain(fam.op, *inputs.args, **inputs.arrays)
    assert "run  xla" in text
    with pytest.raises(ValueError, match="unknown impl"):
        inputs.call(fam.op, impl="pallas_tpu")


def test_generated_conformance_checks():
    fam = _registry.get_family(TOY)
    rc.check_against_reference(fam, "xla")
    rc.check_packed_equals_per_document(fam, "xla")
    rc.check_chained_halves(fam, "xla")
    rc.check_decode_matches_parallel(fam)


def test_capability_row_and_mixer():
    rows = {r["family"]: r for r in ops.capability_rows()}
    assert rows[TOY]["xla"] == "cpu" and rows[TOY]["sequence parallel"].startswith("lasp2")
    assert "ToyLayer" in rows[TOY]["modules (mixers)"] and "`toy`" in rows[TOY]["modules (mixers)"]
    from seqmix.models import LM, LMConfig

    model = LM(LMConfig(mixers="toy,attn", d_model=32, num_heads=2, max_len=16), rngs=nnx.Rngs(0))
    logits = model(jnp.zeros((1, 12), jnp.int32))
    assert logits.shape == (1, 12, 256) and bool(jnp.all(jnp.isfinite(logits)))


LASP_SCRIPT = """
import os
os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=4"
os.environ["JAX_PLATFORMS"] = "cpu"
import jax, jax.numpy as jnp
jax.config.update("jax_default_matmul_precision", "highest")
import seqmix.parallel as sp
from seqmix.testing import assert_close
from tests.conformance.test_new_family import TOY
from seqmix.ops import _registry
fam = _registry.get_family(TOY)
inputs = fam.make_inputs(fam, jax.random.PRNGKey(0), batch=2, seq=64)
q, k, v, g = inputs.args
h0 = inputs.arrays["initial_state"]
mesh = sp.make_mesh({"seq": 4})
seg = jnp.asarray([[0] * 21 + [1] * 43] * 2, jnp.int32)
ref = fam.op(q, k, v, g, initial_state=h0, segment_ids=seg, return_state=True)
out = sp.sequence_parallel_recurrent(TOY, q, k, v, g, mesh=mesh, initial_state=h0, segment_ids=seg,
                                     return_state=True)
assert_close(out[0], ref[0], kind="sharded", name="o")
assert_close(out[1], ref[1], kind="sharded", name="final_state")
print("TOY-LASP2-OK")
"""


def test_lasp2_on_four_devices():
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    env.pop("XLA_FLAGS", None)
    proc = subprocess.run([sys.executable, "-c", LASP_SCRIPT], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=600)
    assert "TOY-LASP2-OK" in proc.stdout, proc.stdout[-2000:] + proc.stderr[-4000:]


def test_config_naming_the_toy_mixer_loads_in_a_fresh_process():
    """A checkpoint's config records the modules that register its mixers, so a fresh process rebuilds it."""
    import json

    from seqmix.models import LMConfig

    d = LMConfig(mixers="toy,attn", d_model=32, num_heads=2, max_len=16).to_dict()
    assert d["mixer_modules"]["toy"] == "tests.conformance.test_new_family"
    script = ("import json, sys\nfrom flax import nnx\nfrom seqmix.models import LM, LMConfig\n"
              "cfg = LMConfig.from_dict(json.loads(sys.argv[1]))\nLM(cfg, rngs=nnx.Rngs(0))\nprint('LOADED', cfg.mixers)")
    env = dict(os.environ, PYTHONPATH=str(ROOT), JAX_PLATFORMS="cpu")
    proc = subprocess.run([sys.executable, "-c", script, json.dumps(d)], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=300)
    assert "LOADED toy,attn" in proc.stdout, proc.stdout[-2000:] + proc.stderr[-3000:]
