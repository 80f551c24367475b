"""`python -m research.bench.gpu`: Stage II and III steps, and the speed-up at sampling, of a real-sized Wan on GPUs.

Runs the real entry points (`torchrun -m train.stage2|stage3`) under the config's DeepSpeed settings
(the shipped Wan 2.1 1.3B config: ZeRO-3, bf16, CPU-offloaded DeepSpeedCPUAdam, gradient checkpointing)
on a teacher with random weights of the config's architecture and random latents and text of the
config's video shape (81 frames at 480x832). A step costs the same whatever the values, so this measures
what a cluster run will: seconds per step (median, the first step left out: it pays for allocation and
kernel selection) and peak GPU memory per process, next to `--dry-run`'s estimate of the resident part.

The plan drops the middle blocks (Stage I's U-shape at the config's keep ratio); Stage III starts from
the teacher (`stage3.init=teacher`, the same models and cost as from Stage II), so the two stages are
measured independently. The `sampling` stage times one video of the teacher (50-step Euler with CFG:
100 evaluations of every block) against the student (the pruned model, 4 steps) in one process, in
alternating rounds (`research.timing`), the transformer alone (text encoding and VAE decoding are the
same for both and not counted).
Needs CUDA GPUs, DeepSpeed, diffusers and accelerate.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Callable

import torch

from train.config import Config, load_config
from train.models.memory import estimate, meta_model
from train.preprocess import write_index, write_null, write_shard

from ..timing import seconds_per_call

# Wan VAEs by latent channels: (temporal, spatial) compression. 2.1: 16 channels at 4x8x8; 2.2 TI2V: 48 at 4x16x16.
WAN_VAE_STRIDE = {16: (4, 8), 48: (4, 16)}
TEXT_TOKENS = 512  # UMT5 sequence length the Wan pipelines pad to
Video = Callable[[], torch.Tensor]  # one video's sampling, as seconds_per_call times it

if TYPE_CHECKING:
    from fastlightgen.adapters import Conditioning, DiTAdapter
    from fastlightgen.sampling import Sampling


def random_wan(cfg: Config) -> torch.nn.Module:
    """The config's architecture with random weights (seed 0), on the default device."""
    from diffusers import WanTransformer3DModel

    torch.manual_seed(0)
    return WanTransformer3DModel.from_config(cfg.model.arch)


def random_teacher(cfg: Config, folder: Path) -> None:
    """A diffusers folder holding the config's architecture with random weights."""
    random_wan(cfg).save_pretrained(str(folder))


def latent_shape(cfg: Config, samples: int) -> tuple[int, ...]:
    arch, p = cfg.model.arch, cfg.preprocess
    temporal, spatial = WAN_VAE_STRIDE[arch["in_channels"]]
    return samples, arch["in_channels"], (p.frames - 1) // temporal + 1, p.height // spatial, p.width // spatial


def random_shards(cfg: Config, folder: Path, samples: int) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    text = torch.randn(samples, TEXT_TOKENS, cfg.model.arch["text_dim"])
    name = write_shard(folder, 0, torch.randn(latent_shape(cfg, samples)), text)
    null = write_null(folder, {"text": torch.randn(1, TEXT_TOKENS, cfg.model.arch["text_dim"])}, "")
    write_index(folder, [{"file": name, "items": [{"file": f"random_{i}", "caption": ""} for i in range(samples)]}],
                null, encoder="random")


def middle_plan(cfg: Config, out: Path) -> list[int]:
    from fastlightgen.adapters import adapt
    from fastlightgen.plan import PrunePlan

    fingerprint = adapt(meta_model(cfg)).fingerprint()
    n = fingerprint.num_blocks
    # importance = distance from the middle block: the plan keeps both ends, as Stage I does on real Wan
    plan = PrunePlan.from_scores(fingerprint, [abs(i - (n - 1) / 2) for i in range(n)], cfg.stage1.keep_ratio)
    plan.save(out)
    return plan.dropped


def sampler_calls(teacher: DiTAdapter, student: DiTAdapter, noise: torch.Tensor, cond: Conditioning,
                  null: Conditioning, ti2v: bool, teacher_cfg: Sampling) -> tuple[Video, Video]:
    """One video each, as a creator samples it: the teacher's Euler with CFG on `teacher_cfg`, the student's
    4 steps (seeded re-noising); under TI2V both keep the noise's first frame as the given one."""
    from fastlightgen.sampling import FEW_STEP, sample_euler_cfg, sample_few_step

    first = noise[:, :, :1] if ti2v else None

    def teacher_video() -> torch.Tensor:
        return sample_euler_cfg(teacher, noise, cond, null, teacher_cfg, first_frame=first)

    def student_video() -> torch.Tensor:
        return sample_few_step(student, noise, cond, FEW_STEP, generator=torch.Generator().manual_seed(1),
                               first_frame=first)
    return teacher_video, student_video


def sampling_speedup(cfg: Config, teacher_dir: Path, plan_path: Path, repeats: int) -> dict:
    """Seconds per video: the teacher's 50-step Euler with CFG vs the student's 4 steps on the pruned model."""
    from diffusers import WanTransformer3DModel

    from fastlightgen.adapters import Conditioning, adapt
    from fastlightgen.plan import PrunePlan
    from fastlightgen.sampling import FEW_STEP, Sampling
    from fastlightgen.toy.teacher import null_like

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    teacher = adapt(WanTransformer3DModel.from_pretrained(str(teacher_dir), torch_dtype=dtype).to(device).eval())
    kept = PrunePlan.load(plan_path).kept
    student = adapt(teacher.pruned_model(kept))
    g = torch.Generator().manual_seed(0)
    noise = torch.randn(latent_shape(cfg, 1), generator=g).to(device, dtype)
    cond = Conditioning(text=torch.randn(1, TEXT_TOKENS, cfg.model.arch["text_dim"], generator=g).to(device, dtype))
    teacher_cfg, few = Sampling(), FEW_STEP
    teacher_video, student_video = sampler_calls(teacher, student, noise, cond, null_like(cond), cfg.model.ti2v,
                                                 teacher_cfg)
    student_s, teacher_s = seconds_per_call(student_video, teacher_video, rounds=repeats, round_seconds=0.0,
                                            device=device)
    block_evals = (teacher_cfg.nfe * teacher.num_blocks, few.nfe * len(kept))
    return {"teacher_s_per_video": teacher_s, "student_s_per_video": student_s, "speedup": teacher_s / student_s,
            "block_evaluation_ratio": block_evals[0] / block_evals[1]}


def run_stage(stage: str, config: str, overrides: list[str], gpus: int) -> subprocess.CompletedProcess:
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={gpus}",
               "-m", f"train.{stage}", "-c", config]
    for o in overrides:
        command += ["--set", o]
    print("$", " ".join(command), flush=True)
    return subprocess.run(command, env={**os.environ, "PYTHONUNBUFFERED": "1"})


def summarise(metrics: Path) -> dict:
    records = [json.loads(line) for line in metrics.read_text().splitlines() if line]
    times = [r["s_per_step"] for r in records[1:]] or [records[0]["s_per_step"]]
    return {"steps": len(records), "s_per_step": statistics.median(times),
            "gpu_peak_gib": max((r["gpu_peak_gib"] for r in records if "gpu_peak_gib" in r), default=None)}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", "-c", default="configs/wan2.1-t2v-1.3b.yaml")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE",
                        help="passed to both stages, e.g. --set dist.cpu_adam=false")
    parser.add_argument("--stages", default="stage2,stage3,sampling")
    parser.add_argument("--steps", type=int, default=4, help="steps per stage (the first is not timed)")
    parser.add_argument("--gpus", type=int, default=torch.cuda.device_count(),
                        help="processes, one per GPU (with DS_ACCELERATOR=cpu: CPU processes, a smoke test)")
    parser.add_argument("--work", default="", help="folder for the random teacher, data and runs (default: a temp)")
    parser.add_argument("--json", default="", help="also write the results here")
    args = parser.parse_args(argv)
    unknown = set(args.stages.split(",")) - {"stage2", "stage3", "sampling"}
    if unknown:
        parser.error(f"--stages takes stage2, stage3 and sampling, comma-separated; got {', '.join(sorted(unknown))}")
    cfg = load_config(args.config, args.overrides)
    if cfg.model.family != "wan" or not cfg.model.arch:
        raise SystemExit(f"{args.config}: the GPU bench builds a Wan from model.arch; give a Wan config with arch")
    if args.gpus < 1:
        raise SystemExit("no CUDA GPU is visible: this bench measures GPU steps (CPU costs: python -m research.bench.training); "
                         "--gpus 1 with DS_ACCELERATOR=cpu runs it on the CPU as a smoke test")

    work = Path(args.work or tempfile.mkdtemp(prefix="fastlightgen-bench-gpu-"))
    teacher, shards, plan = work / "teacher", work / "shards", work / "plan.json"
    if not (teacher / "config.json").is_file():
        random_teacher(cfg, teacher)
    random_shards(cfg, shards, samples=2)
    dropped = middle_plan(cfg, plan)
    base = [f"model.teacher={teacher}", f"data.shards={shards}", f"dist.world_size={args.gpus}",
            f"stage2.plan={plan}", f"stage3.plan={plan}", "stage3.init=teacher", "run.keep_checkpoints=1",
            f"stage2.iterations={args.steps}", f"stage3.iterations={args.steps}", *args.overrides]
    resident = estimate(load_config(args.config, base))
    device = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "CPU"
    results = {"config": args.config, "gpus": args.gpus, "device": device, "dropped_blocks": dropped,
               "sampling": None, "stages": {}}

    def record(key: str, value: dict) -> None:
        if key == "sampling":
            results["sampling"] = value
        else:
            results["stages"][key] = value
        print(json.dumps({key: value}), flush=True)
        if args.json:  # after each part: one that fails or runs out of time keeps the earlier results
            Path(args.json).write_text(json.dumps(results, indent=1))

    for stage in args.stages.split(","):
        if stage == "sampling":  # in this process: its models hold GPU memory until the end, so it comes last
            record(stage, sampling_speedup(cfg, teacher, plan, repeats=3))
            continue
        run_dir = Path(tempfile.mkdtemp(dir=work, prefix=f"runs-{stage}-"))  # fresh: a bench never resumes
        done = run_stage(stage, args.config, base + [f"run.run_dir={run_dir}"], args.gpus)
        if done.returncode != 0:
            raise SystemExit(f"{stage} failed (exit {done.returncode}); its output is above")
        record(stage, {**summarise(run_dir / stage / "metrics.jsonl"),
                       "estimated_resident_gib": resident[stage]["gpu_total"]})
    print_summary(results)


def print_summary(results: dict) -> None:
    print(f"\n{results['device']} x{results['gpus']}, {results['config']}; dropped blocks {results['dropped_blocks']}")
    r = results["sampling"]
    if r:
        print(f"one video: teacher 50-step CFG {r['teacher_s_per_video']:.2f} s, student 4 steps "
              f"{r['student_s_per_video']:.3f} s: {r['speedup']:.1f}x "
              f"(block evaluations {r['block_evaluation_ratio']:.1f}x)")
    if results["stages"]:
        print(f"{'stage':<7} | {'s/step':>7} | {'peak GiB/GPU':>12} | {'dry-run resident GiB':>20}")
    for stage, row in results["stages"].items():
        peak = "-" if row["gpu_peak_gib"] is None else f"{row['gpu_peak_gib']:.2f}"
        print(f"{stage:<7} | {row['s_per_step']:>7.2f} | {peak:>12} | {row['estimated_resident_gib']:>20.2f}")

if __name__ == "__main__":
    sys.exit(main())
