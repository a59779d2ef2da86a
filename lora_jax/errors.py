"""The library's exceptions: one base class, one class per kind of bad input.

Every error lora_jax raises on purpose derives from :class:`LoraJaxError`, so ``except lora.LoraJaxError``
catches them all; each also derives from the built-in exception a caller would expect (``ValueError`` for
input that does not fit, ``FloatingPointError`` for a non-finite state), so code written against the built-ins
keeps working. Messages name the input (file, tensor, key, row) and say what was expected and what came.

    LoraJaxError
    ├── ConfigError        a config file, key or value that does not fit the schema        (ValueError)
    ├── DataError          a data source that is missing, empty or malformed                (ValueError)
    ├── TargetError        a target rule that matches nothing, or the wrong kind of leaf    (ValueError)
    ├── MergeStateError    merging merged params, unmerging unmerged ones                   (ValueError)
    ├── CheckpointError    weights, adapters or a training checkpoint that cannot be loaded (ValueError)
    │   └── PeftError      a PEFT adapter folder that cannot be read or written
    ├── UnsupportedError   a weight kind an operation cannot handle (names the leaf, says what to do)
    │                                                                          (NotImplementedError)
    └── NonFiniteError     a loss, gradient or parameter became NaN / inf                  (FloatingPointError)
"""

from __future__ import annotations


class LoraJaxError(Exception):
    """Base class of every error lora_jax raises on purpose."""


class ConfigError(LoraJaxError, ValueError):
    """A config file, key or value that does not fit the schema (names the key and the expected type)."""


class DataError(LoraJaxError, ValueError):
    """A data source that is missing, empty or malformed (names the file, the column and the row)."""


class TargetError(LoraJaxError, ValueError):
    """A target rule that matches no kernel, or matches a leaf it must not (lists the candidates)."""


class MergeStateError(LoraJaxError, ValueError):
    """Adapters merged into params that already hold them, or unmerged from params that do not."""


class CheckpointError(LoraJaxError, ValueError):
    """Weights, adapters or a training checkpoint that cannot be loaded: a missing, corrupt or mis-shaped
    tensor, a missing file, a structure that does not fit. The message names the file and the tensor."""


class PeftError(CheckpointError):
    """A PEFT adapter folder that cannot be loaded onto these params, or adapters that cannot be saved in
    PEFT's format."""


class UnsupportedError(LoraJaxError, NotImplementedError):
    """An operation that cannot handle this kind of weight or adapter (e.g. ``lora.transform`` on a mixed-adapter
    kernel that a function uses densely). The message names the leaf and what to do instead."""


class NonFiniteError(LoraJaxError, FloatingPointError):
    """The loss, a gradient or an updated parameter became NaN / inf."""


__all__ = ["CheckpointError", "ConfigError", "DataError", "LoraJaxError", "MergeStateError", "NonFiniteError",
           "PeftError", "TargetError", "UnsupportedError"]
