"""`python -m research.demo`: the main job on the embedded default (the toy world, CPU, ~2 minutes).

Generates the held-out prompts of the toy world (combinations of color, shape and direction never seen in
training; the first frame is given, TI2V) with the toy teacher (50-step Euler with CFG) and, when it has
been trained, the 4-step pruned student; writes each video as mp4 and the evaluator's table per model,
with the cost per video of each: wall clock (one video per call, the two models timed in alternating rounds,
the best of 10) and FLOPs (the same on every machine).
"""
from __future__ import annotations

import argparse
from dataclasses import replace
from pathlib import Path
from typing import Callable

import torch

from fastlightgen.adapters import adapt
from fastlightgen.checkpoint import load_wan
from fastlightgen.io_utils import atomic_write_text
from fastlightgen.sampling import FewStepSampling, TeacherSampling
from fastlightgen.toy.evaluate import evaluate_batch
from fastlightgen.toy.generate import generate_few_step, generate_teacher
from fastlightgen.toy.prompts import Prompts, split_prompts
from fastlightgen.video_io import write_mp4

from .timing import flops_per_call, seconds_per_call

MODELS_DIR = Path(__file__).resolve().parent.parent / "models" / "fastlightgen"
TEACHER = MODELS_DIR / "toy_teacher.safetensors"
STUDENT = MODELS_DIR / "toy_student.safetensors"


Generate = Callable[[Prompts], torch.Tensor]  # videos (B, 3, F, H, W) of the prompts


def load_fp32(path: Path):
    model, meta = load_wan(path)
    return adapt(model.float()), meta


def score_model(name: str, generate: Generate, prompts: Prompts, out_dir: Path) -> str:
    """Generates every prompt, writes the videos and returns the evaluator's table."""
    videos = generate(prompts)
    for i, (video, label) in enumerate(zip(videos, prompts.captions)):
        write_mp4(out_dir / name / f"{i:02d}_{label.replace(' ', '_')}.mp4", video, upscale=8)
    return evaluate_batch(videos, list(prompts.factors)).to_markdown(per_video=True)


def one_video(generate: Generate, prompts: Prompts) -> Callable[[], torch.Tensor]:
    """A call that makes the first prompt's video: what `timing` measures of a model."""
    one = prompts.first()
    return lambda: generate(one)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, default=Path("outputs/demo"))
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--per-combination", type=int, default=1)
    p.add_argument("--split", choices=("heldout", "train"), default="heldout",
                   help="tune sampling settings on 'train' prompts, never on the held-out ones")
    p.add_argument("--limit", type=int, default=None, help="use only the first N combinations of the split")
    p.add_argument("--cfg", type=float, default=None, help="override the teacher's recommended CFG scale")
    p.add_argument("--steps", type=int, default=None, help="override the teacher's recommended step count")
    p.add_argument("--teacher", type=Path, default=TEACHER)
    p.add_argument("--student", type=Path, default=STUDENT)
    args = p.parse_args(argv)

    torch.manual_seed(args.seed)
    prompts = split_prompts(args.split, args.per_combination, args.seed, args.limit)
    teacher, meta = load_fp32(args.teacher)
    rec = meta.recommended if meta else None
    teacher_cfg = TeacherSampling(steps=rec.steps, shift=rec.shift, cfg_scale=rec.cfg_scale) if rec else TeacherSampling()
    teacher_cfg = replace(teacher_cfg, **{k: v for k, v in (("steps", args.steps), ("cfg_scale", args.cfg)) if v})
    models = {f"teacher ({teacher_cfg.steps}-step Euler, CFG {teacher_cfg.cfg_scale})":
              lambda batch: generate_teacher(teacher, batch, args.seed, teacher_cfg)}
    if args.student.is_file():
        student, smeta = load_fp32(args.student)
        few = FewStepSampling(tuple(smeta.recommended.denoising_step_list), smeta.recommended.shift)
        models[f"student ({len(few.denoising_step_list)}-step, {len(smeta.kept_blocks)}/"
               f"{smeta.original_num_blocks} blocks)"] = lambda batch: generate_few_step(student, batch, args.seed, few)
    tables = [score_model(name, generate, prompts, args.out) for name, generate in models.items()]
    calls = [one_video(generate, prompts) for generate in models.values()]
    times = seconds_per_call(*calls)  # the models in alternating rounds
    flops = [flops_per_call(call) for call in calls]
    sections = [f"### {name}: {t:.2f} s per video ({f / 1e9:.2f} GFLOP)\n\n{table}\n"
                for name, table, t, f in zip(models, tables, times, flops)]
    if len(times) == 2:
        sections.append(f"speed-up of the student over the teacher: {times[0] / times[1]:.1f}x in wall clock, "
                        f"{flops[0] / flops[1]:.1f}x in FLOPs\n")
    else:
        sections.append(f"(no student at {args.student}: train one with the pipeline in train/README.md)\n")
    report = (f"# FastLightGen toy-world demo\n\n{len(prompts.factors)} {args.split} prompts, seed {args.seed}, "
              f"{torch.get_num_threads()} CPU threads.\n\n" + "\n".join(sections))
    atomic_write_text(args.out / "report.md", report)
    print(report)
    print(f"videos and report in {args.out}/")


if __name__ == "__main__":
    main()
