"""The benchmarks' bookkeeping: every result records its run, the README's figures are generated from the results
(and a test fails when they disagree), stale results are found from git history, and the goal checks can fail."""

from __future__ import annotations

import copy
import json
import re
import subprocess
from pathlib import Path

import jax
import pytest

from benchmarks import common, report, staleness, train_step

ROOT = Path(__file__).resolve().parents[1]


# ----------------------------------------------------------------------------------------- README <-> JSON


def test_readme_figures_are_generated_from_the_results():
    """README.md and the docs pages (docs/**/*.md) show what benchmarks/results/*.json hold."""
    assert not report.stale_pages(report.load_results()), (
        "a page disagrees with benchmarks/results/*.json: run python -m benchmarks.report"
    )


def test_report_follows_the_results_and_covers_them_all():
    readme = "\n".join(p.read_text() for p in report.pages())  # the README and the docs pages together
    results = report.load_results()
    ids = report.marker_ids()
    assert ids == set(report.RENDERERS)  # every renderer has its place on a page, and no marker is unknown
    needs = {n for needs, _, _ in report.RENDERERS.values() for n in needs}
    fresh = {n for n in results if not n.startswith("stale/")}
    withdrawn = {n.removeprefix("stale/") for n in results if n.startswith("stale/")}
    assert fresh <= needs and withdrawn <= needs  # no unreported result, fresh or withdrawn
    assert needs - report.OPTIONAL <= fresh | withdrawn  # none missing but optional ones
    # the check can fail: a result withdrawn (its code changed) changes what the pages say
    name = sorted(n for n in fresh - report.OPTIONAL)[0]
    changed = {k: v for k, v in copy.deepcopy(results).items() if k != name}
    changed[f"stale/{name}"] = results[name]
    assert report.render(readme, changed) != readme
    del changed[f"stale/{name}"]
    with pytest.raises(FileNotFoundError, match=name):  # neither fresh nor withdrawn: an error, not a blank
        report.render(readme, changed)
    with pytest.raises(KeyError, match="no renderer"):
        report.render("<!-- report:nope --><!-- /report:nope -->", results)


# --------------------------------------------------------------------------------------------- staleness


def test_benchmark_results_are_not_older_than_the_code_they_measure():
    """Fails until every listed results file is rerun on the current code (see the rerun commands)."""
    stale = staleness.check()  # raises NoHistory outside a full git checkout: no silent pass
    assert not stale, "stale benchmark results:\n" + "\n".join(
        f"  {s.results}: {s.why}\n    rerun: {s.rerun}" for s in stale
    )


def test_every_benchmark_declares_existing_sources():
    for module in sorted((ROOT / "benchmarks").glob("*.py")):
        if module.stem in ("__init__", "common", "report", "staleness"):
            continue
        sources = staleness.declared_sources(module)
        assert f"benchmarks/{module.name}" in sources, module
        assert all((ROOT / s).exists() for s in sources), (module, sources)


def test_benchmarks_run_as_modules_on_one_harness():
    """Each benchmark runs as ``python -m benchmarks.NAME`` (none edits ``sys.path``), and none imports another's
    private helper: what they share (timing rounds, paired ratios, memory analysis, provenance) is in
    ``benchmarks.common``."""
    import ast

    for module in sorted((ROOT / "benchmarks").glob("*.py")):
        text = module.read_text()
        assert "sys.path" not in text, f"{module.name} edits sys.path; run it as python -m benchmarks.{module.stem}"
        assert f"python benchmarks/{module.name}" not in text, module
        for node in ast.walk(ast.parse(text)):
            if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("benchmarks."):
                private = [a.name for a in node.names if a.name.startswith("_")]
                assert not private, f"{module.name} imports {private} from {node.module}"
    assert {"time_interleaved", "paired_ratio", "paired_summary", "memory_analysis", "Recorder"} <= set(vars(common))


def _git(repo: Path, *args: str) -> str:
    return subprocess.run(
        ["git", *args],
        cwd=repo,
        check=True,
        capture_output=True,
        text=True,
        env={
            "GIT_AUTHOR_NAME": "t",
            "GIT_AUTHOR_EMAIL": "t@t",
            "GIT_COMMITTER_NAME": "t",
            "GIT_COMMITTER_EMAIL": "t@t",
            "PATH": "/usr/bin:/bin",
        },
    ).stdout.strip()


def _commit(repo: Path, files: dict[str, str], message: str) -> str:
    for name, text in files.items():
        (repo / name).parent.mkdir(parents=True, exist_ok=True)
        (repo / name).write_text(text)
    _git(repo, "add", "-A")
    _git(repo, "commit", "-qm", message)
    return _git(repo, "rev-parse", "HEAD")


def _result(repo: Path, name: str, git: dict | None) -> None:
    record = {"provenance": {"benchmark": "foo", "git": git}} if git is not None else {"rows": []}
    (repo / "results").mkdir(exist_ok=True)
    (repo / "results" / f"{name}.json").write_text(json.dumps(record))


def test_staleness_from_git_history(tmp_path):
    repo = tmp_path / "repo"
    repo.mkdir()
    _git(repo, "init", "-q")
    measured = _commit(
        repo,
        {"lib/ops.py": "a = 1\n", "other.py": "", "benchmarks/foo.py": 'SOURCES = ("lib", "benchmarks/foo.py")\n'},
        "code",
    )
    _result(repo, "foo", {"commit": measured, "dirty_sources": []})
    assert staleness.check(repo / "results", repo) == []
    _commit(repo, {"other.py": "x = 2\n"}, "unrelated")  # a change outside the sources keeps it fresh
    assert staleness.check(repo / "results", repo) == []
    _commit(repo, {"lib/ops.py": "a = 2\n"}, "faster ops")
    (stale,) = staleness.check(repo / "results", repo)
    assert stale.benchmark == "foo" and "lib/ops.py" in stale.why and "faster ops" in stale.why
    _result(repo, "foo", {"commit": _git(repo, "rev-parse", "HEAD"), "dirty_sources": []})
    assert staleness.check(repo / "results", repo) == []  # rerun on the new code: fresh again
    _result(repo, "foo", {"commit": _git(repo, "rev-parse", "HEAD"), "dirty_sources": ["lib/ops.py"]})
    assert "uncommitted" in staleness.check(repo / "results", repo)[0].why
    _result(repo, "foo", None)
    assert "no git commit" in staleness.check(repo / "results", repo)[0].why
    _result(repo, "foo", {"commit": "0" * 40})
    assert "not in this repository" in staleness.check(repo / "results", repo)[0].why
    # without history the check refuses to run rather than pass
    shallow = tmp_path / "shallow"
    _git(tmp_path, "clone", "-q", "--depth", "1", f"file://{repo}", str(shallow))
    with pytest.raises(staleness.NoHistory, match="shallow"):
        staleness.check(shallow / "results", shallow)
    plain = tmp_path / "plain"
    (plain / "results").mkdir(parents=True)
    with pytest.raises(staleness.NoHistory, match="not a git checkout"):
        staleness.check(plain / "results", plain)


# ------------------------------------------------------------------------------------------ provenance


def test_recorder_writes_the_run_it_measured(tmp_path):
    rec = common.Recorder("train_step", train_step.SOURCES, ["--quick"])
    path = rec.write("x", {"rows": [1]}, tmp_path)
    record = json.loads(path.read_text())
    p = record["provenance"]
    assert record["rows"] == [1] and p["benchmark"] == "train_step"
    assert p["command"] == "python -m benchmarks.train_step --quick" and p["sources"] == list(train_step.SOURCES)
    assert re.fullmatch(r"[0-9a-f]{40}", p["git"]["commit"]) and isinstance(p["git"]["dirty"], bool)
    assert p["date"].endswith("+00:00") and p["wall_s"] >= 0
    assert p["cpu"]["model"] and p["cpu"]["logical_cores"] >= 1
    if Path("/proc/cpuinfo").is_file():
        assert p["cpu"]["flags"] and all(isinstance(f, str) for f in p["cpu"]["flags"])
    assert len(p["load_average"]["before"]) == 3 and len(p["load_average"]["after"]) == 3
    assert p["libraries"]["jax"] == jax.__version__ and "torch" in p["libraries"] and "peft" in p["libraries"]


# ----------------------------------------------------------------------------------------------- goals


def test_paired_statistics():
    assert common.sign_test_p(20, 20) == pytest.approx(2.0**-20)
    assert common.sign_test_p(0, 5) == 1.0 and common.sign_test_p(3, 6) == pytest.approx(42 / 64)
    s = common.paired_summary([1.1, 2.2, 3.3, 4.4], [1.0, 2.0, 3.0, 4.0])
    assert s["median"] == pytest.approx(1.1) and s["ci95"] == pytest.approx([1.1, 1.1])
    assert s["slower_rounds"] == 4 and s["faster_rounds"] == 0 and s["sign_test_p_slower"] == pytest.approx(1 / 16)
    assert common.ratio_verdict(s, "a", "b").startswith("a is slower than b")
    even = common.paired_summary([1.0, 1.2, 0.8, 1.1, 0.9], [1.0] * 5)
    assert even["ci95"][0] <= 1 <= even["ci95"][1]
    assert common.ratio_verdict(even, "a", "b").startswith("no difference")


def _goal(ratios, control=(1.0,) * 20):
    base = [1.0] * len(ratios)
    return train_step.merged_goal(
        common.paired_summary(list(ratios), base), common.paired_summary(list(control), [1.0] * len(control))
    )


def test_merged_latency_goal_can_fail():
    jitter = [1 + 0.01 * ((i * 7) % 5 - 2) for i in range(20)]  # within +-2% of the base, both ways
    assert _goal(jitter)["met"]
    slower = [1.08 * j for j in jitter]  # 8% slower in every round
    goal = _goal(slower)
    assert not goal["met"] and goal["value"] == pytest.approx(1.08, abs=0.02) and goal["slower_rounds"] == 20
    noisy = [0.8, 1.3] * 10  # median 1.05, far too noisy to claim 1.05 or better
    assert not _goal(noisy)["met"]


def test_git_state_names_the_changed_sources(tmp_path, monkeypatch):
    """A source changed but not committed is named in full (the first porcelain line starts with a space)."""
    repo = tmp_path / "repo"
    repo.mkdir()
    _git(repo, "init", "-q")
    _commit(repo, {"lib/ops.py": "a = 1\n", "other.py": ""}, "code")
    (repo / "lib" / "ops.py").write_text("a = 2\n")
    monkeypatch.setattr(common, "ROOT", repo)
    state = common.git_state(["lib"])
    assert state["dirty"] and state["dirty_files"] == ["lib/ops.py"] and state["dirty_sources"] == ["lib/ops.py"]
    assert common.git_state(["other.py"])["dirty_sources"] == []


EXPERIMENT_EDITS = [
    (report.E2E, lambda r: r["table"][0].update(bleu=r["table"][0]["bleu"] + 1)),
    (report.SST2, lambda r: r["table"][0].update(auc=r["table"][0]["auc"] - 0.1)),
    (report.E2E_ANALYSIS, lambda r: next(iter(r["adapters"].values()))["matrices"][0].update(relative=9.0)),
    (report.RANK, lambda r: r["runs"][0]["result"]["eval_after"].update(auc=0.123)),
    (report.QLORA_EXP, lambda r: r["table"][0].update(auc=0.123)),
    (report.E2E_DPO, lambda r: r["table"][1].update(ser=0.5)),
    (report.SST2_ANALYSIS, lambda r: next(iter(r["adapters"].values()))["matrices"][0].update(relative=9.0)),
    (report.WHISPER, lambda r: r["table"][0]["auc"].update(mean=0.123)),
]


@pytest.mark.parametrize("key, edit", EXPERIMENT_EDITS, ids=[k for k, _ in EXPERIMENT_EDITS])
def test_experiment_blocks_follow_their_results(key, edit):
    """Each experiment's block renders from its JSON and changes when the JSON does; a withdrawn result
    (``experiments/stale/``) is rendered as if it were fresh, so its renderer is checked before its rerun."""
    readme = "\n".join(p.read_text() for p in report.pages())
    results = report.load_results()
    assert key in results or f"stale/{key}" in results, key
    if key not in results:  # withdrawn: the page says so, and names the command that measures it again
        rerun = results[f"stale/{key}"].get("provenance", {}).get("command") or report.RERUN[key]
        assert f"`{rerun}`" in readme and "withdrawn" in readme.lower()
        results = {**results, key: results[f"stale/{key}"]}
        readme = report.render(readme, results)
    changed = copy.deepcopy(results)
    edit(changed[key])
    assert report.render(readme, changed) != readme, key


def test_staleness_covers_the_experiments(tmp_path):
    """experiments/**/*.json are checked against train/experiment.py's SOURCES like benchmark results against
    their module's; experiments/stale/ (withdrawn) and experiments/runs/ are not; a JSON no experiment measures is
    stale."""
    repo = tmp_path / "repo"
    repo.mkdir()
    _git(repo, "init", "-q")
    measured = _commit(
        repo,
        {"lib/ops.py": "a = 1\n", "other.py": "", "train/experiment.py": 'SOURCES = {"exp": ("lib",)}\n'},
        "code",
    )
    (repo / "results").mkdir()
    exp = repo / "experiments"
    for name in ("exp.json", "stale/old.json", "runs/x/result.json"):
        (exp / name).parent.mkdir(parents=True, exist_ok=True)
        (exp / name).write_text(json.dumps({"provenance": {"experiment": "exp", "git": {"commit": measured}}}))
    assert staleness.check(repo / "results", repo) == []
    _commit(repo, {"other.py": "x = 2\n"}, "unrelated")
    assert staleness.check(repo / "results", repo) == []
    _commit(repo, {"lib/ops.py": "a = 2\n"}, "faster ops")
    (stale,) = staleness.check(repo / "results", repo)
    assert stale.results == "experiments/exp.json" and "faster ops" in stale.why
    assert stale.rerun == staleness.rerun_command("exp", repo) == "python -m train.experiment exp"
    (exp / "exp.json").write_text(json.dumps({"rows": []}))  # no provenance: stale
    assert "no git commit" in staleness.check(repo / "results", repo)[0].why
    (exp / "exp.json").unlink()
    (exp / "orphan.json").write_text("{}")
    assert "no experiment" in staleness.check(repo / "results", repo)[0].why
