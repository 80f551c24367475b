"""The command line every entry point shares: --config, --set, --resume, --dry-run."""
from __future__ import annotations

import argparse

from .config import Config, add_config_args, config_from_args


def parse(doc: str, argv: list[str] | None, training: bool = True) -> tuple[Config, argparse.Namespace]:
    parser = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_config_args(parser)
    if training:
        parser.add_argument("--resume", action="store_true",
                            help="continue from the newest complete checkpoint of this stage")
        parser.add_argument("--dry-run", action="store_true",
                            help="print the per-GPU memory estimate (ZeRO-3 at dist.world_size) and exit")
    # The deepspeed launcher appends --local_rank; the rank is read from the environment instead.
    parser.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    try:
        cfg = config_from_args(args)
    except ValueError as e:  # a bad setting: its message names it and the valid values, no traceback
        parser.error(str(e))
    if cfg.dist.bf16 and not cfg.dist.deepspeed:
        parser.error("dist.bf16 needs dist.deepspeed (the plain loop trains in fp32)")
    return cfg, args


def dry_run(cfg: Config) -> None:
    from .memory import report

    print(report(cfg))
