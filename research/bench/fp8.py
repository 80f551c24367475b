"""`python -m research.bench.fp8`: the toy student exported as fp8_scaled against its bf16 file.

The fp8_scaled file is what `python -m train.export --convert toy_student.safetensors --set export.dtype=fp8_scaled`
writes (fastlightgen/fp8.py). Measured:
1. Size: both files, and the Linear weights alone (1 byte instead of 2, plus a 4-byte scale each).
2. Prediction: relative RMS difference (||fp8 - bf16|| / ||bf16||) of the student's velocity at its first step
   (pure noise, sigma 1) on research.demo's held-out prompts, both modes.
3. Videos: the 4-step sampler (fastlightgen.sampling.sample_few_step, through the toy's generate_few_step) on the
   same prompts at noise seeds --seeds, both files at the same noise: the relative RMS difference of the decoded
   videos, and the toy evaluator's faithful score of each with the paired difference and its 95% interval.
Both models run in float32 from the weights each file holds (load_wan(dtype=float32)): for the fp8_scaled file
the weights ComfyUI's loader holds too. Writes the report to --out (default reports/fp8_export.md).
"""
from __future__ import annotations

import argparse
import tempfile
from dataclasses import dataclass
from datetime import date
from pathlib import Path

import torch
from safetensors import safe_open

from fastlightgen.adapters import DiTAdapter, adapt
from fastlightgen.checkpoint import CheckpointMeta, load_wan, save_checkpoint
from fastlightgen.fp8 import FP8_SCALED
from fastlightgen.io_utils import atomic_write_text
from fastlightgen.sampling import Sampling
from fastlightgen.toy.evaluate import evaluate_batch
from fastlightgen.toy.generate import generate_few_step
from fastlightgen.toy.prompts import Prompts, split_prompts
from fastlightgen.toy.teacher import conditioning

from ..demo import MODES, STUDENT
from ..stats import EQUIVALENCE_MARGIN, Interval, paired_interval

OUT = Path("reports/fp8_export.md")
COMMAND = "python -m research.bench.fp8"


def sizes(path: Path) -> tuple[int, int, int]:
    """(file bytes, bytes of the Linear weights, how many): the 2-D `.weight` tensors are Wan's Linear layers'."""
    with safe_open(str(path), "pt") as f:
        linear = [t for t in (f.get_tensor(k) for k in f.keys() if k.endswith(".weight")) if t.ndim == 2]
    return path.stat().st_size, sum(t.nbytes for t in linear), len(linear)


def relative_rms(a: list[torch.Tensor], b: list[torch.Tensor]) -> float:
    """||a - b|| / ||b|| over all the tensors together."""
    diff = sum(float((x - y).double().pow(2).sum()) for x, y in zip(a, b))
    return (diff / sum(float(y.double().pow(2).sum()) for y in b)) ** 0.5


def first_step(model: DiTAdapter, prompts: Prompts) -> torch.Tensor:
    """The velocity at sigma 1 on fixed noise: the student's first step."""
    noise = torch.randn((len(prompts.factors), *prompts.latent_shape()), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        return model.forward(noise, torch.tensor(1.0), conditioning(prompts.captions))


@dataclass
class Measured:
    student: Path
    meta: CheckpointMeta
    sizes: dict[str, tuple[int, int, int]]  # "bf16", "fp8" -> sizes()
    prediction: float  # relative RMS difference of the first step's velocity
    video: float  # and of the sampled videos
    faithful: dict[str, list[float]]  # "bf16", "fp8" -> per video
    interval: Interval  # faithful, fp8 - bf16, paired per video
    prompts: int  # per mode
    seeds: str


def sample_both(models: dict[str, DiTAdapter], prompts: list[Prompts], seeds: list[int], few: Sampling
                ) -> tuple[dict[str, list[torch.Tensor]], dict[str, list[float]], list[tuple]]:
    """(videos, faithful scores, clusters) of each model over every prompt set at every seed, at the same noise."""
    videos: dict[str, list[torch.Tensor]] = {name: [] for name in models}
    faithful: dict[str, list[float]] = {name: [] for name in models}
    clusters = []
    for batch, seed in ((b, s) for b in prompts for s in seeds):
        for name, model in models.items():
            videos[name].append(generate_few_step(model, batch, seed, few))
            table = evaluate_batch(videos[name][-1], list(batch.factors), t2v=batch.t2v)
            faithful[name] += [row["faithful"] for row in table.rows]
        clusters += [(batch.mode, f.combination) for f in batch.factors]
    return videos, faithful, clusters


def measure(student: Path, seeds: str) -> Measured:
    """The bf16 `student` written as fp8_scaled, and both files measured."""
    bf16_model, meta = load_wan(student)
    with tempfile.TemporaryDirectory() as tmp:
        fp8_path = save_checkpoint(Path(tmp) / "student_fp8_scaled.safetensors", bf16_model, meta, dtype=FP8_SCALED)
        size = {"bf16": sizes(student), "fp8": sizes(fp8_path)}
        models = {"fp8": adapt(load_wan(fp8_path, dtype=torch.float32)[0]), "bf16": adapt(bf16_model.float())}
    prompts = [split_prompts("heldout", 1, 0, t2v=mode == "T2V") for mode in MODES]
    first = {name: [first_step(model, batch) for batch in prompts] for name, model in models.items()}
    videos, faithful, clusters = sample_both(models, prompts, [int(s) for s in seeds.split(",")], meta.recommended)
    return Measured(student, meta, size, relative_rms(first["fp8"], first["bf16"]),
                    relative_rms(videos["fp8"], videos["bf16"]), faithful,
                    paired_interval(faithful["fp8"], faithful["bf16"], clusters), len(prompts[0].factors), seeds)


def markdown(m: Measured) -> str:
    (bf16_size, bf16_linear, count), (fp8_size, fp8_linear, _) = m.sizes["bf16"], m.sizes["fp8"]
    mean = {name: sum(scores) / len(scores) for name, scores in m.faithful.items()}
    return f"""# fp8_scaled export of the toy student

{date.today().isoformat()}. Regenerate: `{COMMAND}` ({torch.get_num_threads()} CPU threads).

The committed toy student ({m.student.name}, bf16, {len(m.meta.kept_blocks)} of {m.meta.original_num_blocks} blocks) \
written as ComfyUI's fp8_scaled (`python -m train.export --convert {m.student.name} --set \
export.dtype=fp8_scaled`): every Linear weight in float8_e4m3fn with a float32 per-tensor scale (amax / 448), every \
Linear bias in float8_e4m3fn, norms, modulation and the patch embedding in bf16; metadata unchanged. Every Linear \
layer, the embeddings' and the head's too, because under the `scaled_fp8` marker ComfyUI's loader holds every Linear \
weight and bias in fp8 whatever the file stores (comfy/ops.py `scaled_fp8_ops`): a bf16 one would be cast unscaled. \
So the weights measured here are the ones ComfyUI runs; tests/test_export_fp8.py loads the file with the stock Load \
Diffusion Model and Load FastLightGen Checkpoint, whose predictions are bit-identical.

## Size

| part | bf16 | fp8_scaled | fp8_scaled / bf16 |
|---|---|---|---|
| whole file | {bf16_size} bytes ({bf16_size / 2**20:.2f} MiB) | {fp8_size} bytes ({fp8_size / 2**20:.2f} MiB) \
| {fp8_size / bf16_size:.3f} |
| the {count} Linear weights (scales not counted) | {bf16_linear} bytes | {fp8_linear} bytes \
| {fp8_linear / bf16_linear:.3f} |

## Output difference against the bf16 file

Relative RMS difference, ||fp8_scaled - bf16|| / ||bf16||, both in float32 on the weights each file holds:

| output | prompts | relative RMS difference |
|---|---|---|
| velocity at the first step (noise at seed 0, sigma 1) | {m.prompts} held-out x {len(MODES)} modes ({", ".join(MODES)}) \
| {m.prediction:.4f} |
| 4-step videos (decoded, fastlightgen.sampling.sample_few_step) | the same prompts x noise seeds {m.seeds} = \
{m.interval.n} videos | {m.video:.4f} |

Toy evaluator, faithful (mean over the {m.interval.n} videos): bf16 {mean["bf16"]:.4f}, fp8_scaled {mean["fp8"]:.4f}; \
fp8_scaled - bf16 paired per video {m.interval} (95% interval, clusters: mode and combination); verdict at \
research/stats.py's margin ±{EQUIVALENCE_MARGIN}: {m.interval.verdict()}.
"""


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--student", type=Path, default=STUDENT)
    p.add_argument("--seeds", default="0,1,2", help="noise seeds, comma-separated: every prompt at each")
    p.add_argument("--out", type=Path, default=OUT)
    args = p.parse_args(argv)
    report = markdown(measure(args.student, args.seeds))
    atomic_write_text(args.out, report)
    print(report)


if __name__ == "__main__":
    main()
