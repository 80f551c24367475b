"""`python -m research.bench.adapter`: the toy student as an adapter over the toy teacher, at several settings.

Settings: fixed ranks (--ranks, one rank for every layer), energies (--energies: each layer keeps the smallest
rank holding that share of its delta's squared singular values) and whole deltas.
1. Choice, on training prompts only (research.recipe_choice's: training combinations of both modes at noise
   seeds the held-out evaluation never uses): the student rebuilt from an adapter at each setting against the
   full student, paired per video (research/stats.py, clusters = mode and combination): overall and faithful,
   mean difference with its 95% interval. The chosen setting is the one with the smallest file whose intervals
   for both lie within +-`TOLERANCE`, checked against the target file size (<= `SIZE_TARGET`x the full
   student's checkpoint file).
2. Report, on research.demo's held-out prompts and seeds: the chosen setting against the full student, the
   same two intervals. These videos choose nothing.
3. Size: each toy adapter file and its ratio to the full student's file; computed sizes (bf16, no weights)
   for the real shapes of Wan 2.1 1.3B, Wan 2.2 TI2V-5B and Wan 2.1 14B at the toy's keep ratio, at the
   smallest fixed rank within tolerance (an energy setting's size depends on the real deltas, so it has no
   size without weights).
4. ComfyUI, on the toy (CPU, each in a fresh process, Linux): wall time and peak RSS growth of the stock
   Load Diffusion Model + Apply Student Adapter vs Load FastLightGen Checkpoint of the full student, up to the
   patched model in memory.
Writes a markdown report (--out). --quick: 2 combinations per split, one noise seed each, ranks 8 and 64,
energies 0.9 and 0.99, no ComfyUI runs, to outputs/adapter_bench_quick.md: checks the structure in minutes.
"""
from __future__ import annotations

import argparse
import json
import math
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from diffusers import WanTransformer3DModel

from fastlightgen.adapters import adapt
from fastlightgen.checkpoint import load_wan
from fastlightgen.io_utils import atomic_write_text
from fastlightgen.student_adapter import (
    AdapterError,
    adapter_bytes,
    apply_adapter,
    check_setting,
    make_adapter,
    ranks_summary,
    read_adapter,
    save_adapter,
)
from fastlightgen.toy.generate import generate_few_step
from fastlightgen.toy.prompts import Prompts, split_prompts
from fastlightgen.wan_keys import diffusers_to_original

from ..demo import MODES, STUDENT, TEACHER
from ..report import Samples, paired_samples, sample
from ..reproduce import PREVIEW_SEED, training_prompts
from ..stats import Interval

TOLERANCE = 0.005
SIZE_TARGET = 0.35  # adapter file / full student file
RANKS = (4, 8, 16, 32, 64)
ENERGIES = (0.9, 0.95, 0.98, 0.99, 0.995)
QUICK = {"combinations": 2, "choice_seeds": str(PREVIEW_SEED), "limit": 2, "seeds": "0", "ranks": "8,64",
         "energies": "0.9,0.99", "comfy_repeats": 0, "out": Path("outputs/adapter_bench_quick.md")}
FULL = {"combinations": 12, "choice_seeds": f"{PREVIEW_SEED},{PREVIEW_SEED + 1}", "limit": None, "seeds": "0,1,2,3,4",
        "ranks": ",".join(map(str, RANKS)), "energies": ",".join(map(str, ENERGIES)), "comfy_repeats": 3,
        "out": Path("outputs/adapter_bench.md")}
# Public diffusers configs (transformer/config.json) of the released models.
REAL = {
    "Wan 2.1 T2V 1.3B": {"num_layers": 30, "num_attention_heads": 12, "ffn_dim": 8960, "in_channels": 16,
                         "out_channels": 16},
    "Wan 2.2 TI2V 5B": {"num_layers": 30, "num_attention_heads": 24, "ffn_dim": 14336, "in_channels": 48,
                        "out_channels": 48},
    "Wan 2.1 T2V 14B": {"num_layers": 40, "num_attention_heads": 40, "ffn_dim": 13824, "in_channels": 16,
                        "out_channels": 16},
}
COMMON = {"attention_head_dim": 128, "patch_size": (1, 2, 2), "text_dim": 4096, "freq_dim": 256,
          "cross_attn_norm": True, "qk_norm": "rms_norm_across_heads"}


@dataclass(frozen=True)
class Setting:
    rank: int = 0  # 0 with energy None: whole deltas
    energy: float | None = None

    @property
    def label(self) -> str:
        return f"energy {self.energy}" if self.energy is not None else (
            f"rank {self.rank}" if self.rank else "full (whole deltas)")


@dataclass
class Result:
    setting: Setting
    path: Path
    ranks: str  # ranks_summary of its metadata
    overall: Interval
    faithful: Interval

    @property
    def size(self) -> int:
        return self.path.stat().st_size

    @property
    def within(self) -> bool:
        return within(self.overall, self.faithful)


def within(*intervals: Interval) -> bool:
    return all(-TOLERANCE <= iv.low and iv.high <= TOLERANCE for iv in intervals)


def settings(ranks: list[int], energies: list[float]) -> list[Setting]:
    return [*(Setting(rank=r) for r in ranks), *(Setting(energy=e) for e in energies), Setting()]


def choose(results: list[Result], fixed_rank: bool = False) -> Result | None:
    """The result with the smallest file among the low-rank ones (only fixed ranks with `fixed_rank`) whose
    intervals both lie within +-TOLERANCE; None when there is none."""
    ok = [r for r in results if r.within and (r.setting.rank or r.setting.energy is not None)
          and (not fixed_rank or r.setting.energy is None)]
    return min(ok, key=lambda r: (r.size, r.setting.label)) if ok else None


def scores(model, prompts: list[Prompts], seeds: list[int], few) -> Samples:
    wan = adapt(model)
    return sample(lambda batch, seed: generate_few_step(wan, batch, seed, few), prompts, seeds)


def against(samples: Samples, reference: Samples) -> tuple[Interval, Interval]:
    """overall and faithful of `samples` - `reference`, paired per video."""
    return paired_samples(samples, reference, "overall"), paired_samples(samples, reference, "faithful")


def seed_list(text: str) -> list[int]:
    return [int(s) for s in text.split(",")]


def real_sizes(rank: int, keep_ratio: float) -> list[str]:
    lines = [f"| model | kept blocks | full student (bf16) | adapter at rank {rank} | ratio |", "|---|---|---|---|---|"]
    for name, cfg in REAL.items():
        with torch.device("meta"):
            model = WanTransformer3DModel(**cfg, **COMMON)
        kept = list(range(round(cfg["num_layers"] * keep_ratio)))
        shapes = {k: tuple(v.shape) for k, v in diffusers_to_original(adapt(model).pruned_state_dict(kept)).items()}
        full = sum(math.prod(s) for s in shapes.values()) * 2
        small = adapter_bytes(shapes, rank)
        lines.append(f"| {name} | {len(kept)} of {cfg['num_layers']} | {full / 2**30:.2f} GiB | "
                     f"{small / 2**20:.1f} MiB | {small / full:.3f} |")
    return lines


def comfy_probe(kind: str, folder: str) -> None:
    """In a fresh process: load the model the ComfyUI way and print time and peak RSS growth as JSON."""
    from research import comfyui_harness

    comfyui_harness.import_comfy_in_process()
    import importlib.util

    repo = Path(__file__).resolve().parents[2]
    spec = importlib.util.spec_from_file_location("FastLightGen", repo / "__init__.py",
                                                  submodule_search_locations=[str(repo)])
    pack = importlib.util.module_from_spec(spec)
    sys.modules["FastLightGen"] = pack
    spec.loader.exec_module(pack)
    import asyncio

    import folder_paths

    import nodes as comfy_nodes

    asyncio.run(asyncio.run(pack.comfy_entrypoint()).get_node_list())
    from FastLightGen.nodes import adapter, loader

    for name in ("diffusion_models", "fastlightgen", adapter.ADAPTER_FOLDER):
        folder_paths.add_model_folder_path(name, folder)
    Path("/proc/self/clear_refs").write_text("5")  # resets the peak RSS (VmHWM) to the current RSS
    base = _status_kib("VmRSS")
    start = time.perf_counter()
    with torch.inference_mode():
        if kind == "adapter":
            teacher = comfy_nodes.UNETLoader().load_unet("teacher.safetensors", "default")[0]
            model = adapter.ApplyStudentAdapter.execute(teacher, "adapter.safetensors").args[0]
        else:
            model = loader.LoadCheckpoint.execute("student.safetensors").args[0]
        model.patch_model()
    seconds = time.perf_counter() - start
    peak = _status_kib("VmHWM") - base
    print(json.dumps({"seconds": seconds, "peak_rss_mib": peak / 1024}))


def _status_kib(field: str) -> int:
    line = next(x for x in Path("/proc/self/status").read_text().splitlines() if x.startswith(field + ":"))
    return int(line.split()[1])


def comfy_costs(folder: Path, repeats: int) -> dict[str, tuple[float, float]]:
    out = {}
    for kind in ("adapter", "checkpoint"):
        runs = []
        for _ in range(repeats):
            text = subprocess.run([sys.executable, "-m", "research.bench.adapter", "--comfy-probe", kind,
                                   "--probe-folder", str(folder)], capture_output=True, text=True, check=True).stdout
            runs.append(json.loads(text.strip().splitlines()[-1]))
        out[kind] = (min(r["seconds"] for r in runs), min(r["peak_rss_mib"] for r in runs))
    return out


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="2 combinations, one seed, 2 ranks, 2 energies, no ComfyUI")
    p.add_argument("--out", type=Path, default=None, help=f"report (default {FULL['out']}, --quick: {QUICK['out']})")
    p.add_argument("--combinations", type=int, default=None, help="training combinations per mode the choice is "
                   f"made on (default {FULL['combinations']})")
    p.add_argument("--choice-seeds", default=None, help=f"noise seeds of the choice (default {FULL['choice_seeds']})")
    p.add_argument("--seeds", default=None, help=f"noise seeds of the held-out report (default {FULL['seeds']})")
    p.add_argument("--limit", type=int, default=None, help="only the first N held-out combinations")
    p.add_argument("--ranks", default=None, help=f"fixed ranks (default {FULL['ranks']}; '' for none)")
    p.add_argument("--energies", default=None, help=f"energies (default {FULL['energies']}; '' for none)")
    p.add_argument("--comfy-repeats", type=int, default=None, help="fresh processes per ComfyUI measurement "
                   f"(0: skip; default {FULL['comfy_repeats']})")
    p.add_argument("--teacher", type=Path, default=TEACHER)
    p.add_argument("--student", type=Path, default=STUDENT)
    p.add_argument("--comfy-probe", choices=("adapter", "checkpoint"), help=argparse.SUPPRESS)
    p.add_argument("--probe-folder", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.comfy_probe:
        return comfy_probe(args.comfy_probe, args.probe_folder)
    for name, value in (QUICK if args.quick else FULL).items():
        if getattr(args, name) is None:
            setattr(args, name, value)
    seeds, choice_seeds = seed_list(args.seeds), seed_list(args.choice_seeds)
    if set(seeds) & set(choice_seeds):
        p.error(f"--choice-seeds: the choice may not use the held-out report's noise seeds {args.seeds}")
    ranks = [int(r) for r in args.ranks.split(",") if r.strip()]
    energies = [float(e) for e in args.energies.split(",") if e.strip()]
    try:
        for setting in settings(ranks, energies):
            check_setting(setting.rank, setting.energy)
    except AdapterError as err:
        raise SystemExit(f"error: {err}") from None
    choice_prompts = training_prompts(args.combinations)
    heldout = [split_prompts("heldout", 1, 0, args.limit, t2v=m == "T2V") for m in MODES]
    teacher, _ = load_wan(args.teacher, dtype=torch.float32)
    student, meta = load_wan(args.student, dtype=torch.float32)
    full_size = args.student.stat().st_size
    few = meta.recommended
    reference = scores(student, choice_prompts, choice_seeds, few)
    work = Path(tempfile.mkdtemp(prefix="adapter_bench_"))
    lines = [(f"# Student adapter on the toy\n\nChosen on **training** prompts: {len(choice_prompts[0].factors)} "
              f"training combinations x {len(MODES)} modes ({', '.join(MODES)}) x noise seeds {args.choice_seeds} = "
              f"{len(reference.keys)} paired videos; adapters stored in bf16; reference: the full student "
              f"({args.student.name}, {full_size / 2**20:.2f} MiB). Size ratio: adapter file / full student file. "
              f"Energy E: each linear layer keeps the smallest rank holding share E of its delta's squared "
              f"singular values.\n"),
             "| setting | linear layers | file | x full student | overall: adapter - full [95% CI] "
             "| faithful: adapter - full [95% CI] | within ±" + f"{TOLERANCE} |",
             "|---|---|---|---|---|---|---|"]
    results = []
    for i, setting in enumerate(settings(ranks, energies)):
        adapter = make_adapter(teacher, student, meta.kept_blocks, rank=setting.rank, energy=setting.energy,
                               recommended=few)
        path = save_adapter(work / f"setting{i}.safetensors", adapter)
        overall, faithful = against(scores(apply_adapter(teacher, adapter).float(), choice_prompts, choice_seeds, few),
                                    reference)
        result = Result(setting, path, ranks_summary(adapter.meta.ranks), overall, faithful)
        results.append(result)
        lines.append(f"| {setting.label} | {result.ranks} | {result.size / 2**20:.2f} MiB | "
                     f"{result.size / full_size:.3f} | {overall} | {faithful} | {'yes' if result.within else 'no'} |")
        print(lines[-1], flush=True)
    chosen, fixed = choose(results), choose(results, fixed_rank=True)
    if chosen is None:
        lines.append(f"\nNo setting tried lies within ±{TOLERANCE} on both scores.\n")
    else:
        ratio = chosen.size / full_size
        rebuilt = apply_adapter(teacher, read_adapter(chosen.path)).float()
        overall, faithful = against(scores(rebuilt, heldout, seeds, few), scores(student, heldout, seeds, few))
        lines.append(f"\nSmallest setting whose intervals both lie within ±{TOLERANCE}: **{chosen.setting.label}** "
                     f"({chosen.size / 2**20:.2f} MiB, {ratio:.3f}x the full student): target (<= {SIZE_TARGET}x) "
                     f"{'met' if ratio <= SIZE_TARGET else 'missed'}.\n\nThe chosen setting on the **held-out** "
                     f"prompts ({len(heldout[0].factors)} held-out combinations x {len(MODES)} modes x noise seeds "
                     f"{args.seeds} = {overall.n} paired videos; reported, never used to choose): overall "
                     f"{overall}, faithful {faithful}; within ±{TOLERANCE} on both: "
                     f"{'yes' if within(overall, faithful) else 'no'}.\n")
    sized = fixed.setting.rank if fixed else max(ranks, default=64)
    why = "the smallest fixed rank within tolerance" if fixed else "no fixed rank was within tolerance"
    lines += [f"Real shapes at rank {sized} ({why}; an energy setting's size depends on the real deltas):", ""]
    lines += real_sizes(sized, len(meta.kept_blocks) / meta.original_num_blocks)
    if args.comfy_repeats:
        probe = chosen.setting if chosen else Setting(rank=sized)
        if chosen:
            shutil.copyfile(chosen.path, work / "adapter.safetensors")
        else:
            save_adapter(work / "adapter.safetensors", make_adapter(teacher, student, meta.kept_blocks,
                                                                    rank=sized, recommended=few))
        for name, src in (("teacher", args.teacher), ("student", args.student)):
            (work / f"{name}.safetensors").symlink_to(src.resolve())
        costs = comfy_costs(work, args.comfy_repeats)
        lines += ["", f"ComfyUI on the toy (CPU, best of {args.comfy_repeats} fresh processes, to the patched model):",
                  "", "| path | seconds | peak RSS growth |", "|---|---|---|"]
        lines += [f"| {label} | {costs[k][0]:.3f} | {costs[k][1]:.0f} MiB |" for k, label in
                  (("adapter", f"Load Diffusion Model (teacher) + Apply Student Adapter ({probe.label})"),
                   ("checkpoint", "Load FastLightGen Checkpoint (full student)"))]
    shutil.rmtree(work, ignore_errors=True)
    report = "\n".join(lines) + "\n"
    atomic_write_text(args.out, report)
    print(report)


if __name__ == "__main__":
    main()
