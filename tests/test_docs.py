"""The documentation: the site builds with ``mkdocs build --strict`` (broken links, anchors or API references
fail), every Python block of the docs runs as written, the README stays a short front door whose links and
capability claims hold, and the commands the docs give run from a fresh clone (no ``../shared/data``, no module
or config that does not exist)."""

import importlib.util
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import require

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"
README = ROOT / "README.md"
PAGES = sorted(DOCS.rglob("*.md"))
BLOCK = re.compile(r"^```python\n(.*?)^```", re.S | re.M)
SHELL = re.compile(r"^```bash\n(.*?)^```", re.S | re.M)


# ------------------------------------------------------------------------------------------------ the site


@pytest.mark.slow  # 15-60 s (mkdocstrings reads the whole package): in CI's slow tier (.ci/run), not the default one
def test_site_builds_strict(tmp_path):
    """``mkdocs build --strict``: every page in the nav, every link, anchor and API reference resolves."""
    require("mkdocs", "bash scripts/setup.sh test installs the docs extra")
    require("mkdocstrings", "bash scripts/setup.sh test installs the docs extra")
    env = {**os.environ, "NO_MKDOCS_2_WARNING": "1"}
    proc = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(tmp_path / "site")],
        cwd=ROOT,
        capture_output=True,
        text=True,
        env=env,
        timeout=600,
    )
    warnings = [line for line in proc.stderr.splitlines() if "WARNING" in line or "ERROR" in line]
    assert proc.returncode == 0, "mkdocs build --strict failed:\n" + "\n".join(
        warnings or proc.stderr.splitlines()[-20:]
    )
    site = tmp_path / "site"
    api = (site / "reference" / "api" / "core" / "index.html").read_text()
    assert "lora_jax.core.merge" in api and "lora_jax.core.init" in api  # the API pages come from the docstrings
    config = (site / "reference" / "config" / "index.html").read_text()
    assert "optim.lr" in config and "train.steps" in config
    for png in (ROOT / "experiments").glob("*.png"):  # fresh experiments' plots are served (docs/hooks.py)
        assert (site / "experiments" / png.name).is_file(), png.name
    assert not (site / "experiments" / "stale").exists()  # withdrawn results' plots are not


def test_front_page_leads_to_quickstart_config_and_api():
    index = (DOCS / "index.md").read_text()
    for target in ("getting-started.md", "reference/config.md", "reference/api.md", "guides/your-own-data.md"):
        assert f"]({target})" in index, target


def test_nav_holds_every_page():
    nav = (ROOT / "mkdocs.yml").read_text()
    for page in PAGES:
        assert f": {page.relative_to(DOCS).as_posix()}" in nav, f"{page} is not in mkdocs.yml's nav"


# ------------------------------------------------------------------------------------------------ examples


@pytest.mark.parametrize(
    "page", [p for p in PAGES if BLOCK.search(p.read_text())], ids=lambda p: p.relative_to(DOCS).as_posix()
)
def test_docs_python_blocks_run(page, capsys):
    """Every ```` ```python ```` block of a page, in order, in one namespace (a later block may use an earlier
    one's names), as a reader would paste them."""
    namespace = {"__name__": "docs"}
    for i, code in enumerate(BLOCK.findall(page.read_text())):
        exec(compile(code, f"{page.relative_to(ROOT)} block {i + 1}", "exec"), namespace)


def _commands(text: str) -> list[str]:
    """The shell commands of the ```` ```bash ```` blocks (continuation lines joined, comments dropped)."""
    out = []
    for block in SHELL.findall(text):
        for line in block.replace("\\\n", " ").splitlines():
            line = line.split("  #", 1)[0].strip()
            if line and not line.startswith("#"):
                out.append(line)
    return out


def test_doc_commands_run_from_a_fresh_clone():
    """Every ``python -m MODULE`` the README and the docs give names a module of this checkout (or an installed
    tool), every ``--config`` file exists, and no command reads ``../shared/data`` (a user has none)."""
    tools = {"mkdocs", "pytest", "pip", "tensorboard"}
    for page in [README, *PAGES]:
        for cmd in _commands(page.read_text()):
            assert "shared/data" not in cmd, f"{page.name}: {cmd}"
            for module in re.findall(r"python -m ([\w.]+)", cmd):
                if module.split(".")[0] in tools:
                    continue
                assert (ROOT / (module.replace(".", "/") + ".py")).is_file() or importlib.util.find_spec(
                    module
                ) is not None, f"{page.name}: no module {module}: {cmd}"
            for config in re.findall(r"--config (\S+)", cmd):
                assert (ROOT / config).is_file(), f"{page.name}: no config {config}: {cmd}"
            if "train.run" in cmd:
                _check_data_of(cmd, page)


def _check_data_of(cmd: str, page: Path) -> None:
    """A ``train.run`` command reads built-in data, files of the checkout, or data it names itself: never a data
    file that only a shipped config points at and a fresh clone does not have."""
    import shlex

    from train.config import load_config
    from train.run import parse_args

    rest = re.split(r'"|\s&|;', cmd.split("train.run", 1)[1])[0]
    if "--help" in rest:
        return
    args = parse_args(shlex.split(rest.replace("$i", "0")))
    if any(o.startswith(("data.source=", "data.eval_source=")) for o in args.overrides):
        return  # the command names its data
    data = load_config(ROOT / args.config if args.config else None, args.overrides).data
    for source in filter(None, [data.source, data.eval_source]):
        for path in source.split(","):
            if not path.startswith("builtin:"):
                assert (ROOT / path).exists(), f"{page.name}: {cmd}\n  reads {path}, which a fresh clone lacks"


# ------------------------------------------------------------------------------------------------- README


def test_readme_is_a_front_door():
    text = README.read_text()
    lines = text.splitlines()
    assert len(lines) <= 200, f"README.md has {len(lines)} lines; the detail belongs in docs/"
    assert "bash scripts/setup.sh && .venv/bin/python -m train.run" in text
    assert "bash scripts/setup.sh test && .venv/bin/python -m pytest" in text
    assert "mkdocs serve" in text  # how to read the docs locally
    for target in re.findall(r"\]\(((?:docs/)[^)#]+)", text):
        assert (ROOT / target).is_file(), f"README links to {target}, which does not exist"
    for target in ("docs/getting-started.md", "docs/reference/config.md", "docs/reference/api.md"):
        assert f"]({target})" in text, target


CAPABILITIES = re.compile(r"<!-- capabilities:begin -->\n(.*?)\n<!-- capabilities:end -->", re.S)


def _capability_names() -> list[tuple[str, list[str]]]:
    """``(row, names)``: each capability row of the README and the backticked names in our column."""
    table = CAPABILITIES.search(README.read_text()).group(1).splitlines()[2:]
    rows = []
    for line in table:
        cells = [c.strip() for c in line.strip("|").split("|")]
        rows.append((cells[0], re.findall(r"`([^`]+)`", cells[1])))
    return rows


def _exists(name: str) -> bool:
    import lora_jax as lora
    from train.config import key_table

    keys = {row.split("`")[1] for row in key_table().splitlines()[2:]}
    if name.startswith("lora."):
        return hasattr(lora, name.split(".", 1)[1]) or name in keys
    if name in keys:
        return True
    if "=" in name:  # a keyword argument of lora.init: targets="experts"
        key, value = name.split("=", 1)
        return value.strip('"') in lora.PRESETS if key == "targets" else False
    import inspect

    return hasattr(lora, name) or name in inspect.signature(lora.init).parameters


def test_capability_table_is_checked_against_the_code():
    """Each capability we claim names the function, keyword or config key that does it; each exists, and each
    is exercised by a test (its name appears under tests/)."""
    rows = _capability_names()
    assert len(rows) >= 8
    tests_text = "\n".join(p.read_text() for p in (ROOT / "tests").glob("test_*.py") if p.name != "test_docs.py")
    for row, names in rows:
        if row == "framework":
            continue
        assert names, f"capability {row!r} names nothing in our column"
        for name in names:
            assert _exists(name), f"capability {row!r}: {name} does not exist"
            bare = name.split(".", 1)[1] if name.startswith("lora.") else name.split("=")[0]
            assert bare in tests_text, f"capability {row!r}: no test mentions {bare}"


def test_capability_check_can_fail():
    assert not _exists("lora.no_such_function") and not _exists("use_nothing") and not _exists('targets="nope"')
