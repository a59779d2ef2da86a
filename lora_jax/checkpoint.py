"""Orbax checkpoints of adapters and of training state.

- :func:`save_adapters` / :func:`load_adapters`: an adapter tree on its own (a few MB for a 100M-parameter
  model), with its static metadata (rank, alpha, scale, axis layout) in a JSON file beside the arrays, so it
  restores without the code that created it.
- :class:`Checkpointer`: an ``orbax.checkpoint.CheckpointManager`` for training: the trainable tree, the
  optimizer state and a JSON record (step, data position, ...) saved together every N steps. Orbax finalises a
  step atomically (it writes to a temporary folder and renames it), so a step interrupted while being written is
  never reported as the latest; a step whose files were damaged afterwards fails to restore with an error that
  names it, and :meth:`Checkpointer.restore_latest` can fall back to the previous step.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp

from lora_jax.errors import CheckpointError
from lora_jax.core import LoraAdapter, adapter_items
from lora_jax.tree import put

META_FILE = "lora_adapters.json"




def _abstract(tree: Any) -> Any:
    return jax.tree.map(ocp.utils.to_shape_dtype_struct, tree)


def adapter_metadata(adapters: Any) -> dict:
    return {
        path: {"r": ad.r, "alpha": ad.alpha, "scale": ad.scale, "in_shape": list(ad.in_shape),
               "out_shape": list(ad.out_shape), "dropout": ad.dropout, "dtype": str(ad.a.dtype),
               **({"dora": True} if ad.is_dora else {})}
        for path, ad in adapter_items(adapters)
    }


def save_adapters(folder: str | Path, adapters: Any, *, force: bool = True) -> Path:
    """Write ``adapters`` to ``folder`` (Orbax arrays + ``lora_adapters.json``). In a multi-process run every
    process calls this (Orbax coordinates the write); process 0 writes the metadata."""
    folder = Path(folder).absolute()
    with ocp.StandardCheckpointer() as ckpt:
        ckpt.save(folder / "arrays", adapters, force=force)
    if jax.process_index() == 0:
        (folder / META_FILE).write_text(json.dumps(adapter_metadata(adapters), indent=1))
    return folder


def abstract_adapters(meta: dict) -> dict:
    """A tree of ``LoraAdapter`` with ``ShapeDtypeStruct`` leaves, rebuilt from :func:`adapter_metadata`."""
    tree: dict = {}
    for path, m in meta.items():
        d_in, d_out = int(np.prod(m["in_shape"])), int(np.prod(m["out_shape"]))
        dtype = np.dtype(m["dtype"]) if m["dtype"] != "bfloat16" else jax.numpy.bfloat16
        put(tree, path, LoraAdapter(
            jax.ShapeDtypeStruct((d_in, m["r"]), dtype), jax.ShapeDtypeStruct((m["r"], d_out), dtype),
            alpha=float(m["alpha"]), scale=float(m["scale"]), in_shape=tuple(m["in_shape"]),
            out_shape=tuple(m["out_shape"]), dropout=float(m["dropout"]),
            magnitude=jax.ShapeDtypeStruct((d_out,), dtype) if m.get("dora") else None))
    return tree


def load_adapters(folder: str | Path) -> Any:
    """Read an adapter tree written by :func:`save_adapters`."""
    folder = Path(folder).absolute()
    meta_path = folder / META_FILE
    if not meta_path.is_file():
        raise CheckpointError(f"{folder} holds no adapter checkpoint ({META_FILE} missing)")
    try:
        meta = json.loads(meta_path.read_text())
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{meta_path} is corrupt: {e}") from None
    try:
        with ocp.StandardCheckpointer() as ckpt:
            return ckpt.restore(folder / "arrays", abstract_adapters(meta))
    except Exception as e:
        raise CheckpointError(f"could not restore adapters from {folder / 'arrays'}: {type(e).__name__}: {e}") from e


class Checkpointer:
    """Training-state checkpoints: ``{"trainable", "opt_state"}`` arrays plus a JSON ``meta`` record per step."""

    def __init__(self, folder: str | Path, *, every: int = 100, keep: int = 2, primary: bool = True):
        self.folder = Path(folder).absolute()
        self.every = every
        options = ocp.CheckpointManagerOptions(max_to_keep=keep, save_interval_steps=1, create=True,
                                               enable_async_checkpointing=False)
        self.manager = ocp.CheckpointManager(self.folder, options=options)

    def should_save(self, step: int) -> bool:
        return step % self.every == 0

    def save(self, step: int, trainable: Any, opt_state: Any, meta: dict) -> None:
        self.manager.save(step, args=ocp.args.Composite(
            state=ocp.args.StandardSave({"trainable": trainable, "opt_state": opt_state}),
            meta=ocp.args.JsonSave(meta)), force=True)
        self.manager.wait_until_finished()

    def steps(self) -> list[int]:
        return sorted(self.manager.all_steps())

    def restore(self, step: int, trainable_like: Any, opt_state_like: Any) -> tuple[Any, Any, dict]:
        target = _abstract({"trainable": trainable_like, "opt_state": opt_state_like})
        try:
            out = self.manager.restore(step, args=ocp.args.Composite(
                state=ocp.args.StandardRestore(target), meta=ocp.args.JsonRestore()))
        except Exception as e:
            raise CheckpointError(f"checkpoint step {step} in {self.folder} cannot be restored: "
                                  f"{type(e).__name__}: {e}") from e
        return out["state"]["trainable"], out["state"]["opt_state"], dict(out["meta"])

    def restore_untyped(self, step: int) -> Any:
        """The arrays of ``step`` as nested dicts, without a target structure (for inspection)."""
        return self.manager.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore()))["state"]

    def restore_latest(self, trainable_like: Any, opt_state_like: Any, *, fallback: bool = True):
        """The newest restorable step as ``(step, trainable, opt_state, meta)``, or ``None`` if there is none.

        With ``fallback``, a damaged newest step is reported (a warning), moved aside to
        ``<folder>-damaged/<step>`` (kept for inspection, never deleted) and the previous step is tried.
        """
        import shutil
        import warnings

        errors, damaged = [], []
        for step in reversed(self.steps()):
            try:
                restored = (step, *self.restore(step, trainable_like, opt_state_like))
            except CheckpointError as e:
                if not fallback:
                    raise
                errors.append(str(e))
                damaged.append(step)
                warnings.warn(f"skipping damaged checkpoint: {e}", stacklevel=2)
                continue
            if damaged:
                aside = self.folder.parent / f"{self.folder.name}-damaged"
                if jax.process_index() == 0:
                    aside.mkdir(exist_ok=True)
                    for bad in damaged:
                        shutil.move(str(self.folder / str(bad)), str(aside / f"{bad}-{int(time.time())}"))
                self.manager.reload()
            return restored
        if errors:
            raise CheckpointError("no checkpoint could be restored:\n" + "\n".join(errors))
        return None

    def close(self) -> None:
        self.manager.close()
