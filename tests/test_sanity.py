"""The scorer's verdict view (fastlightgen.toy.evaluate) ranks known answers right (research.sanity)."""
import pytest
import torch

from fastlightgen.toy.evaluate import estimate_object, evaluate_batch, evaluate_video, gates
from fastlightgen.toy.generate import generate_teacher
from fastlightgen.toy.prompts import Prompts, heldout_prompts
from research.demo import TEACHER, load_fp32
from research.sanity import (SANITY_MARGIN, WRONG_ANSWERS, ground_truth, ordering_holds, sanity_rows,
                             wrong_direction, wrong_speed)


@pytest.mark.parametrize("answer, failed", [(wrong_direction, "direction"), (wrong_speed, "speed")])
def test_gates_fail_a_crisp_wrong_answer(answer, failed):
    for factors in heldout_prompts().factors:
        video = answer(factors, torch.Generator())
        passed = gates(estimate_object(video, factors), factors)
        assert not passed[failed] and all(ok for name, ok in passed.items() if name != failed)
        scores = evaluate_video(video, factors)
        assert scores["correct"] == 0.0 and scores["faithful"] == 0.0
        assert scores["overall"] > 0.8  # the VBench-like view alone would have ranked it near the teacher


def test_ground_truth_passes_every_gate():
    for factors in heldout_prompts().factors:
        scores = evaluate_video(ground_truth(factors, torch.Generator()), factors)
        assert scores["correct"] == 1.0 and scores["faithful"] > 0.99


def test_sanity_ordering_holds_with_the_committed_teacher():
    if not TEACHER.is_file():
        pytest.skip(f"no committed teacher at {TEACHER}")
    teacher, meta = load_fp32(TEACHER)
    prompts = Prompts(heldout_prompts().factors[::3])
    videos = generate_teacher(teacher, prompts, 0)
    rows = sanity_rows(prompts, evaluate_batch(videos, list(prompts.factors)))
    assert ordering_holds(rows)
    teacher_score = rows["teacher"].mean()["faithful"]
    assert all(teacher_score - rows[name].mean()["faithful"] >= SANITY_MARGIN for name in WRONG_ANSWERS)


def test_ordering_fails_when_the_teacher_is_a_wrong_answer():
    prompts = Prompts(heldout_prompts().factors[::3])
    rows = sanity_rows(prompts, evaluate_batch(torch.stack([wrong_direction(f, torch.Generator())
                                                            for f in prompts.factors]), list(prompts.factors)))
    assert not ordering_holds(rows)
