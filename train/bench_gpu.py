"""`python -m train.bench_gpu`: Stage II and III steps of a real-sized Wan on this machine's GPUs.

Runs the real entry points (`torchrun -m train.stage2|stage3`) under the config's DeepSpeed settings
(the shipped Wan 2.1 1.3B config: ZeRO-3, bf16, CPU-offloaded DeepSpeedCPUAdam, gradient checkpointing)
on a teacher with random weights of the config's architecture and random latents and text of the
config's video shape (81 frames at 480x832). A step costs the same whatever the values, so this measures
what a cluster run will: seconds per step (median, the first step left out: it pays for allocation and
kernel selection) and peak GPU memory per process, next to `--dry-run`'s estimate of the resident part.

The plan drops the middle blocks (Stage I's U-shape at the config's keep ratio); Stage III starts from
the teacher (`stage3.init=teacher`, the same models and cost as from Stage II), so the two stages are
measured independently. Needs CUDA GPUs, DeepSpeed and diffusers.
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

import torch

from .config import Config, load_config
from .data import SHARD_FORMAT
from .memory import estimate
from .preprocess import write_shard

# Wan VAEs by latent channels: (temporal, spatial) compression. 2.1: 16 channels at 4x8x8; 2.2 TI2V: 48 at 4x16x16.
WAN_VAE_STRIDE = {16: (4, 8), 48: (4, 16)}
TEXT_TOKENS = 512  # UMT5 sequence length the Wan pipelines pad to


def random_teacher(cfg: Config, folder: Path) -> None:
    """A diffusers folder holding the config's architecture with random weights."""
    from diffusers import WanTransformer3DModel

    torch.manual_seed(0)
    WanTransformer3DModel.from_config(cfg.model.arch).save_pretrained(str(folder))


def random_shards(cfg: Config, folder: Path, samples: int) -> None:
    arch, p = cfg.model.arch, cfg.preprocess
    temporal, spatial = WAN_VAE_STRIDE[arch["in_channels"]]
    shape = (samples, arch["in_channels"], (p.frames - 1) // temporal + 1, p.height // spatial, p.width // spatial)
    folder.mkdir(parents=True, exist_ok=True)
    name = write_shard(folder, 0, torch.randn(shape), torch.randn(samples, TEXT_TOKENS, arch["text_dim"]))
    items = [{"file": f"random_{i}", "caption": ""} for i in range(samples)]
    (folder / "index.json").write_text(json.dumps({"format": SHARD_FORMAT, "encoder": "random",
                                                   "shards": [{"file": name, "items": items}]}))


def middle_plan(cfg: Config, teacher: Path, out: Path) -> list[int]:
    from diffusers import WanTransformer3DModel

    from fastlightgen.adapters import adapt
    from fastlightgen.plan import PrunePlan

    with torch.device("meta"):
        model = WanTransformer3DModel.from_config(WanTransformer3DModel.load_config(str(teacher)))
    fingerprint = adapt(model).fingerprint()
    n = fingerprint.num_blocks
    # importance = distance from the middle block: the plan keeps both ends, as Stage I does on real Wan
    plan = PrunePlan.from_scores(fingerprint, [abs(i - (n - 1) / 2) for i in range(n)], cfg.stage1.keep_ratio)
    plan.save(out)
    return plan.dropped


def run_stage(stage: str, args: argparse.Namespace, overrides: list[str], gpus: int) -> subprocess.CompletedProcess:
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={gpus}", "-m", f"train.{stage}", "-c", args.config]
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
    parser.add_argument("--stages", default="stage2,stage3")
    parser.add_argument("--steps", type=int, default=4, help="steps per stage (the first is not timed)")
    parser.add_argument("--gpus", type=int, default=torch.cuda.device_count(),
                        help="processes, one per GPU (with DS_ACCELERATOR=cpu: CPU processes, a smoke test)")
    parser.add_argument("--work", default="", help="folder for the random teacher, data and runs (default: a temp)")
    parser.add_argument("--json", default="", help="also write the results here")
    args = parser.parse_args(argv)
    cfg = load_config(args.config, args.overrides)
    if cfg.model.family != "wan" or not cfg.model.arch:
        raise SystemExit(f"{args.config}: the GPU bench builds a Wan from model.arch; give a Wan config with arch")
    if args.gpus < 1:
        raise SystemExit("no CUDA GPU is visible: this bench measures GPU steps (CPU costs: python -m train.bench); "
                         "--gpus 1 with DS_ACCELERATOR=cpu runs it on the CPU as a smoke test")

    work = Path(args.work or tempfile.mkdtemp(prefix="fastlightgen-bench-gpu-"))
    teacher, shards, plan = work / "teacher", work / "shards", work / "plan.json"
    if not (teacher / "config.json").is_file():
        random_teacher(cfg, teacher)
    random_shards(cfg, shards, samples=2)
    dropped = middle_plan(cfg, teacher, plan)
    base = [f"model.teacher={teacher}", f"data.shards={shards}", f"dist.world_size={args.gpus}",
            f"stage2.plan={plan}", f"stage3.plan={plan}", "stage3.init=teacher", "run.keep_checkpoints=1",
            f"stage2.iterations={args.steps}", f"stage3.iterations={args.steps}", *args.overrides]
    resident = estimate(load_config(args.config, base))
    results = {"config": args.config, "gpus": args.gpus, "device": torch.cuda.get_device_name(0) if torch.cuda.is_available() else "CPU",
               "dropped_blocks": dropped, "stages": {}}
    for stage in args.stages.split(","):
        run_dir = Path(tempfile.mkdtemp(dir=work, prefix=f"runs-{stage}-"))  # fresh: a bench never resumes
        done = run_stage(stage, args, base + [f"run.run_dir={run_dir}"], args.gpus)
        if done.returncode != 0:
            raise SystemExit(f"{stage} failed (exit {done.returncode}); its output is above")
        results["stages"][stage] = {**summarise(run_dir / stage / "metrics.jsonl"),
                                    "estimated_resident_gib": resident[stage]["gpu_total"]}
        print(json.dumps(results["stages"][stage]), flush=True)
        if args.json:  # after each stage: a later stage that fails or runs out of time keeps the earlier results
            Path(args.json).write_text(json.dumps(results, indent=1))
    print(f"\n{results['device']} x{args.gpus}, {args.config}; dropped blocks {dropped}")
    print(f"{'stage':<7} | {'s/step':>7} | {'peak GiB/GPU':>12} | {'dry-run resident GiB':>20}")
    for stage, r in results["stages"].items():
        peak = "-" if r["gpu_peak_gib"] is None else f"{r['gpu_peak_gib']:.2f}"
        print(f"{stage:<7} | {r['s_per_step']:>7.2f} | {peak:>12} | {r['estimated_resident_gib']:>20.2f}")


if __name__ == "__main__":
    sys.exit(main())
