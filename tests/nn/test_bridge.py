"""A Flax Linen module inside an NNX model (flax.nnx.bridge) next to seqmix's Attention, trained one step."""

import jax
import jax.numpy as jnp
import optax
from flax import linen, nnx
from flax.nnx import bridge

from seqmix.nn import Attention, RMSNorm


class Hybrid(nnx.Module):
    """Linen Dense (via bridge.ToNNX) -> seqmix Attention -> RMSNorm -> Linen Dense."""

    def __init__(self, d: int, *, rngs: nnx.Rngs):
        self.inp = bridge.ToNNX(linen.Dense(d), rngs=rngs)
        self.attn = Attention(d, 2, num_kv_heads=1, rngs=rngs)
        self.norm = RMSNorm(d)
        self.out = bridge.ToNNX(linen.Dense(1), rngs=rngs)

    def __call__(self, x):
        h = self.inp(x)
        h = h + self.attn(h)
        return self.out(self.norm(h))[..., 0]


def test_linen_dense_beside_seqmix_attention_trains_one_step():
    d = 8
    x = jax.random.normal(jax.random.PRNGKey(0), (2, 5, d))
    y = jax.random.normal(jax.random.PRNGKey(1), (2, 5))
    model = Hybrid(d, rngs=nnx.Rngs(0))
    bridge.lazy_init(model.inp, x)  # Linen variables exist only after a sample input
    bridge.lazy_init(model.out, jnp.ones((1, 1, d)))
    assert model.inp.kernel.shape == (d, d) and isinstance(model.inp.kernel, nnx.Param)

    optimizer = nnx.Optimizer(model, optax.adam(1e-2), wrt=nnx.Param)

    def loss_fn(m):
        return jnp.mean((m(x) - y) ** 2)

    @nnx.jit
    def train_step(m, opt):
        loss, grads = nnx.value_and_grad(loss_fn)(m)
        opt.update(m, grads)
        return loss, grads

    loss0, grads = train_step(model, optimizer)
    for name, g in (("linen kernel", grads["inp"]["kernel"]), ("attention q_proj", grads["attn"]["q_proj"]["kernel"])):
        g = g[...]
        assert bool(jnp.all(jnp.isfinite(g))), name
        assert float(jnp.abs(g).max()) > 0, name
    loss1 = nnx.jit(loss_fn)(model)
    assert float(loss1) < float(loss0)
