"""The toy world: synthetic videos whose generating factors are known exactly.

One soft-edged object (color x shape) slides at constant velocity in one of four directions, slowly or
quickly, over a plain or softly textured background, and half the time turns another color from frame
`change_frame` on. Every factor is stated in the caption, so a generated video can be scored against the
factors that produced its caption (see `fastlightgen.toy.evaluate`). Direction, speed and the color change
are in the caption only: a given first frame (TI2V) cannot show them, so a model must read them from the text;
without a first frame (T2V) color and shape come from the text too.

Geometry convention: positions are (x, y) in pixels with pixel (row i, column j) centred at
(j + 0.5, i + 0.5); "up" is decreasing y. A shape's position is its area centroid.
"""
from __future__ import annotations

import hashlib
import math
import random
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from functools import lru_cache

import torch


@dataclass(frozen=True)
class ToyWorldSpec:
    frames: int = 6
    height: int = 32
    width: int = 32
    edge_width: float = 1.5  # px over which alpha ramps 1 -> 0 (anti-aliasing)
    circle_radius: float = 6.5
    square_half: float = 5.75  # same area as the circle, so size does not give the shape away
    triangle_side: float = 13.0
    color_level: float = 0.8  # palette channels are +-level: saturated yet unclipped
    background_level: float = 0.0  # mid gray in [-1, 1]
    texture_amplitude: float = 0.1  # far below color_level, so texture never reads as object
    texture_period: tuple[float, float] = (6.0, 12.0)  # px, range sampled per video
    change_frame: int = 3  # a clip that turns another color shows it from this frame on
    change_probability: float = 0.5


TOY_WORLD = ToyWorldSpec()

# Vocabulary. Order matters: indices define the fixed train/held-out split.
COLOR_NAMES: tuple[str, ...] = ("red", "green", "blue", "yellow", "magenta", "cyan")
_COLOR_SIGNS: dict[str, tuple[int, int, int]] = {
    "red": (1, -1, -1), "green": (-1, 1, -1), "blue": (-1, -1, 1),
    "yellow": (1, 1, -1), "magenta": (1, -1, 1), "cyan": (-1, 1, 1),
}
SHAPES: tuple[str, ...] = ("circle", "square", "triangle")
DIRECTIONS: dict[str, tuple[float, float]] = {"left": (-1.0, 0.0), "right": (1.0, 0.0), "up": (0.0, -1.0),
                                              "down": (0.0, 1.0)}
# px per frame; two to one, so the scorer's speed gate (a third) tells them apart and "slowly" is the
# half-speed answer distilled models are blamed for.
SPEEDS: dict[str, float] = {"slowly": 1.5, "quickly": 3.0}
BACKGROUNDS: tuple[str, ...] = ("plain", "textured")
SPLITS: tuple[str, ...] = ("train", "heldout")

Combination = tuple[str, str, str]  # (color, shape, direction)


@dataclass(frozen=True)
class Texture:
    """Soft sinusoidal stripes: angle (rad) of the wave vector, period (px), phase (rad)."""
    angle: float
    period: float
    phase: float


@dataclass(frozen=True)
class Factors:
    color: str
    shape: str
    direction: str
    background: str
    start: tuple[float, float]  # (x, y) of the shape's centroid in frame 0
    texture: Texture | None = None  # set iff background == "textured"
    speed: str = "quickly"
    end_color: str | None = None  # the color from TOY_WORLD.change_frame on; None: no change

    @property
    def combination(self) -> Combination:
        return (self.color, self.shape, self.direction)

    @property
    def pixels_per_frame(self) -> float:
        return SPEEDS[self.speed]


def color_rgb(color: str) -> torch.Tensor:
    return torch.tensor(_COLOR_SIGNS[color], dtype=torch.float32) * TOY_WORLD.color_level


def palette() -> torch.Tensor:
    """(6, 3) RGB of COLOR_NAMES, in order."""
    return torch.stack([color_rgb(c) for c in COLOR_NAMES])


def direction_vector(direction: str) -> torch.Tensor:
    return torch.tensor(DIRECTIONS[direction], dtype=torch.float32)


# ---------------------------------------------------------------- combinations and split

def all_combinations() -> list[Combination]:
    return [(c, s, d) for c in COLOR_NAMES for s in SHAPES for d in DIRECTIONS]


def _is_heldout(combo: Combination) -> bool:
    # (c + 2s + 3d) mod 6 == 0 picks exactly one color per (shape, direction): 12 of 72 held out,
    # each color twice, each shape 4x, each direction 3x, and every pair of factor values
    # still co-occurs in training, so held-out cells test pure compositional generalization.
    c, s, d = COLOR_NAMES.index(combo[0]), SHAPES.index(combo[1]), list(DIRECTIONS).index(combo[2])
    return (c + 2 * s + 3 * d) % 6 == 0


def train_combinations() -> list[Combination]:
    return [k for k in all_combinations() if not _is_heldout(k)]


def heldout_combinations() -> list[Combination]:
    return [k for k in all_combinations() if _is_heldout(k)]


def split_combinations(split: str) -> list[Combination]:
    if split == "train":
        return train_combinations()
    if split == "heldout":
        return heldout_combinations()
    raise ValueError(f"split must be one of {SPLITS}, got {split!r}")


# ---------------------------------------------------------------- sampling

def shape_extent(shape: str) -> tuple[float, float, float, float]:
    """Distances (left, right, top, bottom) from the centroid to the edge of the shape's
    anti-aliased support (where alpha reaches 0), i.e. the shape grown by half an edge width."""
    grow = TOY_WORLD.edge_width / 2
    if shape == "circle":
        return (TOY_WORLD.circle_radius + grow,) * 4
    if shape == "square":
        return (TOY_WORLD.square_half + grow,) * 4
    if shape == "triangle":
        # Growing every edge of an equilateral triangle by `grow` grows its inradius by `grow`;
        # the circumradius (apex) is twice the inradius.
        inradius = TOY_WORLD.triangle_side / (2 * math.sqrt(3)) + grow
        half_width = inradius * math.sqrt(3)
        return (half_width, half_width, 2 * inradius, inradius)
    raise ValueError(f"unknown shape {shape!r}; expected one of {SHAPES}")


def _start_range(low_extent: float, high_extent: float, size: int, travel: float) -> tuple[float, float]:
    """Start coordinates on one axis keeping the support inside [0, size] while moving `travel`."""
    return (low_extent + max(0.0, -travel), size - high_extent - max(0.0, travel))


def sample_factors(seed: int, combinations: Sequence[Combination] | None = None,
                   backgrounds: Sequence[str] = BACKGROUNDS) -> Factors:
    """Factors drawn deterministically from `seed`; the combination from `combinations` (default all 72),
    speed, color change and start position free."""
    w = TOY_WORLD
    rng = random.Random(seed)
    color, shape, direction = rng.choice(list(combinations) if combinations is not None else all_combinations())
    background = rng.choice(list(backgrounds))
    speed = rng.choice(list(SPEEDS))
    end_color = rng.choice([c for c in COLOR_NAMES if c != color]) if rng.random() < w.change_probability else None
    start = sample_start(rng, shape, direction, speed)
    texture = sample_texture(rng) if background == "textured" else None
    return Factors(color, shape, direction, background, start, texture, speed, end_color)


def sample_start(rng: random.Random, shape: str, direction: str, speed: str) -> tuple[float, float]:
    """A start (x, y) keeping the object's support inside the frame over the whole clip."""
    w = TOY_WORLD
    left, right, top, bottom = shape_extent(shape)
    dx, dy = DIRECTIONS[direction]
    travel = SPEEDS[speed] * (w.frames - 1)
    return (rng.uniform(*_start_range(left, right, w.width, dx * travel)),
            rng.uniform(*_start_range(top, bottom, w.height, dy * travel)))


def sample_texture(rng: random.Random) -> Texture:
    return Texture(angle=rng.uniform(0, math.pi), period=rng.uniform(*TOY_WORLD.texture_period),
                   phase=rng.uniform(0, 2 * math.pi))


def trajectory(factors: Factors, start: torch.Tensor | None = None) -> torch.Tensor:
    """(F, 2) centroid positions at constant velocity, from `start` (default the factors' own)."""
    t = torch.arange(TOY_WORLD.frames, dtype=torch.float32)[:, None]
    origin = torch.tensor(factors.start) if start is None else start
    return origin + t * factors.pixels_per_frame * direction_vector(factors.direction)


def frame_colors(color: str, end_color: str | None) -> torch.Tensor:
    """(F, 3) RGB of the object in each frame: `color`, then `end_color` from the change frame on."""
    colors = color_rgb(color).expand(TOY_WORLD.frames, -1).clone()
    if end_color is not None:
        colors[TOY_WORLD.change_frame:] = color_rgb(end_color)
    return colors


def caption(factors: Factors) -> str:
    change = f" and turning {factors.end_color}" if factors.end_color else ""
    return (f"a {factors.color} {factors.shape} moving {factors.direction} {factors.speed}{change} "
            f"on a {factors.background} background")


# ---------------------------------------------------------------- rendering

@lru_cache(maxsize=1)
def pixel_grid() -> tuple[torch.Tensor, torch.Tensor]:
    """(H, W) x and y coordinates of pixel centres."""
    ys, xs = torch.meshgrid(torch.arange(TOY_WORLD.height) + 0.5, torch.arange(TOY_WORLD.width) + 0.5, indexing="ij")
    return xs, ys


def _signed_distance(shape: str, dx: torch.Tensor, dy: torch.Tensor) -> torch.Tensor:
    """Signed distance (negative inside) to a shape centred (by centroid) at the origin."""
    w = TOY_WORLD
    if shape == "circle":
        return torch.sqrt(dx ** 2 + dy ** 2) - w.circle_radius
    if shape == "square":
        return torch.maximum(dx.abs(), dy.abs()) - w.square_half
    if shape == "triangle":
        # Apex up. Max over the three edge half-planes; outward normals 120 degrees apart,
        # each edge at the inradius (half the circumradius) from the centroid.
        inradius = w.triangle_side / (2 * math.sqrt(3))
        s = math.sqrt(3) / 2
        return torch.maximum(torch.maximum(dy, s * dx - 0.5 * dy), -s * dx - 0.5 * dy) - inradius
    raise ValueError(f"unknown shape {shape!r}; expected one of {SHAPES}")


def shape_alpha(shape: str, centers: torch.Tensor) -> torch.Tensor:
    """Anti-aliased coverage of `shape` centred at `centers` (..., 2) -> (..., H, W) in [0, 1]."""
    xs, ys = pixel_grid()
    dx = xs - centers[..., 0, None, None]
    dy = ys - centers[..., 1, None, None]
    return (0.5 - _signed_distance(shape, dx, dy) / TOY_WORLD.edge_width).clamp(0.0, 1.0)


def render_background(factors: Factors) -> torch.Tensor:
    """(3, H, W) static background."""
    w = TOY_WORLD
    base = torch.full((w.height, w.width), w.background_level)
    if factors.background == "textured":
        tex = factors.texture
        xs, ys = pixel_grid()
        along = xs * math.cos(tex.angle) + ys * math.sin(tex.angle)
        base = base + w.texture_amplitude * torch.sin(2 * math.pi * along / tex.period + tex.phase)
    elif factors.background != "plain":
        raise ValueError(f"unknown background {factors.background!r}; expected one of {BACKGROUNDS}")
    return base.expand(3, -1, -1).clone()


def composite(background: torch.Tensor, alpha: torch.Tensor, rgb: torch.Tensor) -> torch.Tensor:
    """Object of colours `rgb` (F, 3) with coverage `alpha` (F, H, W) over `background` (3, H, W) -> (3, F, H, W)."""
    a = alpha[None]
    return (1 - a) * background[:, None] + a * rgb.T[:, :, None, None]


def render_at(factors: Factors, shape: str, color: str, centers: torch.Tensor,
              end_color: str | None = None) -> torch.Tensor:
    """Clean video of `shape` in `color` (turning `end_color`) at per-frame `centers` (F, 2) over the factors'
    background."""
    return composite(render_background(factors), shape_alpha(shape, centers), frame_colors(color, end_color))


def render(factors: Factors) -> torch.Tensor:
    """(3, F, H, W) video in [-1, 1]."""
    return render_at(factors, factors.shape, factors.color, trajectory(factors), factors.end_color)


# ---------------------------------------------------------------- datasets

def _item_seed(seed: int, index: int) -> int:
    # Stable across processes (unlike hash()) and free of collisions between (seed, index) pairs.
    return int.from_bytes(hashlib.sha256(f"{seed}:{index}".encode()).digest()[:8], "little")


def dataset(split: str, n: int, seed: int, backgrounds: Sequence[str] = BACKGROUNDS
            ) -> Iterator[tuple[torch.Tensor, str, Factors]]:
    """n deterministic (video (3, F, H, W), caption, factors) drawn from the split's combinations."""
    combos = split_combinations(split)
    for i in range(n):
        factors = sample_factors(_item_seed(seed, i), combos, backgrounds)
        yield render(factors), caption(factors), factors


@dataclass(frozen=True)
class ToyBatch:
    videos: torch.Tensor  # (B, 3, F, H, W)
    captions: list[str]
    factors: list[Factors]


def make_batch(split: str, size: int, seed: int, backgrounds: Sequence[str] = BACKGROUNDS) -> ToyBatch:
    """A training batch; use a different seed per step for fresh samples."""
    videos, captions, factors = zip(*dataset(split, size, seed, backgrounds))
    return ToyBatch(torch.stack(videos), list(captions), list(factors))
