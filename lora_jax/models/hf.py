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
"""

from __future__ import annotations

import importlib
import json
import os
import re
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import numpy as np

from lora_jax.errors import CheckpointError

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
      config: the architecture's ``Config`` (its module provides ``to_hf_weights`` and ``Config.to_hf``).
      folder: created if needed.
      tokenizer: a ``transformers`` tokenizer to save alongside, or ``None``.
      max_shard_size: shard the weights above this size (bytes or ``"5GB"``).

    Returns the folder.
    """
    arch = importlib.import_module(type(config).__module__)
    if not hasattr(arch, "to_hf_weights"):
        raise TypeError(f"save_pretrained: {type(config).__qualname__} is not a lora_jax model Config (its module "
                        f"{arch.__name__} has no to_hf_weights)")
    tensors = arch.to_hf_weights(params, config)
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    hf_config = config.to_hf()
    if hasattr(arch, "hf_architectures"):
        hf_config.architectures = arch.hf_architectures(params, config)
    dtypes = {str(x.dtype) for x in tensors.values() if x.dtype.kind == "f" or x.dtype.name == "bfloat16"}
    if len(dtypes) == 1:
        hf_config.dtype = dtypes.pop()
    hf_config.save_pretrained(str(folder))
    write_safetensors(tensors, folder, max_shard_size)
    if tokenizer is not None:
        tokenizer.save_pretrained(str(folder))
    return folder
