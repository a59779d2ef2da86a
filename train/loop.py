"""The training job: model + data + LoRA + sharded jitted step + evaluation + Orbax checkpoints + export.

:func:`run` checks the output folder's plan and composes the parts, each taking what it reads explicitly:
:func:`setup` sets up the mesh, the model and the data, chooses what is trained (``lora``: adapters (+ named leaves),
``full``: everything, ``linear_probe``: only the head), builds the optimizer and jits the step (a frozen
:class:`Setup` and the initial :class:`TrainState`); :func:`restore` resumes from a checkpoint;
:func:`evaluate_all` evaluates before and after training; :func:`train_steps` loops over the jitted steps,
evaluating, logging and checkpointing as configured (a :class:`Progress` of its counters); :func:`export` writes
the adapters and the configured exports, :func:`write_result` the run's ``result.json``.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import logging
import math
import re
import signal
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

import lora_jax as lora
from lora_jax import sharding
from lora_jax.checkpoint import Checkpointer, load_trained, save_adapters, save_trained  # noqa: F401 (load_trained: train.predict)
from lora_jax.errors import NonFiniteError
from lora_jax.models import placement
from lora_jax.tree import nbytes
from lora_jax.variants import pissa_to_lora
from train import config as config_lib
from train import data as data_lib
from train import memory, outputs
from train import metrics as metrics_lib
from train import sources as sources_lib
from train.config import Config, ConfigError
from train.tasks import loss_for

logger = logging.getLogger(__name__)

# data.task -> the model task it trains
MODEL_TASKS = {
    "causal-lm": "causal-lm",
    "chat": "causal-lm",
    "classification": "sequence-classification",
    "audio-classification": "audio-classification",
}


# ------------------------------------------------------------------------------------------- output files

GGUF_ADAPTER, GGUF_MERGED, GGUF_MERGED_REPORT = "adapter.gguf", "merged.gguf", "merged_gguf_errors.json"


# ----------------------------------------------------------------------------------------------- model


def open_model(cfg: Config):
    """``(checkpoint, model)``: the configured model opened (config, tokenizer, tensor names and shapes; no weight
    read yet, see :class:`lora_jax.models.Checkpoint`) and its Linen module computing in ``train.precision``, with
    ``train.remat``."""
    from lora_jax import models

    task = MODEL_TASKS[cfg.data.task]
    overrides = {"num_labels": cfg.model.num_labels} if task != "causal-lm" else {}
    overrides["scan_layers"] = scan_layers(cfg)
    coef = cfg.model.router_aux_loss_coef
    if coef is not None:
        overrides.update(router_aux_loss_coef=float(coef), output_router_logits=coef > 0)
    try:
        ckpt = models.open_checkpoint(cfg.model.name, task=task, **overrides)
    except TypeError as e:
        if coef is None or "router_aux_loss_coef" not in str(e):
            raise
        raise ConfigError(
            f"model.router_aux_loss_coef={coef}: {cfg.model.name} is not a mixture of experts "
            "(its Config has no router); leave it unset"
        ) from None
    model = ckpt.build(jnp.dtype(cfg.train.precision))
    if hasattr(model, "remat"):  # checkpoint each layer (train.remat); other models checkpoint the whole loss
        model = model.clone(remat=remat_name(cfg.train.remat))
    if hasattr(model, "attention"):  # the shared decoder's attention implementation (lora_jax.models.attention)
        model = model.clone(attention=cfg.model.attention)
    elif cfg.model.attention != "auto":
        raise ConfigError(
            f"model.attention={cfg.model.attention}: {cfg.model.name} has its own attention (only the "
            "shared decoder's families choose one); leave it auto"
        )
    return ckpt, model


def scan_layers(cfg: Config) -> bool:
    """Whether a decoder runs its layers scanned (``model.scan_layers``): ``auto`` scans unless the run needs
    per-layer parameters (QLoRA and DoRA are not implemented over a stack yet; a LoRA rule naming one layer,
    ``layers_N``, needs the layers apart), logging why; ``true`` refuses such a run instead."""
    choice = cfg.model.scan_layers
    if choice is False:
        return False
    rules = [cfg.lora.targets, cfg.lora.exclude, cfg.lora.train, cfg.lora.rank_pattern, cfg.lora.alpha_pattern]
    texts = [t for r in rules if r for t in ([r] if isinstance(r, str) else list(r))]
    why = [
        k
        for k, on in (
            ("train.method=qlora", cfg.train.method == "qlora"),
            ("lora.use_dora", cfg.lora.use_dora),
            ("a lora rule naming one layer", any(re.search(r"layers_(\\d|\d)", t) for t in texts)),
        )
        if on
    ]
    if not why:
        return True
    if choice is True:
        raise ConfigError(
            f"model.scan_layers=true: {', '.join(why)} needs unrolled layers (not supported over a "
            "scanned stack yet); set model.scan_layers=false or auto"
        )
    logger.info("model.scan_layers=auto: unrolled layers, for %s", ", ".join(why))
    return False


def load_model(cfg: Config):
    """``(model, params, tokenizer, model_config)``: :func:`open_model` with every parameter read whole, in
    float32, onto the default device (for evaluation and tests; training loads through :func:`prepare`)."""
    ckpt, model = open_model(cfg)
    return model, ckpt.load(dtype=jnp.float32), ckpt.tokenizer, ckpt.config


def _head_rules(cfg: Config, params: Any) -> list[str] | None:
    """``lora.train``, else for classification the new head that the model family declares for the task (a
    ``classifier``, and whatever else the family's head holds)."""
    from lora_jax import models

    lc = cfg.lora
    if lc.train is not None:
        return lc.train
    task = MODEL_TASKS[cfg.data.task]
    return (models.head_rules(task, params) or None) if task != "causal-lm" else None


def _adapter_kwargs(cfg: Config) -> dict:
    lc = cfg.lora
    return dict(
        alpha=lc.alpha,
        targets=lc.targets,
        exclude=lc.exclude,
        dropout=lc.dropout,
        use_rslora=lc.use_rslora,
        rank_pattern=lc.rank_pattern,
        alpha_pattern=lc.alpha_pattern,
        use_dora=lc.use_dora,
    )


def choose_trainable(cfg: Config, params: Any, key: jax.Array) -> tuple[Any, dict]:
    """``(frozen, trainable)`` for the configured method (in the parameters' own dtype; see :func:`prepare`).

    ``lora`` / ``qlora``: adapters from :func:`lora_jax.init` (DoRA with ``lora.use_dora``); with
    ``lora.init: pissa`` they come from :func:`lora_jax.init_pissa` and the frozen base is PiSSA's residual
    ``W - s*A@B``, so the adapted model still equals the original one at step 0. ``params`` may be abstract
    (``jax.ShapeDtypeStruct`` leaves) unless the adapters need the base's values (DoRA, PiSSA).
    """
    lc = cfg.lora
    head = _head_rules(cfg, params)
    if cfg.train.method == "full":
        return lora.split(params, {}, train=".*")
    if cfg.train.method == "linear_probe":
        if not head:
            raise ConfigError("train.method=linear_probe trains only named leaves: set lora.train (e.g. [lm_head/.*])")
        return lora.split(params, {}, train=head)
    if lc.init == "pissa":
        params, adapters = lora.init_pissa(params, lc.r, niter=lc.pissa_niter, key=key, **_adapter_kwargs(cfg))
    else:
        adapters = lora.init(params, r=lc.r, key=key, init=lc.init, **_adapter_kwargs(cfg))
    return lora.split(params, adapters, train=head)


def _needs_base_values(cfg: Config) -> bool:
    """Whether what is trained is made from the base's values: DoRA's magnitudes, PiSSA's SVD, or a start adapter
    (``model.adapter``) merged into the base first."""
    return cfg.model.adapter is not None or (
        cfg.train.method in ("lora", "qlora") and (cfg.lora.use_dora or cfg.lora.init == "pissa")
    )


def _cast_floats(tree: Any, dtype) -> Any:
    def cast(x):
        if lora.targets.is_weight_node(x) or not hasattr(x, "dtype") or not jnp.issubdtype(x.dtype, jnp.floating):
            return x
        return x.astype(dtype) if x.dtype != dtype else x

    return jax.tree.map(cast, tree, is_leaf=lora.targets.is_weight_node)


def quantize_base(cfg: Config, frozen: Any) -> Any:
    """The frozen tree with the ``quant.targets`` kernels as :class:`lora_jax.quant.QuantizedWeight` (stored in
    ``quant.type``, dequantised to ``train.precision`` inside the products)."""
    return lora.quant.quantize(frozen, **_quant_kwargs(cfg))


def _quant_kwargs(cfg: Config) -> dict:
    qc = cfg.quant
    return dict(
        method=qc.type,
        block_size=qc.block_size,
        double_quant=qc.double_quant,
        targets=qc.targets,
        compute_dtype=jnp.dtype(cfg.train.precision),
    )


def _quantizer(cfg: Config, frozen: Any) -> lora.quant.Quantizer:
    return lora.quant.quantizer(frozen, **_quant_kwargs(cfg))


def run_keys(cfg: Config) -> tuple[jax.Array, jax.Array]:
    """``(init_key, step_key)`` of a run: adapter init (and PiSSA's randomised SVD), and the per-step keys."""
    init_key, step_key = jax.random.split(jax.random.key(cfg.train.seed))
    return init_key, step_key


@dataclasses.dataclass
class Prepared:
    """What the step trains and what it reads.

    Attributes:
      frozen: the base as the step sees it (``train.precision``; QuantizedWeight kernels for qlora; the PiSSA
        residual for ``lora.init: pissa``), ``None`` where a leaf is trained.
      trainable: ``{"adapters", "params"}`` (adapters float32; leaves trained in full float32 for lora / qlora,
        ``train.precision`` otherwise).
      pissa_init: the initial PiSSA adapters (host arrays), kept for the PEFT export, which states the update
        against the original base.
    """

    frozen: Any
    trainable: dict
    pissa_init: Any = None


class _InMemory:
    """Concrete parameters behind the part of :class:`lora_jax.models.Checkpoint` that :func:`prepare` reads."""

    def __init__(self, params: Any):
        self.params = lora.tree.flatten(params)

    def abstract(self) -> Any:
        return lora.tree.unflatten({p: jax.ShapeDtypeStruct(np.shape(x), x.dtype) for p, x in self.params.items()})

    def load(self, shardings: Any = None, dtype: Any = jnp.float32, only: Any = None, then: Any = None) -> Any:
        wanted = [p for p, v in lora.tree.flatten(only).items() if v is not None] if only is not None else self.params
        where = lora.tree.flatten(shardings) if shardings is not None else {}
        out = {}
        for p in wanted:
            x = self.params[p]
            want = placement.dtype_of(dtype, p)
            x = x.astype(want) if jnp.issubdtype(x.dtype, jnp.floating) and x.dtype != want else x
            x = jax.device_put(x, where[p]) if p in where else x
            out[p] = then(p, x) if then is not None else x
        return lora.tree.unflatten(out)


def _like(abstract: Any, loaded: Any) -> Any:
    """``loaded`` (nested dicts of the leaves read) in the structure of ``abstract``, ``None`` where it has
    ``None`` (the leaves :func:`lora_jax.split` moved to the trainable tree)."""
    flat = lora.tree.flatten(loaded)
    return lora.tree.unflatten({p: None if v is None else flat[p] for p, v in lora.tree.flatten(abstract).items()})


def sharding_rules(base: Any) -> list:
    """The sharding rules of a run: the architecture's logical axes (what a ``tensor`` axis splits), then the FSDP
    defaults (:func:`lora_jax.sharding.logical_rules`)."""
    arch = getattr(base, "arch", None)
    return sharding.logical_rules(arch.logical_axes if arch is not None else ())


def prepare(cfg: Config, base: Any, key: jax.Array, mesh: Any = None) -> Prepared:
    """Read the base for ``cfg`` and split it: choose what is trained, quantise (qlora) or cast the frozen base to
    ``train.precision``, keep float32 masters of what LoRA trains.

    ``base``: a :class:`lora_jax.models.Checkpoint` (read here, each leaf straight into its place on ``mesh`` and in
    its final dtype: the frozen base in ``train.precision``, a QLoRA base quantised kernel by kernel as it is read,
    leaves trained in full in float32 for lora / qlora; nothing whole on one device unless the sharding rules
    replicate it) or concrete float32 parameters. ``mesh``: ``None`` leaves every array on the default device.
    DoRA and PiSSA initialise the adapters from the base's values, and ``model.adapter`` is merged into the base
    first (:func:`merge_start_adapter`): their base is read in float32 first.
    """
    source = base if hasattr(base, "sources") else _InMemory(base)
    abstract = source.abstract()
    rules = sharding_rules(base)
    compute = jnp.dtype(cfg.train.precision)
    method = cfg.train.method
    concrete = _needs_base_values(cfg)
    # what is trained, from the shapes alone (adapters that need the base's values are made after it is read)
    if concrete:
        frozen_abs, trainable_abs = lora.split(abstract, {}, train=_head_rules(cfg, abstract))
    else:
        frozen_abs, trainable_abs = choose_trainable(cfg, abstract, key)
    trained_dtype = compute if method in ("full", "linear_probe") else jnp.dtype(jnp.float32)
    quantize = _quantizer(cfg, frozen_abs) if method == "qlora" and not concrete else None
    if concrete:
        frozen_dtype = jnp.dtype(jnp.float32)
    elif quantize is not None:  # a QLoRA kernel is quantised from its float32 values, the rest cast as usual
        frozen_dtype = lambda path: jnp.dtype(jnp.float32) if quantize.targets(lora.tree.join(path)) else compute  # noqa: E731
    else:
        frozen_dtype = compute

    def shardings(tree: Any, dtype: Any) -> Any:
        if mesh is None:
            return None
        return sharding.tree_shardings(tree, mesh, rules)  # from shapes: the same whatever the dtype

    def requantize(path: tuple, x: Any) -> Any:  # each kernel quantised as soon as it is read
        q = quantize(lora.tree.join(path), x)
        if mesh is None or q is x:
            return q
        placed = sharding.tree_shardings(lora.tree.unflatten({path: q}), mesh, rules)
        return jax.device_put(q, lora.tree.get(placed, path))

    frozen = _like(
        frozen_abs,
        source.load(
            shardings(frozen_abs, frozen_dtype),
            dtype=frozen_dtype,
            only=frozen_abs,
            then=requantize if quantize is not None else None,
        ),
    )
    trained = trainable_abs["params"]
    params = (
        source.load(shardings(trained, trained_dtype), dtype=trained_dtype, only=trained)
        if lora.tree.leaves(trained)
        else {}
    )
    trainable = {"adapters": trainable_abs["adapters"], "params": params}
    if concrete:
        frozen, trainable = choose_trainable(cfg, merge_start_adapter(cfg, lora.combine(frozen, trainable)[0]), key)
        if method == "qlora":
            frozen = quantize_base(cfg, frozen)
        frozen = _cast_floats(frozen, compute)
    pissa_init = None
    if (
        cfg.lora.init == "pissa"
        and method in ("lora", "qlora")
        and (cfg.output.export_peft or cfg.output.export_gguf_adapter or cfg.output.export_gguf)
    ):
        pissa_init = jax.device_get(trainable["adapters"])
    return Prepared(frozen, trainable, pissa_init)


def merge_start_adapter(cfg: Config, params: Any) -> Any:
    """``params`` with ``model.adapter`` (a run folder, or an ``adapters/`` folder of one) merged in, as plain
    arrays: the model new adapters start from (and, for DPO, the reference policy); ``params`` when unset."""
    if cfg.model.adapter is None:
        return params
    from lora_jax.checkpoint import load_adapters

    folder = Path(cfg.model.adapter)
    if (folder / "adapters").is_dir():
        folder = folder / "adapters"
    elif (folder / "latest" / "adapters").is_dir():
        folder = folder / "latest" / "adapters"
    if not folder.is_dir():
        raise ConfigError(
            f"model.adapter={cfg.model.adapter!r}: no such folder (expected a run folder or its adapters/ folder)"
        )
    try:
        merged = lora.merge(params, load_adapters(folder))
    except Exception as e:  # noqa: BLE001 - an adapter of another model: say which setting is wrong
        raise ConfigError(
            f"model.adapter={cfg.model.adapter!r} does not fit {cfg.model.name} "
            f"({type(e).__name__}: {' '.join(str(e).split())[:200]})"
        ) from None
    return dict(merged)  # plain params: the new adapters are not a second merge of the same one


def dequantized(params: Any) -> Any:
    """``params`` with every quantised kernel dense (in its compute dtype)."""
    return lora.quant.dequantize(params)


def merged_params(params: Any, adapters: Any) -> Any:
    """Plain parameters: the adapters merged, and the kernels quantised for QLoRA but not adapted made dense."""
    return dequantized(lora.merge(params, adapters)) if adapters else dequantized(params)


# ------------------------------------------------------------------------------------------- optimizer


def lr_schedule(cfg: Config) -> optax.Schedule | float:
    """The learning rate by optimizer update (0-based): ``optim.warmup_steps`` of linear warmup, then
    ``optim.schedule``; a float when it is constant from the start. (With LoRA+, A's rate; B's is
    ``optim.lora_plus_ratio`` times it.)"""
    oc, steps = cfg.optim, cfg.train.steps
    warmup = min(oc.warmup_steps, max(steps - 1, 0))
    if oc.schedule == "constant":
        return (
            optax.join_schedules(
                [optax.linear_schedule(0.0, oc.lr, max(warmup, 1)), optax.constant_schedule(oc.lr)], [warmup]
            )
            if warmup
            else oc.lr
        )
    if oc.schedule == "linear":
        return optax.join_schedules(
            [
                optax.linear_schedule(0.0, oc.lr, max(warmup, 1)),
                optax.linear_schedule(oc.lr, 0.0, max(steps - warmup, 1)),
            ],
            [warmup],
        )
    return optax.warmup_cosine_decay_schedule(0.0, oc.lr, max(warmup, 1), max(steps, warmup + 1))


def lr_at(cfg: Config, step: int) -> float:
    """The learning rate the update of (1-based) ``step`` used."""
    lr = lr_schedule(cfg)
    return float(lr(step - 1)) if callable(lr) else float(lr)


def make_optimizer(cfg: Config) -> optax.GradientTransformation:
    oc = cfg.optim
    lr = lr_schedule(cfg)

    def make(learning_rate):
        if oc.name == "adamw":
            return optax.adamw(learning_rate, b1=oc.b1, b2=oc.b2, weight_decay=oc.weight_decay)
        if oc.name == "adam":
            return optax.adam(learning_rate, b1=oc.b1, b2=oc.b2)
        return optax.sgd(learning_rate)

    tx = lora.lora_plus(make, lr, ratio=oc.lora_plus_ratio) if oc.lora_plus_ratio else make(lr)
    return optax.chain(optax.clip_by_global_norm(oc.grad_clip), tx) if oc.grad_clip else tx


# ---------------------------------------------------------------------------------------------- batches


def training_batches(cfg: Config, data: data_lib.Tokenized) -> data_lib.Batches:
    """The run's training batches (``data.batching``, :func:`train.config.batching`): batch ``s`` is step
    ``s``'s ``train.grad_accum x train.batch_size`` examples (packed: rows), a pure function of the data,
    ``train.seed`` and ``s``, so a run resumed at step ``k`` sees the batches an uninterrupted run would.

    One batch per step, split into the micro-batches by :func:`micro_batches`: accumulation equals one batch of
    the whole step, every micro-batch of a step has the same width, and bucket widths are chosen for the step's
    batch. Causal LM with ``train.logits=loss``: every batch also has ``loss_positions`` (rows, K), K fixed by the
    batching and its width (``data.loss_capacity`` for packed rows), so the step's shape is still its width's."""
    per_step = cfg.train.batch_size * cfg.train.grad_accum
    kind = config_lib.batching(cfg)
    # causal LM with train.logits=loss: batches carry loss_positions, a fixed number per row (one compilation)
    at_loss = cfg.data.task == "causal-lm" and cfg.train.logits == "loss" and cfg.train.objective != "dpo"
    if kind == "packed":
        return data_lib.PackedBatches(
            data,
            per_step,
            cfg.train.seed,
            width=cfg.data.pack_length,
            loss_positions=at_loss,
            capacity=cfg.data.loss_capacity,
        )
    if kind == "bucketed":
        return data_lib.BucketedBatches(
            data, per_step, cfg.train.seed, n_shapes=cfg.data.buckets, loss_positions=at_loss
        )
    return data_lib.FixedBatches(data, per_step, cfg.train.seed, loss_positions=at_loss)


def micro_batches(batch: dict[str, np.ndarray], accum: int) -> dict[str, np.ndarray]:
    """A step's batch ``{name: (accum * B, ...)}`` as ``{name: (accum, B, ...)}`` (consecutive rows per
    micro-batch)."""
    return {k: v.reshape(accum, v.shape[0] // accum, *v.shape[1:]) for k, v in batch.items()}


# ------------------------------------------------------------------------------------------------ steps


def _token_count(batch: dict, task: str) -> jax.Array:
    if task in ("causal-lm", "chat"):
        return jnp.sum(batch["loss_mask"][..., :-1]).astype(jnp.float32)
    return jnp.asarray(batch["labels"].size, jnp.float32)


def remat_name(remat: bool | str) -> str:
    """``train.remat`` as a policy name of :data:`lora_jax.models.layers.REMAT_POLICIES` (``True``:
    ``dots_no_batch``, ``False``: ``none``)."""
    from lora_jax.models.layers import REMAT_POLICIES

    name = {True: "dots_no_batch", False: "none"}.get(remat, remat)
    if name not in REMAT_POLICIES:
        raise ConfigError(f"train.remat must be one of {sorted(REMAT_POLICIES)} (or true/false), got {remat!r}")
    return name


def step_compiler_options(cfg: Config) -> dict | None:
    """XLA options for compiling the train and evaluation steps on XLA:CPU (``None`` elsewhere). Two passes off:

    - ``while-loop-invariant-code-motion``: XLA:CPU has no bfloat16 matmul, so it converts each bfloat16 kernel
      to float32 before its dot; inside a loop over stacked weights (scanned layers, gradient accumulation) this
      pass hoists the convert of the whole stack out of the loop, and every device keeps a float32 copy of all
      its layers for the whole step: twice its bfloat16 base. Off, one layer is converted at a time (the step of
      a 32-layer stack of 2,048 x 5,632 MLPs on 8 devices: 388 MiB of temporaries with the pass, 28 MiB without;
      the training job's 1.1B model: ``benchmarks.sharded_load``).
    - ``cse_barrier_expander`` (with ``train.remat``): keep ``jax.checkpoint``'s optimization barriers, which
      XLA:CPU otherwise strips before CSE merges the backward pass's recomputation back into the forward pass,
      so that the checkpoint saves little (GPT-2 small, LoRA, 4 x 128 tokens, each block checkpointed: 394 MiB of
      temporaries with the pass, 62 MiB without)."""
    if jax.default_backend() != "cpu":
        return None
    passes = ["while-loop-invariant-code-motion"]
    if remat_name(cfg.train.remat) != "none":
        passes.append("cse_barrier_expander")
    return {"xla_disable_hlo_passes": ",".join(passes)}


def apply_if_finite(
    tx: optax.GradientTransformation, trainable: Any, opt_state: Any, grads: Any, loss: jax.Array
) -> tuple[Any, Any, dict]:
    """One optimizer update of ``trainable`` by ``grads``, kept only if everything it produced is finite (a finite
    loss and gradient can still give NaN / inf parameters: an infinite learning rate, an overflowing moment);
    otherwise the state comes back unchanged. Returns ``(trainable, opt_state, {loss, grad_norm, finite,
    state_finite})``: the tail of the SFT step and of the DPO step."""
    grad_norm = optax.global_norm(grads)
    updates, new_opt = tx.update(grads, opt_state, trainable)
    new_trainable = optax.apply_updates(trainable, updates)
    state_finite = all_finite((new_trainable, new_opt))
    finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm) & state_finite
    keep = lambda new, old: jax.tree.map(lambda n, o: jnp.where(finite, n, o), new, old)  # noqa: E731
    return (
        keep(new_trainable, trainable),
        keep(new_opt, opt_state),
        {"loss": loss, "grad_norm": grad_norm, "finite": finite, "state_finite": state_finite},
    )


def make_train_step(model, cfg: Config, tx: optax.GradientTransformation):
    """``step(trainable, opt_state, frozen, batches, key) -> (trainable, opt_state, metrics)``.

    ``batches`` has a leading gradient-accumulation axis; the micro-batches are scanned and their gradients summed
    (the loss is normalised by the tokens of the whole step, so accumulation equals one big batch). A step whose
    loss or gradients are not finite leaves the state unchanged and reports ``finite = False``.
    """
    loss_fn = loss_for(cfg)
    task = cfg.data.task

    def micro_loss(trainable, frozen, batch, key, total):
        params, adapters = lora.combine(frozen, trainable)
        # One key per micro-batch, split between the adapters' dropout (lora.dropout, each adapter folds in its
        # own index) and the model's own dropout layers.
        lora_key, model_key = jax.random.split(key)
        wrapped = lora.wrap(params, adapters, dropout_key=lora_key)
        loss_sum, _ = loss_fn(model, wrapped, batch, train=True, rng=model_key)
        return loss_sum / total

    remat = remat_name(cfg.train.remat)
    if remat != "none" and getattr(model, "remat", None) != remat:  # a model that cannot checkpoint each layer
        from lora_jax.models.layers import REMAT_POLICIES

        micro_loss = jax.checkpoint(micro_loss, policy=REMAT_POLICIES[remat])

    def step(trainable, opt_state, frozen, batches, key):
        total = jnp.maximum(_token_count(batches, task), 1.0)
        keys = jax.random.split(key, batches["attention_mask"].shape[0])
        zeros = jax.tree.map(jnp.zeros_like, trainable)

        def body(carry, xs):
            grads, loss = carry
            batch, k = xs
            l, g = jax.value_and_grad(micro_loss)(trainable, frozen, batch, k, total)
            return (jax.tree.map(jnp.add, grads, g), loss + l), None

        (grads, loss), _ = jax.lax.scan(body, (zeros, jnp.zeros((), jnp.float32)), (batches, keys))
        return apply_if_finite(tx, trainable, opt_state, grads, loss)

    return step


# -------------------------------------------------------------------------------------------- preference step
#
# DPO with LoRA needs no second model: the reference policy is the frozen base with the adapters off. Each step
# runs the pairs through the model twice over the same frozen arrays, once wrapped with the adapters (the policy,
# differentiated) and once bare (the reference, held constant); SimPO is reference-free and runs once.


def sequence_logps(model, params: Any, batch: dict, loss_chunk: int | str = "auto") -> tuple[jax.Array, jax.Array]:
    """``(logps, tokens)``, ``(N,)`` each: the log-probability of each row's answer tokens (``loss_mask[t] = 1``:
    token ``t + 1`` is one) summed over them, and their number. ``batch``: ``input_ids`` / ``attention_mask`` /
    ``loss_mask`` ``(N, T)``. A model with a ``head()`` runs :func:`lora_jax.losses.chunked_cross_entropy` row by
    row (never the ``(N, T, V)`` logits); others take the full logits."""
    ids, mask = batch["input_ids"], batch["loss_mask"].astype(jnp.float32)
    targets = jnp.concatenate([ids[:, 1:], jnp.zeros_like(ids[:, :1])], axis=1)
    mask = mask.at[:, -1].set(0.0)
    if loss_chunk != 0 and callable(getattr(type(model), "head", None)):

        def hidden_and_head(module, ids, attention_mask):
            h, _ = module(ids, attention_mask=attention_mask, hidden=True)
            return h, module.head()

        h, head = model.apply({"params": params}, ids, batch["attention_mask"], method=hidden_and_head)
        chunk = None if loss_chunk == "auto" else int(loss_chunk)
        per_row = jax.vmap(
            lambda hh, tt, ww: lora.losses.chunked_cross_entropy(hh, targets=tt, weights=ww, chunk_size=chunk, **head)
        )
        ce, tokens = per_row(h, targets, mask)
        return -ce, tokens
    logits, _ = model.apply({"params": params}, ids, attention_mask=batch["attention_mask"])
    logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
    token_logps = jnp.take_along_axis(logp, targets[..., None], axis=-1)[..., 0]
    return lora.losses.sequence_logps(token_logps, mask)


def pair_logps(model, params: Any, batch: dict, loss_chunk: int | str = "auto") -> tuple[jax.Array, jax.Array]:
    """:func:`sequence_logps` of preference pairs: ``batch`` arrays ``(B, 2, T)`` (``[:, 0]`` chosen, ``[:, 1]``
    rejected) -> ``(logps, tokens)`` ``(B, 2)`` each."""
    flat = {k: batch[k].reshape(-1, batch[k].shape[-1]) for k in ("input_ids", "attention_mask", "loss_mask")}
    logps, tokens = sequence_logps(model, params, flat, loss_chunk)
    return logps.reshape(-1, 2), tokens.reshape(-1, 2)


def preference_terms(
    model, cfg: Config, trainable: Any, frozen: Any, batch: dict, dropout_key: jax.Array | None
) -> tuple[jax.Array, dict]:
    """``(losses (B,), metrics)`` of preference pairs (``batch`` arrays ``(B, 2, T)``) under ``dpo.loss``: the
    policy is the base with the adapters (dropout with ``dropout_key``), the reference the same frozen base with
    the adapters off (no gradient; ``batch["ref_logps"]`` ``(B, 2)`` when cached). ``metrics``: TRL's
    ``rewards/*`` and ``logps/chosen`` / ``logps/rejected``,
    summed over the pairs (``weight`` applied when the batch has it)."""
    dc = cfg.dpo
    params, adapters = lora.combine(frozen, trainable)
    policy, tokens = pair_logps(
        model, lora.wrap(params, adapters, dropout_key=dropout_key), batch, cfg.train.loss_chunk
    )
    ref = (None, None)
    if dc.loss != "simpo":
        if "ref_logps" in batch:  # dpo.reference=cached: computed once by cache_reference_logps
            r = batch["ref_logps"]
        else:
            r, _ = pair_logps(model, lora.wrap(params, {}), batch, cfg.train.loss_chunk)
        r = jax.lax.stop_gradient(r)
        ref = (r[:, 0], r[:, 1])
    out = lora.losses.preference_loss(
        policy[:, 0],
        policy[:, 1],
        *ref,
        chosen_tokens=tokens[:, 0],
        rejected_tokens=tokens[:, 1],
        loss_type=dc.loss,
        beta=dc.beta,
        simpo_gamma=dc.simpo_gamma,
    )
    weight = batch.get("weight")
    w = jnp.ones_like(out.losses) if weight is None else weight.astype(jnp.float32)
    sg = jax.lax.stop_gradient
    metrics = {
        **lora.losses.preference_metrics(out, w),
        "logps/chosen": jnp.sum(sg(policy[:, 0]) * w),
        "logps/rejected": jnp.sum(sg(policy[:, 1]) * w),
    }
    return out.losses * w, metrics


def cache_reference_logps(job: Setup) -> None:
    """``dpo.reference=cached``: the reference log-probabilities of every training pair, computed once (the base
    with the adapters off, batches of the evaluation size) and stored with the training data, so that each step
    runs the policy alone. The reference never changes in training, so the steps compute what they would
    otherwise, in one forward pass per pair instead of one per step that sees it."""
    data = job.batches.data
    cfg = job.cfg
    fn = jax.jit(
        lambda frozen, batch: pair_logps(
            job.model,
            lora.wrap(lora.combine(frozen, {"adapters": {}, "params": {}})[0], {}),
            batch,
            cfg.train.loss_chunk,
        )[0]
    )
    out = np.zeros((len(data), 2), np.float32)
    names = ("input_ids", "attention_mask", "loss_mask")
    for start in range(0, len(data), job.eval_bsz):
        idx = np.minimum(np.arange(start, start + job.eval_bsz), len(data) - 1)
        batch = {k: sharding.host_to_global(getattr(data, k)[idx], job.eval_shardings[0]) for k in names}
        got = sharding.global_to_host(fn(job.frozen, batch))
        out[idx] = got
    data.ref_logps = out
    job.say(f"dpo.reference=cached: reference log-probabilities of {len(data)} training pairs computed once")


def make_dpo_step(model, cfg: Config, tx: optax.GradientTransformation):
    """The preference step, :func:`make_train_step`'s signature and contract (gradient accumulation over the
    leading axis, non-finite steps skipped): ``batches`` arrays ``(accum, B, 2, T)``; the loss is the mean over
    the step's pairs of :func:`preference_terms`. Metrics: ``loss``, ``grad_norm``, ``finite``, ``state_finite``
    and the means of TRL's ``rewards/chosen``, ``rewards/rejected``, ``rewards/margins``,
    ``rewards/accuracies``, ``logps/chosen``, ``logps/rejected``."""

    def micro_loss(trainable, frozen, batch, key, total):
        losses, metrics = preference_terms(model, cfg, trainable, frozen, batch, key)
        return jnp.sum(losses) / total, jax.tree.map(lambda m: m / total, metrics)

    remat = remat_name(cfg.train.remat)
    if remat != "none" and getattr(model, "remat", None) != remat:
        from lora_jax.models.layers import REMAT_POLICIES

        micro_loss = jax.checkpoint(micro_loss, policy=REMAT_POLICIES[remat])

    def step(trainable, opt_state, frozen, batches, key):
        accum, pairs = batches["attention_mask"].shape[:2]
        total = jnp.asarray(accum * pairs, jnp.float32)
        keys = jax.random.split(key, accum)
        zeros = jax.tree.map(jnp.zeros_like, trainable)

        def body(carry, xs):
            grads, loss, metrics = carry
            batch, k = xs
            (l, m), g = jax.value_and_grad(micro_loss, has_aux=True)(trainable, frozen, batch, k, total)
            return (jax.tree.map(jnp.add, grads, g), loss + l, jax.tree.map(jnp.add, metrics, m)), None

        names = (
            "rewards/chosen",
            "rewards/rejected",
            "rewards/margins",
            "rewards/accuracies",
            "logps/chosen",
            "logps/rejected",
        )
        init = (zeros, jnp.zeros((), jnp.float32), {n: jnp.zeros((), jnp.float32) for n in names})
        (grads, loss, metrics), _ = jax.lax.scan(body, init, (batches, keys))
        new_trainable, new_opt, m = apply_if_finite(tx, trainable, opt_state, grads, loss)
        return new_trainable, new_opt, {**m, **metrics}

    return step


def make_dpo_eval_step(model, cfg: Config):
    """``evaluate(trainable, frozen, batch) -> (loss_sum, pairs, metric sums)`` over preference pairs (batch
    arrays ``(B, 2, T)`` with a ``weight`` of 0 on padding rows); adapters' dropout off."""

    def evaluate(trainable, frozen, batch):
        losses, metrics = preference_terms(model, cfg, trainable, frozen, batch, None)
        return jnp.sum(losses), jnp.sum(batch["weight"]), metrics

    return evaluate


def evaluate_pairs(job: Setup, trainable: Any) -> dict:
    """The preference loss and TRL's reward metrics (means over the pairs) on the whole evaluation set."""
    loss_sum, count, sums = 0.0, 0.0, {}
    for batch in data_lib.eval_batches(job.eval_data, job.eval_bsz, loss_positions=False):
        dev = {
            k: sharding.host_to_global(v, job.eval_shardings[0] if v.ndim >= 2 else job.eval_shardings[1])
            for k, v in batch.items()
        }
        l, c, m = job.eval_fn(trainable, job.frozen, dev)
        loss_sum += float(l)
        count += float(c)
        for k, v in m.items():
            sums[k] = sums.get(k, 0.0) + float(v)
    count = max(count, 1.0)
    return {"loss": loss_sum / count, **{k: v / count for k, v in sums.items()}}


def all_finite(tree: Any) -> jax.Array:
    """Whether every floating-point value of ``tree`` is finite (a scalar bool array; jit-able)."""
    checks = [
        jnp.all(jnp.isfinite(x))
        for x in jax.tree.leaves(tree)
        if hasattr(x, "dtype") and jnp.issubdtype(x.dtype, jnp.inexact)
    ]
    return jnp.all(jnp.stack(checks)) if checks else jnp.asarray(True)


MAX_SKIPPED_IN_A_ROW = 10  # train.nan_policy=skip gives up after this many non-finite steps in a row


def _non_finite_message(step: int, m: dict, last_finite: int, in_a_row: int, ckpt: Checkpointer, cfg: Config) -> str:
    """Why the run stops at ``step``: what was not finite, the last finite step and the newest checkpoint."""
    loss, grad_norm = float(m["loss"]), float(m["grad_norm"])
    if math.isfinite(loss) and math.isfinite(grad_norm) and not bool(m["state_finite"]):
        what = (
            f"loss {loss:.4g} and grad norm {grad_norm:.4g} are finite, but the update made the trained "
            "parameters or the optimizer state NaN / inf (is optim.lr too large?)"
        )
    else:
        what = f"loss {loss} / grad norm {grad_norm} is not finite"
    saved = ckpt.steps()
    where = (
        f"the newest checkpoint is step {saved[-1]} in {ckpt.folder} (finite)" if saved else "no checkpoint was written"
    )
    policy = (
        f"train.nan_policy=skip skipped {in_a_row} steps in a row, so nothing is being trained. "
        if cfg.train.nan_policy == "skip"
        else ""
    )
    return f"step {step}: {what}; the update was not applied. {policy}The last finite step is {last_finite}; {where}"


def on_mesh(fn: Callable, mesh: Any) -> Callable:
    """``fn`` traced inside :func:`lora_jax.sharding.activation_mesh`: the shared layers pin their activations to
    ``mesh`` (what tensor parallelism needs; nothing changes on a mesh without a ``tensor`` axis)."""

    @functools.wraps(fn)  # keeps the step's name: jit(step) in compile logs and profiles
    def traced(*args):
        with sharding.activation_mesh(mesh):
            return fn(*args)

    return traced


def make_eval_step(model, cfg: Config):
    loss_fn = loss_for(cfg)

    def evaluate(trainable, frozen, batch):
        params, adapters = lora.combine(frozen, trainable)  # no dropout key: the adapters' dropout is off
        loss_sum, aux = loss_fn(model, lora.wrap(params, adapters), batch, train=False, rng=None)
        return loss_sum, aux["count"], aux.get("logits")

    return evaluate


def compile_step(step_fn, *args) -> tuple[Any, dict]:
    """Compile the jitted ``step_fn`` for ``args`` ahead of time: ``(callable, memory)``.

    ``memory`` is XLA's account of the compiled step (``compiled.memory_analysis()``): bytes of its
    ``arguments`` (frozen base, trainable state, optimizer state, batch), ``outputs``, ``aliased`` (donated
    buffers reused for outputs) and ``temp`` (activations, gradients, dequantised kernels...), and ``peak`` =
    arguments + outputs - aliased + temp, an upper bound of what the step holds at once; empty where the
    backend does not report it. The callable is the compiled executable when it returns the trainable and
    optimizer state with the shardings it takes (so it can be called again with its own outputs); otherwise
    ``step_fn`` itself, which compiles again on its first call.
    """
    compiled = step_fn.lower(*args).compile()
    memory: dict = {}
    try:
        stats = compiled.memory_analysis()
        memory = {
            "arguments": int(stats.argument_size_in_bytes),
            "outputs": int(stats.output_size_in_bytes),
            "aliased": int(stats.alias_size_in_bytes),
            "temp": int(stats.temp_size_in_bytes),
        }
        memory["peak"] = memory["arguments"] + memory["outputs"] - memory["aliased"] + memory["temp"]
    except Exception:  # noqa: BLE001 - a backend without memory statistics: the run goes on without them
        memory = {}
    try:
        ins = jax.tree.leaves(compiled.input_shardings[0][:2])
        outs = jax.tree.leaves(compiled.output_shardings[:2])
        ndims = [x.ndim for x in jax.tree.leaves(args[:2])]
        reusable = len(ins) == len(outs) == len(ndims) and all(
            a.is_equivalent_to(b, n) for a, b, n in zip(ins, outs, ndims)
        )
    except Exception:  # noqa: BLE001
        reusable = False
    return (compiled if reusable else step_fn), memory


# ------------------------------------------------------------------------------------------- generation


def generate_texts(model, params, tokenizer, prompts: list[str], cfg: Config, batch_size: int = 8) -> list[str]:
    """Continuations of ``prompts`` (greedy, or beam search with ``eval.num_beams``) as text.

    Prompts are left-padded to a multiple of 16 tokens and batches are filled up to ``batch_size``, so decoding
    compiles once per prompt-length bucket rather than once per call.
    """
    from lora_jax.models import generate as gen

    pad = data_lib._pad_id(tokenizer)
    encoded = [tokenizer(p, add_special_tokens=False)["input_ids"] for p in prompts]
    width = -(-max(len(e) for e in encoded) // 16) * 16
    settings = {"max_new_tokens": cfg.eval.max_new_tokens}
    if cfg.eval.num_beams > 1:  # the LoRA paper's E2E decoding
        settings.update(num_beams=cfg.eval.num_beams, length_penalty=0.9, no_repeat_ngram_size=4)
    texts = []
    for start in range(0, len(encoded), batch_size):
        chunk = encoded[start : start + batch_size]
        rows = chunk + [chunk[-1]] * (batch_size - len(chunk))
        ids = np.full((batch_size, width), pad, np.int32)
        mask = np.zeros((batch_size, width), np.int32)
        for i, e in enumerate(rows):
            ids[i, width - len(e) :] = e
            mask[i, width - len(e) :] = 1
        out = np.asarray(gen.generate(model, params, ids, mask, **settings))[:, width:]
        for row in out[: len(chunk)]:
            texts.append(tokenizer.decode([int(t) for t in row if t != pad], skip_special_tokens=True).strip())
    return texts


# ---------------------------------------------------------------------------------------------- the run


@dataclasses.dataclass
class RunResult:
    folder: Path
    steps_done: int
    history: list[dict]
    eval_before: dict
    eval_after: dict
    samples_before: list[tuple[str, str]]
    samples_after: list[tuple[str, str]]
    trainable_params: int
    total_params: int
    wall_s: float


@dataclasses.dataclass(frozen=True)
class Setup:
    """What a run reads and never changes, from :func:`setup` (the loop's functions take it as ``job``).

    Attributes:
      cfg: the run's config.
      model: the Linen module (computing in ``train.precision``); model_cfg: its family's config.
      tokenizer: the checkpoint's tokenizer.
      mesh: the device mesh of every process.
      frozen: the frozen base, placed on the mesh (``None`` where a leaf is trained).
      eval_data: the tokenized evaluation set; batches: the training batches (:class:`data_lib.Batches`).
      step_fn: ``jax.jit`` of :func:`make_train_step` (donates the trainable and optimizer state), or of the DPO
        step; eval_fn: ``jax.jit`` of :func:`make_eval_step`.
      step_key: folded with the step number for the step's dropout.
      batch_shardings: of the ``(accum, B, T)`` and ``(accum, B)`` training arrays; eval_shardings: of the
        ``(B, T)`` and ``(B,)`` evaluation arrays.
      eval_bsz: global evaluation batch size (a multiple of the devices).
      pissa_init: as :class:`Prepared`.
      n_trainable / total_params / frozen_bytes: what the run trains, holds, and the frozen base's bytes.
      primary: this process writes (process 0); multi_process: more than one process.
      say: prints on process 0 only.
      memory_plan: :func:`train.memory.plan` as a dict (for ``result.json``).
      first_compiled: ``(batch shape, batch keys, compile_step's result)`` from :func:`plan_memory`.
    """

    cfg: Config
    model: Any
    model_cfg: Any
    tokenizer: Any
    mesh: Any
    frozen: Any
    eval_data: data_lib.Tokenized
    batches: data_lib.Batches
    step_fn: Any
    eval_fn: Any
    step_key: jax.Array
    batch_shardings: tuple[Any, Any]  # (accum, B, T) arrays, (accum, B) arrays
    eval_shardings: tuple[Any, Any]  # (B, T) arrays, (B,) arrays
    eval_bsz: int
    pissa_init: Any
    n_trainable: int
    total_params: int
    frozen_bytes: int
    primary: bool
    multi_process: bool
    say: Callable[..., None]
    memory_plan: dict = dataclasses.field(default_factory=dict)
    first_compiled: tuple | None = None  # (batch shape, batch keys, compile_step's result) from plan_memory


@dataclasses.dataclass(frozen=True)
class TrainState:
    """What a step changes: ``trainable`` (``{"adapters", "params"}``) and ``opt_state``, placed on the mesh."""

    trainable: Any
    opt_state: Any


@dataclasses.dataclass
class Progress:
    """The step loop's counters, carried from :func:`restore` through :func:`train_steps` into the run's result.

    Attributes:
      start: the step the loop started from (0, or the resumed checkpoint's); step: steps done.
      skipped: steps whose update was not applied (not finite).
      tokens_seen / steady_s: tokens and wall time of the steps that did not compile (the throughput's clock).
      train_s: wall time of the training steps (compiling included, evaluation and checkpoints excluded).
      examples_seen: training examples the steps read.
      real_tokens / slots: non-padding tokens / token slots of every batch.
      last_finite: the last step whose update was applied; in_a_row: non-finite steps in a row.
      history: the ``train`` log records.
      compiled: one compiled step per batch shape, ``{shape: (callable, memory)}``.
      last_metrics: the newest step's metrics (host values).
      clock: when the time charged to the next step read began (``time.perf_counter``).
    """

    start: int = 0
    step: int = 0
    skipped: int = 0
    tokens_seen: float = 0.0
    train_s: float = 0.0
    steady_s: float = 0.0
    examples_seen: int = 0
    real_tokens: int = 0
    slots: int = 0
    last_finite: int = 0
    in_a_row: int = 0
    history: list[dict] = dataclasses.field(default_factory=list)
    compiled: dict[tuple[int, ...], tuple[Any, dict]] = dataclasses.field(default_factory=dict)
    last_metrics: dict = dataclasses.field(default_factory=dict)
    clock: float = 0.0


def check_data_source(cfg: Config) -> None:
    """Read the local or built-in training (and evaluation) rows and check their columns, before the model is
    loaded (seconds instead of the model's load time). Hub data sets are left to the full load."""
    dc = cfg.data
    sources = [dc.source] + ([dc.eval_source] if dc.eval_source else [])
    for source in sources:
        is_local = source.startswith("builtin:") or any(
            Path(p).suffix.lower() in sources_lib.FILE_TYPES for p in sources_lib.paths(source)
        )
        if is_local:
            data_lib.load_rows(
                dataclasses.replace(dc, source=source), dc.train_split, pairs=cfg.train.objective == "dpo"
            )


def setup(cfg: Config, say: Callable[..., None], *, check: str | None = None) -> tuple[Setup, TrainState] | None:
    """Check and load everything the run reads: the mesh, the model, the data, the trainable tree, the optimizer;
    then place the frozen base and the trainable state on the mesh and jit the step and the evaluation.

    ``check``: the output folder's plan as text (:func:`train.outputs.describe`); stop after the checks, say
    that they passed, and return ``None`` (nothing placed, nothing written)."""
    primary = jax.process_index() == 0
    mesh = sharding.make_mesh(cfg.mesh.data, cfg.mesh.fsdp, expert=cfg.mesh.expert, tensor=cfg.mesh.tensor)
    say(
        f"mesh {dict(mesh.shape)} over {jax.device_count()} {jax.default_backend()} device(s), "
        f"{jax.process_count()} process(es)"
    )
    replicas = mesh.size // mesh.shape.get(sharding.TENSOR_AXIS, 1)  # the devices that see different examples
    if cfg.train.batch_size % replicas:
        raise ConfigError(
            f"train.batch_size={cfg.train.batch_size} must be divisible by the {replicas} devices of "
            "the mesh that see different examples (data x fsdp x expert)"
        )

    check_data_source(cfg)  # a wrong path or column fails here, before the model is loaded
    t0 = time.perf_counter()
    ckpt, model = open_model(cfg)  # config, tokenizer, tensor names and shapes: no weight read yet
    tokenizer, model_cfg = ckpt.tokenizer, ckpt.config
    max_positions = getattr(model_cfg, "max_position_embeddings", None)
    num_labels = cfg.model.num_labels if cfg.data.task != "causal-lm" else None
    train_data, eval_data = data_lib.load_tokenized(
        cfg.data,
        tokenizer,
        cfg.model.name,
        max_positions,
        num_labels,
        cache_dir=Path.home() / ".cache" / "lora_jax" / "tokenized",
        pairs=cfg.train.objective == "dpo",
    )
    say(f"data: {len(train_data)} train / {len(eval_data)} eval examples of {cfg.data.max_length} tokens")
    batches = training_batches(cfg, train_data)
    say(
        f"training on {batches.describe()}"
        + (f", {cfg.train.grad_accum} micro-batches per step" if cfg.train.grad_accum > 1 else "")
    )
    warmup = min(cfg.optim.warmup_steps, max(cfg.train.steps - 1, 0))
    if warmup < cfg.optim.warmup_steps:
        say(
            f"note: optim.warmup_steps={cfg.optim.warmup_steps} is not below train.steps={cfg.train.steps}: the "
            f"warmup is shortened to {warmup} steps"
        )

    init_key, step_key = run_keys(cfg)
    tx = make_optimizer(cfg)
    if check is not None:  # the targets and what is trained, from the shapes alone: no weight is read
        plain = dataclasses.replace(cfg, lora=dataclasses.replace(cfg.lora, use_dora=False, init="lora"))
        choose_trainable(plain, ckpt.abstract(), init_key)
        say(f"check: the config, {cfg.model.name}, the data, the targets and {check} are valid; nothing was written")
        return None

    # Every leaf straight into its place on the mesh, in its final dtype (see prepare).
    prepared = prepare(cfg, ckpt, init_key, mesh)
    frozen, trainable = prepared.frozen, prepared.trainable
    say(f"loaded {cfg.model.name} into the mesh in {time.perf_counter() - t0:.1f}s")
    summary = lora.summary(
        lora.combine(frozen, {"adapters": {}, "params": trainable["params"]})[0],
        trainable["adapters"],
        trainable["params"],
    )
    n_trainable = summary.trainable
    frozen_bytes = nbytes(frozen)
    say(
        f"method {cfg.train.method}: training {n_trainable:,} of {summary.total:,} parameters "
        f"({100 * n_trainable / summary.total:.2f}%); frozen base {frozen_bytes / 2**20:,.1f} MiB as stored"
        + (f" ({cfg.quant.type})" if cfg.train.method == "qlora" else f" ({cfg.train.precision})")
    )

    # The trainable tree by the same rules (adapters are small: replicated); the base is already in place.
    trainable = sharding.put_tree(trainable, sharding.tree_shardings(trainable, mesh, sharding_rules(ckpt)))
    opt_state = sharding.init_opt_state(tx, trainable)  # moments placed like their parameters

    # The state leaves the step with the shardings it came in with (left to XLA, the adapters can come out
    # FSDP-split, and the next step would compile again for them).
    state_shardings = jax.tree.map(lambda x: x.sharding, (trainable, opt_state))
    dpo = cfg.train.objective == "dpo"
    step_fn = jax.jit(
        on_mesh((make_dpo_step if dpo else make_train_step)(model, cfg, tx), mesh),
        donate_argnums=(0, 1),
        out_shardings=(*state_shardings, None),
        compiler_options=step_compiler_options(cfg),
    )
    eval_fn = jax.jit(
        on_mesh((make_dpo_eval_step if dpo else make_eval_step)(model, cfg), mesh),
        compiler_options=step_compiler_options(cfg),
    )
    rows = sharding.batch_axes(mesh)
    batch_shardings = (
        sharding.batch_sharding(mesh, ndim=3, leading=1),
        sharding.NamedSharding(mesh, sharding.P(None, rows)),
    )
    eval_shardings = (sharding.batch_sharding(mesh, ndim=2, leading=0), sharding.NamedSharding(mesh, sharding.P(rows)))
    # (no larger than the evaluation set needs: padding rows cost memory and count for nothing)
    n_devices = mesh.size
    eval_bsz = max(min(cfg.eval.batch_size, -(-len(eval_data) // n_devices) * n_devices) // n_devices, 1) * n_devices

    multi_process = jax.process_count() > 1
    if (
        multi_process
        and cfg.data.task in ("causal-lm", "chat")
        and (cfg.eval.generate_samples or cfg.eval.generate_eval)
    ):
        say(
            "note: sample generation and BLEU/ROUGE run single-process only; skipped in this multi-process run "
            "(evaluate the saved adapter with python -m train.predict)"
        )
    s = Setup(
        cfg=cfg,
        model=model,
        model_cfg=model_cfg,
        tokenizer=tokenizer,
        mesh=mesh,
        frozen=frozen,
        eval_data=eval_data,
        batches=batches,
        step_fn=step_fn,
        eval_fn=eval_fn,
        step_key=step_key,
        batch_shardings=batch_shardings,
        eval_shardings=eval_shardings,
        eval_bsz=eval_bsz,
        pissa_init=prepared.pissa_init,
        n_trainable=n_trainable,
        total_params=summary.total,
        frozen_bytes=frozen_bytes,
        primary=primary,
        multi_process=multi_process,
        say=say,
    )
    return plan_memory(s, TrainState(trainable, opt_state)), TrainState(trainable, opt_state)


def plan_memory(job: Setup, state: TrainState) -> Setup:
    """Compile the step for the first batch's shape and check the memory plan (:mod:`train.memory`) before any
    step runs: a run that would not fit stops here with a :class:`ConfigError` that names what would help. The
    compiled step is kept for the loop (``Setup.first_compiled``) and the plan for ``result.json``."""
    placed = place(job, 0)
    args = (state.trainable, state.opt_state, job.frozen, placed.batch, jax.random.fold_in(job.step_key, 0))
    compiled = compile_step(job.step_fn, *args)
    plan = memory.plan(
        job.frozen, state.trainable, state.opt_state, placed.batch, compiled[1], memory.device_capacity(job.cfg)
    )
    job.say(plan.describe())
    memory.check(plan, job.cfg)
    return dataclasses.replace(
        job, memory_plan=plan.as_dict(), first_compiled=(placed.shape, tuple(sorted(placed.batch)), compiled)
    )


# ------------------------------------------------------------------------------------------- evaluation


def evaluate(job: Setup, trainable: Any) -> dict:
    """Loss (and perplexity, or the classification metrics; preference pairs: :func:`evaluate_pairs`) of
    ``trainable`` on the whole evaluation set."""
    cfg = job.cfg
    if cfg.train.objective == "dpo":
        return evaluate_pairs(job, trainable)
    loss_sum, count, logits, labels = 0.0, 0.0, [], []
    for batch in data_lib.eval_batches(job.eval_data, job.eval_bsz):
        weight = batch["weight"]
        dev = {
            k: sharding.host_to_global(v, job.eval_shardings[0] if v.ndim == 2 else job.eval_shardings[1])
            for k, v in batch.items()
        }
        l, c, lg = job.eval_fn(trainable, job.frozen, dev)
        loss_sum += float(l)
        count += float(c)
        if lg is not None:
            keep = weight > 0
            logits.append(sharding.global_to_host(lg)[keep])
            labels.append(batch["labels"][keep])
    out = {"loss": loss_sum / max(count, 1.0)}
    if cfg.data.task in ("causal-lm", "chat"):
        out["perplexity"] = float(math.exp(min(out["loss"], 50.0)))
    else:
        out.update(metrics_lib.classification(np.concatenate(labels), np.concatenate(logits)))
    return out


def samples(job: Setup, trainable: Any, n: int) -> list[tuple[str, str]]:
    """``(prompt, continuation)`` for the first ``n`` distinct evaluation prompts (causal LM, single process)."""
    if job.cfg.data.task not in ("causal-lm", "chat") or n <= 0 or job.multi_process:
        return []
    prompts = list(dict.fromkeys(job.eval_data.prompts))[:n]
    params_now, adapters_now = lora.combine(job.frozen, trainable)
    outs = generate_texts(job.model, lora.wrap(params_now, adapters_now), job.tokenizer, prompts, job.cfg)
    return list(zip(prompts, outs))


def generation_metrics(job: Setup, trainable: Any) -> dict:
    """BLEU / ROUGE of the merged model's continuations of ``eval.generate_eval`` distinct evaluation prompts
    (causal LM, single process; ``{}`` otherwise)."""
    n = job.cfg.eval.generate_eval
    if job.cfg.data.task not in ("causal-lm", "chat") or n <= 0 or job.multi_process:
        return {}
    eval_data = job.eval_data
    unique = list(dict.fromkeys(eval_data.prompts))[:n]
    refs = {p: r for p, r in zip(eval_data.prompts, eval_data.references)}
    params_now, adapters_now = lora.combine(job.frozen, trainable)
    preds = generate_texts(job.model, merged_params(params_now, adapters_now), job.tokenizer, unique, job.cfg)
    return metrics_lib.generation(preds, [refs[p] for p in unique])


def evaluate_all(job: Setup, trainable: Any) -> tuple[dict, list[tuple[str, str]]]:
    """The evaluation before and after training: ``({**evaluate, **generation_metrics}, samples)``.

    The printed samples are the first ``eval.generate_samples`` of the continuations scored for BLEU / ROUGE-L
    (the merged model's, which equal the factored model's up to rounding) when those cover them: one generation
    pass, one compilation of the decoder, instead of two."""
    cfg = job.cfg
    n_samples, n_scored = cfg.eval.generate_samples, cfg.eval.generate_eval
    if cfg.data.task != "causal-lm" or job.multi_process or not (0 < n_samples <= n_scored):
        return {**evaluate(job, trainable), **generation_metrics(job, trainable)}, samples(job, trainable, n_samples)
    unique = list(dict.fromkeys(job.eval_data.prompts))[:n_scored]
    refs = {p: r for p, r in zip(job.eval_data.prompts, job.eval_data.references)}
    params_now, adapters_now = lora.combine(job.frozen, trainable)
    preds = generate_texts(
        job.model,
        merged_params(params_now, adapters_now),
        job.tokenizer,
        unique,
        cfg,
        batch_size=min(16, -(-len(unique) // 8) * 8),
    )
    scores = metrics_lib.generation(preds, [refs[p] for p in unique])
    return {**evaluate(job, trainable), **scores}, list(zip(unique, preds))[:n_samples]


# ------------------------------------------------------------------------------------------- the step loop


def restore(job: Setup, ckpt: Checkpointer, folder: Path, state: TrainState) -> tuple[TrainState, Progress]:
    """The newest checkpoint in ``ckpt`` placed like ``state``, and the loop's progress at that step (its
    records after the checkpoint are dropped from the metric log)."""
    restored = ckpt.restore_latest(state.trainable, state.opt_state)
    if restored is None:
        raise ConfigError(f"--resume: {folder / 'checkpoints'} holds no checkpoint")
    start, r_trainable, r_opt, meta = restored
    if not all_finite((r_trainable, r_opt)):
        raise NonFiniteError(
            f"--resume: checkpoint step {start} in {folder / 'checkpoints'} holds NaN / inf "
            "values (written by an older version?); move it aside to resume from an "
            "earlier one"
        )
    trainable = sharding.put_tree(r_trainable, jax.tree.map(lambda x: x.sharding, state.trainable))
    opt_state = sharding.put_tree(r_opt, jax.tree.map(lambda x: x.sharding, state.opt_state))
    cfg = job.cfg
    examples0 = int(meta.get("examples_seen", start * cfg.train.grad_accum * cfg.train.batch_size))
    job.say(f"resumed from step {start} ({meta.get('examples_seen', '?')} examples seen)")
    if job.primary:  # the steps after the checkpoint are trained again: drop their records
        metrics_lib.truncate_log(folder, start)
    progress = Progress(
        start=start, step=start, train_s=float(meta.get("train_s", 0.0)), examples_seen=examples0, last_finite=start
    )
    return TrainState(trainable, opt_state), progress


def put_batch(job: Setup, host: dict[str, np.ndarray]) -> dict:
    """A step's host batch as global arrays ``(accum, B, ...)``, split along B over the mesh."""
    stacked = micro_batches(host, job.cfg.train.grad_accum)
    return {
        k: sharding.host_to_global(v, job.batch_shardings[0] if v.ndim == 3 else job.batch_shardings[1])
        for k, v in stacked.items()
    }


@dataclasses.dataclass(frozen=True)
class _Placed:
    """Step ``step``'s batch: ``host`` arrays, the compiled step's ``shape`` key, and the placed ``batch``."""

    step: int
    host: dict
    shape: tuple[int, ...]
    batch: dict


def place(job: Setup, step: int) -> _Placed:
    """Gather step ``step``'s batch on the host and start placing it on the mesh."""
    host = job.batches(step)
    accum = job.cfg.train.grad_accum
    shape = (accum, *micro_batches(host, accum)["attention_mask"].shape[1:])
    return _Placed(step, host, shape, put_batch(job, host))


@dataclasses.dataclass(frozen=True)
class _Dispatched:
    """A dispatched step whose metrics (device arrays) are not read yet; ``step`` counts from 1."""

    step: int
    metrics: dict
    host: dict
    compiled_now: bool


class _StopFlag:
    """SIGTERM handler: a preemption notice; the loop finishes the step, checkpoints and exits cleanly."""

    def __init__(self):
        self.signal = None

    def __call__(self, signum, frame):
        self.signal = signum


def _read_metrics(
    job: Setup, progress: Progress, done: _Dispatched, log: metrics_lib.MetricLog, bar, ckpt: Checkpointer
) -> None:
    """Read a dispatched step's metrics (waiting for it) into ``progress``: its wall time (since the previous read,
    or the last evaluation / checkpoint: ``progress.clock``), the non-finite check (raises :class:`NonFiniteError` as
    ``train.nan_policy`` says), the counters, the history and the ``train`` log record."""
    cfg, m = job.cfg, done.metrics
    loss, finite = float(m["loss"]), bool(m["finite"])
    now = time.perf_counter()
    dt, progress.clock = now - progress.clock, now
    progress.train_s += dt
    step = done.step
    progress.last_metrics = m = {k: np.asarray(v) for k, v in m.items()}
    if finite:
        progress.last_finite, progress.in_a_row = step, 0
    else:
        progress.skipped, progress.in_a_row = progress.skipped + 1, progress.in_a_row + 1
        if cfg.train.nan_policy == "stop" or progress.in_a_row >= MAX_SKIPPED_IN_A_ROW:
            raise NonFiniteError(_non_finite_message(step, m, progress.last_finite, progress.in_a_row, ckpt, cfg))
    mask = done.host["attention_mask"]
    n_real = int(mask.sum())  # tokens that are not padding
    progress.real_tokens, progress.slots = progress.real_tokens + n_real, progress.slots + mask.size
    progress.examples_seen += job.batches.examples(step - 1)
    if not done.compiled_now:  # throughput excludes the steps that compiled
        progress.tokens_seen += n_real
        progress.steady_s += dt
    tok_s = progress.tokens_seen / progress.steady_s if progress.steady_s else 0.0
    record = {
        "loss": loss,
        "lr": lr_at(cfg, step),
        "grad_norm": float(m["grad_norm"]),
        "finite": finite,
        "tokens_per_s": tok_s,
        "train_s": progress.train_s,
        **{k: float(v) for k, v in m.items() if "/" in k},
    }  # DPO: rewards/...
    progress.history.append({"step": step, **record})
    log.write("train", step, **record)
    bar.set_postfix(loss=f"{loss:.4f}", lr=f"{record['lr']:.2e}", tok_s=f"{tok_s:,.0f}")
    bar.update(1)


def train_steps(
    job: Setup,
    state: TrainState,
    progress: Progress,
    ckpt: Checkpointer,
    log: metrics_lib.MetricLog,
    run_folder: outputs.RunFolder,
) -> tuple[TrainState, Progress]:
    """Train from step ``progress.step`` to ``train.steps``: evaluate every ``eval.every`` steps, checkpoint as
    ``checkpoint.every`` says and at the end, stop cleanly (with a checkpoint) on SIGTERM or when
    ``train.time_budget_s`` is spent, raise :class:`NonFiniteError` on non-finite steps as ``train.nan_policy``
    says. Returns the trained state and ``p``, updated in place.

    With ``train.prefetch`` the host work overlaps the step: step ``k+1``'s batch is gathered and placed while
    step ``k`` runs, and step ``k``'s metrics are read after step ``k+1`` is dispatched. The non-finite check of
    step ``k`` therefore runs one step late, after step ``k+1`` was dispatched; that costs nothing: a non-finite
    step leaves the state unchanged (:func:`make_train_step`), and before every evaluation, checkpoint or stop
    the pending metrics are read, so no decision is taken on unread metrics and a checkpoint always follows
    the non-finite check of its own step. Same batches, keys and updates either way: the same losses.
    """
    cfg = job.cfg
    steps, every, budget, prefetch = cfg.train.steps, cfg.eval.every, cfg.train.time_budget_s, cfg.train.prefetch
    every_s = cfg.eval.every_s
    # eval.every_s: an evaluation at the first step past each multiple of every_s seconds of training time (the
    # multiples do not drift with the step boundaries, so a budget of n * every_s gets n - 1 of them in training)
    tick = (lambda t: math.floor(t / every_s)) if every_s is not None else (lambda t: 0)
    last_tick = tick(progress.train_s)
    trainable, opt_state = state.trainable, state.opt_state
    stop = _StopFlag()
    previous = signal.getsignal(signal.SIGTERM)
    signal.signal(signal.SIGTERM, stop)
    from tqdm.auto import tqdm

    bar = tqdm(
        total=steps,
        initial=progress.step,
        disable=not job.primary,
        mininterval=2.0,
        dynamic_ncols=True,
        desc=cfg.train.method,
    )
    n_widths = len(job.batches.widths)
    progress.clock = time.perf_counter()
    nxt: _Placed | None = None  # the next step's batch, placed while a step runs
    pending: _Dispatched | None = None  # a dispatched step whose metrics are not read yet
    try:
        while progress.step < steps:
            placed = nxt if nxt is not None else place(job, progress.step)
            nxt = None
            if (
                job.first_compiled is not None
                and placed.shape not in progress.compiled
                and job.first_compiled[:2] == (placed.shape, tuple(sorted(placed.batch)))
            ):
                progress.compiled[placed.shape] = job.first_compiled[
                    2
                ]  # compiled by plan_memory for this batch's shape
            step_args = (
                trainable,
                opt_state,
                job.frozen,
                placed.batch,
                jax.random.fold_in(job.step_key, progress.step),
            )
            new_shape = placed.shape not in progress.compiled
            if new_shape:  # compile ahead of time, once per shape, to read the compiled step's memory use
                if pending is not None:  # charge the compilation to this step, not to the previous one
                    _read_metrics(job, progress, pending, log, bar, ckpt)
                    pending = None
                progress.compiled[placed.shape] = compile_step(job.step_fn, *step_args)
                if job.primary and n_widths > 1:
                    bar.write(
                        f"step {progress.step + 1}: compiled the step for batches of "
                        f"{' x '.join(map(str, placed.shape))} tokens ({len(progress.compiled)} of at most "
                        f"{n_widths} shapes)"
                    )
            trainable, opt_state, m = progress.compiled[placed.shape][0](*step_args)
            step = progress.step = progress.step + 1
            if prefetch and step < steps:
                nxt = place(job, step)  # host work of the next step while this one runs
            if pending is not None:  # the previous step: finished, its outputs are this step's inputs
                _read_metrics(job, progress, pending, log, bar, ckpt)
            pending = _Dispatched(step, m, placed.host, new_shape)
            live_s = progress.train_s + time.perf_counter() - progress.clock
            due = step % every == 0 or tick(live_s) > last_tick
            if prefetch and not (
                due
                or ckpt.should_save(step)
                or step == steps
                or stop.signal
                or (budget is not None and live_s > budget)
            ):
                continue  # nothing to decide at this step: read its metrics after the next one is dispatched
            _read_metrics(job, progress, pending, log, bar, ckpt)
            pending = None
            meta = {
                "step": step,
                "examples_seen": progress.examples_seen,
                "skipped": progress.skipped,
                "train_s": progress.train_s,
            }
            out_of_time = budget is not None and progress.train_s > budget
            due = step % every == 0 or tick(progress.train_s) > last_tick
            if due and step < steps and not out_of_time:
                last_tick = tick(progress.train_s)
                ev = evaluate(job, trainable)
                log.write("eval", step, **ev, train_s=progress.train_s)
                bar.write(f"step {step}: " + _fmt(ev)) if job.primary else None
            if ckpt.should_save(step) or step == steps or stop.signal or out_of_time:
                if (
                    progress.last_finite == progress.start
                    and progress.skipped
                    and (step == steps or stop.signal or out_of_time)
                ):
                    raise NonFiniteError(
                        _non_finite_message(
                            step, progress.last_metrics, progress.last_finite, progress.in_a_row, ckpt, cfg
                        )
                    )
                ckpt.save(step, trainable, opt_state, meta)  # the state of step last_finite: always finite
                run_folder.commit()
            progress.clock = time.perf_counter()  # evaluation and checkpoints are not training time
            if stop.signal:
                job.say(f"SIGTERM: saved step {step}, exiting")
                break
            if out_of_time:
                job.say(f"time budget of {budget:.0f}s spent after step {step}")
                break
    finally:
        bar.close()
        signal.signal(signal.SIGTERM, previous)
    return TrainState(trainable, opt_state), progress


# ------------------------------------------------------------------------------------------------ export


def export(job: Setup, folder: Path, trainable: Any) -> None:
    """Write the trained adapters (``adapters/``) and leaves trained in full (``params/``), and the exports
    ``output.*`` asks for: merged weights, a PEFT adapter, GGUF files."""
    cfg, say, primary = job.cfg, job.say, job.primary
    params_final, adapters_final = lora.combine(job.frozen, trainable)
    trained_final = trainable["params"]
    if cfg.output.export_merged:  # merged on the mesh, sharded like the base; written below leaf by leaf
        from lora_jax import models

        models.save_pretrained(
            merged_params(params_final, adapters_final), job.model_cfg, folder / "merged", tokenizer=job.tokenizer
        )  # every process gathers each leaf in turn, process 0 writes
        say(f"exported merged weights to {folder / 'merged'}")
    if job.multi_process:  # the other exports are written by process 0 from host copies of the (small) arrays
        adapters_final = jax.tree.map(sharding.global_to_host, adapters_final)
        trained_final = jax.tree.map(sharding.global_to_host, trained_final)
    uses_adapters = cfg.train.method in ("lora", "qlora")
    if uses_adapters:  # every process takes part in Orbax writes
        save_adapters(folder / "adapters", jax.device_get(adapters_final))
    if jax.tree.leaves(trained_final):  # a head trained in full (or every leaf, for full fine-tuning)
        save_trained(folder / "params", jax.device_get(trained_final))
    if primary and cfg.output.export_peft and uses_adapters:
        peft_adapters = jax.device_get(adapters_final)
        if job.pissa_init is not None:  # PEFT applies adapters to the original base, not PiSSA's residual
            peft_adapters = pissa_to_lora(peft_adapters, job.pissa_init)
        from lora_jax import models

        base_name = cfg.output.peft_base_model or models.peft_base_name(cfg.model.name)
        lora.save_peft(
            peft_adapters,
            folder / "peft",
            base_model_name_or_path=base_name,
            config=job.model_cfg,
            modules_to_save=jax.device_get(trained_final) if jax.tree.leaves(trained_final) else None,
        )
        say(f"exported PEFT adapter to {folder / 'peft'}")
    if primary and (cfg.output.export_gguf_adapter or cfg.output.export_gguf):
        export_gguf(
            cfg,
            folder,
            jax.device_get(adapters_final) if uses_adapters else {},
            jax.device_get(trained_final),
            job.pissa_init,
            say,
        )


def say_outputs(job: Setup, folder: Path, result: RunResult) -> None:
    """Draw ``loss.png`` and say where the run's outputs are and how to look at them."""
    from train import plot

    try:
        png = plot.plot_run(folder)
    except Exception as e:  # noqa: BLE001 - a plot that cannot be drawn does not fail a finished run
        png = None
        job.say(f"note: could not draw the loss plot ({type(e).__name__}: {e})")
    job_dir = folder.parent
    job.say(f"\nfinished in {result.wall_s:.0f}s; outputs in {folder}:")
    for name, what in (
        ("result.json", "metrics before / after, sizes, times"),
        ("metrics.jsonl", "loss, learning rate, gradient norm, tokens/s by step; evaluations"),
        ("loss.png", "loss and learning rate by step"),
        ("tensorboard", "TensorBoard events"),
        ("adapters", "the trained adapters"),
        ("params", "leaves trained in full"),
        ("checkpoints", "resume with --resume"),
        ("peft", "PEFT adapter (transformers, vLLM)"),
        ("merged", "merged Hugging Face weights"),
        (GGUF_ADAPTER, "llama.cpp LoRA adapter"),
        (GGUF_MERGED, "merged GGUF model"),
    ):
        if (folder / name).exists() and (name != "loss.png" or png is not None):
            job.say(f"  {folder / name}  ({what})")
    job.say(
        f"look at it: python -m train.plot {folder} (redraws loss.png)  |  python -m train.predict --run {job_dir} "
        f"--text ...  |  tensorboard --logdir {job_dir} (if TensorBoard is installed)"
    )


def write_result(
    job: Setup, result: RunResult, state: TrainState, progress: Progress, phases: dict | None = None
) -> None:
    """``result.json``: the run's evaluations, sizes, times (``phases_s``: wall seconds by phase), the compiled
    step's memory and the batch shapes."""
    folder, step = result.folder, progress.step
    # the widest shape's memory: the step's peak (one compiled executable is held per shape)
    step_memory = max((mem for _, mem in progress.compiled.values()), key=lambda mem: mem.get("peak", 0), default=None)
    last = folder / "checkpoints" / str(step)
    (folder / "result.json").write_text(
        json.dumps(
            {
                "steps": step,
                "eval_before": result.eval_before,
                "eval_after": result.eval_after,
                "trainable_params": job.n_trainable,
                "total_params": job.total_params,
                "wall_s": result.wall_s,
                "train_s": progress.train_s,
                "optimizer_state_bytes": nbytes(state.opt_state),
                "trainable_bytes": nbytes(state.trainable),
                "frozen_bytes": job.frozen_bytes,
                "memory_plan": job.memory_plan,
                "step_memory_bytes": (step_memory or {}).get("peak"),
                "step_memory": step_memory,
                "checkpoint_bytes": sum(f.stat().st_size for f in last.rglob("*") if f.is_file())
                if last.exists()
                else None,
                "batching": config_lib.batching(job.cfg),
                "batch_widths": list(job.batches.widths),
                "step_shapes": sorted(list(k) for k in progress.compiled),
                "step_compilations": len(progress.compiled),
                "examples_seen": progress.examples_seen,
                "real_token_share": progress.real_tokens / progress.slots if progress.slots else None,
                "phases_s": phases or {},
                "generate_eval": job.cfg.eval.generate_eval if job.cfg.data.task == "causal-lm" else 0,
                "samples_before": result.samples_before,
                "samples_after": result.samples_after,
            },
            indent=1,
            default=float,
        )
    )


def _final_eval_logged(folder: Path, progress: Progress) -> dict | None:
    """The evaluation a resumed run already logged at its last step, when it trained no step this time (it was
    finished): the values of that record, else None."""
    if progress.step != progress.start or progress.step == 0:
        return None
    return next(
        (
            {k: v for k, v in r.items() if k not in ("kind", "step", "train_s")}
            for r in metrics_lib.read_log(folder)
            if r["kind"] == "eval" and r["step"] == progress.step
        ),
        None,
    )


def run(cfg: Config, *, resume: bool = False, check: bool = False, print_fn=print) -> RunResult | None:
    """Train as ``cfg`` says. Everything the run reads is checked before anything is written: the output folder
    (:func:`train.outputs.plan`), the mesh, the model, the data, the targets, the batch layout; then the run
    folder is created. A run that fails before its first checkpoint leaves the job folder as it found it.
    ``check``: stop after the checks (nothing written) and return ``None``.

    :func:`setup` -> :func:`restore` (``resume``) -> :func:`evaluate_all` -> :func:`train_steps` ->
    :func:`evaluate_all` -> :func:`export` -> :func:`write_result`."""
    t_start = time.perf_counter()
    primary = jax.process_index() == 0
    say = print_fn if primary else (lambda *a, **k: None)
    check_gguf_exports(cfg)
    out_plan = outputs.plan(cfg, resume)
    ready = setup(cfg, say, check=outputs.describe(out_plan) if check else None)
    if ready is None:
        return None
    job, state = ready
    phases = {"setup": time.perf_counter() - t_start}  # wall seconds by phase (result.json: phases_s)

    # Every input is checked: now the run folder is written (and removed again if the run fails before its
    # first checkpoint; a run it replaces is moved back).
    run_folder = outputs.agree(out_plan).create(cfg, primary)
    outputs.barrier()
    folder = run_folder.folder
    say(f"run folder {folder}" + (" (resumed)" if resume else ""))
    try:
        ckpt = Checkpointer(folder / "checkpoints", every=cfg.checkpoint.every, keep=cfg.checkpoint.keep)
        state, progress = restore(job, ckpt, folder, state) if resume else (state, Progress())
        log = metrics_lib.MetricLog(folder, enabled=primary, purge_step=progress.start + 1 if resume else None)

        eval_before, samples_before = {}, []
        if resume:  # the evaluation before training, as the run's first part logged it
            eval_before = next(
                (
                    {k: v for k, v in r.items() if k not in ("kind", "step", "train_s")}
                    for r in metrics_lib.read_log(folder)
                    if r["kind"] == "eval" and r["step"] == 0
                ),
                {},
            )
        if progress.start == 0:
            t0 = time.perf_counter()
            eval_before, samples_before = evaluate_all(job, state.trainable)
            phases["eval_before"] = time.perf_counter() - t0
            log.write("eval", 0, **eval_before, train_s=0.0)
            say("before training: " + _fmt(eval_before))
            for prompt, out in samples_before:
                say(f"  {prompt.strip()!r} -> {out.strip()!r}")

        if cfg.train.objective == "dpo" and cfg.dpo.loss != "simpo" and cfg.dpo.reference == "cached":
            cache_reference_logps(job)
        t0 = time.perf_counter()
        state, progress = train_steps(job, state, progress, ckpt, log, run_folder)
        phases["training"] = time.perf_counter() - t0  # steps, their compilation, evaluations, checkpoints

        logged = _final_eval_logged(folder, progress) if resume else None
        t0 = time.perf_counter()
        if logged is not None:  # a finished run resumed: its final evaluation is in the log already, once
            eval_after, samples_after = logged, []
        else:
            eval_after, samples_after = evaluate_all(job, state.trainable)
            log.write("eval", progress.step, **eval_after, train_s=progress.train_s)
        phases["eval_after"] = time.perf_counter() - t0
        say("after training:  " + _fmt(eval_after))
        for prompt, out in samples_after:
            say(f"  {prompt.strip()!r} -> {out.strip()!r}")

        t0 = time.perf_counter()
        export(job, folder, state.trainable)
        ckpt.close()
        log.close()
        run_folder.commit()
        phases["export"] = time.perf_counter() - t0
        result = RunResult(
            folder,
            progress.step,
            progress.history,
            eval_before,
            eval_after,
            samples_before,
            samples_after,
            job.n_trainable,
            job.total_params,
            time.perf_counter() - t_start,
        )
        if primary:
            write_result(job, result, state, progress, phases)
            say_outputs(job, folder, result)
        return result
    except BaseException:
        if not run_folder.committed and not resume:
            run_folder.abort()
            say(
                f"the run stopped before its first checkpoint: {folder} was removed"
                + (", the run it was replacing put back" if out_plan.replaces is not None else "")
            )
        raise


# ------------------------------------------------------------------------------------------- artifacts


def check_gguf_exports(cfg: Config) -> None:
    """Refuse GGUF exports that cannot be written before training, not after: a base that is not a GGUF file,
    an unknown type, an adapter file of what llama.cpp's LoRA cannot express."""
    out = cfg.output
    if not (out.export_gguf_adapter or out.export_gguf):
        return
    from lora_jax import gguf_export
    from lora_jax.models import resolve

    keys = "output.export_gguf_adapter / output.export_gguf"
    if out.export_gguf is not None:
        try:
            gguf_export.check_merged_type(out.export_gguf)
        except ValueError as e:
            raise ConfigError(f"output.export_gguf: {e}") from None
    try:
        is_gguf = resolve(cfg.model.name).suffix.lower() == ".gguf"
    except (FileNotFoundError, OSError):
        is_gguf = str(cfg.model.name).lower().endswith(".gguf")
    if not is_gguf:
        raise ConfigError(
            f"{keys} need a GGUF base (model.name {cfg.model.name!r} is not a .gguf file): the "
            "file's tensor names, tokenizer and metadata are what the exports are written against"
        )
    if out.export_gguf_adapter:
        if cfg.train.method not in ("lora", "qlora"):
            raise ConfigError(
                f"output.export_gguf_adapter with train.method={cfg.train.method}: there are no "
                "adapters; use output.export_gguf"
            )
        if cfg.lora.use_dora:
            raise ConfigError(
                "output.export_gguf_adapter with lora.use_dora: llama.cpp's LoRA has no DoRA "
                "magnitude; use output.export_gguf (the merged model)"
            )
        if cfg.train.method == "qlora" and cfg.lora.init == "pissa":
            raise ConfigError(
                "output.export_gguf_adapter with lora.init=pissa and train.method=qlora: the adapters "
                "belong to the quantised PiSSA residual, not to the GGUF base; use "
                "output.export_gguf"
            )


def export_gguf(cfg: Config, folder: Path, adapters: Any, trained: Any, pissa_init: Any, say) -> None:
    """Write ``adapter.gguf`` (llama.cpp LoRA) and / or ``merged.gguf`` (with ``merged_gguf_errors.json``, the
    re-quantisation error of every changed tensor) against the run's GGUF base."""
    from lora_jax import gguf_export
    from lora_jax.models import resolve

    base = resolve(cfg.model.name)
    if pissa_init is not None:  # stated against the original base, as for PEFT
        adapters = pissa_to_lora(adapters, pissa_init)
    if cfg.output.export_gguf_adapter:
        gguf_export.save_gguf_adapter(adapters, folder / GGUF_ADAPTER, base=base, name=f"{folder.name} LoRA")
        say(
            f"exported llama.cpp LoRA adapter to {folder / GGUF_ADAPTER} (llama-cli -m {base} --lora "
            f"{folder / GGUF_ADAPTER})"
        )
    if cfg.output.export_gguf:
        rep = gguf_export.save_merged_gguf(
            adapters,
            folder / GGUF_MERGED,
            base=base,
            type=cfg.output.export_gguf,
            trained=trained if jax.tree.leaves(trained) else None,
        )
        (folder / GGUF_MERGED_REPORT).write_text(
            json.dumps(
                {
                    "type": cfg.output.export_gguf,
                    "types": rep.types,
                    "errors": {p: dataclasses.asdict(e) | {"relative": e.relative} for p, e in rep.errors.items()},
                },
                indent=1,
                default=float,
            )
        )
        worst = rep.worst()
        say(
            f"exported merged GGUF ({cfg.output.export_gguf}) to {folder / GGUF_MERGED}"
            + (
                f"; worst re-quantisation error rms {worst[1].rms:.3g} = {worst[1].relative:.2f} x the update's rms "
                f"({worst[0]})"
                if worst
                else ""
            )
        )


def _fmt(d: dict) -> str:
    return ", ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}" for k, v in d.items())
