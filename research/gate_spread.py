"""`python -m research.gate_spread`: the ground truth's own spread under the scorer's estimates, beside the near misses.

The gates' tolerances (fastlightgen/toy/evaluate.py, EvalSpec) are justified here and only here, on training
prompts (held-out prompts choose nothing): the ground truth rendered clean, blurred (a soft model's output) and
with pixel noise (a speckled one) must pass with room to spare, and every near miss of research/sanity.py must
fail. For each variant the table gives the worst estimate over its videos: the heading's angle to the stated
direction, |log2| of the speed over the stated speed, frame 1's distance from the given first frame moved one
stated step (TI2V), and the per-frame color's distance from the stated color in units of half the palette's
separation (above 1 the frame snaps to another color). Then the artifact check: the ground truth with a token-grid
patchwork (8-px blocks, the DiT's patch on the codec's 4x4 pixels, each block of each frame offset) or a speckle
halo around the object, against the fidelity the scorer gives it.
"""
from __future__ import annotations

import argparse
import math
from collections.abc import Callable
from datetime import date
from pathlib import Path

import torch
import torch.nn.functional as F

from fastlightgen.io_utils import atomic_write_text
from fastlightgen.toy.evaluate import (EVAL, color_error, estimate_object, evaluate_video, first_step_error,
                                      heading_error, speed_error)
from fastlightgen.toy.prompts import split_prompts
from fastlightgen.toy.world import SPEEDS, Factors, render, shape_alpha, trajectory

from .sanity import caption_shift_recolor, near_misses

TOKEN_PX = 8  # the DiT's 2x2 latent patch over the codec's 4x4 pixel unshuffle


def blurred(video: torch.Tensor, sigma: float) -> torch.Tensor:
    """Each frame of (3, F, H, W) blurred by a Gaussian of `sigma` px (edges replicated)."""
    radius = math.ceil(3 * sigma)
    x = torch.arange(-radius, radius + 1, dtype=torch.float32)
    kernel = torch.exp(-x ** 2 / (2 * sigma ** 2))
    kernel = kernel / kernel.sum()
    frames = F.pad(video.transpose(0, 1), (radius,) * 4, mode="replicate")  # (F, 3, H+2r, W+2r)
    frames = F.conv2d(frames, kernel.view(1, 1, 1, -1).expand(3, 1, 1, -1), groups=3)
    frames = F.conv2d(frames, kernel.view(1, 1, -1, 1).expand(3, 1, -1, 1), groups=3)
    return frames.transpose(0, 1)


def patchwork(video: torch.Tensor, amplitude: float, g: torch.Generator) -> torch.Tensor:
    """Every 8x8 token block of every frame offset by its own uniform gray level in [-amplitude, amplitude]."""
    _, frames, height, width = video.shape
    blocks = (torch.rand((1, frames, height // TOKEN_PX, width // TOKEN_PX), generator=g) * 2 - 1) * amplitude
    return video + blocks.repeat_interleave(TOKEN_PX, 2).repeat_interleave(TOKEN_PX, 3)


def speckle_halo(video: torch.Tensor, factors: Factors, amplitude: float, g: torch.Generator) -> torch.Tensor:
    """Gaussian speckle of std `amplitude` in a 3-px ring just outside the object's edge."""
    inside = shape_alpha(factors.shape, trajectory(factors)) > 0  # (F, H, W)
    ring = F.max_pool2d(inside.float()[:, None], 7, stride=1, padding=3)[:, 0].bool() & ~inside
    return video + ring[None] * torch.randn(video.shape, generator=g) * amplitude




Variant = Callable[[Factors, torch.Generator], torch.Tensor]


def ground_truth_variants() -> dict[str, Variant]:
    """The ground truth as a model could fairly give it: clean, soft, speckled."""
    variants: dict[str, Variant] = {"ground truth": lambda f, g: render(f)}
    for sigma in (0.5, 1.0, 1.5, 2.0):
        variants[f"ground truth blurred (sigma {sigma} px)"] = lambda f, g, s=sigma: blurred(render(f), s)
    for std in (0.05, 0.1):
        variants[f"ground truth + pixel noise (std {std})"] = (
            lambda f, g, s=std: render(f) + s * torch.randn(render(f).shape, generator=g))
    return variants


SPREAD_COLUMNS = ("heading (deg)", "log2 speed ratio (abs)", "frame-1 step error (px)", "color error (/ half sep.)")
TOLERANCES = (EVAL.direction_degrees, EVAL.speed_log2_tolerance, EVAL.position_tolerance, 1.0)


def spreads(video: torch.Tensor, factors: Factors) -> tuple[float, ...]:
    est = estimate_object(video, factors)
    return (heading_error(est, factors), speed_error(est, factors), first_step_error(est, factors),
            color_error(est, factors), evaluate_video(video, factors)["fidelity"])


def spread_row(name: str, answer: Variant, factors: list[Factors], worst: Callable = max) -> str:
    """The variant's worst (ground truth: largest; near miss: smallest) estimate of each kind over the videos, and
    its mean TI2V fidelity (how soft it is)."""
    g = torch.Generator().manual_seed(0)
    *values, fidelity = zip(*(spreads(answer(f, g), f) for f in factors))
    return (f"| {name} | {len(factors)} | " + " | ".join(f"{worst(v):.3f}" for v in values)
            + f" | {sum(fidelity) / len(fidelity):.3f} |")


def spread_table(factors: list[Factors]) -> str:
    head = ("| answer | videos | " + " | ".join(SPREAD_COLUMNS) + " | fidelity (mean) |\n"
            + "|---" * (len(SPREAD_COLUMNS) + 3) + "|\n"
            + "| **tolerance** | – | " + " | ".join(f"**{t:g}**" for t in TOLERANCES) + " | – |")
    truths = [spread_row(f"{name} (largest)", answer, factors) for name, answer in ground_truth_variants().items()]
    misses = [spread_row(f"{name} (smallest)", answer, [f for f in factors if applies is None or applies(f)], min)
              for name, (answer, applies) in near_misses(t2v=False).items()]
    solver = caption_shift_recolor
    misses += [spread_row(f"the same solver at {speed} (smallest)", solver,
                          [f for f in factors if f.speed == speed], min) for speed in SPEEDS]
    return "\n".join([head, *truths, *misses])


def artifact_table(factors: list[Factors]) -> str:
    """Mean fidelity and the share of videos passing every gate, ground truth with synthetic artifacts."""
    cases: dict[str, Variant] = {"ground truth": lambda f, g: render(f)}
    for amplitude in (0.02, 0.05, 0.1):
        cases[f"+ token-grid patchwork, offsets up to ±{amplitude}"] = (
            lambda f, g, a=amplitude: patchwork(render(f), a, g))
    for std in (0.1, 0.3):
        cases[f"+ speckle halo, std {std}"] = lambda f, g, s=std: speckle_halo(render(f), f, s, g)
    cases["blurred (sigma 1 px), for scale"] = lambda f, g: blurred(render(f), 1.0)
    lines = ["| video | videos | fidelity (mean) | correct (mean) | imaging_quality (mean) |", "|---|---|---|---|---|"]
    for name, make in cases.items():
        g = torch.Generator().manual_seed(0)
        scores = [evaluate_video(make(f, g), f) for f in factors]
        means = [sum(s[c] for s in scores) / len(scores) for c in ("fidelity", "correct", "imaging_quality")]
        lines.append(f"| {name} | {len(scores)} | " + " | ".join(f"{m:.3f}" for m in means) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seeds", default="0,1", help="prompt seeds of the training split (60 prompts each)")
    p.add_argument("--out", type=Path, default=Path(f"reports/toy/gate_spread_{date.today().isoformat()}.md"))
    args = p.parse_args(argv)
    torch.set_num_threads(1)  # tiny tensors: intra-op threads only stall on a shared machine (evaluate.py)
    seeds = [int(s) for s in args.seeds.split(",")]
    factors = [f for s in seeds for f in split_prompts("train", seed=s).factors]
    text = (f"# The scorer's gates against the ground truth's own spread\n\n`python -m research.gate_spread "
            f"--seeds {args.seeds}`: {len(factors)} training prompts (TI2V prompt draws {args.seeds}; held-out prompts "
            f"choose nothing). Method: research/gate_spread.py.\n\n## Spread of the estimates\n\n"
            f"{spread_table(factors)}\n\n## Artifacts the viewer sees\n\n{artifact_table(factors)}\n")
    atomic_write_text(args.out, text)
    print(text)


if __name__ == "__main__":
    main()
