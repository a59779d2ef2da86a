"""Shared check for the decoder families' tests: LoRA gradients equal the real PEFT library's."""

from __future__ import annotations

import copy
import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import optax

import lora_jax as lora
from lora_jax import stacking


def assert_lora_gradients_match_peft(model, params, config, torch_model, ids, targets: list[str]) -> None:
    """The same random A, B (r=4, alpha=8 on ``targets``) in PEFT over ``torch_model`` and here over ``params``:
    equal next-token cross-entropy on ``ids`` and equal gradients w.r.t. every A and B (4 modules per layer).
    ``params`` scanned or unrolled: PEFT's modules are matched layer by layer (:func:`lora_jax.stacking.unstack`)."""
    import peft
    import torch

    torch.manual_seed(2)
    peft_model = peft.get_peft_model(
        copy.deepcopy(torch_model), peft.LoraConfig(r=4, lora_alpha=8, target_modules=targets, init_lora_weights=False)
    )  # random A and B
    names = lora.peft.naming(config)
    modules = dict(peft_model.base_model.model.named_modules())
    adapters = lora.init(params, r=4, alpha=8, targets=[rf".*/{t}/kernel" for t in targets])

    def from_peft(path, ad):
        m = modules[names.module_name(lora.tree.path_tuple(path))]
        return dataclasses.replace(
            ad,
            a=jnp.asarray(m.lora_A["default"].weight.detach().numpy().T),
            b=jnp.asarray(m.lora_B["default"].weight.detach().numpy().T),
        )

    per_layer = jax.tree_util.tree_map_with_path(from_peft, stacking.unstack(adapters), is_leaf=lora.is_adapter)
    adapters = stacking.conform(per_layer, params)  # stacked again when the model is scanned
    peft_model.train(False)
    out = peft_model(torch.tensor(ids), labels=torch.tensor(ids))
    out.loss.backward()

    def loss_fn(adapters):
        logits, _ = model.apply({"params": lora.wrap(params, adapters)}, jnp.asarray(ids))
        return optax.softmax_cross_entropy_with_integer_labels(logits[:, :-1], jnp.asarray(ids)[:, 1:]).mean()

    loss, grads = jax.jit(jax.value_and_grad(loss_fn))(adapters)
    np.testing.assert_allclose(float(loss), out.loss.item(), rtol=1e-5)
    checked = 0
    for path, g in lora.adapter_items(stacking.unstack(grads)):
        m = modules[names.module_name(lora.tree.split(path))]
        ga, gb = m.lora_A["default"].weight.grad.numpy().T, m.lora_B["default"].weight.grad.numpy().T
        assert np.abs(gb).max() > 1e-4
        np.testing.assert_allclose(np.asarray(g.a), ga, atol=2e-5, rtol=1e-3)
        np.testing.assert_allclose(np.asarray(g.b), gb, atol=2e-5, rtol=1e-3)
        checked += 1
    assert checked == 4 * config.num_hidden_layers
