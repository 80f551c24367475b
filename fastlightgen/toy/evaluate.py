"""Exact VBench-I2V-like scoring of toy-world videos against their known factors.

Every score is in [0, 1], higher is better. The video is clamped to [-1, 1] (what a viewer
sees). Notation: x_f is frame f (3, H, W) of F frames, b the clean background rendered from the factors
(a TI2V first frame shows it, so a faithful model must keep it; T2V prompts are all on the plain background,
so the caption fixes it), v0 = the stated speed (`Factors.pixels_per_frame`: 1.5 px/frame "slowly",
3 "quickly"), u the stated direction's unit vector, F_c = the change frame (TOY_WORLD.change_frame = 3).

Object estimate (shared by all scores):
  foreground  m_f = max_c |x_f - b| > 0.5 * color_level (an object pixel at half coverage);
  colors      c_s, c_e = per-channel medians of x over the foreground pixels of frames [0, F_c) (start) and
              [F_c, F) (end), each snapped to the nearest palette color c*_s, c*_e (a segment without
              foreground: c = gray); frame f's color c*_f is c*_s before F_c and c*_e from F_c on;
  coverage    a_f = clamp(<x_f - b, c*_f - b> / |c*_f - b|^2, 0, 1), zeroed below 0.2 (exact inverse
              of the renderer's compositing for a clean video, a stated color change included);
  shape fit   for each shape s and frame f, the best soft IoU sum(min(a, T)) / sum(max(a, T))
              between a_f and the clean coverage T of s centred within +-1.5 px of the a-weighted
              centroid (coarse-to-fine search, 1/32 px precision); IoU_s = mean over frames;
              detected shape = argmax_s IoU_s;
  presence    frame f shows the object if sum(a_f) >= 16 px (about a fifth of the smallest shape's
              area); q = fraction of frames that do;
  trajectory  p_f = the best-fitting centre of the detected shape; v = least-squares velocity
              of p_f over the frames showing the object; r = RMS distance of those p_f from the
              fitted line (v = 0, r = 0 with fewer than two such frames).

Scores:
  color               mean over the two segments of max(0, 1 - |c - t| / (d_sep / 2)), with t the stated
                      color of the segment (start: the stated color; end: the stated end color, or the
                      stated color when no change is stated) and d_sep the smallest distance between
                      palette colors (so a segment scores > 0 only when its target is the nearest color);
  shape               IoU_target if the detected shape is the target, else 0;
  direction           q * clamp(<v, u> / max(|v|, v0 / 2), 0, 1): cosine to the stated
                      direction, scaled down when slower than half the stated speed (a frozen video gets 0);
  dynamic_degree      q * clamp(1 - ||v| - v0| / v0, 0, 1): moves by the stated amount;
  motion_smoothness   q * clamp(1 - r / (v0 / 2), 0, 1): constant-velocity trajectory;
                      (the factor q: an object that vanishes has no motion to credit)
  i2v_subject         mean_{f>=1} S(A_f, A_0), with A_f the coverage a_f in the 19x19 px patch centred on
                      p_f and S(a, b) = max(0, 2<a, b> / (|a|^2 + |b|^2)) (a cosine that also penalizes
                      fading/brightening; two empty patches score 0). Coverage, not color: a correctly
                      rendered color change keeps the subject, while fading or vanishing still lowers a_f;
  subject_consistency mean_{f>=1} S(A_f, A_{f-1});
  imaging_quality     clamp(1 - RMS(x - y) / 0.25, 0, 1), y = clean render of the detected shape in the
                      detected colors (c*_s, turning c*_e) along p over b (noise, blur and artifacts raise
                      the error);
  temporal_flicker    clamp(1 - MAD / 0.2, 0, 1), MAD = mean |x_{f+1} - x_f| over pixels outside
                      the (1-px dilated) detected object in both frames: background stability.
Summaries: adherence = mean(color, shape, direction); overall = mean of the nine scores above.
Like VBench, smoothness and the subject scores do not penalize a static video; read them with
dynamic_degree.

The verdict view ranks answers, where the VBench-like view above only describes them. The caption (and in
TI2V the first frame) fixes the answer, so a video is compared with it, and a factor it gets wrong cannot be
bought back by crisp pixels:
  gates     each 1 if passed, else 0:
              gate_color      c*_s is the stated color and c*_e the stated end color (the stated color when
                              no change is stated);
              gate_shape      the detected shape is the stated one;
              gate_direction  q >= 0.5 and <v, u> / |v| >= cos 45 degrees (a frozen video fails);
              gate_speed      ||v| - v0| <= v0 / 3 (the other speed word, half or double, fails);
  fidelity  clamp(1 - RMS(x - g) / 0.25, 0, 1), g = the unique answer: in TI2V the clean render of the factors
            (the first frame fixes the start); in T2V, where the start is free, the stated object (shape, color,
            color change) over b along the stated velocity, p0 + f v0 u, with p0 = mean_f (p_f - f v0 u) over
            the frames showing the object (the least-squares start; the stated start where none does);
  correct   1 if every gate passes, else 0;
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
    frame_colors,
    palette,
    render,
    render_at,
    render_background,
    shape_alpha,
    trajectory,
)

DIMENSIONS: tuple[str, ...] = (
    "color", "shape", "direction", "i2v_subject", "subject_consistency",
    "motion_smoothness", "dynamic_degree", "imaging_quality", "temporal_flicker",
)
GATES: tuple[str, ...] = ("gate_color", "gate_shape", "gate_direction", "gate_speed")
VERDICT: tuple[str, ...] = ("fidelity", "correct", "faithful")
COLUMNS: tuple[str, ...] = DIMENSIONS + ("adherence", "overall") + GATES + VERDICT


@dataclass(frozen=True)
class EvalSpec:
    foreground_fraction: float = 0.5  # of color_level: foreground = object coverage above ~1/2
    alpha_floor: float = 0.2  # coverage below this is background noise, not object
    presence_area: float = 16.0  # px of coverage for a frame to show the object
    # Coarse-to-fine (radius, step) px grids around the centroid for the best shape fit: +-1.5 px reach at
    # 1/32 px precision (fine enough for a T2V ground truth's fitted start to score fidelity > 0.99) for 61
    # instead of 9025 template renders.
    search_rounds: tuple[tuple[float, float], ...] = ((1.0, 0.5), (0.25, 0.25), (0.125, 0.125), (0.0625, 0.0625),
                                                      (0.03125, 0.03125))
    patch_half: int = 9  # px; covers the largest support extent (the triangle's apex, 9 px)
    quality_error_scale: float = 0.25  # RMS error (range 2) at which imaging quality reaches 0
    flicker_scale: float = 0.2  # mean abs background change at which temporal flicker reaches 0
    fidelity_error_scale: float = 0.25  # RMS error against the true render at which fidelity reaches 0
    direction_tolerance: float = math.cos(math.pi / 4)  # a motion within 45 degrees goes the stated way
    speed_tolerance: float = 1 / 3  # of the stated speed: the other speed word (half or double) fails
    min_presence: float = 0.5  # of frames: an object that vanishes has not gone anywhere


EVAL = EvalSpec()


@dataclass(frozen=True)
class ObjectEstimate:
    color: str  # palette color nearest the foreground median of frames [0, change_frame)
    median_rgb: torch.Tensor  # (3,)
    end_color: str  # palette color nearest the foreground median of frames [change_frame, F)
    end_median_rgb: torch.Tensor  # (3,)
    shape: str
    shape_iou: dict[str, float]
    positions: torch.Tensor  # (F, 2) centres of the detected shape
    present: torch.Tensor  # (F,) bool: the frame shows the object
    velocity: torch.Tensor  # (2,) px/frame, least squares over frames showing the object
    residual: float  # RMS px distance of those positions from the constant-velocity fit
    alpha: torch.Tensor  # (F, H, W) measured coverage a_f, with each frame's detected color

    @property
    def presence(self) -> float:
        """Fraction of frames showing the object."""
        return self.present.float().mean().item()


def _clamp01(x: float) -> float:
    return min(1.0, max(0.0, x))


def _foreground_color(video: torch.Tensor, background: torch.Tensor) -> torch.Tensor:
    """Per-channel median over the foreground pixels of `video` (3, F', H, W); the background's mean if none."""
    diff = video - background[:, None]
    mask = diff.abs().amax(0) > EVAL.foreground_fraction * TOY_WORLD.color_level
    if not mask.any():
        return background.mean(dim=(1, 2))
    return video.permute(1, 2, 3, 0)[mask].median(dim=0).values


def _nearest_color(rgb: torch.Tensor) -> str:
    return COLOR_NAMES[int(torch.cdist(rgb[None], palette()).argmin())]


def _coverage(video: torch.Tensor, background: torch.Tensor, rgb: torch.Tensor) -> torch.Tensor:
    """(F, H, W) object coverage, inverting x_f = (1 - a) b + a rgb_f along the rgb_f - b direction; rgb (F, 3)."""
    towards = rgb[:, :, None, None] - background[None]  # (F, 3, H, W)
    alpha = ((video.transpose(0, 1) - background[None]) * towards).sum(1) / (towards ** 2).sum(1)
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
    """Read colors (before and from the change frame), shape and trajectory of the object in `video` (3, F, H, W)."""
    video = video.detach().float().cpu().clamp(-1.0, 1.0)
    background = render_background(factors)
    change = TOY_WORLD.change_frame
    median = _foreground_color(video[:, :change], background)
    end_median = _foreground_color(video[:, change:], background)
    color, end_color = _nearest_color(median), _nearest_color(end_median)
    alpha = _coverage(video, background, frame_colors(color, end_color))
    centroids = _centroids(alpha)
    fits = {s: _fit_shape(alpha, s, centroids) for s in SHAPES}
    shape = max(SHAPES, key=lambda s: fits[s][0])
    positions = fits[shape][1]
    present = alpha.sum(dim=(1, 2)) >= EVAL.presence_area
    velocity, residual = _linear_fit(positions, present)
    return ObjectEstimate(color, median, end_color, end_median, shape, {s: fits[s][0] for s in SHAPES},
                          positions, present, velocity, residual, alpha)


def _patches(image: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """(F, C*(2k+1)^2) bilinear crops of image (C, F, H, W) centred on positions (F, 2)."""
    k = EVAL.patch_half
    offsets = torch.arange(-k, k + 1, dtype=torch.float32)
    xs = positions[:, 0, None] + offsets  # (F, S)
    ys = positions[:, 1, None] + offsets
    # grid_sample with align_corners=False maps pixel-centre coordinate u to 2u/size - 1.
    gx = (2 * xs / TOY_WORLD.width - 1)[:, None, :].expand(-1, len(offsets), -1)
    gy = (2 * ys / TOY_WORLD.height - 1)[:, :, None].expand(-1, -1, len(offsets))
    grid = torch.stack([gx, gy], -1)
    crops = F.grid_sample(image.permute(1, 0, 2, 3), grid, mode="bilinear", padding_mode="zeros", align_corners=False)
    return crops.flatten(1)


def _appearance_similarity(a: torch.Tensor, b: torch.Tensor) -> float:
    denominator = (a.pow(2).sum() + b.pow(2).sum()).item()
    if denominator == 0.0:
        return 0.0
    return _clamp01(2 * (a * b).sum().item() / denominator)  # <= 1 up to rounding


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


def evaluate_video(video: torch.Tensor, factors: Factors, t2v: bool = False) -> dict[str, float]:
    """Scores of one video (3, F, H, W) in [-1, 1] generated for `factors` (from the caption alone if `t2v`, else
    from the caption and the first frame); keys COLUMNS."""
    expected = (3, TOY_WORLD.frames, TOY_WORLD.height, TOY_WORLD.width)
    if tuple(video.shape) != expected:
        raise ValueError(f"video must have shape {expected}, got {tuple(video.shape)}")
    with _single_threaded():
        return _scores(video.detach().float().cpu().clamp(-1.0, 1.0), factors, t2v)


def _stated_end_color(factors: Factors) -> str:
    return factors.end_color or factors.color


def _color_score(median: torch.Tensor, target: str) -> float:
    separation = torch.pdist(palette()).min().item()
    return _clamp01(1 - (median - color_rgb(target)).norm().item() / (separation / 2))


def _scores(video: torch.Tensor, factors: Factors, t2v: bool) -> dict[str, float]:
    est = estimate_object(video, factors)
    speed = factors.pixels_per_frame
    target = direction_vector(factors.direction)
    moved = est.velocity.norm().item()
    i2v_subject, subject_consistency = _subject_similarities(_patches(est.alpha[None], est.positions))
    clean = render_at(factors, est.shape, est.color, est.positions, est.end_color)
    background_change = _background_change(video, shape_alpha(est.shape, est.positions))
    scores = {
        "color": (_color_score(est.median_rgb, factors.color)
                  + _color_score(est.end_median_rgb, _stated_end_color(factors))) / 2,
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
    passed = gates(est, factors)
    scores.update({f"gate_{name}": float(ok) for name, ok in passed.items()})
    return {**scores, **_verdict(video, factors, est, all(passed.values()), t2v)}


def gates(est: ObjectEstimate, factors: Factors) -> dict[str, bool]:
    """Each stated factor the video must get right for its answer to count (keys: GATES without `gate_`)."""
    moved = est.velocity.norm().item()
    speed = factors.pixels_per_frame
    heading = (est.velocity @ direction_vector(factors.direction)).item() / moved if moved > 0 else -1.0
    return {"color": est.color == factors.color and est.end_color == _stated_end_color(factors),
            "shape": est.shape == factors.shape,
            "direction": est.presence >= EVAL.min_presence and heading >= EVAL.direction_tolerance,
            "speed": abs(moved - speed) <= EVAL.speed_tolerance * speed}


def expected_video(factors: Factors, est: ObjectEstimate, t2v: bool = False) -> torch.Tensor:
    """The unique right video (3, F, H, W): the render of the factors in TI2V; in T2V the same object along the
    stated velocity from the least-squares start to the detected positions of the frames showing the object."""
    if not t2v or not bool(est.present.any()):
        return render(factors)
    offsets = trajectory(factors) - trajectory(factors)[:1]  # f * v0 * u
    start = (est.positions - offsets)[est.present].mean(0)
    return render_at(factors, factors.shape, factors.color, trajectory(factors, start), factors.end_color)


def _verdict(video: torch.Tensor, factors: Factors, est: ObjectEstimate, correct: bool,
             t2v: bool) -> dict[str, float]:
    error = (video - expected_video(factors, est, t2v)).pow(2).mean().sqrt().item()
    fidelity = _clamp01(1 - error / EVAL.fidelity_error_scale)
    return {"fidelity": fidelity, "correct": float(correct), "faithful": float(correct) * fidelity}


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


def evaluate_batch(videos: torch.Tensor | Sequence[torch.Tensor], factors_list: Sequence[Factors],
                   t2v: bool = False) -> EvalTable:
    """Score (B, 3, F, H, W) videos (or a list of (3, F, H, W)) against their factors (T2V answers if `t2v`)."""
    if len(videos) != len(factors_list):
        raise ValueError(f"{len(videos)} videos but {len(factors_list)} factors")
    if len(factors_list) == 0:
        raise ValueError("evaluate_batch needs at least one video")
    rows = [evaluate_video(v, f, t2v) for v, f in zip(videos, factors_list)]
    return EvalTable([caption(f) for f in factors_list], rows)
