"""The command line every entry point shares: --config, --set, --resume, --dry-run."""
from __future__ import annotations

import argparse
from typing import Callable, Sequence

from .config import Config, ConfigError, add_config_args, config_from_args


def parse(doc: str, argv: list[str] | None, training: bool = True,
          flags: Sequence[tuple[str, str]] = ()) -> tuple[Config, argparse.Namespace]:
    """`flags`: an entry point's own on/off options, as (name, help)."""
    parser = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_config_args(parser)
    for name, text in flags:
        parser.add_argument(name, action="store_true", help=text)
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
    except ConfigError as e:  # a bad setting: its message names it and the valid values, no traceback
        parser.error(str(e))
    return cfg, args


def dry_run(cfg: Config) -> None:
    from .models.memory import report

    try:
        text = report(cfg)
    except (OSError, ValueError) as err:  # no model.arch and no readable teacher config: say which, no traceback
        raise SystemExit(f"--dry-run needs model.arch or the teacher's config.json / safetensors header: {err}")
    print(text)


def stage_main(doc: str, argv: list[str] | None, run: Callable[[Config, bool], object]) -> None:
    """A training stage's command line: parse, then either --dry-run's estimate or the run."""
    cfg, args = parse(doc, argv)
    if args.dry_run:
        return dry_run(cfg)
    run(cfg, args.resume)
