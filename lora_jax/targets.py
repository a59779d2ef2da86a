"""Which leaves get adapters: paths, regex rules, presets and the errors that explain a miss.

A leaf's path is its pytree key path joined by '/', e.g. ``encoder/layer_0/attention/query/kernel``. The
``value`` attribute that ``nnx.split`` states add under each variable is dropped, so a Linen tree and the
state of the equivalent NNX module have the same paths.

Rules are regexes that must match a whole path (``re.fullmatch``). Presets are names for rule sets that
follow the naming of Flax, Hugging Face and this project's models:

- ``"qv"``: the query and value projections (PEFT's default targets: BERT query/value, Llama q_proj/v_proj,
  GPT-2's fused c_attn);
- ``"attention"`` (the default): every dense kernel inside an attention block;
- ``"all-linear"``: every dense kernel except embeddings, the output head and convolutions (a kernel of more
  than two axes in a module named ``conv*``, e.g. Whisper's ``conv1``).
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from typing import Any

import jax.numpy as jnp

from lora_jax.errors import TargetError
from lora_jax.tree import join, leaves, path_str, path_tuple  # noqa: F401  (path_str, path_tuple: public here too)

_KERNEL = r"(kernel|weight|w)"
_ATTN_BLOCK = r"(attention|attn|self_attn|self_attention|cross_attn|cross_attention|crossattention|mha)"

PRESETS: dict[str, tuple[str, ...]] = {
    "qv": (
        rf"(.*/)?(query|value|q_proj|v_proj|q|v|c_attn|wq|wv)/{_KERNEL}",
    ),
    "attention": (
        rf"(.*/)?{_ATTN_BLOCK}/(.*/)?{_KERNEL}",
    ),
    "all-linear": (
        rf"(.*/)?{_KERNEL}",
    ),
}
DEFAULT_PRESET = "attention"

# Leaves never adapted by a preset: embeddings and output heads (as PEFT's "all-linear" does).
_EMBEDDING = re.compile(r"(.*/)?(\w*embed\w*|wte|wpe|embedding)(/.*)?")
_HEAD = re.compile(r"(.*/)?(lm_head|classifier|score|head|qa_outputs)(/.*)?")
# Convolution kernels (k, in, out): not linear layers, so no preset selects them (PEFT's "all-linear" neither).
_CONV = re.compile(r"(.*/)?(conv\w*|\w*_conv)/(kernel|weight)")
# Kernels with more than two axes whose inputs are all but the last axis (output projections of attention).
_OUTPUT_PROJ = re.compile(r"(.*/)?(out|o_proj|out_proj|output|c_proj|wo|o)/\w+")


# Pytree nodes that stand for one kernel, e.g. a quantised weight (lora_jax.quant.QuantizedWeight). Path
# functions treat them as leaves, so rules see ``layer/kernel`` rather than the arrays inside. Such a node has
# the logical kernel's ``shape``, ``dtype`` and ``ndim`` and a ``dequantize(dtype) -> Array`` method.
_WEIGHT_NODES: tuple[type, ...] = ()


def register_weight_node(cls: type) -> type:
    """Class decorator: treat instances of ``cls`` as kernels (leaves) when selecting and mapping paths."""
    global _WEIGHT_NODES
    if cls not in _WEIGHT_NODES:
        _WEIGHT_NODES = (*_WEIGHT_NODES, cls)
    return cls


def is_weight_node(x: Any) -> bool:
    return isinstance(x, _WEIGHT_NODES)


def leaf_paths(tree: Any) -> list[tuple[str, Any]]:
    """``[(path, leaf), ...]`` for every array leaf (or weight node, see :func:`register_weight_node`)."""
    return [(join(p), leaf) for p, leaf in leaves(tree, is_leaf=is_weight_node)]


def compile_rules(rules: str | Sequence[str] | None, what: str) -> list[re.Pattern]:
    if rules is None:
        return []
    if isinstance(rules, str):
        rules = [rules]
    compiled = []
    for rule in rules:
        if not isinstance(rule, str):
            raise TypeError(f"{what}: rules must be regex strings, got {type(rule).__name__}: {rule!r}")
        try:
            compiled.append(re.compile(rule))
        except re.error as e:
            raise ValueError(f"{what}: {rule!r} is not a valid regex: {e}") from None
    return compiled


def no_match_message(what: str, rule: str, candidates: Sequence[str], limit: int = 40) -> str:
    shown = "\n  ".join(candidates[:limit])
    more = f"\n  ... and {len(candidates) - limit} more" if len(candidates) > limit else ""
    return (f"{what} rule {rule!r} matches no leaf (rules must match the whole '/'-joined path). "
            f"Candidates:\n  {shown}{more}")


def is_embedding(path: str) -> bool:
    return _EMBEDDING.fullmatch(path) is not None


def is_head(path: str) -> bool:
    return _HEAD.fullmatch(path) is not None


def _is_kernel_like(leaf: Any) -> bool:
    return hasattr(leaf, "shape") and hasattr(leaf, "dtype") and len(leaf.shape) >= 2 and \
        jnp.issubdtype(leaf.dtype, jnp.floating)


def default_in_axes(path: str, ndim: int) -> int:
    """How many leading axes of a kernel are its inputs: 1, or ``ndim - 1`` for an output projection with
    more than two axes (Flax ``DenseGeneral`` (heads, head_dim, d_model))."""
    if ndim > 2 and _OUTPUT_PROJ.fullmatch(path):
        return ndim - 1
    return 1


def select(
    params: Any,
    targets: str | Sequence[str] | None = None,
    *,
    exclude: str | Sequence[str] | None = None,
    allow_embeddings: bool = False,
) -> list[tuple[str, Any]]:
    """The ``(path, leaf)`` pairs that ``targets`` selects in ``params``, in tree order.

    Raises ``ValueError`` when a rule matches nothing (listing the candidate kernels), when a rule selects a
    non-floating or one-dimensional leaf, or an embedding table without ``allow_embeddings``.
    """
    leaves = leaf_paths(params)
    if not leaves:
        raise TargetError("params has no array leaves to adapt")
    excluded = compile_rules(exclude, "exclude")
    for rule in excluded:
        if not any(rule.fullmatch(p) for p, _ in leaves):
            raise TargetError(no_match_message("exclude", rule.pattern, [p for p, _ in leaves]))

    preset = None
    if targets is None:
        preset = DEFAULT_PRESET
    elif isinstance(targets, str) and targets in PRESETS:
        preset = targets
    elif isinstance(targets, str) and re.fullmatch(r"[a-z]+(-[a-z]+)*", targets) and not any(
        re.fullmatch(targets, p) for p, _ in leaves
    ):
        raise TargetError(f"targets {targets!r} is neither a preset {sorted(PRESETS)} nor a regex that matches a "
                         f"leaf path (e.g. '.*{targets}/kernel')")

    candidates = [p for p, leaf in leaves if _is_kernel_like(leaf) and not is_embedding(p)]
    chosen: dict[str, Any] = {}
    if preset is not None:
        rules = compile_rules(PRESETS[preset], "targets")
        for p, leaf in leaves:
            if any(r.fullmatch(p) for r in rules) and _is_kernel_like(leaf) and not is_embedding(p) \
                    and not is_head(p) and not (leaf.ndim > 2 and _CONV.fullmatch(p)) \
                    and not any(r.fullmatch(p) for r in excluded):
                chosen[p] = leaf
        if not chosen:
            raise TargetError(f"targets preset {preset!r} matches no kernel of these params. Name the kernels with "
                             f"a regex instead. {no_match_message('targets', preset, candidates)}")
    else:
        rules = compile_rules(targets, "targets")
        for rule in rules:
            hits = [(p, leaf) for p, leaf in leaves if rule.fullmatch(p)]
            if not hits:
                raise TargetError(no_match_message("targets", rule.pattern, candidates))
            for p, leaf in hits:
                if any(r.fullmatch(p) for r in excluded):
                    continue
                if not hasattr(leaf, "shape") or not jnp.issubdtype(leaf.dtype, jnp.floating):
                    raise TargetError(f"targets rule {rule.pattern!r} selects {p}, which is not a floating-point "
                                     f"array (dtype {getattr(leaf, 'dtype', type(leaf).__name__)}); LoRA adapts "
                                     "float kernels only")
                if len(leaf.shape) < 2:
                    raise TargetError(f"targets rule {rule.pattern!r} selects {p} of shape {tuple(leaf.shape)}; "
                                     "LoRA adapts kernels with at least two axes (biases and norms are trained "
                                     "in full with split(..., train=...) instead)")
                if is_embedding(p) and not allow_embeddings:
                    raise TargetError(f"targets rule {rule.pattern!r} selects the embedding table {p}; embeddings "
                                     "are adapted only with allow_embeddings=True (and lora_jax.ops.embed)")
                chosen[p] = leaf
        if not chosen:
            raise TargetError(f"targets {[r.pattern for r in rules]} select nothing once exclude "
                             f"{[r.pattern for r in excluded]} is applied")
    return [(p, leaf) for p, leaf in leaves if p in chosen]


class PatternMap:
    """``{regex: value}`` looked up by full match on a path; the first matching pattern wins. Every pattern
    must match at least one of ``paths`` (a silent no-op pattern is a typo nobody notices)."""

    def __init__(self, patterns: Mapping[str, Any] | None, what: str, paths: Sequence[str]):
        self._rules = [(re.compile(k), v) for k, v in (patterns or {}).items()]
        for rule, _ in self._rules:
            if not any(rule.fullmatch(p) for p in paths):
                raise TargetError(no_match_message(what, rule.pattern, list(paths)))

    def get(self, path: str, default: Any) -> Any:
        for rule, value in self._rules:
            if rule.fullmatch(path):
                return value
        return default
