"""The library's exceptions: one base class, one class per kind of bad input.

Every error lora_jax raises on purpose derives from :class:`LoraJaxError`, so ``except lora.LoraJaxError``
catches them all; each also derives from the built-in exception a caller would expect (``ValueError`` for
input that does not fit, ``FloatingPointError`` for a non-finite state), so code written against the built-ins
keeps working. Messages name the input (file, tensor, key, row) and say what was expected and what came.

    LoraJaxError
    ├── ArgumentError      an argument a function cannot take: shape, range, choice, a contradicting pair (ValueError)
    ├── ArgumentTypeError  an argument of the wrong kind (params where adapters belong, ...)        (TypeError)
    ├── NotFoundError      a name that is not there (an adapter, a parameter path); lists what is     (KeyError)
    ├── MissingFileError   a file or folder that does not exist (and cannot be fetched)     (FileNotFoundError)
    ├── ConfigError        a config file, key or value that does not fit the schema        (ValueError)
    ├── DataError          a data source that is missing, empty or malformed                (ValueError)
    ├── TargetError        a target rule that matches nothing, or the wrong kind of leaf    (ValueError)
    ├── MergeStateError    merging merged params, unmerging unmerged ones                   (ValueError)
    ├── CheckpointError    weights, adapters or a training checkpoint that cannot be loaded (ValueError)
    │   └── PeftError      a PEFT adapter folder that cannot be read or written
    ├── UnsupportedError   a weight kind an operation cannot handle (names the leaf, says what to do)
    │                                                                          (NotImplementedError)
    └── NonFiniteError     a loss, gradient or parameter became NaN / inf                  (FloatingPointError)

What a program does with them: ``train.cli`` (every ``python -m train.*`` command) prints a
:class:`LoraJaxError` as one line and exits 2 (refused input); any other exception is a bug and gets a traceback
and its own exit status. So a deliberate refusal anywhere in ``lora_jax`` or ``train`` raises one of these classes,
never a bare built-in (``tests/test_error_policy.py`` walks the source to keep it so).
"""

from __future__ import annotations


class LoraJaxError(Exception):
    """Base class of every error lora_jax raises on purpose."""


class ArgumentError(LoraJaxError, ValueError):
    """An argument a function cannot take: a shape that does not fit, a value out of range, a name that is not one
    of the choices, or two arguments that contradict each other. The message names the argument and what was
    expected."""


class ArgumentTypeError(LoraJaxError, TypeError):
    """An argument of the wrong kind (e.g. a parameter tree where the adapter tree belongs); the message names the
    argument, what came and what was expected."""


class NotFoundError(LoraJaxError, KeyError):
    """A name that is not there (an adapter of a set, a parameter path); the message lists the names that are."""

    def __str__(self) -> str:  # the message as given (KeyError's str() would quote it)
        return str(self.args[0]) if len(self.args) == 1 else super().__str__()


class MissingFileError(LoraJaxError, FileNotFoundError):
    """A file or folder that does not exist (or a hub name that cannot be fetched); the message names it."""


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


__all__ = [
    "ArgumentError",
    "ArgumentTypeError",
    "CheckpointError",
    "ConfigError",
    "DataError",
    "LoraJaxError",
    "MergeStateError",
    "MissingFileError",
    "NonFiniteError",
    "NotFoundError",
    "PeftError",
    "TargetError",
    "UnsupportedError",
]
