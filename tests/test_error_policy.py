"""The error policy (``lora_jax/errors.py``): every refusal ``lora_jax`` and ``train`` raise on purpose is a
:class:`~lora_jax.errors.LoraJaxError` (with the built-in a caller expects as a second base), and the command lines
(``train.cli``) treat exactly those as refused input: one line, exit 2; anything else is a bug: the traceback,
exit 70.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import jax.numpy as jnp
import pytest

import lora_jax as lora
from lora_jax import errors
from train import cli

ROOT = Path(__file__).resolve().parents[1]
LIBRARY = ("lora_jax", "train")
# What a deliberate refusal must not raise bare: the built-ins the library's classes stand in for.
BUILTINS = {
    "ValueError",
    "KeyError",
    "TypeError",
    "IndexError",
    "NotImplementedError",
    "FileNotFoundError",
    "OSError",
    "RuntimeError",
}
ALLOWED: set[str] = set()  # files allowed bare raises: none


def _bare_raises(path: Path) -> list[str]:
    """``file:line: raise X(...)`` for every raise of a built-in in ``BUILTINS`` (a bare ``raise
    NotImplementedError`` with no message, an abstract method's body, is not a refusal)."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if not isinstance(node, ast.Raise) or node.exc is None:
            continue
        exc = node.exc.func if isinstance(node.exc, ast.Call) else node.exc
        if not isinstance(exc, ast.Name) or exc.id not in BUILTINS:
            continue
        if exc.id == "NotImplementedError" and not isinstance(node.exc, ast.Call):
            continue
        found.append(f"{path.relative_to(ROOT)}:{node.lineno}: raise {exc.id}")
    return found


def test_no_bare_builtin_raise_in_library_code():
    """Each ``raise ValueError(...)`` (``KeyError``, ``TypeError``, ...) in ``lora_jax/`` or ``train/`` is one of the
    library's classes instead (``ArgumentError``, ``NotFoundError``, ``ConfigError``, ...): a caller can catch
    ``LoraJaxError`` for "the library refused my input" apart from a bug, and the CLI needs no guessing."""
    files = sorted(p for d in LIBRARY for p in (ROOT / d).rglob("*.py"))
    assert len(files) > 50
    assert ALLOWED <= {str(p.relative_to(ROOT)) for p in files}, "an allow-listed file was moved or removed"
    bare = [hit for p in files if str(p.relative_to(ROOT)) not in ALLOWED for hit in _bare_raises(p)]
    assert not bare, "raise a subclass of lora_jax.errors.LoraJaxError instead:\n" + "\n".join(bare)


def test_every_library_exception_class_is_a_lora_jax_error():
    """The classes in ``lora_jax.errors`` derive from ``LoraJaxError`` and, where they replace a built-in, from it."""
    classes = [getattr(errors, name) for name in errors.__all__]
    assert all(issubclass(c, errors.LoraJaxError) for c in classes)
    assert {name for name in errors.__all__} <= set(lora.__all__)
    assert issubclass(errors.ArgumentError, ValueError) and issubclass(errors.ArgumentTypeError, TypeError)
    assert issubclass(errors.NotFoundError, KeyError) and issubclass(errors.MissingFileError, FileNotFoundError)
    assert str(errors.NotFoundError("no adapter named 'c'")) == "no adapter named 'c'"  # not KeyError's repr


def test_the_library_raises_its_own_classes():
    params = {"attn": {"kernel": jnp.ones((4, 4))}}
    with pytest.raises(errors.ArgumentError, match="r must be a positive int"):
        lora.init(params, r=0)
    with pytest.raises(errors.NotFoundError, match="no adapter named"):
        lora.AdapterSet().add("a", lora.init(params, r=2, targets=[".*kernel"])).activate("b")


@pytest.mark.parametrize(
    "exc, status, lines",
    [
        (errors.DataError("data file 'x.csv' does not exist"), cli.EXIT_INPUT, 1),
        (errors.NotFoundError("no adapter named 'c'"), cli.EXIT_INPUT, 1),
        (errors.NonFiniteError("loss is nan at step 3"), cli.EXIT_NON_FINITE, 1),
        (ValueError("a bug"), cli.EXIT_INTERNAL, None),
        (KeyError("a bug"), cli.EXIT_INTERNAL, None),
        (OSError("a bug"), cli.EXIT_INTERNAL, None),
    ],
)
def test_cli_refuses_exactly_the_library_errors(exc, status, lines, capsys, monkeypatch):
    """A LoraJaxError is refused input (one line naming the class, exit 2); a built-in raised by anything else is an
    internal error: the traceback and a line saying so, exit 70."""
    monkeypatch.delenv("LORA_JAX_TRACEBACK", raising=False)

    def fail():
        raise exc

    assert cli.guarded(fail) == status
    err = capsys.readouterr().err
    if lines is not None:
        assert err.count("\n") == lines and "Traceback" not in err, err
        assert status != cli.EXIT_INPUT or err.startswith(f"error: {type(exc).__name__}: "), err
    else:
        assert "Traceback" in err and f"internal error: {type(exc).__name__}" in err.splitlines()[-1], err
    monkeypatch.setenv("LORA_JAX_TRACEBACK", "1")
    with pytest.raises(type(exc)):
        cli.guarded(fail)


def test_only_cli_reads_the_traceback_switch():
    """``LORA_JAX_TRACEBACK`` is read in one place (``train.cli.traceback_wanted``), not re-implemented per command."""
    readers = sorted(
        str(p.relative_to(ROOT))
        for d in LIBRARY
        for p in (ROOT / d).rglob("*.py")
        if 'LORA_JAX_TRACEBACK"' in p.read_text() or "LORA_JAX_TRACEBACK'" in p.read_text()
    )
    assert readers == ["train/cli.py"], readers


def test_an_internal_error_exits_70_with_its_traceback():
    """In a real process: a bug (any exception that is not the library's) prints its traceback and exits 70."""
    code = (
        "import sys; from train import cli\n"
        "def boom():\n    raise ZeroDivisionError('x')\n"
        "sys.exit(cli.guarded(boom))\n"
    )
    proc = subprocess.run(
        [sys.executable, "-c", code],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
        env={"PATH": "/usr/bin:/bin", "PYTHONPATH": str(ROOT)},
    )
    assert proc.returncode == cli.EXIT_INTERNAL, proc.stderr
    assert "Traceback" in proc.stderr and "ZeroDivisionError" in proc.stderr
