"""`k2jax train --config FILE [--config FILE ...] [--set section.key=value ...]`.

Thin on purpose (k2jax/cli.py): parses, then `Trainer.from_config(...).fit()`. jax is imported
only inside `run`, after `jax.distributed` has been started on multi-host launches.
"""

from __future__ import annotations

import argparse
import logging
import sys


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--config",
        action="append",
        required=True,
        metavar="FILE",
        help="run config (gin syntax; a path or a name in k2jax/configs); repeat to layer files",
    )
    parser.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="SECTION.KEY=VALUE",
        help="override one setting, e.g. --set lora.rank=32 --set data.path=chats.jsonl",
    )
    parser.add_argument(
        "--print-config",
        action="store_true",
        help="print the operative config (every knob) and exit without training",
    )


def run(args: argparse.Namespace) -> int:
    # jax logs its backend discovery at INFO ("Unable to initialize backend 'tpu'"): noise here.
    logging.getLogger("jax").setLevel(logging.WARNING)
    from k2jax.train.config import RunConfig

    config = RunConfig.load(args.config, args.set)
    if args.print_config:
        print(config.to_gin(), end="")
        return 0
    from k2jax.sharding import initialize_distributed

    initialize_distributed()
    from k2jax.train.trainer import NonFiniteError, Trainer

    trainer = Trainer(config)
    try:
        history = trainer.fit()
    except NonFiniteError as e:
        print(f"k2jax train: {e}", file=sys.stderr)
        return 3
    finally:
        trainer.close()
    if history:
        last = history[-1]
        print(
            f"k2jax train: step {last['step']}: loss {last['loss']}; run folder "
            f"{config.train.run_dir}"
        )
    return 0
