"""research.draws: videos made once and read back, whole draws only, no verdict from a mode that is not evidence."""
import torch

from fastlightgen.toy.world import TOY_WORLD, render
from research import draws
from research.demo import Candidate


def _counting_model(calls: list) -> Candidate:
    def generate(prompts, seed):
        calls.append(seed)
        return torch.stack([render(f) for f in prompts.factors])
    return Candidate("ground truth", generate)


def test_a_batch_is_made_once_then_read_from_the_cache(tmp_path):
    calls = []
    model = _counting_model(calls)
    first = draws.videos(model, "digest", tmp_path, "TI2V", 1, 3)
    again = draws.videos(model, "digest", tmp_path, "TI2V", 1, 3)
    assert calls == [3] and torch.equal(first, again)
    assert first.shape == (12, 3, TOY_WORLD.frames, TOY_WORLD.height, TOY_WORLD.width)


def test_only_whole_draws_count_as_complete(tmp_path, monkeypatch):
    monkeypatch.setattr(draws, "NOISE_SEEDS", (0, 1))
    model = _counting_model([])
    for noise_seed in (0, 1):
        draws.videos(model, "a", tmp_path, "TI2V", 0, noise_seed)
    draws.videos(model, "a", tmp_path, "TI2V", 1, 0)  # draw 1 lacks noise seed 1
    assert draws.complete_draws(tmp_path, ["a"], ("TI2V",)) == (0,)
    assert draws.complete_draws(tmp_path, ["a", "b"], ("TI2V",)) == ()


def test_the_main_row_draws_no_verdict_from_a_mode_that_is_not_evidence(tmp_path, monkeypatch):
    monkeypatch.setattr(draws, "NOISE_SEEDS", (0, 1))
    truth = _counting_model([])
    def noisy(prompts, seed):
        clean = torch.stack([render(f) for f in prompts.factors])
        return clean + 0.05 * torch.randn(clean.shape, generator=torch.Generator().manual_seed(seed))
    shaken = Candidate("noisy", noisy)
    teacher = draws.score(truth, "t", tmp_path, "T2V", (0,))
    student = draws.score(shaken, "s", tmp_path, "T2V", (0,))
    assert len(teacher.table.rows) == 24 and len(set(teacher.clusters)) == 12
    interval = draws.difference(student, teacher)
    assert interval.high < 0  # the noisy copy is below the ground truth on every video
    assert "| none (T2V is not evidence; worse if it were) |" in draws.main_row("T2V", teacher, student, False)
    assert draws.main_row("T2V", teacher, student, True).endswith("| worse |")
