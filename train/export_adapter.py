"""`python -m train.export_adapter`: a student as a small adapter over its teacher (fastlightgen.student_adapter).

From a student checkpoint and its teacher file:
    python -m train.export_adapter --student S.safetensors --teacher T.safetensors --rank 8 --out A.safetensors
    python -m train.export_adapter --student S.safetensors --teacher T.safetensors --energy 0.99 --out A.safetensors
From a finished run (like train.export: export.run, default run_dir/stage3; the teacher is model.teacher):
    python -m train.export_adapter -c configs/toy.yaml --rank 8 [--out A.safetensors]
--rank N keeps N singular values of each layer's delta (0: whole deltas, the exact student); --energy E (in
(0, 1], instead of --rank) keeps, per layer, the smallest rank whose singular values hold share E of the delta's
squared singular values; a layer whose factors would not be smaller than its delta is stored whole either way.
The per-layer ranks go into the adapter's metadata. A bad setting is refused before any file is read. Default
out: run_dir/student_adapter.safetensors. API: `run(cfg, rank, energy, out)` and `from_files(...)`.
"""
from __future__ import annotations

import argparse
from pathlib import Path

import torch

from fastlightgen.checkpoint import CheckpointError, load_wan
from fastlightgen.student_adapter import (
    AdapterError,
    check_setting,
    describe_ranks,
    make_adapter,
    save_adapter,
)

from .cli import parse
from .config import Config

DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}


def _report(out: Path, adapter) -> None:
    m = adapter.meta
    print(f"wrote {out} ({out.stat().st_size / 2**20:.2f} MiB): {len(m.kept_blocks)} of {m.original_num_blocks} "
          f"blocks kept {m.kept_blocks}, {describe_ranks(m)}, recommended {m.recommended}")


def from_files(student: str | Path, teacher: str | Path, out: str | Path, rank: int = 0,
               energy: float | None = None, dtype: torch.dtype = torch.bfloat16) -> Path:
    """The adapter of a FastLightGen student checkpoint over its teacher checkpoint."""
    check_setting(rank, energy)
    student_model, meta = load_wan(student, dtype=torch.float32)
    if meta is None:
        raise AdapterError(f"{student}: no FastLightGen metadata, so its kept blocks are unknown; pass the student "
                           "checkpoint train.export wrote")
    teacher_model, _ = load_wan(teacher, dtype=torch.float32)
    adapter = make_adapter(teacher_model, student_model, meta.kept_blocks, rank=rank, energy=energy,
                           recommended=meta.recommended, dtype=dtype,
                           provenance={**meta.provenance, "student": Path(student).name, "teacher": Path(teacher).name})
    out = save_adapter(out, adapter)
    _report(out, adapter)
    return out


def run(cfg: Config, rank: int = 0, energy: float | None = None, out: str | Path = "") -> Path:
    """The adapter of a finished run's student (export.run, default run_dir/stage3) over model.teacher."""
    from .export import metadata
    from .models.loading import load_teacher, student_model
    from .models.record import StageRecord

    check_setting(rank, energy)
    ex = cfg.validate().export
    if ex.dtype not in DTYPES:  # before the run's weights load
        raise SystemExit(f"export.dtype={ex.dtype}: an adapter's deltas are stored in {', '.join(DTYPES)} (fp8 "
                         "would round deltas far smaller than the weights to zero); set export.dtype to one of them")
    folder = Path(ex.run) if ex.run else cfg.stage_dir("stage3")
    record = StageRecord.load(folder)
    student = student_model(cfg, folder, record)
    meta = metadata(student, record)
    if meta.family != "wan":
        raise SystemExit(f"student adapters hold Wan students; this run is {meta.family}")
    adapter = make_adapter(load_teacher(cfg), student, meta.kept_blocks, rank=rank, energy=energy,
                           recommended=meta.recommended, dtype=DTYPES[ex.dtype], provenance=meta.provenance)
    out = save_adapter(Path(out) if out else Path(cfg.run.run_dir) / "student_adapter.safetensors", adapter)
    _report(out, adapter)
    return out


def main(argv: list[str] | None = None) -> None:
    own = argparse.ArgumentParser(add_help=False)
    own.add_argument("--rank", type=int, default=0)
    own.add_argument("--energy", type=float, default=None)
    own.add_argument("--out", default="")
    own.add_argument("--student", default="")
    own.add_argument("--teacher", default="")
    own.add_argument("--dtype", choices=list(DTYPES), default="bfloat16")
    args, rest = own.parse_known_args(argv)
    try:
        check_setting(args.rank, args.energy)  # before the config or any model file is read
        if args.student:
            if not args.teacher or not args.out:
                raise SystemExit("--student needs --teacher (the full model file) and --out")
            from_files(args.student, args.teacher, args.out, args.rank, args.energy, DTYPES[args.dtype])
        else:
            cfg, _ = parse(__doc__, rest, training=False)
            run(cfg, args.rank, args.energy, args.out)
    except (AdapterError, CheckpointError) as err:
        raise SystemExit(f"error: {err}") from None


if __name__ == "__main__":
    main()
