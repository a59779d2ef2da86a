"""The real llama.cpp (through ``llama-cpp-python``) as a reference: load a GGUF model with an optional LoRA
adapter, capture llama.cpp's own log, read teacher-forced logits and greedy continuations of token ids.

Used by ``tests/test_gguf_export.py`` and ``benchmarks/llamacpp_parity.py``. Token ids go in as ids (our
tokenizer's), so a comparison never depends on two tokenizers agreeing.
"""

from __future__ import annotations

import ctypes
import importlib.util
import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np

SOURCES = ("benchmarks/llamacpp.py",)  # a helper of llamacpp_parity and the tests, not a benchmark of its own

_LOG: list[tuple[int, str]] = []  # (ggml log level, text) of every message llama.cpp logged
_CALLBACK = None  # keeps the ctypes callback alive
WARN, ERROR, CONT = 3, 4, 5  # ggml.h ggml_log_level (llama-cpp-python's _logger.py still maps the old 1..4 enum)


def available() -> bool:
    return importlib.util.find_spec("llama_cpp") is not None


def _install_log() -> None:
    global _CALLBACK
    import llama_cpp

    if _CALLBACK is not None:
        return

    @llama_cpp.llama_log_callback
    def collect(level, text, user_data):
        _LOG.append((int(level), text.decode("utf-8", "replace")))

    _CALLBACK = collect
    llama_cpp.llama_log_set(collect, ctypes.c_void_p(0))


def log_mark() -> int:
    """A position in llama.cpp's log (pass to :func:`log_since`)."""
    _install_log()
    return len(_LOG)


def log_since(mark: int) -> str:
    return "".join(text for _, text in _LOG[mark:])


def warnings_since(mark: int) -> list[str]:
    """The warning and error messages llama.cpp logged since ``mark`` (continuation lines joined)."""
    out: list[str] = []
    current = None
    for level, text in _LOG[mark:]:
        if level == CONT and current is not None:
            out[-1] += text
            continue
        current = level if level in (WARN, ERROR) else None
        if current is not None:
            out.append(text)
    return [w.strip() for w in out]


def open_model(
    model_path: str | os.PathLike,
    lora_path: str | os.PathLike | None = None,
    *,
    n_ctx: int = 256,
    threads: int = 2,
    extra_bufts: bool = False,
):
    """A ``llama_cpp.Llama`` over ``model_path`` (+ LoRA adapter) that keeps the logits of every position.

    ``extra_bufts``: llama.cpp's extra CPU buffer types (AMX tiles, repacked Q4_0 / Q8_0 weights;
    ``llama_model_params.use_extra_bufts``, which ``llama_cpp.Llama`` does not expose). Off by default: on this
    project's VM the CPU reports AMX but its tile instructions trap (SIGILL in libggml-cpu), and llama.cpp
    does not load LoRA tensors into those buffers anyway (it warns and falls back to its plain CPU kernels)."""
    _install_log()
    import llama_cpp
    import llama_cpp.llama_cpp as lib

    default = lib.llama_model_default_params

    def params():
        p = default()
        p.use_extra_bufts = extra_bufts
        return p

    lib.llama_model_default_params = params
    try:
        return llama_cpp.Llama(
            model_path=os.fspath(model_path),
            lora_path=os.fspath(lora_path) if lora_path else None,
            n_ctx=n_ctx,
            n_batch=n_ctx,
            logits_all=True,
            n_threads=threads,
            n_threads_batch=threads,
            seed=0,
            verbose=False,
        )
    finally:
        lib.llama_model_default_params = default


def logits(llm, ids: Sequence[int]) -> np.ndarray:
    """``(len(ids), vocab)`` float32 logits of every position of ``ids`` (teacher forcing, one fresh pass)."""
    llm.reset()
    llm.eval([int(i) for i in ids])
    return np.array(llm.scores[: len(ids)], np.float32)


def greedy(llm, ids: Sequence[int], n: int, eos: int | None = None) -> list[int]:
    """The ``n`` greedy (argmax) tokens llama.cpp generates after ``ids`` (stops after ``eos``)."""
    llm.reset()
    llm.eval([int(i) for i in ids])
    out: list[int] = []
    for _ in range(n):
        nxt = int(np.argmax(llm.scores[llm.n_tokens - 1]))
        out.append(nxt)
        if eos is not None and nxt == eos:
            break
        llm.eval([nxt])
    return out


def source_dir() -> Path | None:
    """An unpacked llama-cpp-python source tree holding ``vendor/llama.cpp/convert_lora_to_gguf.py``: the
    ``LLAMA_CPP_PYTHON_SRC`` environment variable, or the one :func:`fetch_source` unpacked. ``None`` if absent."""
    env = os.environ.get("LLAMA_CPP_PYTHON_SRC")
    candidates = [Path(env)] if env else []
    if available():
        from importlib.metadata import version

        candidates.append(Path.home() / ".cache" / "lora_jax" / f"llama_cpp_python-{version('llama_cpp_python')}")
    for c in candidates:
        if (c / "vendor" / "llama.cpp" / "convert_lora_to_gguf.py").is_file():
            return c
    return None


def fetch_source() -> Path:
    """Download the installed llama-cpp-python's source distribution with pip (the wheel lacks llama.cpp's
    Python converters) and unpack it under ``~/.cache/lora_jax``; returns the tree."""
    import subprocess
    import sys
    import tarfile
    import tempfile
    from importlib.metadata import version

    found = source_dir()
    if found is not None:
        return found
    v = version("llama_cpp_python")
    dest = Path.home() / ".cache" / "lora_jax"
    dest.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        subprocess.run(
            [
                sys.executable,
                "-m",
                "pip",
                "download",
                "--no-deps",
                "--no-binary",
                ":all:",
                "-q",
                "-d",
                tmp,
                f"llama-cpp-python=={v}",
            ],
            check=True,
        )
        (sdist,) = Path(tmp).glob("*.tar.gz")
        with tarfile.open(sdist) as tar:
            keep = [
                m
                for m in tar.getmembers()
                if "/vendor/llama.cpp/" in m.name
                and (
                    m.name.endswith("convert_lora_to_gguf.py")
                    or m.name.endswith("convert_hf_to_gguf.py")
                    or "/vendor/llama.cpp/conversion/" in m.name
                    or "/vendor/llama.cpp/gguf-py/" in m.name
                )
            ]
            tar.extractall(dest, members=keep, filter="data")
    return dest / f"llama_cpp_python-{v}"


def convert_peft(
    peft_dir: str | os.PathLike, base_hf_dir: str | os.PathLike, out: str | os.PathLike, outtype: str = "f32"
) -> str:
    """Run llama.cpp's own ``convert_lora_to_gguf.py`` (from :func:`fetch_source`'s tree, with its vendored
    ``gguf-py``) on a PEFT folder; returns its log. ``base_hf_dir`` holds the base's ``config.json``."""
    import subprocess
    import sys

    src = fetch_source() / "vendor" / "llama.cpp"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(src / "gguf-py")}
    proc = subprocess.run(
        [
            sys.executable,
            str(src / "convert_lora_to_gguf.py"),
            "--base",
            os.fspath(base_hf_dir),
            "--outtype",
            outtype,
            "--outfile",
            os.fspath(out),
            os.fspath(peft_dir),
        ],
        capture_output=True,
        text=True,
        env=env,
        cwd=src,
    )
    if proc.returncode:
        raise RuntimeError(f"convert_lora_to_gguf.py failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    return proc.stdout + proc.stderr
