"""NNX as a first-class input, and merge state that travels with the tree for every tree type.

The documented path: ``nnx.split`` -> ``lora.init`` -> train through ``lora.transform`` -> ``lora.merge`` /
``lora.unmerge`` (no ``assume_merged``) -> ``nnx.merge`` back to a module. Each test here fails on the code
before issue 31 (see the docstrings).
"""

import copy
import pickle

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx
from flax.core import freeze

import lora_jax as lora


class Attn(nnx.Module):
    """Projections named as in nnx.MultiHeadAttention, written without lora_jax."""

    def __init__(self, d: int, rngs: nnx.Rngs):
        self.query = nnx.Linear(d, d, rngs=rngs)
        self.key = nnx.Linear(d, d, rngs=rngs)
        self.value = nnx.Linear(d, d, rngs=rngs)
        self.out = nnx.Linear(d, 3, rngs=rngs)

    def __call__(self, x):
        q, k, v = self.query(x), self.key(x), self.value(x)
        w = jax.nn.softmax(q @ jnp.swapaxes(k, -1, -2) / jnp.sqrt(q.shape[-1]), axis=-1)
        return self.out(w @ v)


X = jax.random.normal(jax.random.key(1), (2, 5, 8))


def fresh():
    return nnx.split(Attn(8, nnx.Rngs(0)))


def test_target_error_suggests_the_presets_and_a_regex_that_match():
    """Fails before: "preset 'attention' matches no kernel" without suggesting 'qv'."""
    _, state = fresh()
    state = nnx.State({"proj_" + k: v for k, v in state.items()})  # no block name says "attention"
    with pytest.raises(lora.TargetError) as e:
        lora.init(state, r=2, targets="attention")
    msg = str(e.value)
    assert "Would match" in msg and "'all-linear'" in msg
    _, plain = fresh()
    with pytest.raises(lora.TargetError) as e:
        lora.init(plain, r=2, targets=r".*/q_proj/kernel")
    assert "preset 'qv' would select 2 (query/kernel, value/kernel)" in str(e.value)
    assert "(.*/)?(query|value)/kernel" in str(e.value)


def test_calling_a_model_on_wrapped_params_says_to_use_transform():
    """Fails before: "'LoraWeight' object is not subscriptable" from inside Flax."""
    graphdef, state = fresh()
    wrapped = lora.wrap(state, lora.init(state, r=2, targets="qv"))
    with pytest.raises(lora.UnsupportedError, match=r"LoraWeight.*lora.transform.*nnx.merge\(graphdef"):
        nnx.merge(graphdef, wrapped)(X)

    class Linen(nn.Module):
        @nn.compact
        def __call__(self, x):
            return nn.Dense(3, name="query")(x)

    params = Linen().init(jax.random.key(0), X)["params"]
    with pytest.raises(lora.UnsupportedError, match="lora.transform"):
        Linen().apply({"params": lora.wrap(params, lora.init(params, r=2, targets="qv"))}, X)


def test_nnx_split_train_merge_unmerge_and_back_to_a_module():
    """The documented NNX path; fails before at the unmerge (an nnx.State needed assume_merged=True)."""
    graphdef, state = fresh()
    adapters = lora.init(state, r=2, targets="qv")
    fwd = lora.transform(lambda s, x: nnx.merge(graphdef, s)(x))
    y = jax.random.normal(jax.random.key(2), (2, 5, 3))
    tx = optax.adam(5e-2)

    @jax.jit
    def step(ad, opt):
        loss, g = jax.value_and_grad(lambda a: jnp.mean((fwd(lora.wrap(state, a), X) - y) ** 2))(ad)
        upd, opt = tx.update(g, opt, ad)
        return optax.apply_updates(ad, upd), opt, loss

    opt, losses = tx.init(adapters), []
    for _ in range(5):
        adapters, opt, loss = step(adapters, opt)
        losses.append(float(loss))
    assert losses[-1] < losses[0]

    merged = lora.merge(state, adapters)
    model = nnx.merge(graphdef, merged)
    np.testing.assert_allclose(model(X), fwd(lora.wrap(state, adapters), X), atol=1e-5)
    with pytest.raises(lora.MergeStateError, match="already hold a merged adapter"):
        lora.merge(merged, adapters)
    back = lora.unmerge(jax.jit(lambda s: s)(merged), adapters)  # no assume_merged, through jit
    np.testing.assert_allclose(nnx.merge(graphdef, back)(X), nnx.merge(graphdef, state)(X), atol=1e-5)
    assert lora.merge_record(back) == ()
    with pytest.raises(lora.MergeStateError, match="record no merge"):
        lora.unmerge(back, adapters)
    # an nnx.State read back from a merged export: the caller says so
    lora.unmerge(state, adapters, assume_merged=True)


@pytest.mark.parametrize("kind", ["dict", "FrozenDict", "nnx.State"])
def test_merge_record_survives_jit_and_copies(kind):
    """Fails before for FrozenDict and nnx.State: after jit a second merge silently added dW twice."""
    if kind == "nnx.State":
        _, params = fresh()
    else:
        _, state = fresh()
        plain = {k: {n: v[...] for n, v in layer.items()} for k, layer in state.items()}
        params = plain if kind == "dict" else freeze(plain)
    adapters = lora.init(params, r=2, targets="qv")
    merged = lora.merge(params, adapters)
    copies = {
        "jit": jax.jit(lambda t: t)(merged),
        "tree.map": jax.tree.map(lambda x: x, merged),
        "jit(tree.map(+0))": jax.jit(lambda t: jax.tree.map(lambda x: x + 0, t))(merged),
    }
    if kind != "nnx.State":
        copies["pickle"] = pickle.loads(pickle.dumps(merged))
        copies["deepcopy"] = copy.deepcopy(merged)
    for how, c in copies.items():
        assert type(c) is type(merged), how
        with pytest.raises(lora.MergeStateError):
            lora.merge(c, adapters)
        other = lora.init(params, r=2, targets="qv", key=jax.random.key(9))
        lora.merge(c, other, stack=True)  # a different adapter on top is allowed when said
        assert lora.merge_record(lora.unmerge(c, adapters)) in ((), None), how
