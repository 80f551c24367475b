"""The sanity table: known answers, right and wrong, scored on the report's own prompts (TI2V or T2V).

A scorer is fit to rank models only if it ranks these correctly: the ground truth above the teacher, and
the teacher above every wrong answer and every near miss, by a stated margin. Each crisp wrong answer gets
exactly one stated factor wrong (its gate fails), so the table's gate columns show the scorer reading every
factor. A near miss is wrong by less: the color change one frame off, a drift of 30 or 45 degrees, a speed
between the two speed words, and (TI2V) the caption read without a model, the given frame shifted by whole
pixels and recolored; each is scored only on the prompts where it differs from the ground truth. The no-model
trick that ignores speed and color words is listed apart: not a wrong answer but a shortcut; where it reaches
the ground truth the world is too easy to tell models apart.
"""
from __future__ import annotations

from typing import Callable

import torch

from fastlightgen.toy.evaluate import GATES, EvalTable, evaluate_batch
from fastlightgen.toy.prompts import Prompts
from fastlightgen.toy.world import (
    COLOR_NAMES,
    SHAPES,
    SPEEDS,
    TOY_WORLD,
    Factors,
    composite,
    direction_vector,
    frame_colors,
    render,
    render_at,
    render_background,
    shape_alpha,
    trajectory,
)

Answer = Callable[[Factors, torch.Generator], torch.Tensor]  # (3, F, H, W) in [-1, 1]

# The primary score must separate the teacher from every wrong answer by at least this much.
SANITY_MARGIN = 0.1


def _other_color(factors: Factors, avoid: tuple[str | None, ...]) -> str:
    """The first palette color after the stated one that is none of `avoid`."""
    i = COLOR_NAMES.index(factors.color)
    return next(c for c in COLOR_NAMES[i + 1:] + COLOR_NAMES[:i] if c not in avoid)


def ground_truth(factors: Factors, g: torch.Generator) -> torch.Tensor:
    return render(factors)


def shifted_first_frame(factors: Factors, g: torch.Generator) -> torch.Tensor:
    """No model: the first frame, translated (with wrap-around) along the caption's direction at the quick speed,
    ignoring speed words and color changes."""
    first = render(factors)[:, 0]
    dx, dy = (direction_vector(factors.direction) * max(SPEEDS.values())).round().long().tolist()
    return torch.stack([first.roll((t * dy, t * dx), dims=(1, 2)) for t in range(TOY_WORLD.frames)], dim=1)


def copied_first_frame(factors: Factors, g: torch.Generator) -> torch.Tensor:
    return render(factors)[:, :1].expand(-1, TOY_WORLD.frames, -1, -1).clone()


def wrong_direction(factors: Factors, g: torch.Generator) -> torch.Tensor:
    """The right object played backwards: crisp, in frame, moving the opposite way (the color change kept in
    time order)."""
    return render_at(factors, factors.shape, factors.color, trajectory(factors).flip(0), factors.end_color)


def wrong_speed(factors: Factors, g: torch.Generator) -> torch.Tensor:
    """The right object at the other speed word's speed, from the same start: "quickly" at half speed (the slow
    motion distilled models are blamed for), "slowly" at double speed."""
    path = trajectory(factors)
    other = next(v for word, v in SPEEDS.items() if word != factors.speed)
    scale = other / factors.pixels_per_frame
    return render_at(factors, factors.shape, factors.color, path[:1] + (path - path[:1]) * scale, factors.end_color)


def wrong_color_change(factors: Factors, g: torch.Generator) -> torch.Tensor:
    """The right motion, the color change wrong: a stated change ignored, or where none is stated, a turn to the
    next palette color."""
    end = None if factors.end_color else _other_color(factors, ())
    return render_at(factors, factors.shape, factors.color, trajectory(factors), end)


def wrong_color(factors: Factors, g: torch.Generator) -> torch.Tensor:
    """The right motion and change, another start color: the next palette color that is not the stated end color
    (held throughout where no change is stated)."""
    color = _other_color(factors, (factors.end_color,))
    return render_at(factors, factors.shape, color, trajectory(factors), factors.end_color)


def wrong_shape(factors: Factors, g: torch.Generator) -> torch.Tensor:
    """The right motion and colors, the next shape."""
    shape = SHAPES[(SHAPES.index(factors.shape) + 1) % len(SHAPES)]
    return render_at(factors, shape, factors.color, trajectory(factors), factors.end_color)


def noise(factors: Factors, g: torch.Generator) -> torch.Tensor:
    return torch.rand((3, TOY_WORLD.frames, TOY_WORLD.height, TOY_WORLD.width), generator=g) * 2 - 1


def _change_moved(frames: int) -> Answer:
    """The stated color change `frames` frames late (early where negative), all else right."""
    def answer(factors: Factors, g: torch.Generator) -> torch.Tensor:
        colors = frame_colors(factors.color, None)
        colors[TOY_WORLD.change_frame + frames:] = frame_colors(factors.end_color, None)[0]
        return composite(render_background(factors), shape_alpha(factors.shape, trajectory(factors)), colors)
    return answer


def _drift(degrees: float) -> Answer:
    """The right object at the stated speed, its heading turned `degrees` towards the frame's centre."""
    def answer(factors: Factors, g: torch.Generator) -> torch.Tensor:
        u = direction_vector(factors.direction)
        side = torch.tensor([-u[1], u[0]])
        centre = torch.tensor([TOY_WORLD.width / 2, TOY_WORLD.height / 2])
        side = side if (centre - torch.tensor(factors.start)) @ side >= 0 else -side
        turn = torch.deg2rad(torch.tensor(degrees))
        return _along(factors, factors.pixels_per_frame * (torch.cos(turn) * u + torch.sin(turn) * side))
    return answer


def speed_between_words(factors: Factors, g: torch.Generator) -> torch.Tensor:
    """The right object the stated way at the mean of the two speed words (2.25 px/frame)."""
    return _along(factors, sum(SPEEDS.values()) / len(SPEEDS) * direction_vector(factors.direction))


def _along(factors: Factors, velocity: torch.Tensor) -> torch.Tensor:
    """The stated object and colors from the stated start at a constant `velocity` (px/frame)."""
    path = torch.tensor(factors.start) + torch.arange(TOY_WORLD.frames, dtype=torch.float32)[:, None] * velocity
    return render_at(factors, factors.shape, factors.color, path, factors.end_color)


def caption_shift_recolor(factors: Factors, g: torch.Generator) -> torch.Tensor:
    """No model, the caption read: the given first frame rolled by whole pixels along the stated velocity, and
    from the change frame on its object recolored (its coverage read against the plain gray a solver assumes)."""
    first = render(factors)[:, 0]
    start_rgb = frame_colors(factors.color, None)[0]
    towards = (start_rgb - TOY_WORLD.background_level)[:, None, None]
    coverage = (((first - TOY_WORLD.background_level) * towards).sum(0) / towards.pow(2).sum()).clamp(0, 1)
    path = trajectory(factors)
    frames = []
    for f, rgb in enumerate(frame_colors(factors.color, factors.end_color)):
        dx, dy = (path[f] - path[0]).round().long().tolist()
        frames.append((first + coverage * (rgb - start_rgb)[:, None, None]).roll((dy, dx), dims=(1, 2)))
    return torch.stack(frames, dim=1)


WRONG_ANSWERS: dict[str, Answer] = {
    "copy first frame": copied_first_frame, "wrong direction": wrong_direction,
    "wrong speed (the other speed word)": wrong_speed, "wrong color change": wrong_color_change,
    "wrong color": wrong_color, "wrong shape": wrong_shape, "noise": noise,
}
SHORTCUT = ("no model: first frame shifted along the caption", shifted_first_frame)


def _states_change(factors: Factors) -> bool:
    return factors.end_color is not None


def _not_whole_pixel_steps(factors: Factors) -> bool:
    """Where whole-pixel shifts and a recolor of the given frame differ from the ground truth: a textured
    background (it moves with the object) or a sub-pixel step (1.5 px/frame)."""
    return factors.background != "plain" or factors.pixels_per_frame % 1 != 0


# name -> (answer, the prompts on which it is a near miss rather than the ground truth itself; None: all)
NearMiss = tuple[Answer, Callable[[Factors], bool] | None]
NEAR_MISSES: dict[str, NearMiss] = {
    "near miss: color change one frame early": (_change_moved(-1), _states_change),
    "near miss: color change one frame late": (_change_moved(1), _states_change),
    "near miss: 30-degree drift": (_drift(30.0), None),
    "near miss: 45-degree drift": (_drift(45.0), None),
    "near miss: speed between the words (2.25 px/frame)": (speed_between_words, None),
}
TI2V_NEAR_MISSES: dict[str, NearMiss] = {
    "near miss, no model: caption read, first frame shifted by whole pixels and recolored":
        (caption_shift_recolor, _not_whole_pixel_steps),
}


def near_misses(t2v: bool) -> dict[str, NearMiss]:
    """The mode's near misses: the whole-pixel solver needs a given first frame, so TI2V only."""
    return NEAR_MISSES if t2v else {**NEAR_MISSES, **TI2V_NEAR_MISSES}


class SanityRows(dict):
    """The sanity table's rows (answer -> EvalTable) in the order the scorer must rank them, and the prompts'
    mode ("TI2V" or "T2V")."""

    def __init__(self, rows: dict[str, EvalTable], mode: str):
        super().__init__(rows)
        self.mode = mode


def answer_table(answer: Answer, prompts: Prompts, seed: int = 0) -> EvalTable:
    g = torch.Generator().manual_seed(seed)
    return evaluate_batch(torch.stack([answer(f, g) for f in prompts.factors]), list(prompts.factors), t2v=prompts.t2v)


def sanity_rows(prompts: Prompts, teacher: EvalTable, seed: int = 0) -> SanityRows:
    """Every row of the table, in the order the scorer must rank them (the shortcut last, unranked). `teacher` must
    be scored in the prompts' mode (`evaluate_batch(..., t2v=prompts.t2v)`)."""
    rows = {"ground truth": answer_table(ground_truth, prompts, seed), "teacher": teacher}
    rows.update({name: answer_table(answer, prompts, seed) for name, answer in WRONG_ANSWERS.items()})
    for name, (answer, applies) in near_misses(prompts.t2v).items():
        where = Prompts(tuple(f for f in prompts.factors if applies is None or applies(f)), prompts.t2v)
        if where.factors:
            rows[name] = answer_table(answer, where, seed)
    rows[SHORTCUT[0]] = answer_table(SHORTCUT[1], prompts, seed)
    return SanityRows(rows, prompts.mode)


def ranked_below_teacher(rows: dict[str, EvalTable]) -> list[str]:
    """The rows the teacher must clear: every wrong answer and every near miss present."""
    return [name for name in rows if name in WRONG_ANSWERS or name in NEAR_MISSES or name in TI2V_NEAR_MISSES]


def ordering_holds(rows: dict[str, EvalTable], score: str = "faithful", margin: float = SANITY_MARGIN) -> bool:
    means = {name: table.mean()[score] for name, table in rows.items()}
    wrong = [means[name] for name in ranked_below_teacher(rows)]
    return means["ground truth"] > means["teacher"] and all(means["teacher"] - w >= margin for w in wrong)


SANITY_COLUMNS: tuple[str, ...] = ("faithful", "correct") + GATES + ("fidelity", "overall")


def sanity_markdown(rows: SanityRows, columns: tuple[str, ...] = SANITY_COLUMNS) -> str:
    """The table titled with its mode; the gate columns are per-factor accuracies."""
    lines = [f"**Sanity table, {rows.mode}**", "", "| answer | videos | " + " | ".join(columns) + " |",
             "|---" * (len(columns) + 2) + "|"]
    for name, table in rows.items():
        mean = table.mean()
        lines.append(f"| {name} | {len(table.rows)} | " + " | ".join(f"{mean[c]:.3f}" for c in columns) + " |")
    verdict = "holds" if ordering_holds(rows) else "FAILS"
    return "\n".join(lines) + (f"\n\nRequired: ground truth > teacher > every wrong answer and near miss by >= "
                               f"{SANITY_MARGIN} on `faithful`: the ordering **{verdict}**.")
