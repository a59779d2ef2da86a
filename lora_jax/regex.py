"""The one regex engine for every pattern a user or a file supplies: RE2 (``google-re2``), linear-time matching.

Target rules, ``exclude``, ``train``, ``rank_pattern`` / ``alpha_pattern`` / ``in_axes`` / ``expert_axes`` keys,
sharding rules and the pattern keys of a PEFT ``adapter_config.json`` all come from a config or a file that the
user (or someone else) wrote. Python's ``re`` backtracks: ``(.*.*)*y`` takes exponential time on a path that
does not match, so a hostile or careless pattern hangs ``lora.init`` with no output. RE2 matches in time linear
in the text for every pattern it accepts; it refuses what cannot be matched that way (backreferences,
lookaround) and patterns whose program is too large, with an error that says so.

The syntax is Python's for everything rules need (``(?i)``, ``\\w``, ``(?P<name>...)``, classes, anchors,
``{m,n}``); patterns the project writes itself (its presets, file-format name rules) may use Python's ``re``.
"""

from __future__ import annotations

import functools
from typing import Any

import re2

from lora_jax.errors import LoraJaxError, TargetError

Pattern = Any  # re2._Regexp: .fullmatch(text), .match(text), .search(text), .pattern

_OPTIONS = re2.Options()
_OPTIONS.log_errors = False  # the reason goes into our message, not to stderr
_OPTIONS.max_mem = 64 << 20  # a pattern whose program needs more is refused, not run


@functools.lru_cache(maxsize=4096)
def _compile(pattern: str) -> Pattern:
    return re2.compile(pattern, _OPTIONS)


def compile(
    pattern: Any,
    what: str,
    error: type[LoraJaxError] = TargetError,
    *,  # noqa: A001
    shown: str | None = None,
) -> Pattern:
    """``pattern`` compiled by RE2, or ``error`` naming ``what`` (and the pattern, or ``shown`` in its place) and
    saying why RE2 refused it.

    Only ``re2.error`` is turned into ``error``; anything else (a broken ``google-re2`` install, a bug) is raised
    as it is, never reported as "not a valid pattern".
    """
    if not isinstance(pattern, str):
        raise error(f"{what}: a pattern must be a regex string, got {type(pattern).__name__}: {pattern!r:.80}")
    try:
        return _compile(pattern)
    except re2.error as e:
        detail = e.args[0].decode(errors="replace") if e.args and isinstance(e.args[0], bytes) else str(e)
        name = shown if shown is not None else f"{what}: {pattern!r:.120}"
        raise error(
            f"{name} is not a valid pattern for linear-time matching (RE2: {detail[:160]}; "
            "backreferences and lookaround are not supported)"
        ) from None


def fullmatch(pattern: str, text: str, what: str = "pattern") -> bool:
    """Whether ``pattern`` (RE2) matches the whole of ``text``."""
    return compile(pattern, what).fullmatch(text) is not None


__all__ = ["compile", "fullmatch"]
