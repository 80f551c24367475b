"""`python -m research.bench.host_memory`: host RAM of ZeRO-3 training, models loaded whole vs sharded.

Runs the real `train.stage2` and `train.stage3` (one step each; Stage III from the teacher, as
`research.bench.gpu` does) with 2 CPU processes on gloo (DS_ACCELERATOR=cpu), twice each: with
`dist.sharded_load=false`, where every rank loads whole fp32 models before DeepSpeed partitions them (the path
before 2026-12-04), and with the default, where each rank builds the models under `deepspeed.zero.Init` and
reads only its partitions from the files. The teacher is a random Wan of the Wan 2.1 config's kind at a size
where weights dominate (12 blocks of width 1024: 215 M parameters), stored in bf16 as released weights are;
the video is tiny (2 tokens), so activations are negligible. Training runs in fp32 with the shipped
DeepSpeedCPUAdam (compiled on first use, about 2 minutes once).

Each rank records its resident set after the imports (diffusers' model code included) and its peak (VmHWM)
when the models are loaded (before any DeepSpeed engine), when the stage's engines and optimizer states are
built, and at the end. The table gives each process and the sum of the 2 (one node), beside `--dry-run`'s host
RAM per node for the same config (train/models/memory.py with DS_ACCELERATOR=cpu: every term is host RAM here).
About 5 minutes on 2 cores.
"""
from __future__ import annotations

import argparse
import importlib
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

from train.config import Config, load_config
from train.models.memory import count_params, estimate

from .gpu import middle_plan, random_shards, random_wan

CONFIG = "configs/wan2.1-t2v-1.3b.yaml"
# the bench's Wan: the 1.3B's kind (text_dim, patch, channels) at 207 M parameters; a tiny video; CPU-runnable
# trained in fp32 (bf16 is the GPUs'); the shipped optimizer, DeepSpeedCPUAdam (compiled on first use)
SETTINGS = ["model.arch.num_layers=12", "model.arch.num_attention_heads=8", "model.arch.ffn_dim=4096",
            "preprocess.frames=5", "preprocess.height=16", "preprocess.width=16", "dist.bf16=false",
            "dist.world_size=2", "stage3.init=teacher", "stage3.fake_updates=1", "stage2.iterations=1",
            "stage3.iterations=1", "run.keep_checkpoints=1", "run.save_every=1000"]
PROCESSES = 2
GIB = 1024 ** 3


def status_bytes(field: str) -> int:
    """A `/proc/self/status` field in bytes: VmRSS (resident now) or VmHWM (its peak so far)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise KeyError(field)


def worker(stage: str, out: Path, argv: list[str]) -> None:
    """One rank of `stage`, recording its resident set: after the imports, its peak once the models are loaded
    (when `build` makes the first engine), at the end of `build` (engines and optimizer states made) and at exit."""
    from train.models.loading import model_class

    module = importlib.import_module(f"train.{stage}")
    model_class("wan")  # imports diffusers' model code, which is not the models
    record = {"imports": status_bytes("VmRSS")}
    build, make_trainable = module.build, module.make_trainable

    def measured_build(cfg: Config):
        models = build(cfg)
        record["build_peak"] = status_bytes("VmHWM")
        return models

    def measured_make_trainable(*args, **kwargs):
        record.setdefault("loaded_peak", status_bytes("VmHWM"))
        return make_trainable(*args, **kwargs)

    module.build, module.make_trainable = measured_build, measured_make_trainable
    module.main(argv)
    record["peak"] = status_bytes("VmHWM")
    (out / f"rank{os.environ['RANK']}.json").write_text(json.dumps(record))


def run(stage: str, settings: list[str], out: Path) -> list[dict]:
    """The stage under torchrun; each rank's record."""
    out.mkdir(parents=True)
    sets = [a for s in settings for a in ("--set", s)]
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={PROCESSES}",
               "-m", "research.bench.host_memory", "--worker", stage, "--out", str(out), "--", "-c", CONFIG, *sets]
    done = subprocess.run(command, env={**os.environ, "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1"},
                          capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(f"{stage} failed (exit {done.returncode}):\n{done.stderr[-4000:]}")
    return [json.loads((out / f"rank{r}.json").read_text()) for r in range(PROCESSES)]


def dry_run_host(cfg: Config, stage: str) -> float:
    """`--dry-run`'s host RAM per node (GiB) of `stage` on a CPU accelerator."""
    return estimate(cfg, on_cpu=True)[stage]["host_ram_per_node"]


def table(results: dict, params: int) -> str:
    lines = ["| stage | loading | peak GiB per process (rank 0 / rank 1): models loaded | models + engines built | "
             "whole run | node peak GiB (sum) | node bytes per teacher parameter | --dry-run host GiB/node |",
             "|---|---|---|---|---|---|---|---|"]
    for (stage, loading), r in results.items():
        phases = [" / ".join(f"{rank[key] / GIB:.2f}" for rank in r["ranks"])
                  for key in ("loaded_peak", "build_peak", "peak")]
        node = sum(rank["peak"] for rank in r["ranks"])
        lines.append(f"| {stage} | {loading} | {' | '.join(phases)} | {node / GIB:.2f} | {node / params:.1f} | "
                     f"{r['dry_run_host_gib']:.2f} ({r['dry_run_host_gib'] * GIB / node - 1:+.0%}) |")
    imports = [rank["imports"] for r in results.values() for rank in r["ranks"]]
    lines.append(f"\nresident after the imports, per process: {min(imports) / GIB:.2f}-{max(imports) / GIB:.2f} GiB; "
                 f"teacher {params / 1e6:.0f} M parameters")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--work", default="", help="folder for the random teacher, data and runs (default: a temp)")
    parser.add_argument("--json", default="", help="also write the results here")
    parser.add_argument("--worker", default="", help=argparse.SUPPRESS)  # one rank, started by `run`
    parser.add_argument("--out", default="", help=argparse.SUPPRESS)
    args, rest = parser.parse_known_args(argv)
    if args.worker:
        return worker(args.worker, Path(args.out), rest[1:] if rest[:1] == ["--"] else rest)

    work = Path(args.work or tempfile.mkdtemp(prefix="fastlightgen-bench-host-memory-"))
    cfg = load_config(CONFIG, SETTINGS)
    teacher, shards, plan = work / "teacher", work / "shards", work / "plan.json"
    if not (teacher / "config.json").is_file():  # stored in bf16, as released weights are (16-bit)
        random_wan(cfg).to(torch.bfloat16).save_pretrained(str(teacher))
    random_shards(cfg, shards, samples=PROCESSES)
    middle_plan(cfg, plan)
    base = [*SETTINGS, f"model.teacher={teacher}", f"data.shards={shards}", f"stage2.plan={plan}",
            f"stage3.plan={plan}"]
    params = count_params(load_config(CONFIG, base)).total
    results = {}
    for stage in ("stage2", "stage3"):
        for loading, sharded in (("whole", False), ("sharded", True)):
            settings = [*base, f"dist.sharded_load={str(sharded).lower()}",
                        f"run.run_dir={tempfile.mkdtemp(dir=work, prefix=f'runs-{stage}-{loading}-')}"]
            ranks = run(stage, settings, Path(tempfile.mkdtemp(dir=work, prefix="ranks-")) / "out")
            results[stage, loading] = {"ranks": ranks, "dry_run_host_gib": dry_run_host(load_config(CONFIG, settings),
                                                                                         stage)}
            print(f"{stage} {loading}: {json.dumps(ranks)}", flush=True)
    print(table(results, params))
    if args.json:
        Path(args.json).write_text(json.dumps({f"{s} {l}": r for (s, l), r in results.items()}, indent=1))


if __name__ == "__main__":
    sys.exit(main())
