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

import contextlib
import dataclasses
import functools
import json
import logging
import os
import re
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import numpy as np

from lora_jax import tree
from lora_jax.errors import ArgumentError, CheckpointError, MissingFileError
from lora_jax.untrusted import check_array

logger = logging.getLogger("lora_jax.models")

WEIGHTS_NAME = "model.safetensors"
INDEX_NAME = "model.safetensors.index.json"
HUB_PATTERNS = [
    "config.json",
    "generation_config.json",
    "*.safetensors",
    "*.safetensors.index.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "vocab.txt",
    "vocab.json",
    "merges.txt",
    "tokenizer.model",
    "added_tokens.json",
    "*.tiktoken",
]
DEFAULT_MAX_SHARD_SIZE = 5 * 1024**3


# ------------------------------------------------------------------------------------------- weights


def _open_safetensors(file: Path):
    from safetensors import safe_open

    if not file.is_file():
        raise CheckpointError(f"{file}: weights file not found")
    try:
        return safe_open(str(file), framework="np")
    except Exception as e:  # safetensors raises its own SafetensorError (an Exception subclass)
        raise CheckpointError(
            f"{file}: not a readable safetensors file ({e}); it may be truncated or corrupt, re-download or re-save it"
        ) from None


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
        self._headers: dict[Path, tuple[int, dict]] = {}
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
            raise CheckpointError(
                f"{index_file}: 'weight_map' must map tensor names to shard files, got "
                f"{type(weight_map).__name__} {str(weight_map)[:80]}"
            )
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

    def dtype(self, name: str) -> np.dtype:
        """The dtype of tensor ``name`` without reading it."""
        code = self._handle(self._where[name]).get_slice(name).get_dtype()
        return np.dtype(SAFETENSORS_DTYPES.get(code, "V"))

    def view(self, name: str) -> TensorView:
        """A lazy view of tensor ``name``: indexing it reads only that block of the file."""
        return TensorView(self, name)

    def _offsets(self, file: Path) -> tuple[int, dict]:
        if file not in self._headers:
            self._headers[file] = _data_offsets(file)
        return self._headers[file]

    def __getitem__(self, name: str) -> np.ndarray:
        file = self._where[name]  # KeyError for an unknown name, as a Mapping should
        handle = self._handle(file)
        try:
            return handle.get_tensor(name)
        except Exception as e:
            raise CheckpointError(
                f"{file}: cannot read tensor {name!r} ({e}); the index and the shard disagree or the file is corrupt"
            ) from None

    def __iter__(self) -> Iterator[str]:
        return iter(self._where)

    def __len__(self) -> int:
        return len(self._where)

    def __contains__(self, name: object) -> bool:
        return name in self._where


def _data_offsets(file: Path) -> tuple[int, dict]:
    """``(start of the data section, {tensor name: its header entry})`` of a safetensors file: an 8-byte
    little-endian header length, then the JSON header (``dtype``, ``shape``, ``data_offsets`` per tensor)."""
    with open(file, "rb") as f:
        n = int.from_bytes(f.read(8), "little")
        header = json.loads(f.read(n))
    header.pop("__metadata__", None)
    return 8 + n, header


def read_block(fd: int, offset: int, shape: tuple[int, ...], dtype: np.dtype, index: tuple[slice, ...]) -> np.ndarray:
    """The block ``index`` (slices with step 1) of a C-ordered array of ``shape`` / ``dtype`` whose bytes start at
    ``offset`` in file ``fd``, read with ``pread`` into a new array: one read per contiguous run (the block's rows
    along its last partial axis, with every later axis whole), nothing else, and no memory map (the pages of a
    mapped file would count in the process's resident memory for as long as it lives)."""
    starts = [s.start for s in index]
    ext = [s.stop - s.start for s in index]
    out = np.empty(ext, dtype)
    if out.size == 0:
        return out
    partial = [i for i in range(len(shape)) if ext[i] != shape[i]]
    k = partial[-1] if partial else 0  # runs: axis k's range with all later axes whole
    item = dtype.itemsize
    strides = [int(np.prod(shape[i + 1 :], dtype=np.int64)) for i in range(len(shape))]
    run = ext[k] * strides[k] * item if shape else item
    buf = memoryview(out.reshape(-1).view(np.uint8))
    pos = 0
    for lead in np.ndindex(*ext[:k]):
        at = (
            offset + (sum((starts[i] + j) * strides[i] for i, j in enumerate(lead)) + starts[k] * strides[k]) * item
            if shape
            else offset
        )
        done = 0
        while done < run:
            got = os.preadv(fd, [buf[pos + done : pos + run]], at + done)
            if got <= 0:
                raise CheckpointError(f"unexpected end of file at byte {at + done}")
            done += got
        pos += run
    return out


class TensorView:
    """One tensor of a :class:`SafetensorsWeights`, read lazily: ``view[index]`` reads the block ``index`` (a tuple
    of slices) with :func:`read_block`, only its bytes; ``np.asarray(view)`` reads it whole. Blocks read inside
    :func:`recording_reads` are recorded (for tests and reports)."""

    def __init__(self, weights: SafetensorsWeights, name: str):
        self.weights, self.name = weights, name
        self.shape = weights.shape(name)
        self.dtype = weights.dtype(name)
        self.ndim = len(self.shape)

    def __getitem__(self, index) -> np.ndarray:
        index = index if isinstance(index, tuple) else (index,)
        index = tuple(slice(*s.indices(n)) for s, n in zip(index, self.shape))
        if any(s.step != 1 for s in index) or len(index) != len(self.shape):
            raise ArgumentError(f"{self.name}: blocks are read with one slice of step 1 per axis, got {index}")
        file = Path(self.weights._where[self.name])
        if _reads is not None:
            _reads.append((self.name, index))
        try:
            start, header = self.weights._offsets(file)
            begin, end = header[self.name]["data_offsets"]
            if end - begin != int(np.prod(self.shape, dtype=np.int64)) * self.dtype.itemsize:
                raise CheckpointError(f"header says {end - begin} bytes for shape {self.shape} of {self.dtype}")
            fd = os.open(file, os.O_RDONLY)
            try:
                return read_block(fd, start + begin, self.shape, self.dtype, index)
            finally:
                os.close(fd)
        except (OSError, ValueError, KeyError) as e:
            raise CheckpointError(
                f"{file}: cannot read block {index} of tensor {self.name!r} ({e}); the file may be truncated or corrupt"
            ) from None

    def __array__(self, dtype=None, copy=None) -> np.ndarray:
        x = self[tuple(slice(0, n) for n in self.shape)]
        return x if dtype is None else x.astype(dtype)


_reads: list | None = None


@contextlib.contextmanager
def recording_reads() -> Iterator[list[tuple[str, tuple[slice, ...]]]]:
    """Within the ``with`` block, every block a :class:`TensorView` reads is appended to the yielded list as
    ``(tensor name, slices)`` (what a process read from its checkpoint, for tests and reports)."""
    global _reads
    outer, _reads = _reads, []
    try:
        yield _reads
    finally:
        _reads = outer


# safetensors' dtype codes -> numpy (bfloat16 through ml_dtypes, which jax installs)
SAFETENSORS_DTYPES = {
    "F64": "float64",
    "F32": "float32",
    "F16": "float16",
    "BF16": "bfloat16",
    "I64": "int64",
    "I32": "int32",
    "I16": "int16",
    "I8": "int8",
    "U8": "uint8",
    "BOOL": "bool",
}


def open_weights(folder: str | os.PathLike) -> SafetensorsWeights:
    """The lazy tensors of a Hugging Face folder: ``model.safetensors``, else ``model.safetensors.index.json``."""
    folder = Path(folder)
    if (folder / WEIGHTS_NAME).is_file():
        return SafetensorsWeights.from_file(folder / WEIGHTS_NAME)
    if (folder / INDEX_NAME).is_file():
        return SafetensorsWeights.from_index(folder / INDEX_NAME)
    others = sorted(
        p.name for p in folder.glob("*") if p.suffix in (".safetensors", ".bin", ".pt", ".h5", ".msgpack", ".gguf")
    )
    hint = ""
    if others:
        hint = (
            f" It has {others}: only safetensors is read here (convert PyTorch .bin files with "
            "transformers' save_pretrained(..., safe_serialization=True))."
        )
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
        raise CheckpointError(
            f"{file}: transformers cannot read this config (model_type {model_type!r}): {str(e).splitlines()[0]}"
        ) from None


def load_tokenizer(folder: str | os.PathLike):
    """``transformers.AutoTokenizer`` of a folder, or ``None`` when it has no tokenizer files."""
    import transformers

    folder = Path(folder)
    if not any(
        (folder / f).is_file()
        for f in ("tokenizer.json", "tokenizer_config.json", "vocab.txt", "tokenizer.model", "vocab.json")
    ):
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
        raise MissingFileError(
            f"could not fetch {repo_id!r} from the Hugging Face hub"
            f"{' (HF_HUB_OFFLINE is set and it is not in the local cache)' if offline else ''}: "
            f"{type(e).__name__}: {(str(e).splitlines() or [''])[0].rstrip('.')}. "
            "Pass a local path instead: a folder with config.json and model.safetensors (and tokenizer files), "
            "or a .gguf file."
        ) from None


# ------------------------------------------------------------------------------------------------- save


def parse_size(size: int | str) -> int:
    """Bytes from ``123``, ``"500MB"``, ``"5GB"``, ``"10KiB"``."""
    if isinstance(size, (int, np.integer)):
        return int(size)
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]?)(i?)B?\s*", str(size), re.IGNORECASE)
    if not m:
        raise ArgumentError(f"max_shard_size must be bytes or a string like '5GB', got {size!r}")
    base = 1024 if m.group(3) else 1000
    return int(float(m.group(1)) * base ** " KMGT".index(m.group(2).upper() or " "))


def _shard(sizes: Mapping[str, int], max_bytes: int) -> list[list[str]]:
    shards: list[list[str]] = [[]]
    size = 0
    for name, n in sizes.items():
        if shards[-1] and size + n > max_bytes:
            shards.append([])
            size = 0
        shards[-1].append(name)
        size += n
    return shards


_ST_CODES = {np.dtype(v): k for k, v in SAFETENSORS_DTYPES.items()}


def _write_file(file: Path, names: list[str], specs: Mapping[str, tuple], get) -> None:
    """One safetensors file: the header (shapes, dtypes, offsets: known before any value), then each tensor's bytes
    as ``get(name)`` returns it, one tensor at a time."""
    header: dict[str, Any] = {"__metadata__": {"format": "pt"}}  # transformers' loader requires a framework tag
    offset = 0
    for name in names:
        shape, dtype = specs[name]
        n = int(np.prod(shape, dtype=np.int64)) * np.dtype(dtype).itemsize
        header[name] = {
            "dtype": _ST_CODES[np.dtype(dtype)],
            "shape": [int(d) for d in shape],
            "data_offsets": [offset, offset + n],
        }
        offset += n
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    tmp = file.with_name(file.name + ".partial")
    with open(tmp, "wb") as f:
        f.write(len(raw).to_bytes(8, "little"))
        f.write(raw)
        for name in names:
            x = np.asarray(get(name), order="C")
            if tuple(x.shape) != tuple(specs[name][0]) or x.dtype != np.dtype(specs[name][1]):
                raise ArgumentError(f"{name}: got {x.dtype}{tuple(x.shape)}, announced {specs[name]}")
            f.write(memoryview(x.reshape(-1).view(np.uint8)))
    os.replace(tmp, file)


def write_safetensors_streaming(
    specs: Mapping[str, tuple[tuple[int, ...], Any]],
    get,
    folder: str | os.PathLike,
    max_shard_size: int | str = DEFAULT_MAX_SHARD_SIZE,
) -> list[Path]:
    """Write tensors that are produced one at a time: ``specs`` gives each name's ``(shape, dtype)`` up front,
    ``get(name)`` its values when its turn comes (in ``specs`` order), so at most one tensor need exist on the
    host at once (a sharded tree gathered leaf by leaf, a merge computed leaf by leaf). The layout is
    :func:`write_safetensors`'s: ``model.safetensors``, or shards of at most ``max_shard_size`` bytes plus
    ``model.safetensors.index.json``; weight files of an earlier save in ``folder`` are removed first. safetensors'
    own writer needs every tensor of a file in memory at once, hence this one."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    for old in [folder / WEIGHTS_NAME, folder / INDEX_NAME, *folder.glob("model-*-of-*.safetensors")]:
        old.unlink(missing_ok=True)
    sizes = {k: int(np.prod(shape, dtype=np.int64)) * np.dtype(dtype).itemsize for k, (shape, dtype) in specs.items()}
    shards = _shard(sizes, parse_size(max_shard_size))
    if len(shards) == 1:
        _write_file(folder / WEIGHTS_NAME, shards[0], specs, get)
        return [folder / WEIGHTS_NAME]
    files, weight_map = [], {}
    for i, names in enumerate(shards, 1):
        name = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
        _write_file(folder / name, names, specs, get)
        files.append(folder / name)
        weight_map.update({k: name for k in names})
    index = {"metadata": {"total_size": int(sum(sizes.values()))}, "weight_map": weight_map}
    (folder / INDEX_NAME).write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")
    return [*files, folder / INDEX_NAME]


def write_safetensors(
    tensors: Mapping[str, np.ndarray], folder: str | os.PathLike, max_shard_size: int | str = DEFAULT_MAX_SHARD_SIZE
) -> list[Path]:
    """Write ``tensors`` as ``model.safetensors``, or as shards of at most ``max_shard_size`` bytes (a tensor
    larger than that gets a shard of its own) plus ``model.safetensors.index.json``. Weight files of an earlier
    save in ``folder`` are removed first, so that a stale ``model.safetensors`` cannot shadow new shards.
    Returns the files written."""
    specs = {k: (np.shape(v), np.asarray(v).dtype) for k, v in tensors.items()}
    return write_safetensors_streaming(specs, lambda k: np.asarray(tensors[k]), folder, max_shard_size)


def save_pretrained(
    params: Mapping,
    config: Any,
    folder: str | os.PathLike,
    tokenizer: Any = None,
    max_shard_size: int | str = DEFAULT_MAX_SHARD_SIZE,
) -> Path:
    """Write ``params`` as a Hugging Face folder that ``transformers.AutoModel.from_pretrained`` loads.

    The weights are written leaf by leaf (:func:`write_hf_weights`): a sharded tree is never gathered whole.

    Args:
      params: plain parameters (merge LoRA adapters first with ``lora.merge``).
      config: the family's ``Config`` (its declaration gives the names, layouts and ``transformers`` class).
      folder: created if needed.
      tokenizer: a ``transformers`` tokenizer to save alongside, or ``None``.
      max_shard_size: shard the weights above this size (bytes or ``"5GB"``).

    Returns the folder.
    """
    import jax

    from lora_jax.models import arch as arch_lib

    arch = arch_lib.for_config(config)
    folder = Path(folder)
    specs = write_hf_weights(params, config, folder, max_shard_size)  # leaf by leaf: never the whole model on host
    if jax.process_index() != 0:
        return folder
    hf_config = config.to_hf()
    hf_config.architectures = [arch.hf_class(hf_config, arch.task_of(set(params)))]
    dtypes = {str(dtype) for _, dtype in specs.values() if _is_float(np.empty(0, dtype))}
    if len(dtypes) == 1:
        hf_config.dtype = dtypes.pop()
    hf_config.save_pretrained(str(folder))
    if tokenizer is not None:
        tokenizer.save_pretrained(str(folder))
    return folder


# ------------------------------------------------------------------------------------------ converter


def _summary(config: Any) -> str:
    """The integer fields of a config, for errors that say which config produced an expected shape."""
    return ", ".join(
        f"{f.name}={getattr(config, f.name)}"
        for f in dataclasses.fields(config)
        if type(getattr(config, f.name)) is int
    )


def _hf_shapes(layout, shape: tuple[int, ...]) -> list[tuple[int, ...]]:
    """The checkpoint shapes of a leaf of ``shape`` (computed on a zero-strided view: nothing allocated)."""
    return [tuple(x.shape) for x in layout.save(np.broadcast_to(np.zeros((), np.float32), shape))]


def _is_float(x: np.ndarray) -> bool:
    return x.dtype.kind == "f" or x.dtype.name == "bfloat16"


@dataclasses.dataclass(frozen=True)
class LeafSource:
    """Where one parameter's values come from, read block by block.

    ``shape``: the leaf's shape; ``dtype``: the dtype of its stored values (before any cast); ``block(index)``
    returns ``leaf[index]`` (``index``: one ``slice`` per axis) as a numpy array. ``blockwise``: whether a block
    costs only its own bytes (a safetensors tensor in a sliceable layout); when not (a quantised GGUF tensor, a
    fused layout), every block costs reading the whole leaf, so readers read it once and slice it.
    ``what``: the tensor name(s), for errors.
    """

    shape: tuple[int, ...]
    dtype: np.dtype
    block: Any  # Callable[[tuple[slice, ...]], np.ndarray]
    what: str = ""
    blockwise: bool = True

    def value(self) -> np.ndarray:
        """The whole leaf."""
        return self.block(tuple(slice(0, n) for n in self.shape))


@dataclasses.dataclass
class WeightPlan:
    """What :func:`plan_hf_weights` found: the task, a :class:`LeafSource` per parameter the checkpoint holds,
    the paths it lacks that are initialised instead (a new head), and the shapes of all of them."""

    task: str
    sources: dict[tuple[str, ...], LeafSource]
    fresh: list[tuple[str, ...]]
    shapes: dict[tuple[str, ...], Any]


def _tensor_shape(tensors: Mapping, name: str) -> tuple[int, ...]:
    return tuple(tensors.shape(name)) if hasattr(tensors, "shape") else tuple(np.shape(tensors[name]))


def _tensor_dtype(tensors: Mapping, name: str) -> np.dtype:
    return tensors.dtype(name) if hasattr(tensors, "dtype") else np.asarray(tensors[name]).dtype


def _tensor_view(tensors: Mapping, name: str) -> Any:
    return tensors.view(name) if hasattr(tensors, "view") else tensors[name]


def _checked(read, what: str, source: str):
    """``read`` whose blocks are checked as they come (float, finite: :func:`lora_jax.untrusted.check_array`), so a
    NaN in a file the user did not make fails naming the tensor, whichever device's block holds it."""

    def block(index):
        return check_array(read(index), what, source)

    return block


def plan_hf_weights(config: Any, tensors: Mapping[str, Any], source: str, task: str | None = None) -> WeightPlan:
    """Match checkpoint tensors to the parameters of ``config``'s family for ``task`` and check them, reading no
    tensor data (names, shapes and dtypes only; see :func:`from_hf_weights` for the rules and errors).

    ``tensors``: a :class:`SafetensorsWeights` (read lazily, block by block) or any mapping of names to arrays."""
    from lora_jax.models import arch as arch_lib

    arch = arch_lib.for_config(config)
    names = list(tensors.keys())
    task = arch.detect_task(config, names) if task is None else arch.task(task)
    t = arch.tasks[task]
    prefix = arch.checkpoint_prefix(names)
    where = getattr(tensors, "source_of", None)
    expected = arch.shapes(config, task)
    initialise = [re.compile(p) for p in t.head + t.optional]
    sources, fresh, used = {}, [], set()
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
                "from the same model?"
            )
        wants = _hf_shapes(spec_t.layout, spec.shape)
        dtypes = []
        for n, want in zip(spec_t.names, wants):
            shape = _tensor_shape(tensors, n)
            if shape != want:
                raise CheckpointError(
                    f"{where(n) if where else source}: tensor {n!r} has shape {shape}, expected {want} for "
                    f"{tree.join(path)} of a {arch.name} {task} model ({_summary(config)})"
                )
            dtype = _tensor_dtype(tensors, n)
            if not _is_float(np.empty(0, dtype)):
                raise CheckpointError(f"{source}: tensor {n!r} has dtype {dtype}, expected a float tensor")
            dtypes.append(dtype)
        views = tuple(_tensor_view(tensors, n) for n in spec_t.names)
        what = " + ".join(spec_t.names)
        sources[path] = LeafSource(
            tuple(spec.shape),
            np.result_type(*dtypes),
            _checked(
                functools.partial(spec_t.layout.read_block, views), what, where(spec_t.names[0]) if where else source
            ),
            what,
            blockwise=spec_t.layout.read is not None,
        )
        used.update(spec_t.names)

    strip = lambda n: n[len(prefix) + 1 :] if prefix and n.startswith(prefix + ".") else n  # noqa: E731
    unused = [n for n in names if n not in used and not arch.names.is_ignored(strip(n), config)]
    backbone_modules = {
        strip(arch.names.hf_name(arch.checkpoint_path(p, task, prefix))).split(".")[0]
        for p in expected
        if t.backbone is None or p[0] == t.backbone
    }
    in_backbone = [n for n in unused if strip(n).split(".")[0] in backbone_modules]
    if in_backbone:
        raise CheckpointError(
            f"{source}: {len(in_backbone)} tensor(s) of the backbone do not fit this {arch.name} "
            f"config ({_summary(config)}): {in_backbone[:5]}"
        )
    if unused:
        logger.warning(
            "%s: %d tensor(s) not used by the %s %s model: %s%s",
            source,
            len(unused),
            arch.name,
            task,
            unused[:8],
            " ..." if len(unused) > 8 else "",
        )
    if fresh:
        logger.warning(
            "%s: no %s in the checkpoint; initialised new parameters %s for task %r (train them)",
            source,
            sorted({arch.names.module(p) for p in fresh}),
            [tree.join(p) for p in fresh],
            task,
        )
    return WeightPlan(task, sources, fresh, expected)


def from_hf_weights(
    config: Any,
    tensors: Mapping[str, np.ndarray],
    source: str,
    task: str | None = None,
    *,
    key: Any = None,
    new: list | None = None,
) -> dict:
    """The parameters of ``config``'s family for ``task`` from checkpoint tensors (names as in the checkpoint),
    whole, on the default device.

    The backbone may be stored with its prefix (the task's ``backbone``, e.g. ``model.``: saved from a task
    class) or without (saved from the bare backbone); both load into any task. ``task=None`` picks the task
    whose head the checkpoint has, else the family's default.

    A leaf the checkpoint lacks raises :class:`~lora_jax.errors.CheckpointError` naming the tensor and
    ``source``, except the task's new head (and ``optional`` leaves), which are initialised from ``key``
    (default ``jax.random.key(0)``), logged, and their paths appended to ``new``. A wrong shape or a non-float
    tensor raises too. Unused tensors of the backbone (a checkpoint deeper than the config) raise; other unused
    tensors (the head of another task) are logged; declared buffers and a tied output head are ignored.
    Returns arrays in the checkpoint's dtype. (To load straight into a device mesh, see
    :func:`lora_jax.models.open_checkpoint`.)
    """
    import jax
    import jax.numpy as jnp

    from lora_jax.models import arch as arch_lib

    plan = plan_hf_weights(config, tensors, source, task)
    params = {path: jnp.asarray(np.ascontiguousarray(src.value())) for path, src in plan.sources.items()}
    if plan.fresh:
        init = tree.flatten(
            arch_lib.for_config(config).init_params(config, jax.random.key(0) if key is None else key, plan.task)
        )
        params.update({path: init[path] for path in plan.fresh})
        if new is not None:
            new.extend(plan.fresh)
    return tree.unflatten(params)


def _hf_leaves(params: Mapping, config: Any) -> list[tuple[Any, Any]]:
    """``[(leaf, Tensor), ...]``: each leaf of ``params`` with its checkpoint names and layout, in the family's
    order, after checking that ``params`` are the plain parameters of one of the family's tasks."""
    from lora_jax.core import is_adapter, is_lora_weight
    from lora_jax.models import arch as arch_lib

    arch = arch_lib.for_config(config)
    flat = tree.flatten(params)
    wrapped = [p for p, v in flat.items() if is_lora_weight(v) or is_adapter(v)]
    if wrapped:
        raise ArgumentError(
            f"to_hf_weights: params hold LoRA-wrapped kernels {[tree.join(p) for p in wrapped][:3]}; "
            "save lora.merge(params, adapters) instead"
        )
    task = arch.task_of(set(params))
    expected = arch.shapes(config, task) if task is not None else {}
    optional = [re.compile(p) for p in arch.tasks[task].optional] if task is not None else []
    missing = sorted(
        tree.join(p) for p in set(expected) - set(flat) if not any(r.fullmatch(tree.join(p)) for r in optional)
    )
    extra = sorted(tree.join(p) for p in set(flat) - set(expected))
    if missing or extra:
        raise ArgumentError(
            f"to_hf_weights: params do not match a {arch.name} {task} model of this config: missing "
            f"{missing[:5]}, unexpected {extra[:5]}"
        )
    out = []
    for path, spec in expected.items():
        if path not in flat:
            continue
        if tuple(np.shape(flat[path])) != tuple(spec.shape):
            raise ArgumentError(
                f"to_hf_weights: {tree.join(path)} has shape {tuple(np.shape(flat[path]))}, the config "
                f"needs {tuple(spec.shape)}"
            )
        out.append((flat[path], arch.names.tensor(path, config)))
    return out


def to_hf_weights(params: Mapping, config: Any) -> dict[str, np.ndarray]:
    """Checkpoint names and layouts for the parameters of any task of ``config``'s family (the task is read
    from the params' top-level keys), as that task's ``transformers`` class saves them. LoRA-wrapped params
    raise: save ``lora.merge(params, adapters)``."""
    out = {}
    for leaf, spec_t in _hf_leaves(params, config):
        for name, y in zip(spec_t.names, spec_t.layout.save(np.asarray(leaf)), strict=True):
            out[name] = np.ascontiguousarray(y)
    return out


def write_hf_weights(
    params: Mapping, config: Any, folder: str | os.PathLike, max_shard_size: int | str = DEFAULT_MAX_SHARD_SIZE
) -> dict[str, Any]:
    """:func:`to_hf_weights` written straight to safetensors files, one leaf at a time: a sharded leaf is gathered
    to the host when its turn comes and dropped after, so the host holds at most one leaf's tensors (never the
    whole model). In a multi-process run every process takes part in each gather and process 0 alone writes.
    Returns ``{tensor name: (shape, dtype)}``."""
    import jax

    from lora_jax.sharding import global_to_host

    leaves = _hf_leaves(params, config)
    specs, owner = {}, {}
    for i, (leaf, spec_t) in enumerate(leaves):
        dtype = np.dtype(leaf.dtype)
        for name, shape in zip(spec_t.names, _hf_shapes(spec_t.layout, tuple(leaf.shape)), strict=True):
            specs[name] = (shape, dtype)
            owner[name] = i
    held: dict[int, dict] = {}

    def get(name: str) -> np.ndarray:
        i = owner[name]
        if i not in held:
            held.clear()  # the previous leaf's tensors are written: drop them
            leaf, spec_t = leaves[i]
            held[i] = dict(zip(spec_t.names, spec_t.layout.save(global_to_host(leaf)), strict=True))
        return held[i][name]

    if jax.process_index() != 0:
        for name in specs:  # the gathers are collective: take part, write nothing
            get(name)
        return specs
    write_safetensors_streaming(specs, get, folder, max_shard_size)
    return specs
