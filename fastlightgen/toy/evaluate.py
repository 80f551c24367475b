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
              foreground: c = gray); frame f's own median c_f over its foreground pixels, snapped to c*_f;
  coverage    a_f = clamp(<x_f - b, c*_f - b> / |c*_f - b|^2, 0, 1), zeroed below 0.2 (exact inverse
              of the renderer's compositing for a clean video, whatever frame a color change shows in);
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
              gate_color      every frame showing the object has c*_f = the color stated for that frame (the
                              stated color before F_c, the stated end color from F_c on): a change one frame
                              early or late fails;
              gate_shape      the detected shape is the stated one;
              gate_direction  q >= 0.5 and the angle between v and u <= 15 degrees (a frozen video fails);
              gate_speed      |log2(|v| / v0)| <= 1/4, i.e. |v| within 0.84-1.19 v0: closer to the stated word
                              than to the other by a wide berth (2.25 px/frame, between the words, fails);
              gate_position   TI2V: frames 0 and 1 show the object and their step, the shift d that best maps
                              a_0 onto a_1 (registered on the coverage itself, 1/32 px, so a bias a soft video
                              puts into each frame's shape fit cancels), is within 0.25 px of v0 u: the motion
                              continues from the given first frame (always 1 in T2V, where nothing is given);
            Tolerances, from the ground truth's own spread (research/gate_spread.py on 120 training prompts,
            reports/toy/gate_spread_2026-12-05.md; the worst video of each): clean renders are off by at most
            0.11 degrees, 0.003 in log2 speed, 0.13 px in the step and 0 in color; blurred as softly as the
            teacher's TI2V videos on training prompts (sigma 1.5 px, fidelity 0.72) by 1.2 degrees, 0.045,
            0.10 px and 0.52 of the color margin (1 = half the palette's separation, where a frame snaps to
            another color); the worst of any variant (blur up to sigma 2 px, pixel noise up to std 0.1) is 2.8
            degrees, 0.075, 0.19 px and 0.64. The nearest near misses sit at 29.8 degrees (tolerance 15: half
            the 30-degree drift), 0.41 in log2 speed (2.25 px/frame against "quickly"; tolerance 0.25), 0.48 px
            (the whole-pixel solver at 1.5 px/frame; tolerance 0.25) and 2 color margins (tolerance 1: the
            nearest palette color).
  fidelity  clamp(1 - RMS(x - g) / 0.25, 0, 1), g = the unique answer: in TI2V the clean render of the factors
            (the first frame fixes the start); in T2V, where the start is free, the stated object (shape, color,
            color change) over b along the stated velocity, p0 + f v0 u, with p0 = mean_f (p_f - f v0 u) over
            the frames showing the object (the least-squares start; the stated start where none does);
  correct   1 if every gate passes, else 0;
  faithful  correct * fidelity: the primary score of a video.
Artifacts (token-grid patchwork, speckle halos) have no term of their own: fidelity's RMS error counts them
as it counts any other error of the same energy. Measured on training prompts (reports/toy/gate_spread_2026-12-05.md):
8-px blocks offset by up to +-0.05 (a seam of up to 0.1 between blocks, plainly visible on the gray background)
lower fidelity from 1.000 to 0.885; a speckle halo of std 0.1 in a 3-px ring, to 0.83; as much as a 1-px blur
(0.82). They pass every gate: an artifact costs fidelity, not correctness.
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
    trajectory,
)

DIMENSIONS: tuple[str, ...] = (
    "color", "shape", "direction", "i2v_subject", "subject_consistency",
    "motion_smoothness", "dynamic_degree", "imaging_quality", "temporal_flicker",
)
GATES: tuple[str, ...] = ("gate_color", "gate_shape", "gate_direction", "gate_speed", "gate_position")
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
    # The gates' tolerances: each far outside the ground truth's own spread and well inside its nearest near miss
    # (measured: reports/toy/gate_spread_2026-12-05.md, `python -m research.gate_spread`; the docstring says how).
    direction_degrees: float = 15.0  # half the 30-degree drift
    speed_log2_tolerance: float = 0.25  # |log2(|v| / v0)|: half the way from the stated word to the words' midpoint
    position_tolerance: float = 0.25  # px, TI2V frame 1's step: half the 0.5 px a whole-pixel shift is off at 1.5
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
    frame_rgb: torch.Tensor  # (F, 3) per frame, its own foreground median

    @property
    def frame_colors(self) -> tuple[str, ...]:
        """Per frame, the palette color nearest its own foreground median."""
        return tuple(_nearest_color(rgb) for rgb in self.frame_rgb)

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
    per_frame = torch.stack([_foreground_color(video[:, f:f + 1], background) for f in range(video.shape[1])])
    alpha = _coverage(video, background, palette()[[COLOR_NAMES.index(_nearest_color(c)) for c in per_frame]])
    centroids = _centroids(alpha)
    fits = {s: _fit_shape(alpha, s, centroids) for s in SHAPES}
    shape = max(SHAPES, key=lambda s: fits[s][0])
    positions = fits[shape][1]
    present = alpha.sum(dim=(1, 2)) >= EVAL.presence_area
    velocity, residual = _linear_fit(positions, present)
    return ObjectEstimate(color, median, end_color, end_median, shape, {s: fits[s][0] for s in SHAPES},
                          positions, present, velocity, residual, alpha, per_frame)


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
    passed = gates(est, factors, t2v)
    scores.update({f"gate_{name}": float(ok) for name, ok in passed.items()})
    return {**scores, **_verdict(video, factors, est, all(passed.values()), t2v)}


def gates(est: ObjectEstimate, factors: Factors, t2v: bool = False) -> dict[str, bool]:
    """Each stated factor the video must get right for its answer to count (keys: GATES without `gate_`)."""
    return {"color": _colors_in_time(est, factors),
            "shape": est.shape == factors.shape,
            "direction": est.presence >= EVAL.min_presence and heading_error(est, factors) <= EVAL.direction_degrees,
            "speed": speed_error(est, factors) <= EVAL.speed_log2_tolerance,
            "position": t2v or _continues_first_frame(est, factors)}


def heading_error(est: ObjectEstimate, factors: Factors) -> float:
    """Degrees between the fitted velocity and the stated direction (180 for a frozen video)."""
    moved = est.velocity.norm().item()
    if moved == 0:
        return 180.0
    cosine = (est.velocity @ direction_vector(factors.direction)).item() / moved
    return math.degrees(math.acos(min(1.0, max(-1.0, cosine))))


def speed_error(est: ObjectEstimate, factors: Factors) -> float:
    """|log2| of the fitted speed over the stated one (inf for a frozen video)."""
    moved = est.velocity.norm().item()
    return abs(math.log2(moved / factors.pixels_per_frame)) if moved > 0 else math.inf


def color_error(est: ObjectEstimate, factors: Factors) -> float:
    """The worst frame showing the object: its median's distance from the color stated for it, over half the
    palette's separation (above 1 the frame snaps to another color; 0 when no frame shows it)."""
    half = torch.pdist(palette()).min().item() / 2
    distances = [(rgb - color_rgb(frame_color_name(factors, f))).norm().item() / half
                 for f, (rgb, present) in enumerate(zip(est.frame_rgb, est.present.tolist())) if present]
    return max(distances, default=0.0)


def _colors_in_time(est: ObjectEstimate, factors: Factors) -> bool:
    """Every frame showing the object shows the color the caption states for that frame."""
    stated = [frame_color_name(factors, f) for f in range(TOY_WORLD.frames)]
    shown = [seen == want for seen, want, present in zip(est.frame_colors, stated, est.present.tolist()) if present]
    return bool(shown) and all(shown)


def frame_color_name(factors: Factors, frame: int) -> str:
    """The color the caption states for a frame: the start color, the end color from the change frame on."""
    return _stated_end_color(factors) if frame >= TOY_WORLD.change_frame else factors.color


def _continues_first_frame(est: ObjectEstimate, factors: Factors) -> bool:
    """TI2V: frame 1's object is one stated step from where the given first frame shows it."""
    return bool(est.present[:2].all()) and first_step_error(est, factors) <= EVAL.position_tolerance


def first_step_error(est: ObjectEstimate, factors: Factors) -> float:
    """Px between the step from frame 0 to frame 1, registered on the coverage itself, and the stated step."""
    stated = factors.pixels_per_frame * direction_vector(factors.direction)
    return (registered_step(est.alpha[0], est.alpha[1], est.positions[1] - est.positions[0]) - stated).norm().item()


def registered_step(first: torch.Tensor, second: torch.Tensor, guess: torch.Tensor) -> torch.Tensor:
    """The shift d (2,) px near `guess` that best maps coverage `first` (H, W) onto `second`, min over d of
    |second - first(. - d)|, coarse to fine. Registering a frame on the previous one compares like with like, so
    the bias a soft or textured video puts into each frame's shape fit cancels (a step from two shape fits drifts
    0.45 px on blurred ground truth)."""
    step = guess
    for radius, spacing in EVAL.search_rounds:
        candidates = step + _grid_offsets(radius, spacing)  # (K, 2)
        errors = (_shifted(first, candidates) - second).abs().sum((-2, -1))
        step = candidates[int(errors.argmin())]
    return step


def _shifted(image: torch.Tensor, shifts: torch.Tensor) -> torch.Tensor:
    """(K, H, W): `image` (H, W) moved by each shift (K, 2) px, bilinear, zeros outside."""
    xs, ys = torch.meshgrid(torch.arange(TOY_WORLD.width) + 0.5, torch.arange(TOY_WORLD.height) + 0.5, indexing="xy")
    gx = 2 * (xs[None] - shifts[:, 0, None, None]) / TOY_WORLD.width - 1
    gy = 2 * (ys[None] - shifts[:, 1, None, None]) / TOY_WORLD.height - 1
    grid = torch.stack([gx, gy], -1)
    return F.grid_sample(image.expand(len(shifts), 1, -1, -1), grid, mode="bilinear", padding_mode="zeros",
                         align_corners=False)[:, 0]


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
