"""Hugging Face checkpoint folders: read config / weights / tokenizer, write them back.

A folder in the Hugging Face layout holds

    config.json                        read with ``transformers.AutoConfig`` (no torch needed)
    model.safetensors                  or, sharded:
    model.safetensors.index.json       {"weight_map": {tensor name: shard file}} + model-0000i-of-0000n.safetensors
    tokenizer files                    read with ``transformers.AutoTokenizer``

Weights are read with the ``safetensors`` numpy API, lazily: :class:`SafetensorsWeights` is a
``Mapping[str, np.ndarray]`` over the tensor names that reads a tensor when it is asked for. Nothing here
imports torch. :func:`save_pretrained` writes the same layout, so ``transformers``' PyTorch
``AutoModel.from_pretrained(folder)`` loads what this project saves.

Hub ids are fetched with ``huggingface_hub.snapshot_download`` (config, safetensors and tokenizer files only);
without network (or with ``HF_HUB_OFFLINE=1``) that fails with an error that says so and that a local folder
works instead.

:func:`from_hf_weights` / :func:`to_hf_weights` are the one converter between checkpoint tensors and a
family's parameters, for every family: they read the family's declaration
(:class:`lora_jax.models.arch.Architecture`: its tasks, name rule and layouts).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import re
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import numpy as np

from lora_jax import tree
from lora_jax.errors import CheckpointError
from lora_jax.untrusted import check_array

logger = logging.getLogger("lora_jax.models")

WEIGHTS_NAME = "model.safetensors"
INDEX_NAME = "model.safetensors.index.json"
HUB_PATTERNS = ["config.json", "generation_config.json", "*.safetensors", "*.safetensors.index.json",
                "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.txt", "vocab.json",
                "merges.txt", "tokenizer.model", "added_tokens.json", "*.tiktoken"]
DEFAULT_MAX_SHARD_SIZE = 5 * 1024**3


# ------------------------------------------------------------------------------------------- weights


def _open_safetensors(file: Path):
    from safetensors import safe_open

    if not file.is_file():
        raise CheckpointError(f"{file}: weights file not found")
    try:
        return safe_open(str(file), framework="np")
    except Exception as e:  # safetensors raises its own SafetensorError (an Exception subclass)
        raise CheckpointError(f"{file}: not a readable safetensors file ({e}); it may be truncated or corrupt, "
                              "re-download or re-save it") from None


class SafetensorsWeights(Mapping):
    """A lazy ``Mapping[str, np.ndarray]`` over one or more safetensors files.

    Args:
      files: ``{tensor name: file}``; each file is opened once, on first use. For a single file pass
        :meth:`from_file`, for a sharded checkpoint :meth:`from_index`.
      source: what errors call this checkpoint (the file or the index).
    """

    def __init__(self, files: Mapping[str, Path], source: str):
        self._where = dict(files)
        self._handles: dict[Path, Any] = {}
        self.source = source

    @classmethod
    def from_file(cls, file: str | os.PathLike) -> SafetensorsWeights:
        file = Path(file)
        handle = _open_safetensors(file)
        self = cls({name: file for name in handle.keys()}, str(file))
        self._handles[file] = handle
        return self

    @classmethod
    def from_index(cls, index_file: str | os.PathLike) -> SafetensorsWeights:
        index_file = Path(index_file)
        try:
            weight_map = json.loads(index_file.read_text())["weight_map"]
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise CheckpointError(f"{index_file}: not a safetensors index with a 'weight_map' ({e})") from None
        if not isinstance(weight_map, dict) or not weight_map:
            raise CheckpointError(f"{index_file}: 'weight_map' must map tensor names to shard files, got "
                                  f"{type(weight_map).__name__} {str(weight_map)[:80]}")
        shards = {f: index_file.parent / f for f in set(weight_map.values())}
        for f, path in shards.items():
            if not path.is_file():
                raise CheckpointError(f"{index_file}: shard {f!r} listed in the index is missing ({path})")
        return cls({name: shards[f] for name, f in weight_map.items()}, str(index_file))

    def _handle(self, file: Path):
        if file not in self._handles:
            self._handles[file] = _open_safetensors(file)
        return self._handles[file]

    def source_of(self, name: str) -> str:
        """The file that holds tensor ``name``."""
        return str(self._where[name])

    def shape(self, name: str) -> tuple[int, ...]:
        """The shape of tensor ``name`` without reading it."""
        return tuple(self._handle(self._where[name]).get_slice(name).get_shape())

    def __getitem__(self, name: str) -> np.ndarray:
        file = self._where[name]  # KeyError for an unknown name, as a Mapping should
        handle = self._handle(file)
        try:
            return handle.get_tensor(name)
        except Exception as e:
            raise CheckpointError(f"{file}: cannot read tensor {name!r} ({e}); the index and the shard disagree "
                                  "or the file is corrupt") from None

    def __iter__(self) -> Iterator[str]:
        return iter(self._where)

    def __len__(self) -> int:
        return len(self._where)

    def __contains__(self, name: object) -> bool:
        return name in self._where


def open_weights(folder: str | os.PathLike) -> SafetensorsWeights:
    """The lazy tensors of a Hugging Face folder: ``model.safetensors``, else ``model.safetensors.index.json``."""
    folder = Path(folder)
    if (folder / WEIGHTS_NAME).is_file():
        return SafetensorsWeights.from_file(folder / WEIGHTS_NAME)
    if (folder / INDEX_NAME).is_file():
        return SafetensorsWeights.from_index(folder / INDEX_NAME)
    others = sorted(p.name for p in folder.glob("*") if p.suffix in (".safetensors", ".bin", ".pt", ".h5",
                                                                     ".msgpack", ".gguf"))
    hint = ""
    if others:
        hint = (f" It has {others}: only safetensors is read here (convert PyTorch .bin files with "
                "transformers' save_pretrained(..., safe_serialization=True)).")
    raise CheckpointError(f"{folder}: no {WEIGHTS_NAME} or {INDEX_NAME} in this folder.{hint}")


# ------------------------------------------------------------------------------------ config / tokenizer


def read_config(folder: str | os.PathLike):
    """``transformers.AutoConfig`` of a folder, with errors that name the folder."""
    import transformers

    folder = Path(folder)
    file = folder / "config.json"
    if not file.is_file():
        raise CheckpointError(f"{folder}: no config.json (expected a Hugging Face model folder)")
    try:
        return transformers.AutoConfig.from_pretrained(str(folder))
    except (ValueError, KeyError, TypeError, OSError) as e:
        try:
            model_type = json.loads(file.read_text()).get("model_type")
        except ValueError:
            raise CheckpointError(f"{file}: not valid JSON ({e})") from None
        raise CheckpointError(f"{file}: transformers cannot read this config (model_type {model_type!r}): "
                              f"{str(e).splitlines()[0]}") from None


def load_tokenizer(folder: str | os.PathLike):
    """``transformers.AutoTokenizer`` of a folder, or ``None`` when it has no tokenizer files."""
    import transformers

    folder = Path(folder)
    if not any((folder / f).is_file() for f in ("tokenizer.json", "tokenizer_config.json", "vocab.txt",
                                                 "tokenizer.model", "vocab.json")):
        return None
    return transformers.AutoTokenizer.from_pretrained(str(folder))


# -------------------------------------------------------------------------------------------------- hub

_HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*(/[\w.-]+)?")


def is_hub_id(name: str) -> bool:
    """Whether ``name`` has the shape of a hub repository id (``org/name`` or ``name``)."""
    return bool(_HUB_ID.fullmatch(name)) and not name.endswith((".gguf", ".safetensors", ".json"))


def fetch(repo_id: str, revision: str | None = None) -> Path:
    """Download (or find in the local cache) the config, safetensors and tokenizer files of a hub repo.

    Raises ``OSError`` saying the id could not be fetched and that a local path works, e.g. without network
    or with ``HF_HUB_OFFLINE=1`` and nothing cached.
    """
    import huggingface_hub

    try:
        return Path(huggingface_hub.snapshot_download(repo_id, revision=revision, allow_patterns=HUB_PATTERNS))
    except Exception as e:
        offline = os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes", "on")
        raise OSError(
            f"could not fetch {repo_id!r} from the Hugging Face hub"
            f"{' (HF_HUB_OFFLINE is set and it is not in the local cache)' if offline else ''}: "
            f"{type(e).__name__}: {(str(e).splitlines() or [''])[0].rstrip('.')}. "
            "Pass a local path instead: a folder with config.json and model.safetensors (and tokenizer files), "
            "or a .gguf file.") from None


# ------------------------------------------------------------------------------------------------- save


def parse_size(size: int | str) -> int:
    """Bytes from ``123``, ``"500MB"``, ``"5GB"``, ``"10KiB"``."""
    if isinstance(size, (int, np.integer)):
        return int(size)
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]?)(i?)B?\s*", str(size), re.IGNORECASE)
    if not m:
        raise ValueError(f"max_shard_size must be bytes or a string like '5GB', got {size!r}")
    base = 1024 if m.group(3) else 1000
    return int(float(m.group(1)) * base ** " KMGT".index(m.group(2).upper() or " "))


def _shard(tensors: Mapping[str, np.ndarray], max_bytes: int) -> list[dict[str, np.ndarray]]:
    shards: list[dict[str, np.ndarray]] = [{}]
    size = 0
    for name, x in tensors.items():
        if shards[-1] and size + x.nbytes > max_bytes:
            shards.append({})
            size = 0
        shards[-1][name] = x
        size += x.nbytes
    return shards


def write_safetensors(tensors: Mapping[str, np.ndarray], folder: str | os.PathLike,
                      max_shard_size: int | str = DEFAULT_MAX_SHARD_SIZE) -> list[Path]:
    """Write ``tensors`` as ``model.safetensors``, or as shards of at most ``max_shard_size`` bytes (a tensor
    larger than that gets a shard of its own) plus ``model.safetensors.index.json``. Weight files of an earlier
    save in ``folder`` are removed first, so that a stale ``model.safetensors`` cannot shadow new shards.
    Returns the files written."""
    from safetensors.numpy import save_file

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    for old in [folder / WEIGHTS_NAME, folder / INDEX_NAME, *folder.glob("model-*-of-*.safetensors")]:
        old.unlink(missing_ok=True)
    tensors = {k: np.ascontiguousarray(v) for k, v in tensors.items()}
    shards = _shard(tensors, parse_size(max_shard_size))
    meta = {"format": "pt"}  # transformers' loader requires a framework tag
    if len(shards) == 1:
        save_file(shards[0], str(folder / WEIGHTS_NAME), metadata=meta)
        return [folder / WEIGHTS_NAME]
    files, weight_map = [], {}
    for i, shard in enumerate(shards, 1):
        name = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
        save_file(shard, str(folder / name), metadata=meta)
        files.append(folder / name)
        weight_map.update({k: name for k in shard})
    index = {"metadata": {"total_size": int(sum(x.nbytes for x in tensors.values()))}, "weight_map": weight_map}
    (folder / INDEX_NAME).write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")
    return [*files, folder / INDEX_NAME]


def save_pretrained(params: Mapping, config: Any, folder: str | os.PathLike, tokenizer: Any = None,
                    max_shard_size: int | str = DEFAULT_MAX_SHARD_SIZE) -> Path:
    """Write ``params`` as a Hugging Face folder that ``transformers.AutoModel.from_pretrained`` loads.

    Args:
      params: plain parameters (merge LoRA adapters first with ``lora.merge``).
      config: the family's ``Config`` (its declaration gives the names, layouts and ``transformers`` class).
      folder: created if needed.
      tokenizer: a ``transformers`` tokenizer to save alongside, or ``None``.
      max_shard_size: shard the weights above this size (bytes or ``"5GB"``).

    Returns the folder.
    """
    from lora_jax.models import arch as arch_lib

    arch = arch_lib.for_config(config)
    tensors = to_hf_weights(params, config)
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    hf_config = config.to_hf()
    hf_config.architectures = [arch.hf_class(hf_config, arch.task_of(set(params)))]
    dtypes = {str(x.dtype) for x in tensors.values() if x.dtype.kind == "f" or x.dtype.name == "bfloat16"}
    if len(dtypes) == 1:
        hf_config.dtype = dtypes.pop()
    hf_config.save_pretrained(str(folder))
    write_safetensors(tensors, folder, max_shard_size)
    if tokenizer is not None:
        tokenizer.save_pretrained(str(folder))
    return folder


# ------------------------------------------------------------------------------------------ converter


def _summary(config: Any) -> str:
    """The integer fields of a config, for errors that say which config produced an expected shape."""
    return ", ".join(f"{f.name}={getattr(config, f.name)}" for f in dataclasses.fields(config)
                     if type(getattr(config, f.name)) is int)


def _hf_shapes(layout, shape: tuple[int, ...]) -> list[tuple[int, ...]]:
    """The checkpoint shapes of a leaf of ``shape`` (computed on a zero-strided view: nothing allocated)."""
    return [tuple(x.shape) for x in layout.save(np.broadcast_to(np.zeros((), np.float32), shape))]


def _is_float(x: np.ndarray) -> bool:
    return x.dtype.kind == "f" or x.dtype.name == "bfloat16"


def from_hf_weights(config: Any, tensors: Mapping[str, np.ndarray], source: str, task: str | None = None, *,
                    key: Any = None, new: list | None = None) -> dict:
    """The parameters of ``config``'s family for ``task`` from checkpoint tensors (names as in the checkpoint).

    The backbone may be stored with its prefix (the task's ``backbone``, e.g. ``model.``: saved from a task
    class) or without (saved from the bare backbone); both load into any task. ``task=None`` picks the task
    whose head the checkpoint has, else the family's default.

    A leaf the checkpoint lacks raises :class:`~lora_jax.errors.CheckpointError` naming the tensor and
    ``source``, except the task's new head (and ``optional`` leaves), which are initialised from ``key``
    (default ``jax.random.key(0)``), logged, and their paths appended to ``new``. A wrong shape or a non-float
    tensor raises too. Unused tensors of the backbone (a checkpoint deeper than the config) raise; other unused
    tensors (the head of another task) are logged; declared buffers and a tied output head are ignored.
    Returns arrays in the checkpoint's dtype.
    """
    import jax
    import jax.numpy as jnp

    from lora_jax.models import arch as arch_lib

    arch = arch_lib.for_config(config)
    names = list(tensors.keys())
    task = arch.detect_task(config, names) if task is None else arch.task(task)
    t = arch.tasks[task]
    prefix = arch.checkpoint_prefix(names)
    where = getattr(tensors, "source_of", None)
    expected = arch.shapes(config, task)
    initialise = [re.compile(p) for p in t.head + t.optional]
    params, fresh, used = {}, [], set()
    for path, spec in expected.items():
        ways = arch.names.candidates(arch.checkpoint_path(path, task, prefix), config)
        spec_t = next((w for w in ways if all(n in tensors for n in w.names)), ways[0])
        missing = [n for n in spec_t.names if n not in tensors]
        if missing:
            if any(r.fullmatch(tree.join(path)) for r in initialise):
                fresh.append(path)
                continue
            similar = [n for n in names if n.endswith(missing[0].split(".", 1)[-1])][:3]
            raise CheckpointError(
                f"{source}: missing tensor {missing[0]!r} (for parameter {tree.join(path)}, shape "
                f"{_hf_shapes(spec_t.layout, spec.shape)[0]}) of a {arch.name} {task} model ({_summary(config)}); "
                f"the checkpoint has {len(names)} tensors{f', e.g. {similar}' if similar else ''}. Is the config "
                "from the same model?")
        arrays = [np.asarray(tensors[n]) for n in spec_t.names]
        wants = _hf_shapes(spec_t.layout, spec.shape)
        for n, x, want in zip(spec_t.names, arrays, wants):
            if tuple(x.shape) != want:
                raise CheckpointError(
                    f"{where(n) if where else source}: tensor {n!r} has shape {tuple(x.shape)}, expected {want} for "
                    f"{tree.join(path)} of a {arch.name} {task} model ({_summary(config)})")
            if not _is_float(x):
                raise CheckpointError(f"{source}: tensor {n!r} has dtype {x.dtype}, expected a float tensor")
            check_array(x, n, where(n) if where else source)  # NaN / inf weights: one error naming the tensor
        params[path] = jnp.asarray(np.ascontiguousarray(spec_t.layout.load(arrays)))
        used.update(spec_t.names)

    if fresh:
        init = tree.flatten(arch.init_params(config, jax.random.key(0) if key is None else key, task))
        for path in fresh:
            params[path] = init[path]
        if new is not None:
            new.extend(fresh)
        logger.warning("%s: no %s in the checkpoint; initialised new parameters %s for task %r (train them)",
                       source, sorted({arch.names.module(p) for p in fresh}), [tree.join(p) for p in fresh], task)

    strip = lambda n: n[len(prefix) + 1:] if prefix and n.startswith(prefix + ".") else n  # noqa: E731
    unused = [n for n in names if n not in used and not arch.names.is_ignored(strip(n), config)]
    backbone_modules = {strip(arch.names.hf_name(arch.checkpoint_path(p, task, prefix))).split(".")[0]
                        for p in expected if t.backbone is None or p[0] == t.backbone}
    in_backbone = [n for n in unused if strip(n).split(".")[0] in backbone_modules]
    if in_backbone:
        raise CheckpointError(f"{source}: {len(in_backbone)} tensor(s) of the backbone do not fit this {arch.name} "
                              f"config ({_summary(config)}): {in_backbone[:5]}")
    if unused:
        logger.warning("%s: %d tensor(s) not used by the %s %s model: %s%s", source, len(unused), arch.name, task,
                       unused[:8], " ..." if len(unused) > 8 else "")
    return tree.unflatten(params)


def to_hf_weights(params: Mapping, config: Any) -> dict[str, np.ndarray]:
    """Checkpoint names and layouts for the parameters of any task of ``config``'s family (the task is read
    from the params' top-level keys), as that task's ``transformers`` class saves them. LoRA-wrapped params
    raise: save ``lora.merge(params, adapters)``."""
    from lora_jax.core import is_adapter, is_lora_weight
    from lora_jax.models import arch as arch_lib

    arch = arch_lib.for_config(config)
    flat = tree.flatten(params)
    wrapped = [p for p, v in flat.items() if is_lora_weight(v) or is_adapter(v)]
    if wrapped:
        raise ValueError(f"to_hf_weights: params hold LoRA-wrapped kernels {[tree.join(p) for p in wrapped][:3]}; "
                         "save lora.merge(params, adapters) instead")
    task = arch.task_of(set(params))
    expected = arch.shapes(config, task) if task is not None else {}
    optional = [re.compile(p) for p in arch.tasks[task].optional] if task is not None else []
    missing = sorted(tree.join(p) for p in set(expected) - set(flat)
                     if not any(r.fullmatch(tree.join(p)) for r in optional))
    extra = sorted(tree.join(p) for p in set(flat) - set(expected))
    if missing or extra:
        raise ValueError(f"to_hf_weights: params do not match a {arch.name} {task} model of this config: missing "
                         f"{missing[:5]}, unexpected {extra[:5]}")
    out = {}
    for path, spec in expected.items():
        if path not in flat:
            continue
        x = np.asarray(flat[path])
        if tuple(x.shape) != tuple(spec.shape):
            raise ValueError(f"to_hf_weights: {tree.join(path)} has shape {tuple(x.shape)}, the config needs "
                             f"{tuple(spec.shape)}")
        spec_t = arch.names.tensor(path, config)
        for name, y in zip(spec_t.names, spec_t.layout.save(x), strict=True):
            out[name] = np.ascontiguousarray(y)
    return out
