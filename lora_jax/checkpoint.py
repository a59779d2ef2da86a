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

import contextlib
import json
import logging
import time
from pathlib import Path
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp

from lora_jax.errors import CheckpointError
from lora_jax.core import LoraAdapter, adapter_items
from lora_jax.tree import put
from lora_jax.untrusted import check_tree

META_FILE = "lora_adapters.json"




@contextlib.contextmanager
def _quiet_absl():
    """Orbax logs a damaged file through absl at ERROR level before raising; the raised error is reported."""
    logger = logging.getLogger("absl")
    level = logger.level
    logger.setLevel(logging.CRITICAL)
    try:
        yield
    finally:
        logger.setLevel(level)


def _first_line(e: BaseException, limit: int = 200) -> str:
    """The gist of an Orbax / TensorStore error (whose full text can run to hundreds of lines of specs)."""
    lines = [line.strip() for line in str(e).splitlines() if line.strip()]
    text = lines[0] if lines else type(e).__name__
    return text if len(text) <= limit else text[: limit - 4] + " ..."


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


_DTYPES = ("float32", "bfloat16", "float16", "float64")


def check_metadata(meta: Any, where: str) -> dict:
    """Validate an adapter metadata record read from a file (untrusted): a mapping of kernel paths to ``r`` (an
    integer >= 1), finite ``alpha`` and ``scale``, positive integer shapes, a dropout in [0, 1) and a float dtype.
    Raises :class:`CheckpointError` naming the file, the path and the field."""
    import math

    if not isinstance(meta, dict) or not meta:
        raise CheckpointError(f"{where}: expected a non-empty mapping of kernel paths to adapter records, got "
                              f"{type(meta).__name__}")

    def bad(path, field, value, expected):
        text = repr(value)
        raise CheckpointError(f"{where}: {path}: {field} must be {expected}, got "
                              f"{text if len(text) < 60 else text[:57] + '...'}")

    for path, m in meta.items():
        if not isinstance(path, str) or not path or any(not p for p in path.split("/")):
            bad("a key", "the kernel path", path, "a '/'-joined path")
        if not isinstance(m, dict):
            bad(path, "the record", m, "a mapping")
        for field in ("r", "alpha", "scale", "in_shape", "out_shape", "dtype"):
            if field not in m:
                bad(path, field, None, "present")
        r = m["r"]
        if isinstance(r, bool) or not isinstance(r, int) or not 1 <= r <= 2**31 - 1:
            bad(path, "r", r, "an integer >= 1")
        for field in ("alpha", "scale"):
            v = m[field]
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
                bad(path, field, v, "a finite number")
        for field in ("in_shape", "out_shape"):
            v = m[field]
            if not isinstance(v, list) or not v or any(isinstance(d, bool) or not isinstance(d, int) or not
                                                       1 <= d <= 2**31 - 1 for d in v) or math.prod(v) > 2**40:
                bad(path, field, v, "a non-empty list of positive integers")
        dropout = m.get("dropout", 0.0)
        if isinstance(dropout, bool) or not isinstance(dropout, (int, float)) or not 0 <= dropout < 1:
            bad(path, "dropout", dropout, "a number in [0, 1)")
        if m["dtype"] not in _DTYPES:
            bad(path, "dtype", m["dtype"], f"one of {list(_DTYPES)}")
        if not isinstance(m.get("dora", False), bool):
            bad(path, "dora", m["dora"], "true or false")
    return meta


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
    except (ValueError, OSError, RecursionError) as e:
        raise CheckpointError(f"{meta_path} is corrupt: {e}") from None
    check_metadata(meta, str(meta_path))
    try:
        with ocp.StandardCheckpointer() as ckpt:
            restored = ckpt.restore(folder / "arrays", abstract_adapters(meta))
    except Exception as e:
        raise CheckpointError(f"could not restore adapters from {folder / 'arrays'}: {type(e).__name__}: "
                              f"{_first_line(e)}") from e
    return check_tree(restored, str(folder / "arrays"))  # a NaN / inf factor: one error naming it


def save_trained(folder: str | Path, tree: Any) -> Path:
    """Write leaves trained in full (a nested dict of arrays, e.g. a classifier head) with Orbax to ``folder``
    (replaced if it exists); returns the absolute folder. Read back with :func:`load_trained`."""
    folder = Path(folder).absolute()
    with ocp.StandardCheckpointer() as ckpt:
        ckpt.save(folder, tree, force=True)
    return folder


def load_trained(folder: str | Path, like: Any) -> Any:
    """Read what :func:`save_trained` wrote, into the structure, shapes and dtypes of ``like`` (a tree of arrays
    or ``ShapeDtypeStruct``). Raises :class:`CheckpointError` naming the folder when it is missing or does not
    hold that tree."""
    folder = Path(folder).absolute()
    if not folder.is_dir():
        raise CheckpointError(f"{folder} holds no trained parameters (the folder is missing)")
    target = jax.tree.map(lambda x: jax.ShapeDtypeStruct(np.shape(x), x.dtype), like)
    try:
        with _quiet_absl(), ocp.StandardCheckpointer() as ckpt:
            restored = ckpt.restore(folder, target)
    except Exception as e:
        raise CheckpointError(f"could not restore trained parameters from {folder}: {type(e).__name__}: "
                              f"{_first_line(e)}") from e
    return check_tree(restored, str(folder))


class Checkpointer:
    """Training-state checkpoints: ``{"trainable", "opt_state"}`` arrays plus a JSON ``meta`` record per step."""

    def __init__(self, folder: str | Path, *, every: int = 100, keep: int = 2, primary: bool = True):
        self.folder = Path(folder).absolute()
        self.every = every
        options = ocp.CheckpointManagerOptions(max_to_keep=keep, save_interval_steps=1, create=True,
                                               enable_async_checkpointing=False)
        with _quiet_absl():  # (damaged step metadata is reported when the step is restored)
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
            with _quiet_absl():  # a damaged step: the error below says it in one line
                out = self.manager.restore(step, args=ocp.args.Composite(
                    state=ocp.args.StandardRestore(target), meta=ocp.args.JsonRestore()))
        except Exception as e:
            raise CheckpointError(f"checkpoint step {step} in {self.folder} cannot be restored: "
                                  f"{type(e).__name__}: {_first_line(e)}") from e
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
                with _quiet_absl():
                    restored = (step, *self.restore(step, trainable_like, opt_state_like))
            except CheckpointError as e:
                if not fallback:
                    raise
                errors.append(str(e))
                damaged.append(step)
                continue
            for e in errors:  # (when nothing restores, the error below says it all)
                warnings.warn(f"skipping damaged checkpoint: {e}", stacklevel=2)
            if damaged:
                aside = self.folder.parent / f"{self.folder.name}-damaged"
                if jax.process_index() == 0:
                    aside.mkdir(exist_ok=True)
                    for bad in damaged:
                        shutil.move(str(self.folder / str(bad)), str(aside / f"{bad}-{int(time.time())}"))
                self.manager.reload()
            return restored
        if errors:
            raise CheckpointError(f"no checkpoint in {self.folder} could be restored (steps "
                                  f"{', '.join(map(str, damaged))} are damaged; newest: {errors[0]})")
        return None

    def close(self) -> None:
        self.manager.close()
