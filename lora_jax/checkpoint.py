"""Orbax checkpoints of adapters and of training state.

- :func:`save_adapters` / :func:`load_adapters` (also ``lora.save_adapters`` / ``lora.load_adapters``): an
  adapter tree on its own (a few MB for a 100M-parameter model), with its static metadata (rank, alpha, scale,
  axis layout) in a JSON file beside the arrays, so it restores without the code that created it. Given
  ``like=`` (the adapter tree the caller expects), a checkpoint of another rank or layout is refused with the
  adapter path and both shapes.
- :func:`save_trained_params` / :func:`load_trained_params`: leaves trained in full beside the adapters (a new
  classification head), read back into the structure of a template. (``save_trained`` / ``load_trained`` are
  their old names, kept as deprecated aliases.)
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

from lora_jax.core import LoraAdapter, adapter_items
from lora_jax.errors import CheckpointError
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
        path: {
            "r": ad.r,
            "alpha": ad.alpha,
            "scale": ad.scale,
            "in_shape": list(ad.in_shape),
            "out_shape": list(ad.out_shape),
            "dropout": ad.dropout,
            "dtype": str(ad.a.dtype),
            **({"dora": True} if ad.is_dora else {}),
        }
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
        raise CheckpointError(
            f"{where}: expected a non-empty mapping of kernel paths to adapter records, got {type(meta).__name__}"
        )

    def bad(path, field, value, expected):
        text = repr(value)
        raise CheckpointError(
            f"{where}: {path}: {field} must be {expected}, got {text if len(text) < 60 else text[:57] + '...'}"
        )

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
            if (
                not isinstance(v, list)
                or not v
                or any(isinstance(d, bool) or not isinstance(d, int) or not 1 <= d <= 2**31 - 1 for d in v)
                or math.prod(v) > 2**40
            ):
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
        put(
            tree,
            path,
            LoraAdapter(
                jax.ShapeDtypeStruct((d_in, m["r"]), dtype),
                jax.ShapeDtypeStruct((m["r"], d_out), dtype),
                alpha=float(m["alpha"]),
                scale=float(m["scale"]),
                in_shape=tuple(m["in_shape"]),
                out_shape=tuple(m["out_shape"]),
                dropout=float(m["dropout"]),
                magnitude=jax.ShapeDtypeStruct((d_out,), dtype) if m.get("dora") else None,
            ),
        )
    return tree


def _saved_shapes(metadata: Any) -> dict[str, tuple[int, ...]]:
    """``{'a/b/c': shape}`` of the arrays an Orbax checkpoint's metadata lists (empty if it lists none)."""
    tree = getattr(metadata, "item_metadata", metadata)
    tree = getattr(tree, "tree", tree)
    flat = jax.tree_util.tree_flatten_with_path(tree, is_leaf=lambda x: hasattr(x, "shape") and hasattr(x, "dtype"))[0]
    from lora_jax.targets import path_str

    return {path_str(p): tuple(x.shape) for p, x in flat if hasattr(x, "shape")}


def _shape_mismatches(saved: dict[str, tuple[int, ...]], target: Any, where: str, keys: bool = True) -> None:
    """Raise :class:`CheckpointError` naming each array whose saved shape differs from the expected one (with
    ``keys``, also each that one side lacks), instead of Orbax's advice to restore with ``strict=False``."""
    if not saved:
        return
    from lora_jax.targets import path_str

    flat = jax.tree_util.tree_flatten_with_path(target)[0]
    want = {path_str(p): tuple(np.shape(x)) for p, x in flat}
    diff = [f"{p}: saved {saved[p]}, expected {want[p]}" for p in want if p in saved and saved[p] != want[p]]
    if keys:
        diff += [f"{p}: not in the checkpoint (expected {want[p]})" for p in want if p not in saved]
        diff += [f"{p}: saved {saved[p]}, not expected" for p in saved if p not in want]
    if diff:
        raise CheckpointError(
            f"{where} does not fit the tree it is restored into ({len(diff)} difference(s)): "
            + "; ".join(diff[:6])
            + (" ..." if len(diff) > 6 else "")
            + ". A different rank or targets than the run that wrote it? Restore with the same "
            "settings, or load the adapters on their own (lora.load_adapters(folder))."
        )


def _check_like(meta: dict, like: Any, where: str) -> None:
    """``like`` (an adapter tree) against the saved metadata: each adapter path and its A / B shapes."""
    got = {p: ad for p, ad in adapter_items(like)}
    saved = abstract_adapters(meta)
    saved_items = dict(adapter_items(saved))
    diff = []
    for p in sorted(set(got) | set(saved_items)):
        if p not in saved_items:
            diff.append(f"{p}: not in the checkpoint")
        elif p not in got:
            diff.append(f"{p}: in the checkpoint (r={saved_items[p].r}) but not expected")
        else:
            s, g = saved_items[p], got[p]
            if (tuple(s.a.shape), tuple(s.b.shape)) != (tuple(np.shape(g.a)), tuple(np.shape(g.b))):
                diff.append(
                    f"{p}: saved A {tuple(s.a.shape)} / B {tuple(s.b.shape)} (r={s.r}), expected "
                    f"A {tuple(np.shape(g.a))} / B {tuple(np.shape(g.b))} (r={g.r})"
                )
    if diff:
        raise CheckpointError(
            f"{where}: the saved adapters do not fit the expected tree ({len(diff)} "
            f"difference(s)): " + "; ".join(diff[:6]) + (" ..." if len(diff) > 6 else "")
        )


def load_adapters(folder: str | Path, like: Any = None) -> Any:
    """Read an adapter tree written by :func:`save_adapters`.

    ``like``: optionally the adapter tree the caller expects (e.g. ``lora.init(params, r=4)``); an adapter path
    that differs in rank or shape, or is missing on either side, raises :class:`CheckpointError` naming it and
    both shapes. Without it the tree is rebuilt from the saved metadata alone."""
    folder = Path(folder).absolute()
    meta_path = folder / META_FILE
    if not meta_path.is_file():
        raise CheckpointError(f"{folder} holds no adapter checkpoint ({META_FILE} missing)")
    try:
        meta = json.loads(meta_path.read_text())
    except (ValueError, OSError, RecursionError) as e:
        raise CheckpointError(f"{meta_path} is corrupt: {e}") from None
    check_metadata(meta, str(meta_path))
    if like is not None:
        _check_like(meta, like, str(folder))
    try:
        with ocp.StandardCheckpointer() as ckpt:
            restored = ckpt.restore(folder / "arrays", abstract_adapters(meta))
    except Exception as e:
        raise CheckpointError(
            f"could not restore adapters from {folder / 'arrays'}: {type(e).__name__}: {_first_line(e)}"
        ) from e
    return check_tree(restored, str(folder / "arrays"))  # a NaN / inf factor: one error naming it


def save_trained_params(folder: str | Path, tree: Any) -> Path:
    """Write leaves trained in full (a nested dict of arrays, e.g. a classifier head) with Orbax to ``folder``
    (replaced if it exists); returns the absolute folder. Read back with :func:`load_trained_params`."""
    folder = Path(folder).absolute()
    with ocp.StandardCheckpointer() as ckpt:
        ckpt.save(folder, tree, force=True)
    return folder


def load_trained_params(folder: str | Path, like: Any) -> Any:
    """Read what :func:`save_trained_params` wrote, into the structure, shapes and dtypes of ``like`` (a tree of
    arrays or ``ShapeDtypeStruct``). Raises :class:`CheckpointError` naming the folder when it is missing, and
    each array whose saved shape differs from ``like``'s (both shapes)."""
    folder = Path(folder).absolute()
    if not folder.is_dir():
        raise CheckpointError(f"{folder} holds no trained parameters (the folder is missing)")
    target = jax.tree.map(lambda x: jax.ShapeDtypeStruct(np.shape(x), x.dtype), like)
    try:
        with _quiet_absl(), ocp.StandardCheckpointer() as ckpt:
            saved = _saved_shapes(ckpt.metadata(folder))
    except Exception:  # unreadable metadata: the restore below reports it
        saved = {}
    _shape_mismatches(saved, target, f"could not restore trained parameters from {folder}: the checkpoint")
    try:
        with _quiet_absl(), ocp.StandardCheckpointer() as ckpt:
            restored = ckpt.restore(folder, target)
    except Exception as e:
        raise CheckpointError(
            f"could not restore trained parameters from {folder}: {type(e).__name__}: {_first_line(e)}"
        ) from e
    return check_tree(restored, str(folder))


# The old names (train/, tests): deprecated aliases of the functions above.
save_trained = save_trained_params
load_trained = load_trained_params


class Checkpointer:
    """Training-state checkpoints (``lora.TrainStateCheckpointer``): ``{"trainable", "opt_state"}`` arrays plus a
    JSON ``meta`` record per step."""

    def __init__(self, folder: str | Path, *, every: int = 100, keep: int = 2, primary: bool = True):
        self.folder = Path(folder).absolute()
        self.every = every
        options = ocp.CheckpointManagerOptions(
            max_to_keep=keep, save_interval_steps=1, create=True, enable_async_checkpointing=False
        )
        with _quiet_absl():  # (damaged step metadata is reported when the step is restored)
            self.manager = ocp.CheckpointManager(self.folder, options=options)

    def should_save(self, step: int) -> bool:
        return step % self.every == 0

    def save(self, step: int, trainable: Any, opt_state: Any, meta: dict) -> None:
        self.manager.save(
            step,
            args=ocp.args.Composite(
                state=ocp.args.StandardSave({"trainable": trainable, "opt_state": opt_state}),
                meta=ocp.args.JsonSave(meta),
            ),
            force=True,
        )
        self.manager.wait_until_finished()

    def steps(self) -> list[int]:
        return sorted(self.manager.all_steps())

    def check_shapes(self, step: int, trainable_like: Any, opt_state_like: Any) -> None:
        """Raise :class:`CheckpointError` naming each array of ``step`` whose saved shape differs from the
        target's (a rank-8 run resumed as rank 4): a mismatch, not damage, so :meth:`restore_latest` does not
        fall back past it."""
        try:
            with _quiet_absl():
                saved = _saved_shapes(self.manager.item_metadata(step)["state"])
        except Exception:  # damaged metadata: restore reports it
            return
        _shape_mismatches(
            saved,
            {"trainable": trainable_like, "opt_state": opt_state_like},
            f"checkpoint step {step} in {self.folder}",
            keys=False,
        )

    def restore(self, step: int, trainable_like: Any, opt_state_like: Any) -> tuple[Any, Any, dict]:
        self.check_shapes(step, trainable_like, opt_state_like)
        target = _abstract({"trainable": trainable_like, "opt_state": opt_state_like})
        try:
            with _quiet_absl():  # a damaged step: the error below says it in one line
                out = self.manager.restore(
                    step, args=ocp.args.Composite(state=ocp.args.StandardRestore(target), meta=ocp.args.JsonRestore())
                )
        except Exception as e:
            raise CheckpointError(
                f"checkpoint step {step} in {self.folder} cannot be restored: {type(e).__name__}: {_first_line(e)}"
            ) from e
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
            self.check_shapes(step, trainable_like, opt_state_like)  # a mismatch is the caller's, not damage
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
            raise CheckpointError(
                f"no checkpoint in {self.folder} could be restored (steps "
                f"{', '.join(map(str, damaged))} are damaged; newest: {errors[0]})"
            )
        return None

    def close(self) -> None:
        self.manager.close()
