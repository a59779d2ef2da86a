"""A model family is a declaration: :class:`Architecture`, registered in :data:`FAMILIES`.

Everything the project does with a family that is not its forward pass reads the declaration: the one Hugging
Face reader / writer (:mod:`lora_jax.models.hf`), the one GGUF reader (:mod:`lora_jax.models.gguf`), PEFT
import / export (:mod:`lora_jax.peft`), :func:`lora_jax.models.load` and the training job. None of them names a
family.

What a declaration says
-----------------------
- ``model_types``: the Hugging Face ``config.json`` ``model_type`` values it reads.
- ``config``: the family's frozen-dataclass ``Config`` with ``Config.from_hf(hf_config)`` and ``config.to_hf()``
  (the config mapping, with the errors for settings the model does not implement).
- ``tasks``: task name -> :class:`Task` (the Linen module, where its backbone sits, its new head, the
  ``transformers`` class and PEFT task type). The first task is the default.
- ``names``: the parameter-name rule Hugging Face <-> Flax path (:class:`Names`): list modules, the
  :class:`Layout` of each leaf (transposes, reshapes, several tensors stacked into one leaf), buffers that hold
  no parameter, the output head that is tied to the embedding.
- ``gguf``: llama.cpp's tensor names, the GGUF metadata -> config mapping, and value fixes such as RoPE row
  permutations (:class:`GGUF`); ``None`` when the family has no GGUF reading.
- ``presets``: the PEFT ``target_modules`` of each LoRA preset (``"qv"``, ``"attention"``, ``"all-linear"``).
- ``adapt``: ``(config, tensor_names, task) -> config``: settles what ``config.json`` does not say from a
  checkpoint's tensor names (optional; BERT: whether the checkpoint has a pooler).
- ``preprocessor``: ``(folder or None, config) -> object`` that :func:`lora_jax.models.load` returns in the
  tokenizer's place (an audio family's feature extractor); ``None``: the folder's ``transformers`` tokenizer.
- ``logical_axes``: ``(path regex, (logical axis name per leaf axis))`` for the kernels that a ``tensor`` mesh axis
  splits (``("embed", "heads")`` for a query projection); :data:`lora_jax.sharding.LOGICAL_AXES` maps the names to
  mesh axes. Leaves it does not name are placed by the FSDP rules.

How a parameter path maps: our paths mirror the ``transformers`` module names. ``layers_3`` (a Linen list) is
``layers.3`` when ``"layers"`` is in ``Names.lists``; the leaf ``kernel`` / ``scale`` / ``embedding`` is
``weight`` and ``bias`` stays ``bias``; a ``kernel`` is stored with its axes reversed (``nn.Linear`` keeps
``(out, in)``, ``nn.Conv1d`` ``(out, in, k)``) unless a :class:`Rule` says otherwise. So
``model/layers_0/self_attn/q_proj/kernel (D, H*hd)`` <-> ``model.layers.0.self_attn.q_proj.weight (H*hd, D)``.

How to add a family (Qwen3 is the worked example: ``lora_jax/models/qwen3.py``)
------------------------------------------------------------------------------
1. Write ``lora_jax/models/<family>.py``:

   - a ``@dataclasses.dataclass(frozen=True) class Config`` with ``from_hf`` / ``to_hf`` (decoders subclass
     :class:`lora_jax.models.decoder.DecoderConfig`, which maps the usual fields, RoPE and sliding windows);
   - the Linen modules, built from the shared layers (:mod:`lora_jax.models.layers`: ``Dense``, ``Embed``,
     ``RMSNorm``, ``layer_norm``, ``Rope``, ``Attention`` with GQA / RoPE / q-k norms / sliding window / KV
     cache, ``GatedMLP``; :mod:`lora_jax.models.decoder`: ``DecoderLayer``, ``DecoderModel``, ``CausalLM``).
     Name every submodule as ``transformers`` names it, so the default name rule holds;
   - ``ARCHITECTURE = Architecture(...)`` at the end, and ``build = ARCHITECTURE.build``,
     ``init_params = ARCHITECTURE.init_params`` for callers that import the module.

2. Add the module to :data:`FAMILIES` (one line).

3. Test it against ``transformers``' PyTorch model on a tiny random config (logits and gradients), and PEFT
   both ways (``tests/test_models_qwen3.py`` is the template).

A family outside this package registers itself with :func:`register`.
"""

from __future__ import annotations

import dataclasses
import functools
import importlib
import re
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from lora_jax import stacking, tree
from lora_jax.errors import ArgumentError, ArgumentTypeError

Path = tuple[str, ...]

# The one registration list: a family is one line here (modules are imported on first lookup).
FAMILIES: tuple[str, ...] = (
    "lora_jax.models.bert",
    "lora_jax.models.llama",
    "lora_jax.models.gpt2",
    "lora_jax.models.qwen3",
    "lora_jax.models.gemma3",
    "lora_jax.models.qwen3_moe",
    "lora_jax.models.mixtral",
    "lora_jax.models.whisper",
)


# ------------------------------------------------------------------------------------------ layouts


@dataclasses.dataclass(frozen=True)
class Layout:
    """How one Flax leaf is stored in a checkpoint: ``load`` turns the checkpoint tensor(s) into the leaf,
    ``save`` the leaf into the tensor(s) (one per name the leaf maps to). Both work on numpy and jax arrays.

    ``transposed``: the checkpoint holds the leaf with its axes reversed (what PEFT calls not
    ``fan_in_fan_out`` for a linear layer).

    ``read``: ``(views, index) -> array``, the leaf's block ``leaf[index]`` (``index``: one ``slice`` per leaf axis)
    read from lazy tensor ``views`` (anything indexable like a numpy array: safetensors' ``get_slice``, a
    memory map) by reading only the matching block of each tensor. ``None``: the layout cannot say which bytes
    a block needs, and :meth:`read_block` loads the whole leaf and slices it.
    """

    load: Callable[[Sequence[Any]], Any]
    save: Callable[[Any], list[Any]]
    transposed: bool = False
    read: Callable[[Sequence[Any], tuple[slice, ...]], Any] | None = None

    def read_block(self, views: Sequence[Any], index: tuple[slice, ...]) -> np.ndarray:
        """``load(views)[index]``, reading only that block of the tensors when the layout knows how."""
        if self.read is not None:
            return np.asarray(self.read(views, tuple(index)))
        return np.asarray(self.load([np.asarray(v) for v in views]))[tuple(index)]


def _reverse(x):
    return x.transpose(tuple(range(x.ndim))[::-1])


SAME = Layout(load=lambda xs: xs[0], save=lambda x: [x], read=lambda vs, index: vs[0][index])
"""Stored as it is (norm scales, biases, embedding tables, GPT-2's ``Conv1D`` kernels)."""

TRANSPOSE = Layout(
    load=lambda xs: _reverse(xs[0]),
    save=lambda x: [_reverse(x)],
    transposed=True,
    read=lambda vs, index: _reverse(np.asarray(vs[0][index[::-1]])),
)
"""Stored with the axes reversed: ``nn.Linear`` ``(out, in)`` <-> kernel ``(in, out)``; ``nn.Conv1d``
``(out, in, k)`` <-> Flax ``nn.Conv`` ``(k, in, out)``."""


def permuted(axes: Sequence[int]) -> Layout:
    """Stored as ``leaf.transpose(axes)`` (e.g. ``(0, 2, 1)``: stacked expert kernels ``(E, in, out)`` stored
    ``(E, out, in)``)."""
    axes = tuple(axes)
    inverse = tuple(int(i) for i in np.argsort(axes))
    return Layout(
        load=lambda xs: xs[0].transpose(inverse),
        save=lambda x: [x.transpose(axes)],
        transposed=axes == tuple(range(len(axes)))[::-1],
        read=lambda vs, index: np.asarray(vs[0][tuple(index[a] for a in axes)]).transpose(inverse),
    )


def _stack_of(each: Layout, per: int = 1, count: int | None = None) -> Layout:
    """A leaf stacked on a new first axis: item ``i`` is stored as ``per`` tensors (names ``i * per`` up to ``(i +
    1) * per``) in layout ``each``; ``count`` items (``None``: as many as there are tensors). A block reads only
    its items' tensors, each blockwise, when ``each`` can read blocks."""

    def items(xs):
        return len(xs) // per if count is None else count

    def load(xs):
        parts = [each.load(xs[i * per : (i + 1) * per]) for i in range(items(xs))]
        return (jnp if isinstance(parts[0], jax.Array) else np).stack(parts)

    def read(views, index):
        return np.stack(
            [each.read_block(views[i * per : (i + 1) * per], index[1:]) for i in range(*index[0].indices(items(views)))]
        )

    return Layout(
        load=load,
        save=lambda x: [t for i in range(x.shape[0]) for t in each.save(x[i])],
        transposed=each.transposed,
        read=read if each.read is not None else None,
    )


def stacked(each: Layout = TRANSPOSE) -> Layout:
    """One leaf stacked on a new first axis from several tensors, each stored in layout ``each`` (per-expert
    ``experts.N.gate_proj.weight`` tensors -> one ``(E, in, out)`` kernel). Pair it with a :class:`Rule` whose
    ``name`` gives the tensor names in order."""
    return _stack_of(each)


def layer_stacked(each: Layout, per_layer: int, layers: int) -> Layout:
    """One leaf of a scanned layer stack (:mod:`lora_jax.stacking`): layer ``i`` is stored as ``per_layer``
    tensors in layout ``each`` (the names of all layers in order), so files keep their per-layer names."""
    return _stack_of(each, per_layer, layers)


# -------------------------------------------------------------------------------------------- names


@dataclasses.dataclass(frozen=True)
class Rule:
    """An exception to the default name rule, for leaves whose '/'-joined path fullmatches ``path``.

    ``layout``: how the leaf is stored. ``name``: ``None`` keeps the default tensor name; a string is a
    ``re.sub`` template over the path giving the module name (``.weight`` / ``.bias`` is appended as usual); a
    callable ``(default_name, config) -> tuple of names`` gives several tensors (with a :func:`stacked`
    layout). ``also``: other ``(layout, name)`` pairs (``name``: ``None`` or a callable as above) in which
    checkpoints may hold the leaf, read when the first way's tensors are absent and never written (an expert
    stack saved one tensor per expert, or fused as ``transformers`` holds it at run time).
    """

    path: str
    layout: Layout = SAME
    name: str | Callable[[str, Any], tuple[str, ...]] | None = None
    also: tuple[tuple[Layout, Callable[[str, Any], tuple[str, ...]] | None], ...] = ()


@dataclasses.dataclass(frozen=True)
class Tensor:
    """Where one leaf is in a checkpoint: its tensor ``names`` and the :class:`Layout` between the two."""

    names: tuple[str, ...]
    layout: Layout


LEAF_NAMES = {"kernel": "weight", "scale": "weight", "embedding": "weight", "bias": "bias"}


@dataclasses.dataclass(frozen=True)
class Names:
    """The parameter-name rule between a family's Flax paths and its Hugging Face tensor names.

    Attributes:
      lists: module names that are Linen lists (``layers_3`` <-> ``layers.3``); ``None``: every ``name_N``.
      rules: exceptions (:class:`Rule`), first match wins; the default stores every ``kernel`` with its axes
        reversed (:data:`TRANSPOSE`) and every other leaf as it is.
      ignore: regexes of checkpoint tensors that hold no parameter (buffers such as RoPE ``inv_freq``), matched
        against the name without the backbone prefix.
      tied: the checkpoint tensor of the output head, absent or ignored when ``config.tie_word_embeddings``.
    """

    lists: tuple[str, ...] | None = ("layers",)
    rules: tuple[Rule, ...] = ()
    ignore: tuple[str, ...] = ()
    tied: str | None = None

    @functools.cached_property
    def _list_re(self) -> re.Pattern | None:
        if self.lists is None:
            return re.compile(r"(.+)_(\d+)")
        if not self.lists:
            return None
        return re.compile(rf"({'|'.join(map(re.escape, self.lists))})_(\d+)")

    @functools.cached_property
    def _rules(self) -> tuple[tuple[re.Pattern, Rule], ...]:
        return tuple((re.compile(r.path), r) for r in self.rules)

    def module(self, path: Sequence[str]) -> str:
        """The ``transformers`` module name owning leaf ``path``: ``model.layers.0.self_attn.q_proj``."""
        path = tree.split(path)
        joined = tree.join(path)
        for pattern, rule in self._rules:
            m = pattern.fullmatch(joined)
            if m and isinstance(rule.name, str):
                return m.expand(rule.name)
        list_re = self._list_re
        parts = [list_re.sub(r"\1.\2", p) if list_re is not None and list_re.fullmatch(p) else p for p in path[:-1]]
        return ".".join(parts)

    def _stack_size(self, path: Path, config: Any) -> int:
        """The layer count of a leaf in a scanned stack (``0``: the leaf is not in one)."""
        if not stacking.layer_axes(path) or (self.lists is not None and stacking.STACK not in self.lists):
            return 0
        n = getattr(config, "num_hidden_layers", None)
        if n is None:
            raise ArgumentError(
                f"{tree.join(path)} is in a scanned layer stack; its checkpoint names need the config "
                "(its num_hidden_layers)"
            )
        return int(n)

    def tensor(self, path: Sequence[str], config: Any = None) -> Tensor:
        """The checkpoint tensor(s) of leaf ``path`` and their layout (a leaf of a scanned stack: the tensors of
        every layer, :func:`layer_stacked`)."""
        path = tree.split(path)
        layers = self._stack_size(path, config)
        if layers:
            return _stack_tensors([self.tensor(stacking.per_layer_path(path, i), config) for i in range(layers)])
        name = f"{self.module(path)}.{LEAF_NAMES.get(path[-1], path[-1])}"
        joined = tree.join(path)
        for pattern, rule in self._rules:
            if pattern.fullmatch(joined):
                names = rule.name(name, config) if callable(rule.name) else (name,)
                return Tensor(tuple(names), rule.layout)
        return Tensor((name,), TRANSPOSE if path[-1] == "kernel" else SAME)

    def candidates(self, path: Sequence[str], config: Any = None) -> tuple[Tensor, ...]:
        """Every way a checkpoint may hold leaf ``path``: :meth:`tensor` first, then its rule's ``also``."""
        layers = self._stack_size(tree.split(path), config)
        if layers:
            ways = [self.candidates(stacking.per_layer_path(tree.split(path), i), config) for i in range(layers)]
            return tuple(_stack_tensors([w[j] for w in ways]) for j in range(len(ways[0])))
        first = self.tensor(path, config)
        joined = tree.join(tree.split(path))
        rule = next((r for pattern, r in self._rules if pattern.fullmatch(joined)), None)
        if rule is None or not rule.also:
            return (first,)
        default = f"{self.module(path)}.{LEAF_NAMES.get(path[-1], path[-1])}"
        return (
            first,
            *(
                Tensor(tuple(name(default, config)) if callable(name) else (default,), layout)
                for layout, name in rule.also
            ),
        )

    def hf_name(self, path: Sequence[str]) -> str:
        """The (first) tensor name of leaf ``path``: ``model.layers.0.self_attn.q_proj.weight`` (layer 0's for a
        leaf of a scanned stack)."""
        return self.tensor(stacking.per_layer_path(tree.split(path), 0)).names[0]

    def is_ignored(self, name: str, config: Any) -> bool:
        """Whether checkpoint tensor ``name`` (without backbone prefix) holds no parameter of ``config``."""
        if self.tied is not None and name == self.tied and getattr(config, "tie_word_embeddings", False):
            return True
        return any(re.fullmatch(p, name) for p in self.ignore)


def _stack_tensors(per_layer: Sequence[Tensor]) -> Tensor:
    first = per_layer[0]
    return Tensor(
        tuple(n for t in per_layer for n in t.names), layer_stacked(first.layout, len(first.names), len(per_layer))
    )


GENERIC_NAMES = Names(lists=None)
"""The rule for trees of no registered family: ``name_N`` -> ``name.N`` for every module, kernels reversed."""


# -------------------------------------------------------------------------------------------- tasks


def with_scan_layers(config: Any, scan_layers: bool | None) -> Any:
    """``config`` built scanned or unrolled (``scan_layers``; ``None``: as it is). A build option, not a file
    setting: a family whose ``Config`` has no ``scan_layers`` (layers that never scan) ignores it."""
    if scan_layers is None or not hasattr(config, "scan_layers"):
        return config
    return dataclasses.replace(config, scan_layers=bool(scan_layers))


def _token_ids(config: Any) -> tuple:
    return (jnp.zeros((1, 2), jnp.int32),)


@dataclasses.dataclass(frozen=True)
class Task:
    """One task of a family: which Linen module, and how its parameters sit.

    Attributes:
      module: ``(config, dtype) -> nn.Module``.
      backbone: the top-level key of the backbone in this task's params and the prefix of its checkpoint
        names (``"model"``, ``"bert"``, ``"transformer"``); ``None`` when the params are the backbone itself.
      head: regexes of the leaves a base checkpoint lacks for this task (a new classifier): initialised,
        reported in ``Loaded.new_params`` and trained in full by default. A checkpoint that has them selects
        this task when none is asked for.
      optional: regexes of more leaves initialised when the checkpoint lacks them, or left out when saving
        params that lack them (BERT's pooler).
      hf_class: the ``transformers`` class, ``{}`` standing for the config class's prefix
        (``"{}ForCausalLM"`` -> ``LlamaForCausalLM``), written to ``config.json`` ``architectures``.
      peft_task_type: PEFT's ``task_type`` for adapters of this task; ``None`` for PEFT's plain ``PeftModel``,
        which passes any inputs through (PEFT's task classes pass ``input_ids``, which audio models lack).
      inputs: ``config -> example inputs`` for ``module.init`` (default: token ids ``(1, 2)``).
    """

    module: Callable[[Any, Any], Any]
    backbone: str | None = None
    head: tuple[str, ...] = ()
    optional: tuple[str, ...] = ()
    hf_class: str = "{}Model"
    peft_task_type: str | None = "FEATURE_EXTRACTION"
    inputs: Callable[[Any], tuple] = _token_ids


# --------------------------------------------------------------------------------------------- GGUF


@dataclasses.dataclass(frozen=True)
class GGUF:
    """How llama.cpp's GGUF files of a family read.

    Attributes:
      model_types: ``general.architecture`` -> the Hugging Face ``model_type`` it stands for.
      tensors: regex over Hugging Face module names -> GGUF name template (``re`` groups), e.g.
        ``r"model\\.layers\\.(\\d+)\\.self_attn\\.q_proj": r"blk.\\1.attn_q"``; ``.weight`` / ``.bias`` carry over.
        A tuple of templates: the checkpoint tensor is those GGUF tensors concatenated along its second-to-last
        axis (a fused ``gate_up_proj`` from ``ffn_gate`` and ``ffn_up``).
      config: GGUF metadata key (after ``"<arch>."``) -> Hugging Face config field.
      required: the keys of ``config`` a file must have.
      derive: ``(metadata, tensor_names, gguf_arch) -> {HF config field: value}``: more fields (overriding the
        generic ones: tied embeddings, vocabulary size, special tokens, RoPE).
      from_gguf: ``(hf_tensor_name, array, config) -> array``: a value fix after dequantisation (the array is in
        the checkpoint's layout), e.g. undoing llama.cpp's RoPE row permutation. ``to_gguf`` is its inverse.
      task: the task whose params a GGUF file holds.
    """

    model_types: Mapping[str, str]
    tensors: Mapping[str, str | tuple[str, ...]]
    config: Mapping[str, str]
    required: tuple[str, ...] = ()
    derive: Callable[[Mapping[str, Any], set[str], str], dict] | None = None
    from_gguf: Callable[[str, np.ndarray, Any], np.ndarray] | None = None
    to_gguf: Callable[[str, np.ndarray, Any], np.ndarray] | None = None
    task: str = "causal-lm"

    @functools.cached_property
    def _tensors(self) -> tuple[tuple[re.Pattern, str], ...]:
        return tuple((re.compile(k), v) for k, v in self.tensors.items())

    def names(self, hf_name: str) -> tuple[str, ...]:
        """The GGUF name(s) of checkpoint tensor ``hf_name`` (``model.layers.0.self_attn.q_proj.weight`` ->
        ``("blk.0.attn_q.weight",)``); ``()`` when the table has no entry for its module."""
        module, _, leaf = hf_name.rpartition(".")
        for pattern, template in self._tensors:
            m = pattern.fullmatch(module)
            if m:
                templates = (template,) if isinstance(template, str) else template
                return tuple(f"{m.expand(t)}.{leaf}" for t in templates)
        return ()

    def name(self, hf_name: str) -> str | None:
        """The one GGUF name of checkpoint tensor ``hf_name``, or ``None`` (see :meth:`names`)."""
        names = self.names(hf_name)
        return names[0] if len(names) == 1 else None


# ------------------------------------------------------------------------------------- architecture


@dataclasses.dataclass(frozen=True)
class Architecture:
    """A model family, declared (see the module docstring for what each field means and how to add one)."""

    name: str
    model_types: tuple[str, ...]
    config: type
    tasks: Mapping[str, Task]
    names: Names = Names()
    gguf: GGUF | None = None
    presets: Mapping[str, tuple[str, ...]] = dataclasses.field(default_factory=dict)
    adapt: Callable[[Any, Sequence[str], str], Any] | None = None
    preprocessor: Callable[[Any, Any], Any] | None = None
    logical_axes: tuple[tuple[str, tuple[str | None, ...]], ...] = ()

    def __post_init__(self):
        if not self.tasks:
            raise ArgumentError(f"architecture {self.name!r} declares no task")

    # --- tasks

    @property
    def default_task(self) -> str:
        return next(iter(self.tasks))

    def task(self, task: str | None) -> str:
        """``task`` checked (``None``: the default task)."""
        task = self.default_task if task is None else task
        if task not in self.tasks:
            raise ArgumentError(f"{self.name} supports tasks {tuple(self.tasks)}, got {task!r}")
        return task

    def build(self, config: Any, dtype: Any = jnp.float32, task: str | None = None):
        """The Linen module of ``task`` (``dtype``: the compute dtype)."""
        return self.tasks[self.task(task)].module(config, jnp.dtype(dtype))

    def init_params(self, config: Any, key: jax.Array, task: str | None = None) -> dict:
        """Randomly initialised float32 parameters of ``task`` (the families' Hugging Face init scheme)."""
        task = self.task(task)
        return self.build(config, jnp.float32, task).init(key, *self.tasks[task].inputs(config))["params"]

    def shapes(self, config: Any, task: str | None = None) -> dict[Path, jax.ShapeDtypeStruct]:
        """``{path: ShapeDtypeStruct}`` of ``task``'s parameters, computed without allocating them."""
        return tree.flatten(jax.eval_shape(lambda: self.init_params(config, jax.random.key(0), task)))

    def backbones(self) -> tuple[str, ...]:
        """The backbone keys of the tasks (the checkpoint prefixes this family's names may carry)."""
        return tuple(dict.fromkeys(t.backbone for t in self.tasks.values() if t.backbone))

    def task_of(self, top_keys: set[str]) -> str | None:
        """The task of params with these top-level keys: the first task whose backbone key is among them, else
        the task whose params are the backbone itself (``None`` when there is none)."""
        for name, t in self.tasks.items():
            if t.backbone is not None and t.backbone in top_keys:
                return name
        return next((n for n, t in self.tasks.items() if t.backbone is None), None)

    # --- checkpoints

    def checkpoint_prefix(self, names: Sequence[str]) -> str | None:
        """The backbone prefix the tensor ``names`` of a checkpoint carry (``None``: unprefixed)."""
        for prefix in self.backbones():
            if any(n.startswith(prefix + ".") for n in names):
                return prefix
        return None

    def checkpoint_path(self, path: Path, task: str, prefix: str | None) -> Path:
        """The path whose Hugging Face name ``path`` of ``task`` has in a checkpoint with ``prefix``."""
        backbone = self.tasks[task].backbone
        if backbone is not None:
            if path[0] != backbone:
                return path  # a head: named from the top
            path = path[1:]
        return (prefix, *path) if prefix else path

    def detect_task(self, config: Any, names: Sequence[str]) -> str:
        """The task a checkpoint holds when none is asked for: the first task with a head whose tensors are all
        present, else the default task."""
        present = set(names)
        prefix = self.checkpoint_prefix(names)
        for name, t in self.tasks.items():
            if not t.head:
                continue
            heads = [p for p in self.shapes(config, name) if any(re.fullmatch(h, tree.join(p)) for h in t.head)]
            if heads and all(
                n in present
                for p in heads
                for n in self.names.tensor(self.checkpoint_path(p, name, prefix), config).names
            ):
                return name
        return self.default_task

    def hf_class(self, hf_config: Any, task: str) -> str:
        """The ``transformers`` class name of ``task`` for ``hf_config`` (``LlamaForCausalLM``)."""
        return self.tasks[task].hf_class.format(type(hf_config).__name__.removesuffix("Config"))

    # --- LoRA presets

    def preset_rules(self, preset: str) -> list[str]:
        """The regexes over '/'-joined paths that select the kernels of the PEFT ``target_modules`` of
        ``preset`` (PEFT's rule: a module matches an entry that equals it or is a dot-separated suffix of it)."""
        if preset not in self.presets:
            raise ArgumentError(f"{self.name} declares presets {sorted(self.presets)}, got {preset!r}")
        return ["(.*/)?" + "/".join(map(re.escape, m.split("."))) + "/kernel" for m in self.presets[preset]]


# -------------------------------------------------------------------------------------------- registry

_REGISTERED: dict[str, Architecture] = {}


def register(arch: Architecture) -> Architecture:
    """Add a family (one defined outside :data:`FAMILIES`); a family of the same name is replaced."""
    _REGISTERED[arch.name] = arch
    return arch


@functools.cache
def _imported() -> tuple[Architecture, ...]:
    return tuple(importlib.import_module(m).ARCHITECTURE for m in FAMILIES)


def families() -> tuple[Architecture, ...]:
    """Every registered family, :data:`FAMILIES` first (importing their modules on first use)."""
    known = {a.name: a for a in _imported()}
    known.update(_REGISTERED)
    return tuple(known.values())


def model_types() -> list[str]:
    return sorted(t for a in families() for t in a.model_types)


def for_model_type(model_type: str | None) -> Architecture:
    """The family of a Hugging Face ``model_type``; ``ValueError`` naming the supported ones otherwise."""
    for arch in families():
        if model_type in arch.model_types:
            return arch
    raise ArgumentError(f"unsupported model_type {model_type!r}; lora_jax.models supports {model_types()}")


def for_config(config: Any) -> Architecture:
    """The family whose ``Config`` ``config`` is; ``TypeError`` for anything else."""
    for arch in families():
        if type(config) is arch.config:
            return arch
    raise ArgumentTypeError(
        f"expected the Config of a lora_jax model family ({[a.name for a in families()]}), got "
        f"{type(config).__module__}.{type(config).__qualname__}"
    )


def for_gguf(gguf_arch: str | None) -> Architecture | None:
    """The family that reads GGUF files of ``general.architecture == gguf_arch``, or ``None``."""
    for arch in families():
        if arch.gguf is not None and gguf_arch in arch.gguf.model_types:
            return arch
    return None


def gguf_architectures() -> list[str]:
    return sorted(k for a in families() if a.gguf is not None for k in a.gguf.model_types)


def for_paths(paths: Sequence[Sequence[str]]) -> Architecture | None:
    """A guess from parameter paths alone: the first family one of whose list modules (``layers_N``) appears
    in a path; ``None`` when none does. Families with the same lists name the same way."""
    joined = [tree.join(p) for p in paths]
    for arch in families():
        if arch.names.lists and any(re.search(rf"(^|/)({'|'.join(arch.names.lists)})_\d+/", p) for p in joined):
            return arch
    return None


__all__ = [
    "FAMILIES",
    "GENERIC_NAMES",
    "GGUF",
    "LEAF_NAMES",
    "SAME",
    "TRANSPOSE",
    "Architecture",
    "Layout",
    "Names",
    "Rule",
    "Task",
    "Tensor",
    "families",
    "for_config",
    "for_gguf",
    "for_model_type",
    "for_paths",
    "gguf_architectures",
    "layer_stacked",
    "model_types",
    "permuted",
    "register",
    "stacked",
    "with_scan_layers",
]
