"""The debug switch (``seqmix.ops.debug_checks``, chex ``chexify``) and chex variants of the ops.

Value checks inside jit: NaN inputs, positive log gates and β outside its bounds fail with the op's and
the argument's name; shape errors stay ValueErrors whatever the switch says.
"""

import chex
import jax
from jax.experimental.checkify import JaxRuntimeError
import jax.numpy as jnp
import pytest

from seqmix import ops
from seqmix.testing import assert_close


@pytest.fixture(autouse=True)
def _drain_chexify():
    """chex registers every chexified function for an at-exit "statuses not inspected" warning, even with
    async_check=False; wait for them and forget them so the test run's output stays clean."""
    yield
    chex.block_until_chexify_assertions_complete()
    from chex._src import asserts_internal  # private: the list behind that warning

    asserts_internal.CHEXIFY_STORAGE.wait_fns.clear()


def _gla_inputs(t=12):
    ks = jax.random.split(jax.random.PRNGKey(0), 4)
    q, k, v = (jax.random.normal(kk, (1, t, 2, 8)) for kk in ks[:3])
    g = jax.nn.log_sigmoid(jax.random.normal(ks[3], (1, t, 2, 8)))
    return q, k, v, g


def test_off_by_default_and_traced_values_pass_unchecked():
    q, k, v, g = _gla_inputs()
    out = jax.jit(ops.gla)(q.at[0, 0, 0, 0].set(jnp.nan), k, v, g)  # no check: NaN propagates
    assert bool(jnp.isnan(out).any())


def test_eager_checks_raise():
    q, k, v, g = _gla_inputs()
    with ops.debug_checks():
        with pytest.raises(AssertionError, match="gla: q must be finite"):
            ops.gla(q.at[0, 0, 0, 0].set(jnp.nan), k, v, g)
        assert_close(ops.gla(q, k, v, g), ops.gla(q, k, v, g, impl="reference"))


def test_chexify_checks_values_under_jit():
    q, k, v, g = _gla_inputs()
    beta = jax.nn.sigmoid(q[..., 0])
    qn, kn = (x / jnp.linalg.norm(x, axis=-1, keepdims=True) for x in (q, k))
    with ops.debug_checks():
        gla = chex.chexify(jax.jit(lambda q, k, v, g: ops.gla(q, k, v, g)), async_check=False)
        with pytest.raises(JaxRuntimeError, match="gla: g is a log decay"):
            gla(q, k, v, -g)
        with pytest.raises(AssertionError, match="gla: k must be finite"):
            gla(q, k.at[0, 3, 1, 2].set(jnp.inf), v, g)
        gla(q, k, v, g.at[0, 0].set(-jnp.inf))  # a hard reset is allowed
        dn = chex.chexify(jax.jit(lambda q, k, v, b: ops.delta_rule(q, k, v, b)), async_check=False)
        with pytest.raises(JaxRuntimeError, match=r"delta_rule: beta must lie in \[0.0, 2.0\]"):
            dn(qn, kn, v, 3.0 * beta)
        with pytest.raises(RuntimeError, match="chexify"):  # under jit the checks need chexify
            jax.jit(lambda q, k, v, g: ops.gla(q, k, v, g))(q, k, v, g)
    with pytest.raises(ValueError, match="g .log-space gate. must have shape"):
        ops.gla(q, k, v, g[..., 0])


class OpsVariantsTest(chex.TestCase):
    """Each op gives the same answer with and without jit (chex.variants)."""

    @chex.variants(with_jit=True, without_jit=True)
    def test_recurrent_ops_match_reference(self):
        for name in ("linear_attention", "simple_gla", "gated_delta_rule"):
            fam = ops.get_family(name)
            inputs = fam.make_inputs(fam, jax.random.PRNGKey(1), batch=1, seq=20, heads=2, dk=8, dv=8)
            fn = self.variant(lambda *a, fam=fam, inputs=inputs: fam.op(*a, **inputs.arrays, **inputs.options,
                                                                         return_state=True))
            o, s = fn(*inputs.args)
            chex.assert_shape(o, inputs.args[2].shape)
            chex.assert_tree_all_finite((o, s))
            ref = inputs.call(fam.op, return_state=True, impl="reference")
            assert_close(o, ref[0], name=f"{name} o")
            assert_close(s, ref[1], name=f"{name} state")
