"""What the command-line entry points (``train.run``, ``train.predict``, ``train.analyze``, ``train.experiment``,
``train.plot``) do with an error. One rule: the library's own errors (:class:`~lora_jax.errors.LoraJaxError`,
raised on purpose for input that does not fit) are refused input, anything else is a bug.

- a :class:`~lora_jax.errors.LoraJaxError`: one line on stderr that names the input and what was expected, exit
  status 2 (:data:`EXIT_INPUT`); a run stopped by a non-finite loss or update
  (:class:`~lora_jax.errors.NonFiniteError`) exits 3;
- a step that does not fit in the device's memory (XLA's ``RESOURCE_EXHAUSTED``): one line, exit 2 (the batch, the
  length or the model is the input to change);
- Ctrl-C exits 130;
- anything else is an internal error: the traceback, a line saying so, exit status 70 (:data:`EXIT_INTERNAL`,
  ``EX_SOFTWARE``).

``LORA_JAX_TRACEBACK=1`` shows the full traceback of every error instead (Python's own exit status).
"""

from __future__ import annotations

import argparse
import os
import sys
import traceback
from collections.abc import Callable
from typing import Any

from lora_jax.errors import LoraJaxError, NonFiniteError

EXIT_INPUT = 2
EXIT_NON_FINITE = 3
EXIT_INTERNAL = 70  # sysexits.h EX_SOFTWARE: an internal software error
EXIT_INTERRUPTED = 130
MAX_MESSAGE = 600


class ArgumentParser(argparse.ArgumentParser):
    """``argparse.ArgumentParser`` whose usage errors are one line too (exit 2; ``--help`` shows the usage)."""

    def error(self, message: str):
        self.exit(EXIT_INPUT, f"{self.prog}: error: {one_line(message)} (see --help)\n")


def one_line(text: Any, limit: int = MAX_MESSAGE) -> str:
    """``text`` on one line (whitespace runs collapsed), at most ``limit`` characters."""
    line = " ".join(str(text).split())
    return line if len(line) <= limit else line[: limit - 5] + " ..."


def traceback_wanted() -> bool:
    """``LORA_JAX_TRACEBACK`` is set (and not ``0``): errors propagate with their full traceback."""
    return os.environ.get("LORA_JAX_TRACEBACK", "") not in ("", "0")


def _one_line_warning(message, category, filename, lineno, file=None, line=None):
    print(f"warning: {one_line(message)}", file=sys.stderr if file is None else file)


def guarded(fn: Callable[[], Any], prefix: str | None = None) -> int:
    """Run ``fn()``; return the exit status (0 on success) after printing one line for refused input (``prefix:
    message``; ``prefix`` defaults to ``error: ClassName``) or the traceback for an internal error. Warnings are
    printed as one line each (``warning: ...``)."""
    import warnings

    show = warnings.showwarning
    if not traceback_wanted():
        warnings.showwarning = _one_line_warning
    try:
        return _guarded(fn, prefix)
    finally:
        warnings.showwarning = show


def _guarded(fn: Callable[[], Any], prefix: str | None) -> int:
    try:
        fn()
    except KeyboardInterrupt:
        if traceback_wanted():
            raise
        print("interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    except NonFiniteError as e:
        if traceback_wanted():
            raise
        print(f"stopped: {one_line(e)}", file=sys.stderr)
        return EXIT_NON_FINITE
    except LoraJaxError as e:
        if traceback_wanted():
            raise
        print(f"{prefix or 'error: ' + type(e).__name__}: {one_line(e)}", file=sys.stderr)
        return EXIT_INPUT
    except Exception as e:
        if traceback_wanted():
            raise
        if isinstance(e, RuntimeError) and "RESOURCE_EXHAUSTED" in str(e):  # XLA: a step that does not fit in memory
            print(
                f"{prefix or 'error'}: out of memory: {one_line(e, 300)} (reduce train.batch_size, "
                "data.max_length or eval.batch_size, or use more devices)",
                file=sys.stderr,
            )
            return EXIT_INPUT
        traceback.print_exc()
        print(
            f"internal error: {type(e).__name__}: {one_line(e, 300)} (a bug, not your input: please report it with "
            "the traceback above)",
            file=sys.stderr,
        )
        return EXIT_INTERNAL
    return 0
