"""Edge values through every registered mixer module (the layers an LM is built from).

* a NaN in one token's input reaches that token's output (never masked away); every output that stays
  finite equals the clean run's (a NaN may spread inside a block or chunk: loud, not silently wrong);
* a length-1 sequence gives finite outputs; an empty one is a ValueError.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from seqmix.nn.mixer import MixerDims, build_mixer, lookup, registered_mixers
from seqmix.testing import assert_close

DIMS = MixerDims(d_model=32, num_heads=2)
T, POISON = 24, 10


def _build(name):
    return build_mixer(DIMS, name, lookup(name).example, rngs=nnx.Rngs(0))


@nnx.jit
def _apply(module, x):
    return module(x)


@pytest.mark.parametrize("name", registered_mixers())
def test_mixer_edge_values(name):
    module = _build(name)
    x = jax.random.normal(jax.random.key(1), (1, T, DIMS.d_model))
    clean = np.asarray(_apply(module, x))
    assert np.isfinite(clean).all()
    out = np.asarray(_apply(module, x.at[0, POISON, 3].set(jnp.nan)))
    assert not np.isfinite(out[0, POISON]).any(), f"{name}: the NaN token's output is finite"
    finite = np.isfinite(out).all(-1)
    assert_close(out[finite], clean[finite], name=f"{name}: outputs the NaN leaves finite")
    one = np.asarray(_apply(module, x[:, :1]))
    assert one.shape == (1, 1, DIMS.d_model) and np.isfinite(one).all()
    with pytest.raises(ValueError):
        module(x[:, :0])
