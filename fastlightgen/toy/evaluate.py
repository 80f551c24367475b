"""Exact VBench-I2V-like scoring of toy-world videos against their known factors.

Every score is in [0, 1], higher is better. The video is clamped to [-1, 1] (what a viewer
sees). Notation: x_f is frame f (3, H, W), b the clean background rendered from the factors
(the I2V first frame shows it, so a faithful model must keep it), v0 = world speed (3 px/frame).

Object estimate (shared by all scores):
  foreground  m_f = max_c |x_f - b| > 0.5 * color_level (an object pixel at half coverage);
  color       c   = per-channel median of x over foreground pixels of all frames, snapped to the
                    nearest palette color c* (no foreground: c = gray);
  coverage    a_f = clamp(<x_f - b, c* - b> / |c* - b|^2, 0, 1), zeroed below 0.2 (exact inverse
                    of the renderer's compositing for a clean video);
  shape fit   for each shape s and frame f, the best soft IoU sum(min(a, T)) / sum(max(a, T))
              between a_f and the clean coverage T of s centred within +-1 px of the a-weighted
              centroid (coarse-to-fine search, 1/8 px precision); IoU_s = mean over frames;
              detected shape = argmax_s IoU_s;
  presence    frame f shows the object if sum(a_f) >= 16 px (about a fifth of the smallest shape's
              area); q = fraction of frames that do;
  trajectory  p_f = the best-fitting centre of the detected shape; v = least-squares velocity
              of p_f over the frames showing the object; r = RMS distance of those p_f from the
              fitted line (v = 0, r = 0 with fewer than two such frames).

Scores:
  color               max(0, 1 - |c - c_target| / (d_sep / 2)), d_sep = smallest distance
                      between palette colors (so > 0 only when the target is the nearest color);
  shape               IoU_target if the detected shape is the target, else 0;
  direction           q * clamp(<v, u_target> / max(|v|, v0 / 2), 0, 1): cosine to the stated
                      direction, scaled down when slower than half speed (a frozen video gets 0);
  dynamic_degree      q * clamp(1 - ||v| - v0| / v0, 0, 1): moves by the expected amount;
  motion_smoothness   q * clamp(1 - r / (v0 / 2), 0, 1): constant-velocity trajectory;
                      (the factor q: an object that vanishes has no motion to credit)
  i2v_subject         mean_{f>=1} S(P_f, P_0), with P_f the (x_f - b) patch of 19x19 px centred on
                      p_f and S(a, b) = max(0, 2<a, b> / (|a|^2 + |b|^2)) (a cosine that also
                      penalizes fading/brightening; two empty patches score 0);
  subject_consistency mean_{f>=1} S(P_f, P_{f-1});
  imaging_quality     clamp(1 - RMS(x - y) / 0.25, 0, 1), y = clean render of the detected
                      color and shape along p over b (noise, blur and artifacts raise the error);
  temporal_flicker    clamp(1 - MAD / 0.2, 0, 1), MAD = mean |x_{f+1} - x_f| over pixels outside
                      the (1-px dilated) detected object in both frames: background stability.
Summaries: adherence = mean(color, shape, direction); overall = mean of the nine scores above.
Like VBench, smoothness and the subject scores do not penalize a static video; read them with
dynamic_degree.

The verdict view ranks answers, where the VBench-like view above only describes them. In TI2V the first
frame and the caption fix the answer, so a video is compared with it, and a factor it gets wrong cannot be
bought back by crisp pixels:
  fidelity  clamp(1 - RMS(x - g) / 0.25, 0, 1), g = the clean render of the factors (the unique answer);
  correct   1 if every gate passes, else 0: the detected color and shape are the stated ones, the object
            is present in at least half the frames and moves within 45 degrees of the stated direction,
            at a speed within a third of the stated one;
  faithful  correct * fidelity: the primary score of a video.
"""
from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from fastlightgen.toy.world import (
    COLOR_NAMES,
    SHAPES,
    TOY_WORLD,
    Factors,
    caption,
    color_rgb,
    direction_vector,
    palette,
    render,
    render_at,
    render_background,
    shape_alpha,
)

DIMENSIONS: tuple[str, ...] = (
    "color", "shape", "direction", "i2v_subject", "subject_consistency",
    "motion_smoothness", "dynamic_degree", "imaging_quality", "temporal_flicker",
)
VERDICT: tuple[str, ...] = ("fidelity", "correct", "faithful")
COLUMNS: tuple[str, ...] = DIMENSIONS + ("adherence", "overall") + VERDICT


@dataclass(frozen=True)
class EvalSpec:
    foreground_fraction: float = 0.5  # of color_level: foreground = object coverage above ~1/2
    alpha_floor: float = 0.2  # coverage below this is background noise, not object
    presence_area: float = 16.0  # px of coverage for a frame to show the object
    # Coarse-to-fine (radius, step) px grids around the centroid for the best shape fit:
    # +-1 px reach at 1/8 px precision for 43 instead of 289 template renders.
    search_rounds: tuple[tuple[float, float], ...] = ((1.0, 0.5), (0.25, 0.25), (0.125, 0.125))
    patch_half: int = 9  # px; covers the largest support extent (the triangle's apex, 9 px)
    quality_error_scale: float = 0.25  # RMS error (range 2) at which imaging quality reaches 0
    flicker_scale: float = 0.2  # mean abs background change at which temporal flicker reaches 0
    fidelity_error_scale: float = 0.25  # RMS error against the true render at which fidelity reaches 0
    direction_tolerance: float = math.cos(math.pi / 4)  # a motion within 45 degrees goes the stated way
    speed_tolerance: float = 1 / 3  # of the stated speed: half or double speed fails
    min_presence: float = 0.5  # of frames: an object that vanishes has not gone anywhere


EVAL = EvalSpec()


@dataclass(frozen=True)
class ObjectEstimate:
    color: str  # palette color nearest the foreground median
    median_rgb: torch.Tensor  # (3,)
    shape: str
    shape_iou: dict[str, float]
    positions: torch.Tensor  # (F, 2) centres of the detected shape
    presence: float  # fraction of frames showing the object
    velocity: torch.Tensor  # (2,) px/frame, least squares over frames showing the object
    residual: float  # RMS px distance of those positions from the constant-velocity fit


def _clamp01(x: float) -> float:
    return min(1.0, max(0.0, x))


def _foreground_color(video: torch.Tensor, background: torch.Tensor) -> torch.Tensor:
    diff = video - background[:, None]
    mask = diff.abs().amax(0) > EVAL.foreground_fraction * TOY_WORLD.color_level
    if not mask.any():
        return background.mean(dim=(1, 2))
    return video.permute(1, 2, 3, 0)[mask].median(dim=0).values


def _coverage(video: torch.Tensor, background: torch.Tensor, rgb: torch.Tensor) -> torch.Tensor:
    """(F, H, W) object coverage, inverting x = (1 - a) b + a rgb along the rgb - b direction."""
    towards = rgb[:, None, None] - background
    alpha = ((video - background[:, None]) * towards[:, None]).sum(0) / (towards ** 2).sum(0)
    alpha = alpha.clamp(0.0, 1.0)
    return alpha * (alpha >= EVAL.alpha_floor)


def _centroids(alpha: torch.Tensor) -> torch.Tensor:
    """(F, 2) coverage-weighted centroids; the frame centre where nothing was found."""
    xs = torch.arange(TOY_WORLD.width) + 0.5
    ys = torch.arange(TOY_WORLD.height) + 0.5
    mass = alpha.sum(dim=(1, 2))
    safe = mass.clamp_min(1e-8)
    cx = (alpha.sum(1) * xs).sum(1) / safe
    cy = (alpha.sum(2) * ys).sum(1) / safe
    centre = torch.tensor([TOY_WORLD.width / 2, TOY_WORLD.height / 2])
    return torch.where(mass[:, None] > 0, torch.stack([cx, cy], 1), centre)


def _grid_offsets(radius: float, step: float) -> torch.Tensor:
    steps = round(radius / step)
    grid = torch.arange(-steps, steps + 1) * step
    dy, dx = torch.meshgrid(grid, grid, indexing="ij")
    return torch.stack([dx.flatten(), dy.flatten()], 1)


def _soft_iou(alpha: torch.Tensor, template: torch.Tensor) -> torch.Tensor:
    """alpha (F, H, W) vs template (F, K, H, W) -> (F, K)."""
    a = alpha[:, None]
    return torch.minimum(a, template).sum((-2, -1)) / torch.maximum(a, template).sum((-2, -1)).clamp_min(1e-8)


def _fit_shape(alpha: torch.Tensor, shape: str, centroids: torch.Tensor) -> tuple[float, torch.Tensor]:
    """Mean over frames of the best soft IoU near each centroid, and the best centres (F, 2)."""
    centres = centroids
    for radius, step in EVAL.search_rounds:
        candidates = centres[:, None] + _grid_offsets(radius, step)[None]  # (F, K, 2)
        best, index = _soft_iou(alpha, shape_alpha(shape, candidates)).max(dim=1)
        centres = candidates[torch.arange(len(candidates)), index]
    return best.mean().item(), centres


def _linear_fit(positions: torch.Tensor, present: torch.Tensor) -> tuple[torch.Tensor, float]:
    """Least-squares velocity (2,) and RMS residual of a constant-velocity fit to the present frames of (F, 2)."""
    if int(present.sum()) < 2:
        return torch.zeros(2), 0.0
    t = torch.arange(len(positions), dtype=positions.dtype)[present]
    positions = positions[present]
    t = t - t.mean()
    centred = positions - positions.mean(0)
    velocity = (t[:, None] * centred).sum(0) / (t ** 2).sum()
    residual = centred - t[:, None] * velocity
    return velocity, residual.pow(2).sum(1).mean().sqrt().item()


def estimate_object(video: torch.Tensor, factors: Factors) -> ObjectEstimate:
    """Read color, shape and trajectory of the object in `video` (3, F, H, W)."""
    video = video.detach().float().cpu().clamp(-1.0, 1.0)
    background = render_background(factors)
    median = _foreground_color(video, background)
    color = COLOR_NAMES[int(torch.cdist(median[None], palette()).argmin())]
    alpha = _coverage(video, background, color_rgb(color))
    centroids = _centroids(alpha)
    fits = {s: _fit_shape(alpha, s, centroids) for s in SHAPES}
    shape = max(SHAPES, key=lambda s: fits[s][0])
    positions = fits[shape][1]
    present = alpha.sum(dim=(1, 2)) >= EVAL.presence_area
    velocity, residual = _linear_fit(positions, present)
    return ObjectEstimate(color, median, shape, {s: fits[s][0] for s in SHAPES}, positions,
                          present.float().mean().item(), velocity, residual)


def _patches(diff: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """(F, 3*(2k+1)^2) bilinear crops of diff (3, F, H, W) centred on positions (F, 2)."""
    k = EVAL.patch_half
    offsets = torch.arange(-k, k + 1, dtype=torch.float32)
    xs = positions[:, 0, None] + offsets  # (F, S)
    ys = positions[:, 1, None] + offsets
    # grid_sample with align_corners=False maps pixel-centre coordinate u to 2u/size - 1.
    gx = (2 * xs / TOY_WORLD.width - 1)[:, None, :].expand(-1, len(offsets), -1)
    gy = (2 * ys / TOY_WORLD.height - 1)[:, :, None].expand(-1, -1, len(offsets))
    grid = torch.stack([gx, gy], -1)
    crops = F.grid_sample(diff.permute(1, 0, 2, 3), grid, mode="bilinear", padding_mode="zeros", align_corners=False)
    return crops.flatten(1)


def _appearance_similarity(a: torch.Tensor, b: torch.Tensor) -> float:
    denominator = (a.pow(2).sum() + b.pow(2).sum()).item()
    if denominator == 0.0:
        return 0.0
    return max(0.0, 2 * (a * b).sum().item() / denominator)


def _subject_similarities(patches: torch.Tensor) -> tuple[float, float]:
    """Mean similarity of frames 1.. to the first frame, and to their previous frame."""
    to_first = [_appearance_similarity(patches[f], patches[0]) for f in range(1, len(patches))]
    to_previous = [_appearance_similarity(patches[f], patches[f - 1]) for f in range(1, len(patches))]
    return sum(to_first) / len(to_first), sum(to_previous) / len(to_previous)


def _background_change(video: torch.Tensor, object_alpha: torch.Tensor) -> float:
    """Mean abs frame-to-frame change over pixels away from the object in both frames."""
    near = F.max_pool2d((object_alpha > 0).float()[:, None], 3, stride=1, padding=1)[:, 0] > 0
    keep = ~(near[1:] | near[:-1])  # (F-1, H, W)
    change = (video[:, 1:] - video[:, :-1]).abs().mean(0)
    return change[keep].mean().item() if keep.any() else math.inf


@contextmanager
def _single_threaded() -> Iterator[None]:
    # Per-video tensors are tiny: intra-op threads only add barriers, which stall for whole
    # scheduler slices (100x slowdowns measured) when another process, e.g. training, holds the cores.
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def evaluate_video(video: torch.Tensor, factors: Factors) -> dict[str, float]:
    """Scores of one video (3, F, H, W) in [-1, 1] generated for `factors`; keys COLUMNS."""
    expected = (3, TOY_WORLD.frames, TOY_WORLD.height, TOY_WORLD.width)
    if tuple(video.shape) != expected:
        raise ValueError(f"video must have shape {expected}, got {tuple(video.shape)}")
    with _single_threaded():
        return _scores(video.detach().float().cpu().clamp(-1.0, 1.0), factors)


def _scores(video: torch.Tensor, factors: Factors) -> dict[str, float]:
    est = estimate_object(video, factors)
    background = render_background(factors)
    speed = TOY_WORLD.speed
    separation = torch.pdist(palette()).min().item()

    target = direction_vector(factors.direction)
    moved = est.velocity.norm().item()
    i2v_subject, subject_consistency = _subject_similarities(_patches(video - background[:, None], est.positions))
    clean = render_at(factors, est.shape, est.color, est.positions)
    background_change = _background_change(video, shape_alpha(est.shape, est.positions))
    scores = {
        "color": _clamp01(1 - (est.median_rgb - color_rgb(factors.color)).norm().item() / (separation / 2)),
        "shape": est.shape_iou[factors.shape] if est.shape == factors.shape else 0.0,
        "direction": est.presence * _clamp01((est.velocity @ target).item() / max(moved, speed / 2)),
        "i2v_subject": i2v_subject,
        "subject_consistency": subject_consistency,
        "motion_smoothness": est.presence * _clamp01(1 - est.residual / (speed / 2)),
        "dynamic_degree": est.presence * _clamp01(1 - abs(moved - speed) / speed),
        "imaging_quality": _clamp01(1 - (video - clean).pow(2).mean().sqrt().item() / EVAL.quality_error_scale),
        "temporal_flicker": _clamp01(1 - background_change / EVAL.flicker_scale),
    }
    scores["adherence"] = (scores["color"] + scores["shape"] + scores["direction"]) / 3
    scores["overall"] = sum(scores[d] for d in DIMENSIONS) / len(DIMENSIONS)
    return {**scores, **_verdict(video, factors, est)}


def gates(est: ObjectEstimate, factors: Factors) -> dict[str, bool]:
    """Each stated factor the video must get right for its answer to count."""
    moved = est.velocity.norm().item()
    heading = (est.velocity @ direction_vector(factors.direction)).item() / moved if moved > 0 else -1.0
    return {"color": est.color == factors.color, "shape": est.shape == factors.shape,
            "direction": est.presence >= EVAL.min_presence and heading >= EVAL.direction_tolerance,
            "speed": abs(moved - TOY_WORLD.speed) <= EVAL.speed_tolerance * TOY_WORLD.speed}


def _verdict(video: torch.Tensor, factors: Factors, est: ObjectEstimate) -> dict[str, float]:
    error = (video - render(factors)).pow(2).mean().sqrt().item()
    fidelity = _clamp01(1 - error / EVAL.fidelity_error_scale)
    correct = float(all(gates(est, factors).values()))
    return {"fidelity": fidelity, "correct": correct, "faithful": correct * fidelity}


@dataclass
class EvalTable:
    labels: list[str]
    rows: list[dict[str, float]]

    def mean(self) -> dict[str, float]:
        return {c: float(torch.tensor([r[c] for r in self.rows], dtype=torch.float64).mean()) for c in COLUMNS}

    def std(self) -> dict[str, float]:
        """Population std over videos (0 for a single video)."""
        return {c: float(torch.tensor([r[c] for r in self.rows], dtype=torch.float64).std(correction=0))
                for c in COLUMNS}

    def to_markdown(self, per_video: bool = False) -> str:
        lines = ["| video | " + " | ".join(COLUMNS) + " |", "|---" * (len(COLUMNS) + 1) + "|"]
        if per_video:
            lines += [f"| {label} | " + " | ".join(f"{row[c]:.3f}" for c in COLUMNS) + " |"
                      for label, row in zip(self.labels, self.rows)]
        mean, std = self.mean(), self.std()
        lines.append(f"| mean (n={len(self.rows)}) | " + " | ".join(f"{mean[c]:.3f}" for c in COLUMNS) + " |")
        lines.append("| std | " + " | ".join(f"{std[c]:.3f}" for c in COLUMNS) + " |")
        return "\n".join(lines)


def evaluate_batch(videos: torch.Tensor | Sequence[torch.Tensor], factors_list: Sequence[Factors]) -> EvalTable:
    """Score (B, 3, F, H, W) videos (or a list of (3, F, H, W)) against their factors."""
    if len(videos) != len(factors_list):
        raise ValueError(f"{len(videos)} videos but {len(factors_list)} factors")
    if len(factors_list) == 0:
        raise ValueError("evaluate_batch needs at least one video")
    rows = [evaluate_video(v, f) for v, f in zip(videos, factors_list)]
    return EvalTable([caption(f) for f in factors_list], rows)
