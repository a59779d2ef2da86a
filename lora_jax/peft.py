"""Hugging Face PEFT LoRA adapters in and out: the exact on-disk format, both ways.

A PEFT LoRA adapter is a folder with two files:

    adapter_config.json          LoraConfig: peft_type "LORA", r, lora_alpha, target_modules, use_rslora,
                                 rank_pattern, alpha_pattern, modules_to_save, fan_in_fan_out, ...
    adapter_model.safetensors    base_model.model.<module>.lora_A.weight            (r, in)
                                 base_model.model.<module>.lora_B.weight            (out, r)
                                 base_model.model.<module>.lora_magnitude_vector    (out,)    DoRA only
                                 base_model.model.<module>.lora_embedding_A         (r, num_embeddings)
                                 base_model.model.<module>.lora_embedding_B         (dim, r)
                                 base_model.model.<module>.<param>                  a module trained in full
                                                                                    (modules_to_save)

``<module>`` is the module's name inside the ``transformers`` model. This project's parameter paths mirror those
names (``model.layers.0.self_attn.q_proj`` <-> ``model/layers_0/self_attn/q_proj/kernel``; each family's name rule
is part of its declaration, :class:`lora_jax.models.arch.Names`), so an adapter maps onto our tree one to one,
with ``A = lora_A.weight.T`` ``(in, r)`` and ``B = lora_B.weight.T`` ``(r, out)``. (A ``Conv1D`` layer stores its
weight ``(in, out)``; PEFT marks it ``fan_in_fan_out`` but its LoRA factors keep the layout above, so they map
the same way.)

Mixtures of experts: PEFT reaches the stacked expert parameters (``mlp.experts.gate_up_proj``, ``(E, out, in)``
at run time) with ``target_parameters``; their tensors are ``<module>.lora_A.weight (r*E, in)`` /
``lora_B.weight (out, r*E)``, nested as ``<module>.base_layer.lora_A.weight`` for the parameter registered
before the outermost one. They map onto this project's per-expert adapters ``a (E, in, r)``, ``b (E, r, out)``
(:func:`expert_factors_from_peft`), both ways; parameters are named as the ``transformers`` model names them at
run time, which a checkpoint may not (one tensor per expert).

PEFT's scaling is ``lora_alpha / r`` (``lora_alpha / sqrt(r)`` with ``use_rslora``), where ``r`` and ``lora_alpha``
of a module come from ``rank_pattern`` / ``alpha_pattern`` when a key matches the module name: a key matches when
it is a regex for a dot-separated suffix of the name (``re.match(rf"(.*\\.)?({key})$", name)``), first key in
order wins. :func:`load_peft` follows these rules; :func:`save_peft` writes full module names as pattern keys.

    loaded = lora.load_peft("path/to/adapter", params, config=config)
    params = loaded.update(params)                   # modules_to_save, e.g. a trained classifier head
    logits = model.apply({"params": lora.wrap(params, loaded.adapters)}, ids)
    lora.save_peft(adapters, "out/", config=config, base_model_name_or_path="org/base-model")

Nothing here imports torch or ``peft``: the files are read and written with ``safetensors``' numpy API.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import re
from collections import Counter
from collections.abc import Mapping
from pathlib import Path
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from lora_jax import core, regex, stacking, tree
from lora_jax.errors import ArgumentTypeError, MissingFileError, PeftError, UnsupportedError
from lora_jax.untrusted import check_array, nonfinite_summary

PyTree = Any
logger = logging.getLogger("lora_jax.peft")

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
PICKLE_NAME = "adapter_model.bin"
PREFIX = "base_model.model."

# The key suffixes of a LoRA module in PEFT's state dict (the adapter name is removed when PEFT saves).
_LORA_KEY = re.compile(
    r"(?P<module>.+)\.(?P<kind>lora_A\.weight|lora_B\.weight|lora_embedding_A|lora_embedding_B|"
    r"lora_magnitude_vector(?:\.weight)?)"
)
# Settings that change what the saved tensors mean in ways this loader does not implement.
_UNSUPPORTED = {
    "lora_bias": "a bias on lora_B (lora_bias=True)",
    "layer_replication": "layer replication",
    "trainable_token_indices": "trainable tokens (trainable_token_indices)",
    "alora_invocation_tokens": "activated LoRA (alora_invocation_tokens)",
    "use_qalora": "QA-LoRA (use_qalora)",
    "use_bdlora": "BD-LoRA (use_bdlora)",
}
# init_lora_weights values for which PEFT also rewrites the base weights: such an adapter is relative to a
# modified base unless it was converted when saved (path_initial_model_for_weight_conversion).
_BASE_CHANGING_INITS = ("pissa", "olora", "corda", "loftq")


def _has_dora() -> bool:
    return "magnitude" in {f.name for f in dataclasses.fields(core.LoraAdapter)}


def _dora_missing(what: str) -> NotImplementedError:
    return NotImplementedError(
        f"{what} uses DoRA (lora_magnitude_vector / use_dora=True), and this lora_jax has no DoRA support: "
        "lora_jax.core.LoraAdapter has no 'magnitude' field"
    )


# ----------------------------------------------------------------------------------------------- naming


@dataclasses.dataclass(frozen=True)
class Naming:
    """How this project's parameter paths map to Hugging Face module names for one model family.

    ``arch``: the family's declaration (:class:`lora_jax.models.arch.Architecture`), or ``None`` for a tree of
    no known family (then list index ``name_N`` -> ``name.N`` for every module and any ``kernel`` transposed);
    ``names``: its name rule.
    """

    arch: Any
    names: Any

    @property
    def backbones(self) -> tuple[str, ...]:
        """The prefixes of the backbone in task models, which PEFT adapters trained on the bare backbone lack."""
        return self.arch.backbones() if self.arch is not None else ()

    def tensor_name(self, path: tuple[str, ...]) -> str:
        """``("model", "layers_0", "self_attn", "q_proj", "kernel")`` -> ``"model.layers.0.self_attn.q_proj.weight"``:
        the parameter's name in the ``transformers`` model at run time, which PEFT uses (a checkpoint may store it
        otherwise: one tensor per expert for ``model.layers.0.mlp.experts.gate_up_proj``)."""
        from lora_jax.models.arch import LEAF_NAMES

        return f"{self.names.module(tuple(path))}.{LEAF_NAMES.get(path[-1], path[-1])}"

    def module_name(self, path: tuple[str, ...]) -> str:
        """The module owning a parameter: ``"model.layers.0.self_attn.q_proj"``."""
        return self.names.module(tuple(path))

    def transposed(self, path: tuple[str, ...]) -> bool:
        """Whether our leaf is stored with its axes reversed (``nn.Linear`` kernels; not ``Conv1D`` kernels,
        embedding tables or vectors)."""
        return self.names.tensor(tuple(path)).layout.transposed

    def to_hf(self, path: tuple[str, ...], x: np.ndarray) -> np.ndarray:
        return np.ascontiguousarray(self.names.tensor(tuple(path)).layout.save(x)[0])

    def from_hf(self, path: tuple[str, ...], x: np.ndarray) -> np.ndarray:
        return np.ascontiguousarray(self.names.tensor(tuple(path)).layout.load([x]))


def naming(config: Any = None, paths: list[tuple[str, ...]] | None = None) -> Naming:
    """The :class:`Naming` of a model: from its ``Config`` (any registered family's) when given, else guessed from
    parameter paths (:func:`lora_jax.models.arch.for_paths`), else the generic rule."""
    from lora_jax.models import arch as arch_lib

    arch = arch_lib.for_config(config) if config is not None else arch_lib.for_paths(paths or [])
    return Naming(arch, arch.names if arch is not None else arch_lib.GENERIC_NAMES)


def _paths(tree_: PyTree) -> list[tuple[tuple[str, ...], Any]]:
    return tree.leaves(tree_, is_leaf=lambda x: core.is_adapter(x) or core.is_lora_weight(x))


# ------------------------------------------------------------------------------------------------- load


class LoadedPeft(NamedTuple):
    """What :func:`load_peft` returns.

    ``adapters``: the adapter tree for :func:`lora_jax.wrap` / :func:`lora_jax.merge`.
    ``trained``: the leaves PEFT trained in full (``modules_to_save``, e.g. a classifier head, or biases with
    ``bias != "none"``), as a nested dict mirroring ``params`` (the shape of ``lora.split(...)[1]["params"]``);
    empty when there are none. Put them into the base with :meth:`update`.
    ``config``: the adapter's ``adapter_config.json`` as a dict.
    """

    adapters: PyTree
    trained: dict
    config: dict

    def update(self, params: PyTree) -> PyTree:
        """``params`` with the fully trained leaves replaced by the adapter's values (a new tree)."""
        return with_leaves(params, self.trained)


def with_leaves(params: PyTree, leaves: Mapping) -> PyTree:
    """``params`` with every leaf present in the nested dict ``leaves`` replaced (paths must exist)."""
    new = {tuple(p): v for p, v in _paths(leaves)}
    used = set()

    def put(path, leaf):
        key = tree.path_tuple(path)
        if key in new:
            used.add(key)
            return new[key]
        return leaf

    out = jax.tree_util.tree_map_with_path(put, params, is_leaf=core.is_lora_weight)
    missing = sorted("/".join(k) for k in set(new) - used)
    if missing:
        raise PeftError(f"trained leaves {missing[:5]} have no place in these params")
    return out


def _resolve(folder_or_hub_id: str | os.PathLike, revision: str | None) -> Path:
    name = os.fspath(folder_or_hub_id)
    path = Path(name).expanduser()
    if path.is_dir():
        return path
    if path.exists():
        raise PeftError(f"{path}: expected a PEFT adapter folder (with {CONFIG_NAME} and {WEIGHTS_NAME}), got a file")
    from lora_jax.models import hf

    if os.path.isabs(name) or name.startswith((".", "~")) or not hf.is_hub_id(name):
        raise MissingFileError(f"no such adapter folder: {name!r}")
    import huggingface_hub

    try:
        return Path(
            huggingface_hub.snapshot_download(name, revision=revision, allow_patterns=[CONFIG_NAME, WEIGHTS_NAME])
        )
    except Exception as e:
        offline = os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes", "on")
        raise MissingFileError(
            f"could not fetch the adapter {name!r} from the Hugging Face hub"
            f"{' (HF_HUB_OFFLINE is set and it is not in the local cache)' if offline else ''}: "
            f"{type(e).__name__}: {(str(e).splitlines() or [''])[0].rstrip('.')}. Pass a local folder with "
            f"{CONFIG_NAME} and {WEIGHTS_NAME} instead."
        ) from None


def read_config(folder: str | os.PathLike) -> dict:
    """``adapter_config.json`` of a PEFT folder, checked to be a LoRA adapter this module can read."""
    file = Path(folder) / CONFIG_NAME
    if not file.is_file():
        raise PeftError(f"{Path(folder)}: no {CONFIG_NAME} (expected a PEFT adapter folder)")
    try:
        cfg = json.loads(file.read_text())
    except (ValueError, RecursionError) as e:
        raise PeftError(f"{file}: not valid JSON ({e})") from None
    if not isinstance(cfg, dict):
        raise PeftError(f"{file}: expected a JSON object, got {type(cfg).__name__}")
    if cfg.get("peft_type") != "LORA":
        raise PeftError(f"{file}: peft_type is {cfg.get('peft_type')!r}; only LoRA adapters ('LORA') are supported")
    for field, what in _UNSUPPORTED.items():
        if cfg.get(field):
            raise UnsupportedError(f"{file}: {what} is not supported ({field}={cfg[field]!r})")
    if cfg.get("use_dora") and not _has_dora():
        raise _dora_missing(str(file))
    _check_numbers_and_patterns(cfg, file)
    init = cfg.get("init_lora_weights")
    if isinstance(init, str) and init.lower().startswith(_BASE_CHANGING_INITS):
        logger.warning(
            "%s: init_lora_weights=%r rewrites the base weights in PEFT; unless the adapter was converted "
            "when saved, it only fits that modified base",
            file,
            init,
        )
    return cfg


def _check_numbers_and_patterns(cfg: dict, file: Path) -> None:
    """An adapter_config.json is untrusted input: its numbers must be finite and in range (a NaN or infinite
    alpha would give NaN outputs), its pattern keys valid regexes, compiled for linear-time matching (RE2: no
    backreferences or lookaround, so no pattern can take exponential time on a module name)."""

    def number(value, field, integer=False, low=0.0, low_ok=False, high=None):
        ok = (
            not isinstance(value, bool)
            and isinstance(value, int if integer else (int, float))
            and math.isfinite(value)
            and (value >= low if low_ok else value > low)
            and (high is None or value < high)
        )
        if not ok:
            kind = "an integer" if integer else "a finite number"
            bound = f">= {low:g}" if low_ok else f"> {low:g}"
            raise PeftError(
                f"{file}: {field} must be {kind} {bound}{f' and < {high:g}' if high else ''}, got {value!r:.60}"
            )

    number(cfg.get("r"), "r", integer=True)
    number(cfg.get("lora_alpha"), "lora_alpha")
    number(cfg.get("lora_dropout") or 0.0, "lora_dropout", low_ok=True, high=1.0)
    for field in ("use_rslora", "use_dora", "fan_in_fan_out"):
        if field in cfg and cfg[field] is not None and not isinstance(cfg[field], bool):
            raise PeftError(f"{file}: {field} must be true or false, got {cfg[field]!r:.60}")
    for field, integer in (("rank_pattern", True), ("alpha_pattern", False)):
        patterns = cfg.get(field)
        if patterns is None:
            continue
        if not isinstance(patterns, dict):
            raise PeftError(
                f"{file}: {field} must be a mapping of module patterns to numbers, got {type(patterns).__name__}"
            )
        for key, value in patterns.items():
            _suffix_pattern(key, f"{file}: {field} key")
            number(value, f"{field}[{key!r:.60}]", integer=integer)


def _suffix_pattern(key: Any, where: str):
    """PEFT's pattern for a module-name suffix, compiled with RE2 (:mod:`lora_jax.regex`: linear-time matching).
    Only a pattern RE2 refuses becomes a :class:`PeftError`; nothing else is swallowed."""
    if not isinstance(key, str) or not key:
        raise PeftError(f"{where} {key!r:.60} must be a non-empty string (a regex of a module name)")
    return regex.compile(rf"(.*\.)?({key})$", where, PeftError, shown=f"{where} {key!r:.60}")


def pattern_value(patterns: Mapping[str, Any] | None, module: str, default: Any) -> Any:
    """PEFT's ``rank_pattern`` / ``alpha_pattern`` lookup: the value of the first key that is a regex for a
    dot-separated suffix of ``module`` (``re.match(rf"(.*\\.)?({key})$", module)``, run by RE2), else
    ``default``."""
    for key, value in (patterns or {}).items():
        if _suffix_pattern(key, "pattern").match(module):
            return value
    return default


def _read_tensors(folder: Path) -> dict[str, np.ndarray]:
    file = folder / WEIGHTS_NAME
    if not file.is_file():
        hint = (
            f" It has {PICKLE_NAME}: only safetensors is read here (re-save the adapter with safe_serialization=True)."
            if (folder / PICKLE_NAME).is_file()
            else ""
        )
        raise PeftError(f"{folder}: no {WEIGHTS_NAME}.{hint}")
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(file), framework="np") as f:
            return {k: f.get_tensor(k) for k in f.keys()}
    except (SafetensorError, OSError, ValueError) as e:  # a damaged file; anything else is not hidden
        raise PeftError(f"{file}: not a readable safetensors file ({e})") from None


def _index(params: PyTree, names: Naming) -> dict[str, tuple[tuple[str, ...], Any]]:
    """Hugging Face tensor name -> (our path, leaf), with aliases for the backbone prefix toggled (an adapter
    trained on ``BertModel`` loads onto ``BertForSequenceClassification`` params and back)."""
    index: dict[str, tuple[tuple[str, ...], Any]] = {}
    aliases: dict[str, tuple[tuple[str, ...], Any]] = {}
    for path, leaf in _paths(params):
        if core.is_lora_weight(leaf) or core.is_adapter(leaf):
            raise PeftError(
                f"load_peft: params hold a {type(leaf).__name__} at {'/'.join(path)}; pass the plain "
                "base params (not wrapped or merged)"
            )
        name = names.tensor_name(path)
        index[name] = (path, leaf)
        for backbone in names.backbones:
            prefix = backbone + "."
            alias = name[len(prefix) :] if name.startswith(prefix) else prefix + name
            aliases.setdefault(alias, (path, leaf))
    return {**aliases, **index}


# ------------------------------------------------------------------------------------ target_parameters
# PEFT wraps each targeted nn.Parameter in a lora.ParamWrapper; several parameters of one module nest, the one
# registered first innermost. transformers' expert modules register gate_up_proj (or gate_proj, up_proj) before
# down_proj (biases after their weight), the order of the forward pass; other names follow, alphabetically.
_PARAM_ORDER = (
    "gate_up_proj",
    "gate_up_proj_bias",
    "gate_proj",
    "up_proj",
    "w1",
    "w3",
    "down_proj",
    "down_proj_bias",
    "w2",
)


def _registration_order(params: list[str]) -> list[str]:
    return sorted(params, key=lambda p: (_PARAM_ORDER.index(p) if p in _PARAM_ORDER else len(_PARAM_ORDER), p))


def _targets_parameter(name: str, targets: list[str]) -> bool:
    """PEFT's rule for ``target_parameters``: ``module.param`` equals an entry or ends with ``"." + entry``."""
    return any(name == t or name.endswith("." + t) for t in targets)


def _parameter_target(module: str, parts: Mapping, targets: list[str], index: Mapping, source: str):
    """For the LoRA tensors of PEFT module ``module`` (``<m>`` or ``<m>.base_layer...``): ``(param name,
    runtime name, path, leaf)`` of the ``target_parameters`` entry they belong to, or ``None`` when ``<m>``
    has no targeted parameter (an ordinary ``target_modules`` LoRA)."""
    m = re.fullmatch(r"(?P<module>.+?)(?P<nest>(\.base_layer)*)", module)
    base, depth = m["module"], m["nest"].count(".base_layer")
    wrapped = _registration_order(
        [
            n[len(base) + 1 :]
            for n in index
            if n.startswith(base + ".") and "." not in n[len(base) + 1 :] and _targets_parameter(n, targets)
        ]
    )
    if not wrapped:
        return None
    if depth >= len(wrapped):
        key = next(iter(parts.values()))[0]
        raise PeftError(
            f"{source}: tensor {key!r} is nested {depth} wrapper(s) deep in {base!r}, whose targeted "
            f"parameters are only {wrapped} (target_parameters)"
        )
    param = wrapped[len(wrapped) - 1 - depth]  # the parameter registered last wraps outermost
    name = f"{base}.{param}"
    return param, name, *index[name]


def _load_parameter_adapter(wrapper, parts: Mapping, cfg: Mapping, use_rslora: bool, dtype, source: str):
    """One ``lora.ParamWrapper``'s tensors as a :class:`~lora_jax.core.LoraAdapter` (per expert for a 3-D
    expert stack, see :func:`expert_factors_from_peft`)."""
    param, name, path, leaf = wrapper
    for k in ("lora_A.weight", "lora_B.weight"):
        if k not in parts:
            raise PeftError(f"{source}: {next(iter(parts.values()))[0]!r} has no matching lora {k} for {name}")
    if set(parts) - {"lora_A.weight", "lora_B.weight"}:
        raise PeftError(
            f"{source}: {name} (target_parameters) has tensors {sorted(parts)}; PEFT's ParamWrapper has "
            "only lora_A / lora_B"
        )
    (a_key, a), (b_key, b) = parts["lora_A.weight"], parts["lora_B.weight"]
    if leaf.ndim not in (2, 3):
        raise PeftError(
            f"{source}: {a_key!r} targets {'/'.join(path)} of shape {tuple(leaf.shape)}; PEFT adapts 2-D "
            "and 3-D parameters"
        )
    n_exp, d_in, d_out = leaf.shape if leaf.ndim == 3 else (1, *leaf.shape)
    if (
        a.ndim != 2
        or b.ndim != 2
        or a.shape[1] != d_in
        or b.shape[0] != d_out
        or a.shape[0] != b.shape[1]
        or a.shape[0] % n_exp
    ):
        raise PeftError(
            f"{source}: tensors {a_key!r} {tuple(a.shape)} / {b_key!r} {tuple(b.shape)} do not fit "
            f"{'/'.join(path)} of shape {tuple(leaf.shape)}: expected (r*{n_exp}, {d_in}) / "
            f"({d_out}, r*{n_exp})"
        )
    r = a.shape[0] // n_exp
    want_r = pattern_value(cfg.get("rank_pattern"), name, cfg["r"])
    if int(want_r) != r:
        raise PeftError(
            f"{source}: tensor {a_key!r} has rank {r} per expert, but {CONFIG_NAME} gives {name} rank "
            f"{want_r} (r / rank_pattern)"
        )
    alpha = float(pattern_value(cfg.get("alpha_pattern"), name, cfg["lora_alpha"]))
    scale = alpha / (math.sqrt(r) if use_rslora else r)
    if leaf.ndim == 3:
        a3, b3 = expert_factors_from_peft(a, b, n_exp)
        fields = dict(a=jnp.asarray(a3, dtype), b=jnp.asarray(b3, dtype), in_shape=(n_exp, d_in), out_shape=(d_out,))
    else:
        fields = dict(a=jnp.asarray(a.T, dtype), b=jnp.asarray(b.T, dtype), in_shape=(d_in,), out_shape=(d_out,))
    return path, core.LoraAdapter(**fields, alpha=alpha, scale=scale)


def _restack(tree_: PyTree, like: PyTree, source: Any) -> PyTree:
    try:
        return stacking.stack(tree_, like=like)
    except ValueError as e:  # ArgumentError from stacking.stack
        raise PeftError(
            f"{source}: the adapter does not cover every layer of the scanned model's stack the same way "
            f"({e}); load the model with unrolled layers (scan_layers=False) to use it"
        ) from e


def _close(name: str, candidates: list[str], n: int = 3) -> list[str]:
    tail = name.split(".")[-2:]
    return [c for c in candidates if c.split(".")[-2:] == tail][:n] or candidates[:n]


def load_peft(
    folder_or_hub_id: str | os.PathLike,
    params: PyTree,
    *,
    config: Any = None,
    dtype=jnp.float32,
    revision: str | None = None,
) -> LoadedPeft:
    """Read a PEFT LoRA adapter onto this project's parameters.

    Args:
      folder_or_hub_id: a folder with ``adapter_config.json`` and ``adapter_model.safetensors``, or a hub id
        (fetched with ``huggingface_hub``; offline that fails with an error that says so).
      params: the base parameters the adapter was trained on (plain arrays, e.g. from
        :func:`lora_jax.models.load`).
      config: the model's ``Config`` (names the architecture; guessed from ``params`` when ``None``).
      dtype: dtype of the adapter factors (float32: adapters train in full precision).
      revision: the hub revision.

    Returns:
      :class:`LoadedPeft` ``(adapters, trained, config)``. Each adapter has ``scale = lora_alpha / r`` (or
      ``/ sqrt(r)`` with ``use_rslora``), with ``r`` and ``lora_alpha`` resolved per module through
      ``rank_pattern`` / ``alpha_pattern``; DoRA magnitudes go into the adapters; ``modules_to_save`` tensors (and
      trained biases) come back in ``trained``.

    Raises:
      PeftError: a tensor whose module has no parameter here, a shape that does not fit the kernel, a rank that
        disagrees with ``rank_pattern``, an A without its B; each names the tensor.
      NotImplementedError: PEFT features that change the forward pass and are not implemented (named).
    """
    if stacking.is_stacked(params):  # a scanned model: PEFT files name layers; read per layer, then stack
        loaded = load_peft(
            folder_or_hub_id, stacking.unstack(params), config=stacking.unrolled(config), dtype=dtype, revision=revision
        )
        return LoadedPeft(
            _restack(loaded.adapters, params, folder_or_hub_id),
            _restack(loaded.trained, params, folder_or_hub_id),
            loaded.config,
        )
    folder = _resolve(folder_or_hub_id, revision)
    cfg = read_config(folder)
    tensors = _read_tensors(folder)
    source = str(folder / WEIGHTS_NAME)
    names = naming(config, [p for p, _ in _paths(params)])
    index = _index(params, names)
    known = sorted(index)

    lora: dict[str, dict[str, np.ndarray]] = {}
    full: dict[tuple[str, ...], Any] = {}
    for key, x in tensors.items():
        check_array(x, key, source, error=PeftError)  # a float tensor with finite values (shapes: below, per use)
        if not key.startswith(PREFIX):
            raise PeftError(f"{source}: tensor {key!r} does not start with {PREFIX!r}; not a PEFT LoRA state dict")
        name = key[len(PREFIX) :]
        m = _LORA_KEY.fullmatch(name)
        if m:
            kind = m["kind"].removesuffix(".weight") if m["kind"].startswith("lora_magnitude") else m["kind"]
            lora.setdefault(m["module"], {})[kind] = (key, np.asarray(x))
            continue
        if ".lora_" in name:
            raise PeftError(f"{source}: tensor {key!r} is a LoRA tensor of a kind this loader does not know")
        # PEFT saves the full table of an adapted embedding as "<module>.base_layer.weight" (save_embedding_layers)
        name = name.replace(".base_layer.", ".")
        if name not in index:
            raise PeftError(
                f"{source}: tensor {key!r} (a module trained in full, modules_to_save) has no parameter "
                f"in these params; close names: {_close(name, known)}"
            )
        path, leaf = index[name]
        value = names.from_hf(path, np.asarray(x))
        if tuple(value.shape) != tuple(leaf.shape):
            raise PeftError(
                f"{source}: tensor {key!r} has shape {tuple(x.shape)}, but {'/'.join(path)} has shape "
                f"{tuple(leaf.shape)}{' (stored transposed)' if names.transposed(path) else ''}"
            )
        full[path] = jnp.asarray(value, leaf.dtype)

    use_rslora = bool(cfg.get("use_rslora", False))
    param_targets = list(cfg.get("target_parameters") or [])
    adapters: dict = {}
    for module, parts in lora.items():
        if param_targets:
            wrapper = _parameter_target(module, parts, param_targets, index, source)
            if wrapper is not None:
                path, ad = _load_parameter_adapter(wrapper, parts, cfg, use_rslora, dtype, source)
                tree.put(adapters, path, ad)
                continue
        kinds = set(parts)
        embedding = bool(kinds & {"lora_embedding_A", "lora_embedding_B"})
        a_kind, b_kind = ("lora_embedding_A", "lora_embedding_B") if embedding else ("lora_A.weight", "lora_B.weight")
        for k in (a_kind, b_kind):
            if k not in parts:
                other = next(iter(parts.values()))[0]
                raise PeftError(f"{source}: {other!r} has no matching {PREFIX}{module}.{k}")
        (a_key, a), (b_key, b) = parts[a_kind], parts[b_kind]
        target = f"{module}.weight"
        if target not in index:
            raise PeftError(
                f"{source}: tensor {a_key!r} targets module {module!r}, which has no kernel in these "
                f"params; close names: {_close(target, known)}"
            )
        path, leaf = index[target]
        if leaf.ndim != 2:
            raise PeftError(
                f"{source}: {a_key!r} targets {'/'.join(path)} of shape {tuple(leaf.shape)}; PEFT LoRA "
                "layers here are 2-D"
            )
        if embedding != (path[-1] == "embedding"):
            raise PeftError(
                f"{source}: {a_key!r} is a {'n embedding' if embedding else ' linear'} LoRA tensor but "
                f"{'/'.join(path)} is {'not ' if embedding else ''}an embedding table"
            )
        d_in, d_out = leaf.shape
        r = a.shape[0]
        want_a, want_b = ((r, d_in), (d_out, r))
        for key, x, want in ((a_key, a, want_a), (b_key, b, want_b)):
            if x.ndim != 2 or tuple(x.shape) != want:
                raise PeftError(
                    f"{source}: tensor {key!r} has shape {tuple(x.shape)}, expected {want} for "
                    f"{'/'.join(path)} of shape {tuple(leaf.shape)} (our kernel layout: in, out) at "
                    f"rank {r}"
                )
        want_r = pattern_value(cfg.get("rank_pattern"), module, cfg["r"])
        if int(want_r) != r:
            raise PeftError(
                f"{source}: tensor {a_key!r} has rank {r}, but {CONFIG_NAME} gives {module} rank "
                f"{want_r} (r / rank_pattern)"
            )
        alpha = float(pattern_value(cfg.get("alpha_pattern"), module, cfg["lora_alpha"]))
        scale = alpha / (math.sqrt(r) if use_rslora else r)
        fields = dict(
            a=jnp.asarray(a.T, dtype),
            b=jnp.asarray(b.T, dtype),
            alpha=alpha,
            scale=scale,
            in_shape=(d_in,),
            out_shape=(d_out,),
            dropout=float(cfg.get("lora_dropout", 0.0) or 0.0),
        )
        if "lora_magnitude_vector" in parts:
            m_key, mag = parts["lora_magnitude_vector"]
            if not _has_dora():
                raise _dora_missing(f"{source}: tensor {m_key!r}")
            if tuple(mag.shape) != (d_out,):
                raise PeftError(f"{source}: tensor {m_key!r} has shape {tuple(mag.shape)}, expected ({d_out},)")
            fields["magnitude"] = jnp.asarray(mag, dtype)
        elif cfg.get("use_dora"):
            raise PeftError(f"{source}: use_dora is set but {module} has no lora_magnitude_vector")
        tree.put(adapters, path, core.LoraAdapter(**fields))
    if not lora:
        logger.warning("%s: the adapter holds no LoRA tensors", source)
    return LoadedPeft(adapters, tree.unflatten(full), cfg)


# ------------------------------------------------------------------------------------------------- save


def _number(x: float) -> int | float:
    return int(x) if float(x).is_integer() else float(x)


def _most_common(values: list) -> Any:
    return Counter(values).most_common(1)[0][0]


def _close_to(a: float, b: float) -> bool:
    return math.isclose(a, b, rel_tol=1e-6, abs_tol=1e-12)


def _guess_task(names: Naming, paths: list[tuple[str, ...]]) -> tuple[str | None, str | None]:
    """(our task, PEFT task_type) from the adapted paths' top-level keys."""
    if names.arch is None:
        return None, None
    task = names.arch.task_of({p[0] for p in paths})
    return (task, names.arch.tasks[task].peft_task_type) if task is not None else (None, None)


def _module_universe(names: Naming, config: Any, task: str | None) -> set[str] | None:
    if names.arch is None or config is None or task is None:
        return None
    return {names.module_name(p) for p in names.arch.shapes(config, task)}


def _parameter_universe(names: Naming, config: Any, task: str | None) -> set[str] | None:
    """Every parameter's run-time name (``module.param``): what PEFT matches ``target_parameters`` against."""
    if names.arch is None or config is None or task is None:
        return None
    return {names.tensor_name(p) for p in names.arch.shapes(config, task)}


def target_modules(adapted: set[str], universe: set[str] | None) -> list[str]:
    """The shortest PEFT ``target_modules`` list (PEFT matches an entry when a module name equals it or ends with
    ``"." + entry``) that selects exactly ``adapted`` among ``universe``. Without a universe: the full names."""
    if universe is None:
        return sorted(adapted)
    others = universe - adapted
    chosen: set[str] = set()
    for name in adapted:
        parts = name.split(".")
        for n in range(1, len(parts) + 1):
            suffix = ".".join(parts[-n:])
            if parts[-n].isdigit() and n < len(parts):
                continue  # "layer.0.attention.output.dense" reads better than "0.attention.output.dense"
            if not any(o == suffix or o.endswith("." + suffix) for o in others):
                chosen.add(suffix)
                break
    return sorted(chosen)


def save_peft(
    adapters: PyTree,
    folder: str | os.PathLike,
    *,
    base_model_name_or_path: str | None = None,
    config: Any = None,
    modules_to_save: Mapping | None = None,
    task_type: str | None = None,
    revision: str | None = None,
    dtype=None,
) -> Path:
    """Write ``adapters`` as a PEFT LoRA adapter folder that ``peft.PeftModel.from_pretrained`` loads.

    Args:
      adapters: the adapter tree (from :func:`lora_jax.init`, trained).
      folder: created if needed; ``adapter_config.json`` and ``adapter_model.safetensors`` are written into it.
      base_model_name_or_path: recorded in the config (what ``AutoPeftModel`` loads the base from).
      config: the model's ``Config``: names the family and lets ``target_modules`` be written as short suffixes
        (``["q_proj", "v_proj"]``) instead of full module names.
      modules_to_save: leaves trained in full, as a nested dict mirroring the params (e.g.
        ``lora.split(...)[1]["params"]`` holding ``classifier/{kernel,bias}``). Saved under their Hugging Face
        names and listed in ``modules_to_save``; pass whole modules (kernel and bias).
      task_type: PEFT's task type; when ``None``, the declared type of the task the paths belong to (e.g.
        ``CAUSAL_LM`` for a causal LM's params, ``SEQ_CLS`` for a classifier's, ``FEATURE_EXTRACTION`` for a bare
        backbone).
      revision: the base model revision recorded in the config.
      dtype: dtype of the saved tensors (default: as the adapters hold them).

    Each module's rank and scale are written as PEFT computes them: ``r`` and ``lora_alpha`` are the most
    common values, other modules get ``rank_pattern`` / ``alpha_pattern`` entries keyed by their full module
    name, ``lora_alpha`` being set so that PEFT's ``lora_alpha / r`` (``/ sqrt(r)`` with ``use_rslora``) equals the
    adapter's ``scale``. Returns the folder.
    """
    adapters, config = stacking.unstack(adapters), stacking.unrolled(config)  # PEFT files name layers
    modules_to_save = None if modules_to_save is None else stacking.unstack(modules_to_save)
    items = [(tree.split(p), ad) for p, ad in core.adapter_items(adapters)]
    if not items:
        raise PeftError("save_peft: the adapter tree holds no LoraAdapter")
    names = naming(config, [p for p, _ in items])
    tensors: dict[str, np.ndarray] = {}

    def array(x) -> np.ndarray:
        x = np.asarray(x if dtype is None else jnp.asarray(x, dtype))
        return np.ascontiguousarray(x)

    ranks, modules, dora, params_adapted = {}, {}, [], {}
    experts = [(path, ad) for path, ad in items if ad.stack_shape]
    by_module: dict[str, list[str]] = {}
    for path, _ in experts:
        by_module.setdefault(names.module_name(path), []).append(path[-1])
    for path, ad in experts:  # expert stacks: PEFT's target_parameters (nested ParamWrappers)
        if len(ad.stack_shape) != 1 or len(ad.out_shape) != 1 or ad.is_dora or ad.dropout:
            raise PeftError(
                f"save_peft: {'/'.join(path)} is a stacked adapter {ad!r}; PEFT's target_parameters "
                "takes one expert axis, no DoRA and no dropout"
            )
        module = names.module_name(path)
        order = _registration_order(by_module[module])
        depth = len(order) - 1 - order.index(path[-1])
        name = f"{module}.{path[-1]}"
        modules[path] = name
        ranks[name] = ad.r
        params_adapted[name] = path
        key = PREFIX + module + ".base_layer" * depth
        tensors[f"{key}.lora_A.weight"], tensors[f"{key}.lora_B.weight"] = map(
            array, expert_factors_to_peft(np.asarray(ad.a), np.asarray(ad.b))
        )
    for path, ad in items:
        if ad.stack_shape:
            continue
        if len(ad.in_shape) != 1 or len(ad.out_shape) != 1:
            raise PeftError(
                f"save_peft: {'/'.join(path)} adapts a kernel of shape {ad.kernel_shape}; PEFT LoRA "
                "layers are 2-D (in, out)"
            )
        module = names.module_name(path)
        modules[path] = module
        ranks[module] = ad.r
        key = PREFIX + module
        if path[-1] == "embedding":
            tensors[f"{key}.lora_embedding_A"] = array(ad.a.T)
            tensors[f"{key}.lora_embedding_B"] = array(ad.b.T)
        else:
            tensors[f"{key}.lora_A.weight"] = array(ad.a.T)
            tensors[f"{key}.lora_B.weight"] = array(ad.b.T)
        magnitude = getattr(ad, "magnitude", None)
        if magnitude is not None:
            tensors[f"{key}.lora_magnitude_vector"] = array(magnitude)
            dora.append(module)
    if dora and len(dora) != len(items):
        raise PeftError(
            f"save_peft: PEFT's use_dora is one switch for the whole adapter, but only {len(dora)} of "
            f"{len(items)} modules have a DoRA magnitude"
        )

    # One rsLoRA switch for all modules: on when every scale is alpha / sqrt(r) and some are not alpha / r.
    rs = [_close_to(ad.scale, ad.alpha / math.sqrt(ad.r)) for _, ad in items]
    plain = [_close_to(ad.scale, ad.alpha / ad.r) for _, ad in items]
    use_rslora = all(rs) and not all(plain)
    alphas = {modules[p]: _number(round(ad.scale * (math.sqrt(ad.r) if use_rslora else ad.r), 10)) for p, ad in items}
    r = _most_common(list(ranks.values()))
    alpha = _most_common(list(alphas.values()))
    rank_pattern = {m: v for m, v in ranks.items() if v != r}
    alpha_pattern = {m: v for m, v in alphas.items() if v != alpha}

    saved_modules: list[str] = []
    for path, leaf in _paths(modules_to_save or {}):
        if not hasattr(leaf, "shape"):
            raise ArgumentTypeError(
                f"save_peft: modules_to_save leaf {'/'.join(path)} is a {type(leaf).__name__}, expected an array"
            )
        tensors[PREFIX + names.tensor_name(path)] = array(names.to_hf(path, np.asarray(leaf)))
        module = names.module_name(path)
        if module in ranks or any(p.startswith(module + ".") for p in params_adapted):
            raise PeftError(f"save_peft: {module} has an adapter and is also in modules_to_save; choose one")
        if module not in saved_modules:
            saved_modules.append(module)

    task, guessed_type = _guess_task(names, [p for p, _ in items])
    # PEFT's one switch for layers that store their weight (in, out) (Conv1D), as every adapted kernel does here
    linear = [p for p, ad in items if p[-1] != "embedding" and not ad.stack_shape]
    fan_in_fan_out = bool(linear) and not any(names.transposed(p) for p in linear)
    dropouts = [ad.dropout for _, ad in items]
    peft_config = {
        "peft_type": "LORA",
        "task_type": task_type if task_type is not None else guessed_type,
        "base_model_name_or_path": base_model_name_or_path,
        "revision": revision,
        "inference_mode": True,
        "r": r,
        "lora_alpha": alpha,
        "target_modules": target_modules(set(ranks) - set(params_adapted), _module_universe(names, config, task))
        if len(ranks) > len(params_adapted)
        else None,
        "target_parameters": target_modules(set(params_adapted), _parameter_universe(names, config, task))
        if params_adapted
        else None,
        "exclude_modules": None,
        "lora_dropout": _most_common(dropouts),
        "fan_in_fan_out": fan_in_fan_out,
        "bias": "none",
        "use_rslora": use_rslora,
        "use_dora": bool(dora),
        "modules_to_save": saved_modules or None,
        "init_lora_weights": True,
        "layers_to_transform": None,
        "layers_pattern": None,
        "rank_pattern": rank_pattern,
        "alpha_pattern": alpha_pattern,
        "lora_bias": False,
    }
    for key, x in tensors.items():  # nothing is written when one is non-finite: such a file gives NaN outputs
        bad = nonfinite_summary(x)
        if bad is not None:
            raise PeftError(
                f"save_peft: tensor {key!r} holds {bad}; refusing to write a PEFT adapter with "
                "non-finite weights (nothing was written)"
            )
    for field, value in (
        ("lora_alpha", peft_config.get("lora_alpha")),
        *((f"alpha_pattern[{k!r}]", v) for k, v in (peft_config.get("alpha_pattern") or {}).items()),
    ):
        if not isinstance(value, (int, float)) or not math.isfinite(value):
            raise PeftError(
                f"save_peft: {field} is {value!r}; refusing to write a non-finite alpha (nothing was written)"
            )
    from safetensors.numpy import save_file

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(folder / WEIGHTS_NAME), metadata={"format": "pt"})
    (folder / CONFIG_NAME).write_text(json.dumps(peft_config, indent=2, sort_keys=True) + "\n")
    return folder


# ------------------------------------------------------------------------------------------ expert stacks
# PEFT adapts a 3-D expert parameter through ``target_parameters`` (``lora.ParamWrapper``): one ``nn.Linear``
# pair for all experts, ``lora_A.weight (r*E, in)`` whose rows are expert-major (row ``e*r + k``) and
# ``lora_B.weight (out, r*E)`` whose columns are rank-major (column ``k*E + e``); expert ``e``'s update is
# ``scale * lora_B[:, k*E + e] @ lora_A[e*r + k, :]`` summed over ``k`` (``get_delta_weight``'s
# ``einsum("o r e, e r i -> e o i")``). ``in`` / ``out`` are the expert's features: for a parameter stored
# ``(E, out, in)`` (``nn.Linear`` order, as most families store it) and for one stored ``(E, in, out)``
# (``is_transposed``) alike. Several parameters of one module nest their wrappers: the one registered last is
# outermost, so its tensors are ``<module>.lora_A.weight`` and the one before it ``<module>.base_layer.lora_A.weight``.


def expert_factors_from_peft(lora_a: np.ndarray, lora_b: np.ndarray, num_experts: int) -> tuple[np.ndarray, np.ndarray]:
    """PEFT's ``lora_A.weight (r*E, in)`` / ``lora_B.weight (out, r*E)`` of an expert parameter -> this project's
    per-expert factors ``a (E, in, r)``, ``b (E, r, out)`` (``delta[e] = scale * a[e] @ b[e]``, ``(in, out)``)."""
    lora_a, lora_b = np.asarray(lora_a), np.asarray(lora_b)
    if lora_a.ndim != 2 or lora_b.ndim != 2 or lora_a.shape[0] != lora_b.shape[1] or lora_a.shape[0] % num_experts:
        raise PeftError(
            f"expert LoRA tensors lora_A {tuple(lora_a.shape)} / lora_B {tuple(lora_b.shape)} are not "
            f"(r*E, in) / (out, r*E) with E = {num_experts}"
        )
    r = lora_a.shape[0] // num_experts
    a = lora_a.reshape(num_experts, r, -1).transpose(0, 2, 1)
    b = lora_b.reshape(lora_b.shape[0], r, num_experts).transpose(2, 1, 0)
    return np.ascontiguousarray(a), np.ascontiguousarray(b)


def expert_factors_to_peft(a: np.ndarray, b: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Inverse of :func:`expert_factors_from_peft`: ``a (E, in, r)``, ``b (E, r, out)`` -> PEFT's
    ``lora_A.weight (r*E, in)``, ``lora_B.weight (out, r*E)``."""
    a, b = np.asarray(a), np.asarray(b)
    if a.ndim != 3 or b.ndim != 3 or a.shape[0] != b.shape[0] or a.shape[2] != b.shape[1]:
        raise PeftError(f"per-expert factors a {tuple(a.shape)} / b {tuple(b.shape)} are not (E, in, r) / (E, r, out)")
    n_exp, d_in, r = a.shape
    lora_a = a.transpose(0, 2, 1).reshape(n_exp * r, d_in)
    lora_b = b.transpose(2, 1, 0).reshape(b.shape[2], r * n_exp)
    return np.ascontiguousarray(lora_a), np.ascontiguousarray(lora_b)


__all__ = [
    "LoadedPeft",
    "Naming",
    "PeftError",
    "expert_factors_from_peft",
    "expert_factors_to_peft",
    "load_peft",
    "naming",
    "pattern_value",
    "read_config",
    "save_peft",
    "target_modules",
    "with_leaves",
]
