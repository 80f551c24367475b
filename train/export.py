"""`python -m train.export`: a finished stage -> the FastLightGen checkpoint format (and optionally diffusers).

From run_dir/stage3 (default): the few-step student, already physically pruned. From run_dir/stage2: the
pruned path of the dynamically pruned model, physically pruned here (a multi-step model: recommended
Euler with CFG). A two-expert Stage III run (run_dir/stage3/high and low) exports one file per expert, the name of
export.out followed by _high_noise and _low_noise (default run_dir/student_high_noise.safetensors and
student_low_noise.safetensors), each
with its expert and the boundary in its metadata: ComfyUI's two Load Diffusion Model nodes read them as they read
Wan 2.2 A14B's own pair; a Stage II run of one expert exports that expert. The file is `fastlightgen.checkpoint` format: original/ComfyUI Wan key layout, kept blocks
renumbered 0..K-1, metadata with the kept original indices, the recommended denoising list and shift,
and provenance (betas, alpha, iterations, data fingerprint). `export.diffusers_out` also writes a
diffusers folder (the only output for HunyuanVideo, which the checkpoint format does not cover).
`export.dtype`: bfloat16 (default), float16, float32, or fp8_scaled (ComfyUI's fp8_scaled, fastlightgen/fp8.py: every
Linear layer in fp8, each weight with a per-tensor scale; about half the size; the checkpoint only, no diffusers folder).

An existing checkpoint file in another dtype (e.g. a bf16 student as fp8_scaled), metadata kept:
    python -m train.export --convert student.safetensors --set export.dtype=fp8_scaled [--set export.out=OUT]
(default out: beside it, student_fp8_scaled.safetensors; only export.dtype and export.out are read.)
API: `run(cfg)`, `convert(cfg, source)`; the model itself: `train.models.loading.student_model`.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from fastlightgen.checkpoint import CheckpointError, CheckpointMeta, load_wan, save_checkpoint
from fastlightgen.experts import EXPERTS
from fastlightgen.fp8 import FP8_SCALED
from fastlightgen.io_utils import atomic_write_text

from .cli import parse
from .config import Config, ExportConfig
from .models.loading import student_model
from .models.record import RUN_FILE, StageRecord


def metadata(model: torch.nn.Module, record: StageRecord) -> CheckpointMeta:
    plan = record.plan
    return CheckpointMeta(original_num_blocks=plan.fingerprint.num_blocks, kept_blocks=plan.kept,
                          family=plan.fingerprint.family, head_dim=model.config.attention_head_dim,
                          recommended=record.sampling, provenance=record.provenance(), expert=record.expert,
                          boundary=expert_boundary(record))


def expert_boundary(record: StageRecord) -> float | None:
    """The boundary of the expert a run trained: the end of its part of the schedule that the other expert holds."""
    if record.expert is None:
        return None
    low, high = record.sigma_range
    return low if record.expert == EXPERTS[0] else high


def run(cfg: Config) -> list[Path]:
    """Exports the run export.run (default run_dir/stage3); returns the checkpoints written (one per expert of a
    two-expert Stage III run: `expert_out`), or the diffusers folder when the family has no
    checkpoint format."""
    ex = checked(cfg)
    folder = Path(ex.run) if ex.run else cfg.stage_dir("stage3")
    out = Path(ex.out) if ex.out else Path(cfg.run.run_dir) / "student.safetensors"
    diffusers_out = Path(ex.diffusers_out) if ex.diffusers_out else None
    experts = [e for e in EXPERTS if (folder / e / RUN_FILE).is_file()]
    if not experts:
        return [export_run(cfg, folder, out, diffusers_out)]
    # a diffusers pipeline holds the experts as transformer/ and transformer_2/
    return [export_run(cfg, folder / e, expert_out(out, e),
                       diffusers_out / ("transformer" if e == EXPERTS[0] else "transformer_2") if diffusers_out else None)
            for e in experts]


def expert_out(out: Path, expert: str) -> Path:
    """Where `expert`'s file of a two-expert export goes: export.out's name + _high_noise / _low_noise, the words
    Wan 2.2 A14B's own files (and the pack's loader) name their experts by."""
    return out.with_name(f"{out.stem}_{expert}_noise{out.suffix}")


def export_run(cfg: Config, folder: Path, out: Path, diffusers_out: Path | None) -> Path:
    """One finished run's student as a checkpoint at `out` (Wan) and/or a diffusers folder."""
    ex = cfg.export
    record = StageRecord.load(folder)
    model = student_model(cfg, folder, record)
    meta = metadata(model, record)
    if meta.family == "wan":
        _write(out, model, meta, ex.dtype)
    elif diffusers_out is None:
        raise SystemExit(f"the FastLightGen checkpoint format holds Wan models; for {meta.family} set "
                         "--set export.diffusers_out=FOLDER")
    if diffusers_out is not None:
        model.to(getattr(torch, ex.dtype)).save_pretrained(diffusers_out, safe_serialization=True)
        meta_json = json.dumps(json.loads(meta.to_json()), indent=1)
        atomic_write_text(diffusers_out / "fastlightgen.json", meta_json)
        print(f"wrote diffusers folder {diffusers_out}")
    return out if meta.family == "wan" else diffusers_out


def convert(cfg: Config, source: str | Path) -> Path:
    """The FastLightGen checkpoint `source` rewritten in export.dtype to export.out (default: beside it, named
    after the dtype), with its metadata: kept blocks, recommended sampling, provenance."""
    ex = checked(cfg)
    source = Path(source)
    model, meta = load_wan(source)
    if meta is None:
        raise CheckpointError(f"{source}: no FastLightGen metadata (kept blocks, recommended sampling) to keep: "
                              "--convert rewrites a student train.export wrote")
    out = Path(ex.out) if ex.out else source.with_name(f"{source.stem}_{ex.dtype}.safetensors")
    _write(out, model, meta, ex.dtype)
    return out


def checked(cfg: Config) -> ExportConfig:
    """The export settings, refused before any model is read when they cannot all be written."""
    ex = cfg.validate().export
    if ex.dtype == FP8_SCALED and ex.diffusers_out:
        raise SystemExit(f"export.dtype={FP8_SCALED} is ComfyUI's checkpoint format; a diffusers folder holds "
                         "bfloat16, float16 or float32: drop export.diffusers_out, or write the folder in a second "
                         "export with another export.dtype")
    return ex


def _write(out: Path, model: torch.nn.Module, meta: CheckpointMeta, dtype: str) -> None:
    save_checkpoint(out, model, meta, dtype=dtype if dtype == FP8_SCALED else getattr(torch, dtype))
    print(f"wrote {out} ({dtype}, {out.stat().st_size / 2**20:.2f} MiB): {len(meta.kept_blocks)} of "
          f"{meta.original_num_blocks} blocks, kept {meta.kept_blocks}, recommended {meta.recommended}")


def main(argv: list[str] | None = None) -> None:
    own = argparse.ArgumentParser(add_help=False)  # --help is the config parser's, which prints __doc__
    own.add_argument("--convert", default="", metavar="CHECKPOINT")
    args, rest = own.parse_known_args(argv)
    cfg, _ = parse(__doc__, rest, training=False)
    try:
        if args.convert:
            convert(cfg, args.convert)
        else:
            run(cfg)
    except CheckpointError as err:
        raise SystemExit(f"error: {err}") from None


if __name__ == "__main__":
    main()
