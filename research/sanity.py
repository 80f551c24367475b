"""The sanity table: known answers, right and wrong, scored on the report's own prompts (TI2V or T2V).

A scorer is fit to rank models only if it ranks these correctly: the ground truth above the teacher, and
the teacher above every wrong answer, by a stated margin. Each crisp wrong answer gets exactly one stated factor
wrong (its gate fails), so the table's gate columns show the scorer reading every factor. The no-model trick
is listed apart: it is not a wrong answer but a shortcut, and where it reaches the ground truth the world is too
easy to tell models apart.
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
    direction_vector,
    render,
    render_at,
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


WRONG_ANSWERS: dict[str, Answer] = {
    "copy first frame": copied_first_frame, "wrong direction": wrong_direction,
    "wrong speed (the other speed word)": wrong_speed, "wrong color change": wrong_color_change,
    "wrong color": wrong_color, "wrong shape": wrong_shape, "noise": noise,
}
SHORTCUT = ("no model: first frame shifted along the caption", shifted_first_frame)


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
    rows[SHORTCUT[0]] = answer_table(SHORTCUT[1], prompts, seed)
    return SanityRows(rows, prompts.mode)


def ordering_holds(rows: dict[str, EvalTable], score: str = "faithful", margin: float = SANITY_MARGIN) -> bool:
    means = {name: table.mean()[score] for name, table in rows.items()}
    wrong = [means[name] for name in WRONG_ANSWERS]
    return means["ground truth"] > means["teacher"] and all(means["teacher"] - w >= margin for w in wrong)


SANITY_COLUMNS: tuple[str, ...] = ("faithful", "correct") + GATES + ("fidelity", "overall")


def sanity_markdown(rows: SanityRows, columns: tuple[str, ...] = SANITY_COLUMNS) -> str:
    """The table titled with its mode; the gate columns are per-factor accuracies."""
    lines = [f"**Sanity table, {rows.mode}**", "", "| answer | " + " | ".join(columns) + " |",
             "|---" * (len(columns) + 1) + "|"]
    for name, table in rows.items():
        mean = table.mean()
        lines.append(f"| {name} | " + " | ".join(f"{mean[c]:.3f}" for c in columns) + " |")
    verdict = "holds" if ordering_holds(rows) else "FAILS"
    return "\n".join(lines) + (f"\n\nRequired: ground truth > teacher > every wrong answer by >= {SANITY_MARGIN} on "
                               f"`faithful`: the ordering **{verdict}**.")
