"""The sanity table: known answers, right and wrong, scored on the report's own prompts.

A scorer is fit to rank models only if it ranks these correctly: the ground truth above the teacher, and
the teacher above every wrong answer, by a stated margin. The no-model trick is listed apart: it is not a
wrong answer but a shortcut, and where it reaches the ground truth the world is too easy to tell models apart.
"""
from __future__ import annotations

from typing import Callable

import torch

from fastlightgen.toy.evaluate import EvalTable, evaluate_batch
from fastlightgen.toy.prompts import Prompts
from fastlightgen.toy.world import TOY_WORLD, Factors, direction_vector, render, render_at, trajectory

Answer = Callable[[Factors, torch.Generator], torch.Tensor]  # (3, F, H, W) in [-1, 1]

# The primary score must separate the teacher from every wrong answer by at least this much.
SANITY_MARGIN = 0.1


def ground_truth(factors: Factors, g: torch.Generator) -> torch.Tensor:
    return render(factors)


def shifted_first_frame(factors: Factors, g: torch.Generator) -> torch.Tensor:
    """No model: the given first frame, translated along the caption's direction at the world's speed."""
    first = render(factors)[:, 0]
    dx, dy = (direction_vector(factors.direction) * TOY_WORLD.speed).round().long().tolist()
    return torch.stack([first.roll((t * dy, t * dx), dims=(1, 2)) for t in range(TOY_WORLD.frames)], dim=1)


def copied_first_frame(factors: Factors, g: torch.Generator) -> torch.Tensor:
    return render(factors)[:, :1].expand(-1, TOY_WORLD.frames, -1, -1).clone()


def wrong_direction(factors: Factors, g: torch.Generator) -> torch.Tensor:
    """The right object played backwards: crisp, in frame, moving the opposite way."""
    return render_at(factors, factors.shape, factors.color, trajectory(factors).flip(0))


def wrong_speed(factors: Factors, g: torch.Generator) -> torch.Tensor:
    """The right object at half speed: the slow motion distilled models are blamed for."""
    path = trajectory(factors)
    return render_at(factors, factors.shape, factors.color, path[:1] + (path - path[:1]) / 2)


def noise(factors: Factors, g: torch.Generator) -> torch.Tensor:
    return torch.rand((3, TOY_WORLD.frames, TOY_WORLD.height, TOY_WORLD.width), generator=g) * 2 - 1


WRONG_ANSWERS: dict[str, Answer] = {"copy first frame": copied_first_frame, "wrong direction": wrong_direction,
                                    "wrong speed (half)": wrong_speed, "noise": noise}
SHORTCUT = ("no model: first frame shifted along the caption", shifted_first_frame)


def answer_table(answer: Answer, prompts: Prompts, seed: int = 0) -> EvalTable:
    g = torch.Generator().manual_seed(seed)
    return evaluate_batch(torch.stack([answer(f, g) for f in prompts.factors]), list(prompts.factors))


def sanity_rows(prompts: Prompts, teacher: EvalTable, seed: int = 0) -> dict[str, EvalTable]:
    """Every row of the table, in the order the scorer must rank them (the shortcut last, unranked)."""
    rows = {"ground truth": answer_table(ground_truth, prompts, seed), "teacher": teacher}
    rows.update({name: answer_table(answer, prompts, seed) for name, answer in WRONG_ANSWERS.items()})
    rows[SHORTCUT[0]] = answer_table(SHORTCUT[1], prompts, seed)
    return rows


def ordering_holds(rows: dict[str, EvalTable], score: str = "faithful", margin: float = SANITY_MARGIN) -> bool:
    means = {name: table.mean()[score] for name, table in rows.items()}
    wrong = [means[name] for name in WRONG_ANSWERS]
    return means["ground truth"] > means["teacher"] and all(means["teacher"] - w >= margin for w in wrong)


def sanity_markdown(rows: dict[str, EvalTable], columns: tuple[str, ...] = ("faithful", "correct", "fidelity",
                                                                              "overall")) -> str:
    lines = ["| answer | " + " | ".join(columns) + " |", "|---" * (len(columns) + 1) + "|"]
    for name, table in rows.items():
        mean = table.mean()
        lines.append(f"| {name} | " + " | ".join(f"{mean[c]:.3f}" for c in columns) + " |")
    verdict = "holds" if ordering_holds(rows) else "FAILS"
    return "\n".join(lines) + (f"\n\nRequired: ground truth > teacher > every wrong answer by >= {SANITY_MARGIN} on "
                               f"`faithful`: the ordering **{verdict}**.")
