"""`python -m research.bench.adapter`: the toy student as an adapter over the toy teacher, at several ranks.

1. Quality: research.demo's held-out prompts and seeds, the student rebuilt from an adapter at each rank (and
   at full rank, whole deltas) against the full student, paired per video (research/stats.py, clusters =
   prompt combinations): overall and faithful, mean difference with its 95% interval; the chosen rank is the
   smallest whose intervals for both lie within +-`TOLERANCE`.
2. Size: each toy adapter file, and computed sizes (bf16, no weights) for the real shapes of Wan 2.1 1.3B,
   Wan 2.2 TI2V-5B and Wan 2.1 14B at the toy's keep ratio, the chosen rank vs the full student.
3. ComfyUI, on the toy (CPU, each in a fresh process, Linux): wall time and peak RSS growth of the stock
   Load Diffusion Model + Apply Student Adapter vs Load FastLightGen Checkpoint of the full student, up to the
   patched model in memory.
Writes a markdown report (--out).
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
from pathlib import Path

import torch
from diffusers import WanTransformer3DModel

from fastlightgen.adapters import adapt
from fastlightgen.checkpoint import load_wan
from fastlightgen.io_utils import atomic_write_text
from fastlightgen.student_adapter import (
    adapter_bytes,
    apply_adapter,
    make_adapter,
    save_adapter,
)
from fastlightgen.toy.evaluate import EvalTable, evaluate_batch
from fastlightgen.toy.generate import generate_few_step
from fastlightgen.toy.prompts import split_prompts
from fastlightgen.wan_keys import diffusers_to_original

from ..demo import STUDENT, TEACHER
from ..stats import paired_interval

TOLERANCE = 0.005
RANKS = (4, 8, 16, 32, 64)
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


def scores(model, prompts, seeds, few) -> EvalTable:
    labels, rows = [], []
    wan = adapt(model)
    for seed in seeds:
        table = evaluate_batch(generate_few_step(wan, prompts, seed, few), list(prompts.factors))
        labels += [f"seed {seed}: {label}" for label in table.labels]
        rows += table.rows
    return EvalTable(labels, rows)


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
    p.add_argument("--out", type=Path, default=Path("outputs/adapter_bench.md"))
    p.add_argument("--seeds", default="0,1,2,3,4")
    p.add_argument("--limit", type=int, default=None, help="only the first N held-out combinations")
    p.add_argument("--ranks", default=",".join(map(str, RANKS)))
    p.add_argument("--comfy-repeats", type=int, default=3, help="fresh processes per ComfyUI measurement (0: skip)")
    p.add_argument("--comfy-probe", choices=("adapter", "checkpoint"), help=argparse.SUPPRESS)
    p.add_argument("--probe-folder", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.comfy_probe:
        return comfy_probe(args.comfy_probe, args.probe_folder)
    seeds, ranks = [int(s) for s in args.seeds.split(",")], [int(r) for r in args.ranks.split(",")]
    prompts = split_prompts("heldout", 1, 0, args.limit)
    combos = [f.combination for f in prompts.factors] * len(seeds)
    teacher, _ = load_wan(TEACHER, dtype=torch.float32)
    student, meta = load_wan(STUDENT, dtype=torch.float32)
    few = meta.recommended
    reference = scores(student, prompts, seeds, few)
    work = Path(tempfile.mkdtemp(prefix="adapter_bench_"))
    lines = [(f"# Student adapter on the toy\n\n{len(prompts.factors)} held-out combinations x seeds {args.seeds} "
              f"= {len(reference.rows)} paired videos; adapters stored in bf16; reference: the full student "
              f"({STUDENT.name}).\n"),
             "| rank | file | overall: adapter - full [95% CI] | faithful: adapter - full [95% CI] |",
             "|---|---|---|---|"]
    chosen = None
    for rank in [*ranks, 0]:
        adapter = make_adapter(teacher, student, meta.kept_blocks, rank=rank, recommended=few)
        path = save_adapter(work / f"rank{rank}.safetensors", adapter)
        table = scores(apply_adapter(teacher, adapter).float(), prompts, seeds, few)
        cells = []
        ok = True
        for column in ("overall", "faithful"):
            iv = paired_interval([r[column] for r in table.rows], [r[column] for r in reference.rows], combos)
            ok &= -TOLERANCE <= iv.low and iv.high <= TOLERANCE
            cells.append(str(iv))
        if ok and chosen is None and rank:
            chosen = rank
        lines.append(f"| {rank or 'full (whole deltas)'} | {path.stat().st_size / 2**20:.2f} MiB | "
                     + " | ".join(cells) + " |")
        print(lines[-1], flush=True)
    lines.append(f"\nFull student checkpoint: {STUDENT.stat().st_size / 2**20:.2f} MiB. Smallest rank whose "
                 f"intervals both lie within ±{TOLERANCE}: {chosen or 'none of those tried'}.\n")
    lines += real_sizes(chosen or max(ranks), len(meta.kept_blocks) / meta.original_num_blocks)
    if args.comfy_repeats:
        save_adapter(work / "adapter.safetensors", make_adapter(teacher, student, meta.kept_blocks,
                                                                rank=chosen or max(ranks), recommended=few))
        for name, src in (("teacher", TEACHER), ("student", STUDENT)):
            (work / f"{name}.safetensors").symlink_to(src.resolve())
        costs = comfy_costs(work, args.comfy_repeats)
        lines += ["", f"ComfyUI on the toy (CPU, best of {args.comfy_repeats} fresh processes, to the patched model):",
                  "", "| path | seconds | peak RSS growth |", "|---|---|---|"]
        lines += [f"| {label} | {costs[k][0]:.3f} | {costs[k][1]:.0f} MiB |" for k, label in
                  (("adapter", f"Load Diffusion Model (teacher) + Apply Student Adapter (rank {chosen or max(ranks)})"),
                   ("checkpoint", "Load FastLightGen Checkpoint (full student)"))]
    shutil.rmtree(work, ignore_errors=True)
    report = "\n".join(lines) + "\n"
    atomic_write_text(args.out, report)
    print(report)


if __name__ == "__main__":
    main()
