"""`python -m research.demo`: the main job on the embedded default (the toy world, CPU, a few minutes).

Generates the held-out prompts of the toy world (combinations of color, shape and direction never seen in
training, with free speeds and color changes) in both modes the model serves, TI2V (the first frame given) and
T2V (the caption alone), with the toy teacher (50-step Euler with CFG) and, when it has been trained, the
4-step pruned student, each at several noise seeds; writes the first seed's videos as mp4 and a report, per
mode: each model's scores over all videos, the student's per-video paired difference to the teacher with its
95% bootstrap interval and verdict (research/stats.py; the margin is fixed there; no verdict in a mode whose sanity
ordering fails) and the sanity table (research/sanity.py); and the cost per video of each model: wall clock (one
TI2V video per call, the two models timed in alternating rounds, the best of 10) and FLOPs (the same on every machine).
"""
from __future__ import annotations

import argparse
import re
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Callable

import torch
from tqdm import tqdm

from fastlightgen.adapters import adapt
from fastlightgen.checkpoint import load_wan
from fastlightgen.io_utils import atomic_write_text
from fastlightgen.sampling import Sampling
from fastlightgen.toy.evaluate import EvalTable, evaluate_batch
from fastlightgen.toy.generate import generate_few_step, generate_teacher
from fastlightgen.toy.prompts import Prompts, split_prompts
from fastlightgen.video_io import write_mp4

from .sanity import ordering_holds, sanity_markdown, sanity_rows
from .stats import EQUIVALENCE_MARGIN, paired_interval
from .timing import flops_per_call, seconds_per_call

MODELS_DIR = Path(__file__).resolve().parent.parent / "models" / "fastlightgen"
TEACHER = MODELS_DIR / "toy_teacher.safetensors"
STUDENT = MODELS_DIR / "toy_student.safetensors"


Generate = Callable[[Prompts], torch.Tensor]  # videos (B, 3, F, H, W) of the prompts
SeededGenerate = Callable[[Prompts, int], torch.Tensor]  # the same, at a noise seed


@dataclass(frozen=True)
class Candidate:
    """A model of the comparison: its name in the report, and how it makes the videos of prompts at a seed."""
    name: str
    generate: SeededGenerate

    @property
    def folder(self) -> str:
        """Where its videos go: the name's first word ('teacher', 'student'), safe in any shell and file manager."""
        return re.sub(r"[^a-z0-9]+", "_", self.name.split(" ", 1)[0].lower())


def load_fp32(path: Path):
    model, meta = load_wan(path)
    return adapt(model.float()), meta


MODES = ("TI2V", "T2V")
NOT_EVIDENCE = "none, not evidence"  # the verdict of a mode whose sanity ordering fails
SUMMARY_COLUMNS = ("faithful", "correct", "gate_color", "gate_shape", "gate_direction", "gate_speed", "gate_position",
                   "fidelity", "overall")


def score_model(model: Candidate, prompts: Prompts, seeds: list[int], out_dir: Path, progress: tqdm) -> EvalTable:
    """Generates every prompt at every seed and scores the videos; writes the first seed's as mp4."""
    labels, rows = [], []
    for seed in seeds:
        progress.set_postfix_str(f"{prompts.mode} {model.folder} seed {seed}")
        videos = model.generate(prompts, seed)
        if seed == seeds[0]:
            for i, (video, label) in enumerate(zip(videos, prompts.captions)):
                write_mp4(out_dir / prompts.mode / model.folder / f"{i:02d}_{label.replace(' ', '_')}.mp4", video,
                          upscale=8)
        table = evaluate_batch(videos, list(prompts.factors), t2v=prompts.t2v)
        labels += [f"seed {seed}: {label}" for label in table.labels]
        rows += table.rows
        progress.update(len(videos))
    return EvalTable(labels, rows)


def summary_markdown(tables: dict[str, EvalTable]) -> str:
    lines = ["| model | " + " | ".join(SUMMARY_COLUMNS) + " |", "|---" * (len(SUMMARY_COLUMNS) + 1) + "|"]
    for name, table in tables.items():
        mean, std = table.mean(), table.std()
        lines.append(f"| {name} | " + " | ".join(f"{mean[c]:.3f} ± {std[c]:.3f}" for c in SUMMARY_COLUMNS) + " |")
    return "\n".join(lines)


def cost_markdown(costs: dict[str, tuple[float, float]]) -> str:
    lines = ["| model | s / video | GFLOP / video |", "|---|---|---|"]
    lines += [f"| {name} | {seconds:.3f} | {flops / 1e9:.2f} |" for name, (seconds, flops) in costs.items()]
    return "\n".join(lines)


def comparison_markdown(student: EvalTable, teacher: EvalTable, prompts: Prompts, seeds: list[int],
                        evidence: bool) -> str:
    """Student - teacher per video, resampled over held-out combinations then videos; no verdict where the mode's
    sanity ordering fails (its scores cannot rank models)."""
    combos = [f.combination for f in prompts.factors] * len(seeds)
    lines = [f"| score | student - teacher, mean [95% CI] | verdict (margin ±{EQUIVALENCE_MARGIN}) |", "|---|---|---|"]
    for column in ("faithful", "overall"):
        interval = paired_interval([r[column] for r in student.rows], [r[column] for r in teacher.rows], combos)
        lines.append(f"| {column} | {interval} | {interval.verdict() if evidence else NOT_EVIDENCE} |")
    return "\n".join(lines)


def mode_section(models: list[Candidate], prompts: Prompts, seeds: list[int], out_dir: Path, student_source: Path,
                 progress: tqdm) -> str:
    """One mode's part of the report: scores, the paired comparison, the sanity table, the per-video tables."""
    mode = prompts.mode
    tables = {m.name: score_model(m, prompts, seeds, out_dir, progress) for m in models}
    teacher_table, *student_table = tables.values()
    sanity = sanity_rows(prompts, teacher_table, seeds[0])
    parts = [f"## {mode}: scores over {len(teacher_table.rows)} videos (mean ± std)\n\n{summary_markdown(tables)}\n"]
    if student_table:
        comparison = comparison_markdown(student_table[0], teacher_table, prompts, seeds, ordering_holds(sanity))
        parts.append(f"### {mode}: the student against the teacher, paired per video\n\n{comparison}\n")
    else:
        parts.append(f"(no student at {student_source}: train one with the pipeline in train/README.md)\n")
    parts.append(f"### The same prompts: known answers (noise at seed {seeds[0]}) and the teacher over every seed\n\n"
                 f"{sanity_markdown(sanity)}\n")
    parts += [f"### {mode}: {name}, per video\n\n{table.to_markdown(per_video=True)}\n"
              for name, table in tables.items()]
    return "\n".join(parts)


def one_video(generate: Generate, prompts: Prompts) -> Callable[[], torch.Tensor]:
    """A call that makes the first prompt's video: what `timing` measures of a model."""
    one = prompts.first()
    return lambda: generate(one)


def models_to_compare(args: argparse.Namespace) -> list[Candidate]:
    """The teacher at its recommended sampling (or the overrides) and, when its file exists, the student."""
    teacher, meta = load_fp32(args.teacher)
    overrides = {k: v for k, v in (("steps", args.steps), ("cfg_scale", args.cfg)) if v}
    teacher_cfg = replace(meta.recommended if meta else Sampling(), **overrides)
    models = [Candidate(f"teacher ({teacher_cfg.steps}-step Euler, CFG {teacher_cfg.cfg_scale})",
                        lambda batch, seed: generate_teacher(teacher, batch, seed, teacher_cfg))]
    if args.student_adapter is not None:
        from fastlightgen.student_adapter import apply_adapter, read_adapter

        adapter = read_adapter(args.student_adapter)
        student, smeta = adapt(apply_adapter(teacher.model, adapter).float()), adapter.meta
    elif args.student.is_file():
        student, smeta = load_fp32(args.student)
    if (args.student_adapter or args.student).is_file():
        few = smeta.recommended
        origin = ", from adapter" if args.student_adapter else ""
        models.append(Candidate(f"student ({len(few.denoising_step_list)}-step, {len(smeta.kept_blocks)}/"
                                f"{smeta.original_num_blocks} blocks{origin})",
                                lambda batch, seed: generate_few_step(student, batch, seed, few)))
    return models


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, default=Path("outputs/demo"))
    p.add_argument("--seeds", default="0,1,2,3,4", help="noise seeds, comma-separated: every prompt at each")
    p.add_argument("--per-combination", type=int, default=1, help="renders (positions, backgrounds) per combination")
    p.add_argument("--split", choices=("heldout", "train"), default="heldout",
                   help="tune sampling settings on 'train' prompts, never on the held-out ones")
    p.add_argument("--limit", type=int, default=None, help="use only the first N combinations of the split")
    p.add_argument("--cfg", type=float, default=None, help="override the teacher's recommended CFG scale")
    p.add_argument("--steps", type=int, default=None, help="override the teacher's recommended step count")
    p.add_argument("--teacher", type=Path, default=TEACHER)
    p.add_argument("--student", type=Path, default=STUDENT)
    p.add_argument("--student-adapter", type=Path, default=None,
                   help="build the student from the teacher and this adapter (train.export_adapter) instead")
    args = p.parse_args(argv)
    seeds = [int(x) for x in args.seeds.split(",")]
    source = args.student_adapter or args.student  # the file the student comes from
    if len(seeds) < 2 and source.is_file():
        p.error("--seeds: a paired comparison needs at least two noise seeds")

    prompts = {mode: split_prompts(args.split, args.per_combination, 0, args.limit, t2v=mode == "T2V")
               for mode in MODES}
    models = models_to_compare(args)
    videos = len(models) * len(seeds) * sum(len(p.factors) for p in prompts.values())
    with tqdm(total=videos, unit="video", desc="demo", dynamic_ncols=True) as progress:
        sections = [mode_section(models, prompts[mode], seeds, args.out, source, progress) for mode in MODES]
    print("timing one video of each model (alternating rounds) ...", flush=True)
    calls = [one_video(lambda batch, g=m.generate: g(batch, seeds[0]), prompts["TI2V"]) for m in models]
    times = seconds_per_call(*calls)  # the models in alternating rounds
    costs = {m.name: (t, flops_per_call(call)) for m, t, call in zip(models, times, calls)}
    sections.append(f"## Cost per video (one TI2V video per call)\n\n{cost_markdown(costs)}\n")
    if len(models) > 1:
        flops = [f for _, f in costs.values()]
        sections[-1] += f"\nSpeed-up: {times[0] / times[1]:.1f}x in wall clock, {flops[0] / flops[1]:.1f}x in FLOPs.\n"
    report = (f"# FastLightGen toy-world demo\n\n{len(prompts['TI2V'].factors)} {args.split} prompts per mode x "
              f"noise seeds {args.seeds}; {torch.get_num_threads()} CPU threads.\n\n" + "\n".join(sections))
    atomic_write_text(args.out / "report.md", report)
    print(report)
    print(f"videos (seed {seeds[0]}) and report in {args.out}/")


if __name__ == "__main__":
    main()
