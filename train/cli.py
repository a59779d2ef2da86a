"""What the command-line entry points (``train.run``, ``train.predict``, ``train.analyze``, ``train.experiment``)
do with an error: bad input exits with status 2 and one line on stderr that names the input and what was
expected; a run stopped by a non-finite loss or update exits 3; Ctrl-C exits 130. ``LORA_JAX_TRACEBACK=1``
shows the full traceback instead.
"""

from __future__ import annotations

import argparse
import os
import re
import sys
from collections.abc import Callable
from typing import Any

from lora_jax.errors import LoraJaxError, NonFiniteError

EXIT_INPUT = 2
EXIT_NON_FINITE = 3
EXIT_INTERRUPTED = 130
MAX_MESSAGE = 600

# Errors that mean "this input does not fit" (the library's own, and what file, JSON, regex and unicode parsing
# raise on bad input).
INPUT_ERRORS: tuple[type[BaseException], ...] = (LoraJaxError, ValueError, OSError, re.error, NotImplementedError,
                                                 KeyError, IndexError)


class ArgumentParser(argparse.ArgumentParser):
    """``argparse.ArgumentParser`` whose usage errors are one line too (exit 2; ``--help`` shows the usage)."""

    def error(self, message: str):
        self.exit(EXIT_INPUT, f"{self.prog}: error: {one_line(message)} (see --help)\n")


def one_line(text: Any, limit: int = MAX_MESSAGE) -> str:
    """``text`` on one line (whitespace runs collapsed), at most ``limit`` characters."""
    line = " ".join(str(text).split())
    return line if len(line) <= limit else line[: limit - 5] + " ..."


def _traceback_wanted() -> bool:
    return os.environ.get("LORA_JAX_TRACEBACK", "") not in ("", "0")


def _one_line_warning(message, category, filename, lineno, file=None, line=None):
    print(f"warning: {one_line(message)}", file=sys.stderr if file is None else file)


def guarded(fn: Callable[[], Any], prefix: str = "error") -> int:
    """Run ``fn()``; return the exit status (0 on success) after printing one line for an error. Warnings are
    printed as one line each (``warning: ...``)."""
    import warnings

    show = warnings.showwarning
    if not _traceback_wanted():
        warnings.showwarning = _one_line_warning
    try:
        return _guarded(fn, prefix)
    finally:
        warnings.showwarning = show


def _guarded(fn: Callable[[], Any], prefix: str) -> int:
    try:
        fn()
    except KeyboardInterrupt:
        if _traceback_wanted():
            raise
        print("interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    except NonFiniteError as e:
        if _traceback_wanted():
            raise
        print(f"stopped: {one_line(e)}", file=sys.stderr)
        return EXIT_NON_FINITE
    except INPUT_ERRORS as e:
        if _traceback_wanted():
            raise
        name = type(e).__name__
        message = one_line(e.args[0] if isinstance(e, KeyError) and e.args else e)
        print(f"{prefix}: {name}: {message}", file=sys.stderr)
        return EXIT_INPUT
    except RuntimeError as e:  # XLA: a step that does not fit in memory is input too (batch, length, model)
        if _traceback_wanted() or "RESOURCE_EXHAUSTED" not in str(e):
            raise
        print(f"{prefix}: out of memory: {one_line(e, 300)} (reduce train.batch_size, data.max_length or "
              "eval.batch_size, or use more devices)", file=sys.stderr)
        return EXIT_INPUT
    return 0
