"""Stage II from another Stage II run's weights (`stage2.init`: progressive pruning), on the tiny toy teacher.

A run given stage2.init starts from those weights (its frozen target is their unpruned velocity, not the
teacher's), says so in run.json and in its identity; a run without it keeps the identity it had before the
setting existed, so cached runs stay valid; a missing file stops the run before the teacher is read.
"""
from __future__ import annotations


import pytest
import torch
from test_stage2_target import spy_loss, teacher_model
from test_train import make_tiny_teacher, train_args

from fastlightgen.adapters import adapt
from fastlightgen.plan import PrunePlan
from train.config import load_config
from train.loop.identity import run_identity
from train.models.loading import load_weights
from train.models.record import StageRecord


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """The tiny teacher, its plan dropping blocks 1 and 2, and a finished Stage II run of a plan dropping 2 only."""
    folder = tmp_path_factory.mktemp("tiny_init")
    teacher, plan = make_tiny_teacher(folder)
    larger = folder / "larger_plan.json"
    PrunePlan.from_blocks(adapt(teacher_model(teacher)).fingerprint(), [2]).save(larger)
    from train import stage2

    stage2.main(train_args(teacher, larger, folder / "larger", **{"stage2.lr": 1e-2}))
    return teacher, plan, folder / "larger" / "stage2" / "model.safetensors"


def test_a_run_from_stage2_init_starts_from_those_weights(runs, tmp_path, monkeypatch):
    from train import stage2

    teacher, plan, init = runs
    calls = []
    spy_loss(monkeypatch, calls)
    stage2.main(train_args(teacher, plan, tmp_path, **{"stage2.init": init, "stage2.target": "frozen"}))
    start = adapt(load_weights(teacher_model(teacher), init))
    with torch.no_grad():
        for x_t, sigma, cond, unpruned_target in calls:
            assert torch.equal(unpruned_target, start.forward(x_t, sigma, cond))
            assert not torch.equal(unpruned_target, adapt(teacher_model(teacher)).forward(x_t, sigma, cond))
    assert StageRecord.load(tmp_path / "stage2").config["stage2"]["init"] == str(init)


def test_the_identity_names_the_init_by_its_contents_and_is_unchanged_without_one(runs, tmp_path):
    teacher, plan, init = runs
    base = [f"model.teacher={teacher}", f"stage2.plan={plan}"]
    plain = run_identity(load_config(None, base), "stage2", 1)["stage2"]
    assert "init" not in plain and "init (contents)" not in plain  # the keys of runs cached before the setting
    copy = tmp_path / "model.safetensors"
    copy.write_bytes(init.read_bytes())
    given = run_identity(load_config(None, [*base, f"stage2.init={copy}"]), "stage2", 1)["stage2"]
    assert given["init (contents)"] is not None and {k: v for k, v in given.items() if k != "init (contents)"} == plain
    weights = load_weights(teacher_model(teacher), init).state_dict()
    from safetensors.torch import save_file

    save_file({k: v + 1e-3 for k, v in weights.items()}, str(copy))
    changed = run_identity(load_config(None, [*base, f"stage2.init={copy}"]), "stage2", 1)["stage2"]
    assert changed["init (contents)"] != given["init (contents)"]


def test_a_missing_init_stops_the_run_before_the_teacher_is_read(runs, tmp_path, monkeypatch):
    from train import stage2

    teacher, plan, _ = runs
    monkeypatch.setattr(stage2, "load_start", lambda cfg, init: pytest.fail("the teacher was read"))
    missing = tmp_path / "nowhere" / "model.safetensors"
    with pytest.raises(FileNotFoundError, match=r"stage2\.init .*nowhere/model\.safetensors does not exist: give a "
                                                r"finished Stage II run's model\.safetensors"):
        stage2.main(train_args(teacher, plan, tmp_path / "run", **{"stage2.init": missing}))
    assert not (tmp_path / "run" / "stage2").exists()
