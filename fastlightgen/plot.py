"""The Stage I importance chart, drawn once for the training run's importance.png and the ComfyUI node.

Drawn with Pillow, which ComfyUI itself requires: the pack may import only what ComfyUI's requirements and
ours provide, so no plotting library.
"""
from __future__ import annotations

from PIL import Image, ImageDraw, ImageFont

from .importance import ImportanceResult
from .plan import PrunePlan

KEPT_COLOR, DROPPED_COLOR, REFERENCE_COLOR = (31, 119, 180), (214, 39, 40), (110, 110, 110)
LEFT, RIGHT, TOP, BOTTOM = 80, 20, 36, 48  # margins around the plotting area, pixels
HEIGHT = 360


def importance_chart(result: ImportanceResult, plan: PrunePlan, title: str = "Stage I block importance") -> Image.Image:
    """Each block's score as a bar, kept and dropped blocks in two colours, the full model's error dashed."""
    n = len(result.scores)
    width = max(800, LEFT + RIGHT + 25 * n)
    image = Image.new("RGB", (width, HEIGHT), "white")
    draw, font = ImageDraw.Draw(image), ImageFont.load_default()
    x0, x1, y0, y1 = LEFT, width - RIGHT, TOP, HEIGHT - BOTTOM
    top = 1.1 * max([*result.scores, result.reference_error, 1e-12])

    def y(value: float) -> float:
        return y1 - (y1 - y0) * max(value, 0.0) / top

    slot, kept = (x1 - x0) / n, set(plan.kept)
    for i, score in enumerate(result.scores):
        left = x0 + slot * (i + 0.1)
        draw.rectangle([left, y(score), left + 0.8 * slot, y1], fill=KEPT_COLOR if i in kept else DROPPED_COLOR)
        _centered(draw, font, x0 + slot * (i + 0.5), y1 + 4, str(i))
    for k in range(5):  # value ticks
        value = top * k / 4
        draw.line([x0 - 4, y(value), x0, y(value)], fill="black")
        draw.text((4, y(value) - 6), f"{value:.3g}", fill="black", font=font)
    ref = y(result.reference_error)
    for start in range(x0, x1, 12):
        draw.line([start, ref, min(start + 6, x1), ref], fill=REFERENCE_COLOR, width=2)
    draw.line([x0, y0, x0, y1, x1, y1], fill="black")
    _centered(draw, font, (x0 + x1) / 2, 8, f"{title} ({result.num_samples} draws): x0 error with the block skipped")
    _centered(draw, font, (x0 + x1) / 2, HEIGHT - 20, "block")
    legend = [(REFERENCE_COLOR, "full model (dashed)"), (KEPT_COLOR, f"kept ({len(plan.kept)})"),
              (DROPPED_COLOR, f"dropped ({len(plan.dropped)})")]
    draw.rectangle([x1 - 156, y0, x1 - 4, y0 + 8 + 16 * len(legend)], fill="white", outline=REFERENCE_COLOR)
    for row, (color, label) in enumerate(legend):
        top_y = y0 + 4 + 16 * row
        draw.rectangle([x1 - 150, top_y, x1 - 138, top_y + 10], fill=color)
        draw.text((x1 - 132, top_y - 1), label, fill="black", font=font)
    return image


def expert_charts(charts: dict[str, tuple[ImportanceResult, PrunePlan, tuple[float, float]]]) -> Image.Image:
    """A two-expert model's charts, one above the other, each titled with its expert and sigma range; each has
    its own value axis, as the experts' errors are measured on different parts of the schedule."""
    images = [importance_chart(result, plan, f"{name}-noise expert, sigma in [{low:.3g}, {high:.3g}]")
              for name, (result, plan, (low, high)) in charts.items()]
    out = Image.new("RGB", (max(i.width for i in images), sum(i.height for i in images)), "white")
    for k, image in enumerate(images):
        out.paste(image, (0, k * HEIGHT))
    return out


def _centered(draw: ImageDraw.ImageDraw, font, x: float, top: float, text: str) -> None:
    left, _, right, _ = draw.textbbox((0, 0), text, font=font)
    draw.text((x - (right - left) / 2, top), text, fill="black", font=font)
