"""A Stage II or III run whose input (Stage I's plan, the Stage II weights it starts from) is missing stops
with the setting, the path and the fix, before its run folder is made or the teacher is read."""
from __future__ import annotations

from pathlib import Path

import pytest
from test_train import make_tiny_teacher, train_args

REPO = Path(__file__).resolve().parent.parent


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
    monkeypatch.setattr(module, "load_start", lambda cfg, init: pytest.fail("the teacher was read"))
    teacher, plan = tiny
    given = {k: v.format(tmp=tmp_path) for k, v in settings.items()}
    with pytest.raises(FileNotFoundError, match=error):
        module.main(train_args(teacher, plan, tmp_path / "run", **given))
    assert not (tmp_path / "run" / stage).exists()


def test_stage1_refuses_protected_blocks_the_model_lacks_before_it_loads(tmp_path, monkeypatch):
    from train import stage1

    monkeypatch.setattr(stage1, "load_teacher", lambda cfg: pytest.fail("the teacher loaded first"))
    with pytest.raises(ValueError, match=r"stage1\.protected blocks \[99\] do not exist in a model of 12 blocks"):
        stage1.main(["-c", str(REPO / "configs" / "toy.yaml"), "--set", "stage1.protected=[99]",
                     "--set", f"run.run_dir={tmp_path}"])


def test_shards_that_do_not_fit_stop_the_stage_before_its_run_folder(tmp_path, monkeypatch):
    """Truncated shards, or shards of another model's widths, are named before the teacher or the run folder."""
    from test_train import _shard_set

    from train import stage2
    from train.config import load_config

    monkeypatch.setattr(stage2, "build", lambda cfg: pytest.fail("the models were built first"))
    shards = tmp_path / "shards"
    shards.mkdir()
    _shard_set(shards, (2,))  # 4-channel latents, 6-wide text: not the toy teacher's 48 and 4096
    from fastlightgen.plan import ModelFingerprint, PrunePlan

    PrunePlan.from_blocks(ModelFingerprint("wan", 12, 256), [1, 2]).save(tmp_path / "plan.json")
    cfg = load_config(str(REPO / "configs" / "toy.yaml"), ["data.source=shards", f"data.shards={shards}",
                                                           f"stage2.plan={tmp_path / 'plan.json'}",
                                                           f"run.run_dir={tmp_path / 'run'}"])
    with pytest.raises(ValueError, match="4-channel latents and 6-wide text, but the teacher takes 48-channel"):
        stage2.run(cfg)
    shard = shards / "shard_00000.safetensors"
    shard.write_bytes(shard.read_bytes()[:-64])
    with pytest.raises(ValueError, match=r"shard_00000\.safetensors: truncated"):
        stage2.run(cfg)
    assert not (tmp_path / "run").exists()
