"""Which results files are older than the code they measure.

    python -m benchmarks.staleness          # exit 1 and list them when any is stale

Each benchmark module declares ``SOURCES`` (files and folders relative to the repository root, itself
included). A results file ``benchmarks/results/NAME.json`` belongs to the benchmark its provenance names (else
the module ``NAME``, or ``NAME`` without ``_quick``). It is fresh when its recorded commit contains the last
commit that touched any of those sources and it was not measured with uncommitted changes to them; otherwise
it is stale: no recorded commit, a commit unknown to this clone, a later change to a source, or dirty sources.

The experiments' results (``experiments/**/*.json`` outside ``experiments/stale/`` and ``experiments/runs/``)
are checked the same way against ``train/experiment.py``'s ``SOURCES[NAME]``, ``NAME`` being the experiment
their provenance names (else the file's name); a JSON there that no experiment measures is stale too.
Withdrawn results (``benchmarks/results/stale/``, ``experiments/stale/``) are not checked: the pages say they
are withdrawn.

The check needs the repository's history: outside a git checkout, or in a shallow clone, it raises
:class:`NoHistory` instead of passing.
"""

from __future__ import annotations

import argparse
import ast
import dataclasses
import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
EXPERIMENTS = ROOT / "experiments"


class NoHistory(RuntimeError):
    """The check cannot run: no git, not a git checkout, or a shallow clone."""


@dataclasses.dataclass(frozen=True)
class Stale:
    results: str  # the results file, relative to the root
    benchmark: str
    why: str
    rerun: str  # the command that refreshes it


def _git(root: Path, *args: str, check: bool = True) -> subprocess.CompletedProcess:
    try:
        return subprocess.run(["git", *args], cwd=root, capture_output=True, text=True, check=check)
    except OSError as e:
        raise NoHistory(f"git is not available ({e}); the staleness check needs the repository's history") from None
    except subprocess.CalledProcessError as e:
        raise NoHistory(f"git {' '.join(args)} failed in {root}: {e.stderr.strip()}") from None


def require_history(root: Path) -> None:
    """Raise :class:`NoHistory` unless ``root`` is a git checkout with its full history."""
    out = _git(root, "rev-parse", "--is-inside-work-tree", "--is-shallow-repository", check=False)
    lines = out.stdout.split()
    if out.returncode != 0 or not lines or lines[0] != "true":
        raise NoHistory(
            f"{root} is not a git checkout ({out.stderr.strip() or 'no work tree'}): the staleness of "
            "benchmark results is decided from the history, so it cannot be checked here"
        )
    if len(lines) > 1 and lines[1] == "true":
        raise NoHistory(
            f"{root} is a shallow clone: fetch the full history (git fetch --unshallow) to check the "
            "staleness of benchmark results"
        )


def _sources_literal(module: Path):
    tree = ast.parse(module.read_text(), str(module))
    for node in tree.body:
        if isinstance(node, ast.Assign) and any(isinstance(t, ast.Name) and t.id == "SOURCES" for t in node.targets):
            return ast.literal_eval(node.value)
    raise ValueError(f"{module} declares no SOURCES (the files whose code it measures)")


def declared_sources(module: Path) -> list[str]:
    """The ``SOURCES = (...)`` literal of a benchmark module, read without importing it."""
    return list(_sources_literal(module))


def experiment_sources(root: Path = ROOT) -> dict[str, list[str]]:
    """``train/experiment.py``'s ``SOURCES = {NAME: (...)}``: the code each experiment measures (not imported)."""
    module = root / "train" / "experiment.py"
    return {k: list(v) for k, v in _sources_literal(module).items()} if module.is_file() else {}


def benchmark_of(path: Path, record: dict) -> str:
    name = (record.get("provenance") or {}).get("benchmark")
    if name:
        return name
    stem = path.stem
    return stem[: -len("_quick")] if stem.endswith("_quick") else stem


def rerun_command(benchmark: str, root: Path = ROOT) -> str:
    if benchmark in experiment_sources(root):
        return f"python -m train.experiment {benchmark}"
    return f"python -m benchmarks.{benchmark}"


def experiment_results(experiments_dir: Path) -> list[Path]:
    """The experiments' results files: ``experiments_dir/**/*.json`` outside ``stale/`` and ``runs/``."""
    return sorted(
        p
        for p in experiments_dir.rglob("*.json")
        if not {"stale", "runs"} & set(p.relative_to(experiments_dir).parts[:-1])
    )


def check(results_dir: Path = RESULTS, root: Path = ROOT, experiments_dir: Path | None = None) -> list[Stale]:
    """The stale results files under ``results_dir`` and ``experiments_dir`` (default ``root/experiments``; empty
    list: all fresh). Raises :class:`NoHistory`."""
    require_history(root)
    stale = []
    jobs = []
    for path in sorted(results_dir.glob("*.json")):
        record = json.loads(path.read_text())
        name = benchmark_of(path, record)
        module = root / "benchmarks" / f"{name}.py"
        if not module.is_file():
            jobs.append((path, record, name, None, f"no benchmark module benchmarks/{name}.py measures it"))
        else:
            jobs.append((path, record, name, declared_sources(module), None))
    experiments = experiment_sources(root)
    for path in experiment_results(root / "experiments" if experiments_dir is None else experiments_dir):
        record = json.loads(path.read_text())
        name = (record.get("provenance") or {}).get("experiment") or path.stem
        if name in experiments:
            jobs.append((path, record, name, experiments[name], None))
        else:
            why = f"no experiment of train/experiment.py (SOURCES: {sorted(experiments)}) measures it"
            jobs.append((path, record, name, None, why))
    for path, record, name, sources, orphan in jobs:
        rel = str(path.relative_to(root)) if path.is_relative_to(root) else str(path)
        if sources is None:
            stale.append(Stale(rel, name, orphan, "delete it (or move it to a stale/ folder: withdrawn)"))
            continue
        git = (record.get("provenance") or {}).get("git") or {}
        commit = git.get("commit")
        last = _git(root, "log", "-1", "--format=%H", "--", *sources).stdout.strip()
        why = None
        if not commit:
            why = "it records no git commit (it predates provenance recording)"
        elif _git(root, "cat-file", "-e", f"{commit}^{{commit}}", check=False).returncode != 0:
            why = f"its commit {commit[:12]} is not in this repository's history"
        elif last and _git(root, "merge-base", "--is-ancestor", last, commit, check=False).returncode != 0:
            changed = _git(root, "log", "--format=%h %s", f"{commit}..HEAD", "--", *sources).stdout.splitlines()
            files = _git(root, "diff", "--name-only", commit, "HEAD", "--", *sources).stdout.split()
            why = (
                f"measured at {commit[:12]}; {len(changed)} later commit(s) changed "
                f"{', '.join(files) or 'its sources'}" + (f" (latest: {changed[0][:100]})" if changed else "")
            )
        elif git.get("dirty_sources"):
            why = f"measured with uncommitted changes to {', '.join(git['dirty_sources'])}"
        if why:
            recorded = (record.get("provenance") or {}).get("command")
            stale.append(Stale(rel, name, why, recorded or rerun_command(name, root)))
    return stale


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.staleness", description=__doc__.split("\n\n")[0])
    ap.add_argument("--results", default=str(RESULTS), help="folder of results JSON files")
    args = ap.parse_args(argv)
    try:
        stale = check(Path(args.results))
    except NoHistory as e:
        print(f"cannot check: {e}", file=sys.stderr)
        return 2
    for s in stale:
        print(f"STALE {s.results}: {s.why}\n      rerun: {s.rerun}")
    if not stale:
        print("every results file is at least as new as the code it measures")
    return 1 if stale else 0


if __name__ == "__main__":
    sys.exit(main())
