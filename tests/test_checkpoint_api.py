"""One checkpoint API for adapters at the top level, and reload errors that name the adapter and both shapes.

Each test fails on the code before issue 31: ``lora.save_adapters`` was an AttributeError, lazily imported names
were missing from ``dir(lora_jax)``, and a rank mismatch ended in Orbax's advice to pass ``strict=False``.
"""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import lora_jax as lora

PARAMS = {"encoder": {"query": {"kernel": jnp.ones((16, 12))}, "value": {"kernel": jnp.ones((16, 12))}}}


def test_top_level_names_and_dir():
    for name in (
        "save_adapters",
        "load_adapters",
        "save_trained_params",
        "load_trained_params",
        "TrainStateCheckpointer",
    ):
        assert name in dir(lora), name
        assert callable(getattr(lora, name))
    with pytest.warns(DeprecationWarning, match="save_trained_params"):
        assert lora.save_trained is lora.save_trained_params


def test_save_and_load_adapters_round_trip(tmp_path):
    ad = lora.init(PARAMS, r=4, targets="qv")
    ad = jax.tree.map(lambda x: x + 1.0, ad)
    back = lora.load_adapters(lora.save_adapters(tmp_path / "ad", ad), like=lora.init(PARAMS, r=4, targets="qv"))
    for (p, a), (q, b) in zip(lora.adapter_items(ad), lora.adapter_items(back)):
        assert p == q and (a.r, a.scale) == (b.r, b.scale)
        np.testing.assert_array_equal(a.b, b.b)


def test_rank_mismatch_names_the_adapter_and_both_shapes(tmp_path):
    folder = lora.save_adapters(tmp_path / "r8", lora.init(PARAMS, r=8, targets="qv"))
    with pytest.raises(lora.CheckpointError) as e:
        lora.load_adapters(folder, like=lora.init(PARAMS, r=4, targets="qv"))
    msg = str(e.value)
    assert "encoder/query/kernel" in msg and "(16, 8)" in msg and "(16, 4)" in msg and "strict" not in msg


def test_trained_params_mismatch_names_the_leaf_and_both_shapes(tmp_path):
    head = {"classifier": {"kernel": jnp.ones((4, 2))}}
    folder = lora.save_trained_params(tmp_path / "params", head)
    with pytest.raises(lora.CheckpointError) as e:
        lora.load_trained_params(folder, {"classifier": {"kernel": jnp.zeros((4, 3))}})
    assert "classifier/kernel: saved (4, 2), expected (4, 3)" in str(e.value)


def test_training_state_of_another_rank_is_refused_not_treated_as_damage(tmp_path):
    tx = optax.adam(1e-3)
    ad8 = lora.init(PARAMS, r=8, targets="qv")
    ck = lora.TrainStateCheckpointer(tmp_path / "ckpt", every=1)
    ck.save(1, ad8, tx.init(ad8), {"step": 1})
    ad4 = lora.init(PARAMS, r=4, targets="qv")
    with pytest.raises(lora.CheckpointError) as e:
        ck.restore_latest(ad4, tx.init(ad4))
    assert "encoder/query/kernel/a: saved (16, 8), expected (16, 4)" in str(e.value)
    assert ck.steps() == [1]  # still there: not moved aside as damaged
    step, back, _, meta = ck.restore_latest(ad8, tx.init(ad8))
    assert step == 1 and meta["step"] == 1
    ck.close()
