"""What a newcomer waits for: the README's two commands (the main job, the test suite) and the setup, timed as a
user runs them, recorded with the CPU and the load they ran under.

    python -m benchmarks.newcomer --main-job        # .venv/bin/python -m train.run (in a scratch output folder)
    python -m benchmarks.newcomer --tests           # .venv/bin/python -m pytest, as the README gives it
    python -m benchmarks.newcomer --setup           # bash scripts/setup.sh test in a fresh clone of this commit

Each part replaces its own section of ``benchmarks/results/newcomer.json`` and keeps the others, so they can be
measured one at a time (each section carries its own provenance: commit, date, CPU model, cores, load average
before and after). The README's figures for the main job, the test run and the setup are rendered from this file
by ``python -m benchmarks.report``. The main job's section also keeps what the run printed about its outputs and
its ``result.json`` (held-out metrics before / after, time per phase).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from benchmarks.common import RESULTS, ROOT, Recorder

# The definitions of what is timed (benchmarks.staleness). The times depend on the whole code base; a rerun on an
# idle machine is what keeps them honest, and each section records the commit it ran on.
SOURCES = ("benchmarks/newcomer.py", "configs/default.yaml", "scripts/setup.sh")
PATH = RESULTS / "newcomer.json"


def timed(cmd: list[str], cwd: Path, env: dict | None = None, timeout: float | None = None) -> dict:
    """Run ``cmd``; its wall time, user + system CPU time (children included), exit status and output."""
    t0 = time.perf_counter()
    before = os.times()
    proc = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    after = os.times()
    return {
        "command": " ".join(cmd),
        "wall_s": time.perf_counter() - t0,
        "user_s": after.children_user - before.children_user,
        "system_s": after.children_system - before.children_system,
        "returncode": proc.returncode,
        "stdout": proc.stdout,
        "stderr": proc.stderr,
    }


def python() -> str:
    venv = ROOT / ".venv" / "bin" / "python"
    return str(venv) if venv.exists() else sys.executable


def main_job() -> dict:
    out = Path(tempfile.mkdtemp(prefix="newcomer_main_"))
    try:
        env = {**os.environ, "HF_HUB_OFFLINE": "1"}
        run = timed([python(), "-m", "train.run", f"output.dir={out}"], ROOT, env)
        if run["returncode"] != 0:
            raise SystemExit(f"the main job failed (exit {run['returncode']}):\n{run['stderr'][-3000:]}")
        folder = (out / "latest").resolve()
        result = json.loads((folder / "result.json").read_text())
        printed = (run["stdout"] + run["stderr"]).splitlines()
        return {
            "wall_s": run["wall_s"],
            "user_s": run["user_s"],
            "system_s": run["system_s"],
            "command": "python -m train.run",
            "loss_plot": (folder / "loss.png").is_file(),
            "printed_outputs": [line for line in printed if str(out) in line][-12:],
            "result": {k: v for k, v in result.items() if not k.startswith("samples")},
            "samples_after": result.get("samples_after", [])[:3],
        }
    finally:
        shutil.rmtree(out, ignore_errors=True)


SUMMARY = re.compile(r"^=*\s*(?P<body>\d+ \w+.*?) in (?P<secs>[\d.]+)s")  # "613 passed, 20 skipped in 837.12s"


def tests() -> dict:
    run = timed([python(), "-m", "pytest", "-p", "no:cacheprovider", "--durations=15"], ROOT)
    lines = [line for line in run["stdout"].splitlines() if SUMMARY.search(line)]
    counts = {}
    if lines:
        for part in SUMMARY.search(lines[-1]).group("body").split(", "):
            n, _, what = part.partition(" ")
            if n.isdigit():
                counts[what] = int(n)
    durations = [line for line in run["stdout"].splitlines() if re.match(r"^\d+\.\d+s (call|setup|teardown)", line)]
    return {
        "wall_s": run["wall_s"],
        "user_s": run["user_s"],
        "system_s": run["system_s"],
        "command": "python -m pytest",
        "returncode": run["returncode"],
        "counts": counts,
        "slowest": durations[:15],
    }


def setup() -> dict:
    with tempfile.TemporaryDirectory(prefix="newcomer_setup_") as tmp:
        clone = Path(tmp) / "lora_jax"
        subprocess.run(["git", "clone", "-q", str(ROOT), str(clone)], check=True)
        run = timed(["bash", "scripts/setup.sh", "test"], clone)
        if run["returncode"] != 0:
            raise SystemExit(f"setup failed (exit {run['returncode']}):\n{run['stderr'][-3000:]}")
        return {
            "wall_s": run["wall_s"],
            "user_s": run["user_s"],
            "system_s": run["system_s"],
            "command": "bash scripts/setup.sh test",
            "pip_cache": "warm" if (Path.home() / ".cache" / "pip").exists() else "cold",
        }


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.newcomer", description=__doc__.split("\n\n")[0])
    ap.add_argument("--main-job", action="store_true", help="time python -m train.run")
    ap.add_argument("--tests", action="store_true", help="time python -m pytest (the default tier)")
    ap.add_argument("--setup", action="store_true", help="time bash scripts/setup.sh test in a fresh clone")
    args = ap.parse_args(argv)
    parts = [
        (name, fn)
        for name, fn, on in (
            ("main_job", main_job, args.main_job),
            ("tests", tests, args.tests),
            ("setup", setup, args.setup),
        )
        if on
    ]
    if not parts:
        ap.error("name at least one of --main-job, --tests, --setup")
    record = json.loads(PATH.read_text()) if PATH.exists() else {}
    for name, fn in parts:
        rec = Recorder("newcomer", SOURCES, [f"--{name.replace('_', '-')}"])
        section = fn()
        section["provenance"] = rec.provenance()
        record[name] = section
        print(f"{name}: {section['wall_s']:.0f} s wall (load average {section['provenance']['load_average']})")
    # The file's own provenance (benchmarks.staleness reads it): that of its oldest section.
    record["provenance"] = min(
        (record[k]["provenance"] for k in ("main_job", "tests", "setup") if k in record), key=lambda p: p["date"]
    )
    PATH.parent.mkdir(parents=True, exist_ok=True)
    PATH.write_text(json.dumps(record, indent=1, default=str) + "\n")
    print(f"wrote {PATH}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
