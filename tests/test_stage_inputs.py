"""A Stage II or III run whose input (Stage I's plan, the Stage II weights it starts from) is missing stops
with the setting, the path and the fix, before its run folder is made or the teacher is read."""
from __future__ import annotations

import pytest
from test_train import make_tiny_teacher, train_args


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return make_tiny_teacher(tmp_path_factory.mktemp("tiny_inputs"))


CASES = {  # stage, settings, the error
    "stage2 without a plan": ("stage2", {"stage2.plan": "{tmp}/none/plan.json"},
                              r"stage2\.plan .*none/plan\.json does not exist: run `python -m train\.stage1` first"),
    "stage2 from a missing run": ("stage2", {"stage2.init": "{tmp}/none/model.safetensors"},
                                  r"stage2\.init .*none/model\.safetensors does not exist: give a finished Stage II"),
    "stage3 before Stage II": ("stage3", {},  # stage3.init empty: this run folder's own Stage II
                               r"stage3\.init .*run/stage2/model\.safetensors does not exist: run `python -m "
                               r"train\.stage2` first"),
    "stage3 from a missing run": ("stage3", {"stage3.init": "{tmp}/none/model.safetensors"},
                                  r"stage3\.init .*none/model\.safetensors does not exist"),
    "stage3 from the teacher without a plan": ("stage3", {"stage3.init": "teacher", "stage3.plan": "{tmp}/none.json"},
                                               r"stage3\.plan .*none\.json does not exist"),
}


@pytest.mark.parametrize("case", CASES)
def test_a_missing_input_stops_the_run_before_the_teacher_is_read(case, tiny, tmp_path, monkeypatch):
    import importlib

    stage, settings, error = CASES[case]
    module = importlib.import_module(f"train.{stage}")
    monkeypatch.setattr(module, "load_teacher", lambda cfg: pytest.fail("the teacher was read"))
    teacher, plan = tiny
    given = {k: v.format(tmp=tmp_path) for k, v in settings.items()}
    with pytest.raises(FileNotFoundError, match=error):
        module.main(train_args(teacher, plan, tmp_path / "run", **given))
    assert not (tmp_path / "run" / stage).exists()
