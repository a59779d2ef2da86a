"""The benchmarks' one harness: timing in interleaved rounds, paired ratios and their statistics, XLA's memory
analysis of a compiled step, the provenance of every result (git commit, date, machine, load, library versions),
a table printer, JSON output. Run a benchmark as a module from the repository root: ``python -m benchmarks.NAME``.

Every benchmark module declares ``SOURCES``: the files and folders (relative to the repository root) whose code
it measures, itself included. ``python -m benchmarks.staleness`` compares them with the commit a result records.
"""

from __future__ import annotations

import datetime
import importlib.metadata
import json
import math
import os
import platform
import random
import shlex
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import jax

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
# Library versions recorded with every result (None: not installed).
LIBRARIES = (
    "jax",
    "jaxlib",
    "flax",
    "optax",
    "numpy",
    "orbax-checkpoint",
    "transformers",
    "tokenizers",
    "gguf",
    "torch",
    "peft",
    "bitsandbytes",
    "qwix",
)


def block(x: Any) -> Any:
    return jax.block_until_ready(x)


def time_interleaved(
    fns: Mapping[str, Callable[[], Any]], rounds: int = 10, warmup: int = 2, rotate: bool = False
) -> dict[str, list[float]]:
    """Time each zero-argument function ``rounds`` times, interleaving them round by round so that a noisy
    neighbour slows all of them alike. Each function must block until its result is ready. ``rotate``: round
    ``i`` starts at the ``i``-th function, so that no function always runs right after the same neighbour (e.g.
    one that frees a lot of memory)."""
    names = list(fns)
    for name in names:
        for _ in range(warmup):
            fns[name]()
    times: dict[str, list[float]] = {name: [] for name in names}
    for i in range(rounds):
        shift = i % len(names) if rotate else 0
        for name in names[shift:] + names[:shift]:
            t0 = time.perf_counter()
            fns[name]()
            times[name].append(time.perf_counter() - t0)
    return times


def paired_ratio(times: Mapping[str, Sequence[float]], name: str, base: str) -> float:
    """Median over rounds of ``times[name] / times[base]`` measured in the same round: robust to the load of a
    shared machine drifting between rounds (:func:`paired_summary` adds its CI and sign test)."""
    return statistics.median([t / b for t, b in zip(times[name], times[base], strict=True)])


def memory_analysis(compiled: Any) -> dict[str, int] | None:
    """What XLA plans for a compiled step (``compiled.memory_analysis()``; nothing executed), in bytes:
    ``argument``, ``output``, ``alias`` (outputs written in place of donated arguments), ``temp``; ``peak =
    argument + output - alias + temp`` (every buffer held at once, donated state counted once) and ``sum =
    argument + output + temp`` (the same without donation). None where the backend gives no analysis."""
    m = compiled.memory_analysis()
    if m is None:
        return None
    out = {
        "argument": int(m.argument_size_in_bytes),
        "output": int(m.output_size_in_bytes),
        "alias": int(m.alias_size_in_bytes),
        "temp": int(m.temp_size_in_bytes),
    }
    out["peak"] = out["argument"] + out["output"] - out["alias"] + out["temp"]
    out["sum"] = out["argument"] + out["output"] + out["temp"]
    return out


def donated_step_memory(step: Callable, *args: Any) -> dict[str, int] | None:
    """:func:`memory_analysis` of ``step`` jitted with its first two arguments (the trained tree and its optimizer
    state) donated, as ``train.loop`` runs it; ``args`` may be abstract (``jax.ShapeDtypeStruct``)."""
    return memory_analysis(jax.jit(step, donate_argnums=(0, 1)).lower(*args).compile())


def median(xs: list[float]) -> float:
    return statistics.median(xs)


# ------------------------------------------------------------------------------------------- statistics


def sign_test_p(above: int, n: int) -> float:
    """One-sided exact sign test: P(X >= above) for X ~ Binomial(n, 1/2) (ties dropped before counting ``n``)."""
    return sum(math.comb(n, k) for k in range(above, n + 1)) / 2**n if n else 1.0


def bootstrap_median_ci(
    xs: Sequence[float], level: float = 0.95, resamples: int = 10_000, seed: int = 0
) -> tuple[float, float]:
    """Percentile bootstrap confidence interval of the median of ``xs`` (seeded: the same data, the same CI)."""
    rng = random.Random(seed)
    n = len(xs)
    meds = sorted(statistics.median(rng.choices(xs, k=n)) for _ in range(resamples))
    lo = meds[int(math.floor((1 - level) / 2 * resamples))]
    hi = meds[min(int(math.ceil((1 + level) / 2 * resamples)) - 1, resamples - 1)]
    return lo, hi


def paired_summary(times: Sequence[float], reference: Sequence[float]) -> dict[str, Any]:
    """Paired per-round ratios ``times[i] / reference[i]`` (both measured in round ``i``): their median, its 95%
    bootstrap CI, and the sign test of "slower than the reference" (rounds with a ratio above 1 vs below)."""
    ratios = [t / r for t, r in zip(times, reference, strict=True)]
    above, below = sum(x > 1 for x in ratios), sum(x < 1 for x in ratios)
    lo, hi = bootstrap_median_ci(ratios)
    return {
        "rounds": len(ratios),
        "median": statistics.median(ratios),
        "ci95": [lo, hi],
        "slower_rounds": above,
        "faster_rounds": below,
        "sign_test_p_slower": sign_test_p(above, above + below),
        "sign_test_p_faster": sign_test_p(below, above + below),
    }


def ratio_verdict(summary: Mapping[str, Any], a: str, b: str) -> str:
    """What paired rounds of ``a`` over ``b`` show, in words and from the summary's own numbers."""
    lo, hi = summary["ci95"]
    where = (
        f"median {summary['median']:.2f}, 95% CI {lo:.2f}-{hi:.2f} over {summary['rounds']} paired rounds; "
        f"{a} slower in {summary['slower_rounds']} of them"
    )
    if lo > 1:
        return f"{a} is slower than {b} ({where})"
    if hi < 1:
        return f"{a} is faster than {b} ({where})"
    return f"no difference between {a} and {b} detected at this number of rounds ({where})"


# ------------------------------------------------------------------------------------------ provenance


def _git(*args: str) -> str:
    return subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True, check=True).stdout.strip()


def git_state(sources: Sequence[str] = ()) -> dict[str, Any]:
    """The commit the working tree is at, whether it has uncommitted changes, and which of ``sources`` do."""
    try:
        commit = _git("rev-parse", "HEAD")
        # not _git's stripped output: each porcelain line starts "XY " and X may be a space
        status = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            cwd=ROOT,
            capture_output=True,
            text=True,
            check=True,
        ).stdout
        dirty = [line[3:] for line in status.splitlines() if line.strip()]
    except (OSError, subprocess.CalledProcessError) as e:
        return {"commit": None, "error": f"no git history here: {e}"}
    dirty_sources = sorted({d for d in dirty for s in sources if d == s or d.startswith(s.rstrip("/") + "/")})
    return {"commit": commit, "dirty": bool(dirty), "dirty_files": dirty, "dirty_sources": dirty_sources}


def cpu_info() -> dict[str, Any]:
    """CPU model, flags and core counts (from /proc/cpuinfo where there is one)."""
    info: dict[str, Any] = {
        "model": platform.processor() or platform.machine(),
        "flags": [],
        "logical_cores": os.cpu_count(),
    }
    if hasattr(os, "sched_getaffinity"):
        info["usable_cores"] = len(os.sched_getaffinity(0))
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return info
    cores = set()
    physical = None
    for line in text.splitlines():
        key, _, value = line.partition(":")
        key, value = key.strip(), value.strip()
        if key == "model name":
            info["model"] = value
        elif key == "flags" and not info["flags"]:
            info["flags"] = sorted(value.split())
        elif key == "physical id":
            physical = value
        elif key == "core id":
            cores.add((physical, value))
    if cores:
        info["physical_cores"] = len(cores)
    return info


def library_versions() -> dict[str, str | None]:
    out = {}
    for name in LIBRARIES:
        try:
            out[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            out[name] = None
    return out


def load_average() -> list[float] | None:
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return None


def environment() -> dict[str, Any]:
    dev = jax.devices()[0]
    return {
        "jax": jax.__version__,
        "backend": jax.default_backend(),
        "device": getattr(dev, "device_kind", str(dev)),
        "device_count": jax.device_count(),
        "cpu_count": os.cpu_count(),
        "python": platform.python_version(),
        "machine": platform.machine(),
        "time": time.strftime("%Y-%m-%d %H:%M:%S"),
    }


class Recorder:
    """Provenance of one benchmark run: call at the start (git state and load average before), ``write`` at
    the end (load average after, wall time). Every results JSON goes through it, the experiments' too
    (``python -m train.experiment``: ``kind="experiment"`` and their own ``command``)."""

    def __init__(
        self,
        benchmark: str,
        sources: Sequence[str],
        argv: Sequence[str] | None = None,
        command: str | None = None,
        kind: str = "benchmark",
    ):
        self.benchmark = benchmark
        self.kind = kind
        self.sources = list(sources)
        args = list(sys.argv[1:] if argv is None else argv)
        self.command = command or " ".join(["python -m benchmarks." + benchmark, *map(shlex.quote, args)])
        self.t0 = time.perf_counter()
        self.started = datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds")
        self.load_before = load_average()
        self.git = git_state(self.sources)

    def provenance(self) -> dict[str, Any]:
        return {
            self.kind: self.benchmark,
            "command": self.command,
            "sources": self.sources,
            "git": self.git,
            "date": self.started,
            "finished": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
            "wall_s": time.perf_counter() - self.t0,
            "cpu": cpu_info(),
            "load_average": {"before": self.load_before, "after": load_average()},
            "libraries": library_versions(),
            "python": platform.python_version(),
            "platform": platform.platform(),
        }

    def write(self, name: str, payload: Mapping[str, Any], out_dir: str | Path | None = None) -> Path:
        """``benchmarks/results/NAME.json`` (or ``out_dir/NAME.json``): provenance, environment, payload."""
        folder = Path(out_dir) if out_dir is not None else RESULTS
        folder.mkdir(parents=True, exist_ok=True)
        path = folder / f"{name}.json"
        record = {"provenance": self.provenance(), "environment": environment(), **payload}
        path.write_text(json.dumps(record, indent=2, default=str) + "\n")
        return path


def table(rows: list[Mapping[str, Any]], columns: list[str]) -> str:
    def fmt(v):
        if isinstance(v, float):
            return f"{v:.3f}" if abs(v) < 1000 else f"{v:,.0f}"
        if isinstance(v, int):
            return f"{v:,}"
        return str(v)

    cells = [[fmt(r.get(c, "")) for c in columns] for r in rows]
    widths = [max(len(c), *(len(row[i]) for row in cells)) for i, c in enumerate(columns)]
    lines = ["  ".join(c.ljust(w) for c, w in zip(columns, widths)), "  ".join("-" * w for w in widths)]
    lines += ["  ".join(v.ljust(w) for v, w in zip(row, widths)) for row in cells]
    return "\n".join(lines)
