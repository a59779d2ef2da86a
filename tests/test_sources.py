"""``data.source`` is read one way everywhere (``train.sources``): the config's checks of which keys apply and the
loader agree on built-in / local files / hub data set."""

from __future__ import annotations

from train import config as config_lib
from train import sources
from train.config import load_config


def test_source_kinds(tmp_path):
    folder_file = tmp_path / "rows"  # no suffix, but a path that exists
    folder_file.write_text("prompt,completion\na,b\n")
    assert sources.kind("builtin:restaurants") == "builtin"
    assert sources.kind("train.csv, dev.JSONL") == "files"  # a data file suffix, existing or not
    assert sources.kind(str(folder_file)) == "files"
    assert sources.kind("glue") == sources.kind("org/no-such-data-set") == "hub"
    assert sources.paths(" a.csv,, b.csv ") == ["a.csv", "b.csv"]


def test_config_and_loader_read_the_source_alike(tmp_path):
    for source, kind in (("builtin:sentiment", "builtin"), (str(tmp_path / "x.csv"), "files"), ("glue", "hub")):
        cfg = load_config(None, [f"data.source={source}"])
        assert sources.kind(cfg.data.source) == kind
        assert config_lib._local(cfg) == (kind == "files") and config_lib._hub(cfg) == (kind == "hub")
