"""The training guards, single process on the tiny toy teacher: no checkpoint from non-finite weights (a
non-finite gradient is skipped, an update that overflows stops the run), a resume that cannot mix two runs
(the plan's and the Stage II weights' contents and every result-changing setting in the identity, a locked
run folder, a killed save's leftovers removed, group-readable files), and every setting's range checked
before anything loads, as a usage error."""
from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file, save_file
from test_train import REPO, TINY, make_tiny_teacher, subprocess_env, train_args

from fastlightgen.adapters import adapt
from fastlightgen.plan import PrunePlan
from fastlightgen.toy.teacher import build_toy_teacher
from train.config import ConfigError, load_config
from train.loop.identity import identity_diff, run_identity
from train.distributed.processes import Dist
from train.loop.run import CheckpointMismatch, PoisonedWeights, Run, TooManyBadSteps
from train.ranges import RANGES
from train.loop.state import LOCK_FILE, RunDirBusy, latest_state
from train.models.units import AdapterModule, make_trainable


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return make_tiny_teacher(tmp_path_factory.mktemp("tiny_guards"))


def all_finite_file(path: Path) -> bool:
    return all(torch.isfinite(v).all() for v in load_file(str(path)).values())


def checkpoint_steps(stage_dir: Path) -> list[str]:
    return sorted(p.name for p in stage_dir.glob("step_*"))


# ---- item 7: no poisoned "last good" checkpoint ----------------------------------------------------

def test_non_finite_gradients_are_skipped_then_too_many_stop(tiny, tmp_path, monkeypatch, capsys):
    """A finite loss whose gradients are infinite (d sqrt(x)/dx at 0) from the third step on: each such step is
    skipped, max_bad_steps in a row stop the run, and the newest checkpoint is the last good one, finite."""
    from train import stage2

    teacher, plan = tiny
    real_loss, calls = stage2.stage2_loss, []

    def inf_gradient_loss(adapter, *args):
        loss, parts = real_loss(adapter, *args)
        calls.append(1)
        if len(calls) >= 3:
            weight = adapter.model.proj_out.weight
            loss = loss + (weight - weight.detach()).sqrt().sum()  # adds 0; its gradient is inf
        return loss, parts

    monkeypatch.setattr(stage2, "stage2_loss", inf_gradient_loss)
    settings = {"stage2.iterations": 10, "run.save_every": 1, "run.max_bad_steps": 2, "run.keep_checkpoints": 5}
    with pytest.raises(TooManyBadSteps, match="3 consecutive non-finite steps") as stop:
        stage2.main(train_args(teacher, plan, tmp_path, **settings))
    err = capsys.readouterr().err
    assert "step 2: non-finite model gradients (norm inf) on batch toy train seed" in err
    assert "step skipped (1 in a row)" in err and "step skipped (2 in a row)" in err
    stage_dir = tmp_path / "stage2"
    assert checkpoint_steps(stage_dir) == ["step_0000001", "step_0000002"]
    assert f"Last good checkpoint: {stage_dir / 'step_0000002'}" in str(stop.value)
    assert all_finite_file(stage_dir / "step_0000002" / "tensors.safetensors")
    records = [json.loads(line) for line in (stage_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if r.get("skipped")] == [3, 4]
    assert not (stage_dir / "model.safetensors").exists()


def test_an_update_that_poisons_the_weights_stops_the_run_and_leaves_the_last_good_checkpoint(tiny, tmp_path,
                                                                                              monkeypatch):
    """Learning rate inf from step 2 (below the config's range check: a step that overflows): the loss and the
    gradients are finite, the applied update makes the weights non-finite, the run stops at once, and no
    checkpoint holds those weights."""
    from train import stage2

    teacher, plan = tiny
    real_rate = stage2.learning_rate
    monkeypatch.setattr(stage2, "learning_rate", lambda base, i, *a: math.inf if i >= 2 else real_rate(base, i, *a))
    with pytest.raises(PoisonedWeights, match="step 2: the update at learning rate inf made model weights") as stop:
        stage2.main(train_args(teacher, plan, tmp_path, **{"stage2.iterations": 6, "run.save_every": 2}))
    stage_dir = tmp_path / "stage2"
    assert f"Last good checkpoint: {stage_dir / 'step_0000002'} (untouched)" in str(stop.value)
    assert checkpoint_steps(stage_dir) == ["step_0000002"]
    assert all_finite_file(stage_dir / "step_0000002" / "tensors.safetensors")
    assert not (stage_dir / "model.safetensors").exists()


def test_a_checkpoint_is_never_written_from_non_finite_weights(tmp_path):
    cfg = load_config(None, [f"run.run_dir={tmp_path}"])
    dist = Dist(0, 1, 0, torch.device("cpu"), False)
    unit = make_trainable("model", AdapterModule(build_toy_teacher(TINY)), cfg, dist, lr=1e-4)
    run = Run(cfg, "stage2", dist)
    run.save(1, [unit], {})
    with torch.no_grad():
        unit.module.model.proj_out.weight[0, 0] = float("nan")
    with pytest.raises(PoisonedWeights, match="refusing to write the step 2 checkpoint: non-finite weights in model"):
        run.save(2, [unit], {})
    assert [p.name for p in (tmp_path / "stage2").iterdir()] == ["step_0000001"]


# ---- item 8: a resume cannot mix two runs --------------------------------------------------------

def test_identity_covers_input_contents_and_result_settings(tiny, tmp_path):
    teacher, plan = tiny
    my_plan, init = tmp_path / "plan.json", tmp_path / "stage2.safetensors"
    my_plan.write_text(plan.read_text())
    save_file({"w": torch.zeros(3)}, str(init))
    sets = [f"model.teacher={teacher}", f"stage2.plan={my_plan}", f"stage3.plan={my_plan}", f"stage3.init={init}"]
    before = {stage: run_identity(load_config(None, sets), stage, 1) for stage in ("stage2", "stage3")}

    layout_only = json.dumps(json.loads(plan.read_text()), indent=4, sort_keys=True)
    my_plan.write_text(layout_only)  # the same plan, written otherwise: the same run
    assert run_identity(load_config(None, sets), "stage2", 1) == before["stage2"]
    PrunePlan.from_blocks(adapt(build_toy_teacher(TINY)).fingerprint(), [1]).save(my_plan)
    save_file({"w": torch.ones(3)}, str(init))  # Stage II retrained in place: the same size
    os.utime(init, ns=(0, 12345))  # a distinct mtime even on a coarse clock
    after = run_identity(load_config(None, sets), "stage3", 1)
    assert [line.split(":")[0] for line in identity_diff(before["stage3"], after)] == \
        ["stage3.init (contents)", "stage3.plan (contents)"]
    clipped = run_identity(load_config(None, [*sets, "dist.grad_clip=0.5"]), "stage2", 1)
    assert clipped["dist"]["grad_clip"] == 0.5 != before["stage2"]["dist"]["grad_clip"]


def test_resume_is_refused_when_the_plan_or_grad_clip_changed(tiny, tmp_path):
    from train import stage2

    teacher, plan = tiny
    my_plan = tmp_path / "plan.json"
    my_plan.write_text(plan.read_text())
    settings = {"stage2.iterations": 2, "run.save_every": 2}
    stage2.main(train_args(teacher, my_plan, tmp_path, **settings))
    more = {**settings, "stage2.iterations": 3}
    with pytest.raises(CheckpointMismatch, match=r"dist\.grad_clip: 1\.0 != 0\.5"):
        stage2.main(train_args(teacher, my_plan, tmp_path, **more, **{"dist.grad_clip": 0.5}) + ["--resume"])
    PrunePlan.from_blocks(adapt(build_toy_teacher(TINY)).fingerprint(), [2]).save(my_plan)
    with pytest.raises(CheckpointMismatch, match=r"stage2\.plan \(contents\): '[0-9a-f]+' != '[0-9a-f]+'"):
        stage2.main(train_args(teacher, my_plan, tmp_path, **more) + ["--resume"])


def test_stage3_resume_is_refused_when_the_stage2_weights_changed(tiny, tmp_path):
    from train import stage2, stage3

    teacher, plan = tiny
    settings = {"stage2.iterations": 1, "stage3.iterations": 1, "stage3.fake_updates": 1, "run.save_every": 1}
    stage2.main(train_args(teacher, plan, tmp_path, **settings))
    stage3.main(train_args(teacher, plan, tmp_path, **settings))
    weights = tmp_path / "stage2" / "model.safetensors"
    tensors = load_file(str(weights))
    tensors["proj_out.bias"] = tensors["proj_out.bias"] + 1
    save_file(tensors, str(weights))  # Stage II retrained in place
    with pytest.raises(CheckpointMismatch, match=r"stage3\.init \(contents\)"):
        stage3.main(train_args(teacher, plan, tmp_path, **{**settings, "stage3.iterations": 2}) + ["--resume"])


def test_a_second_job_on_a_locked_run_folder_refuses(tiny, tmp_path):
    from train import stage2

    teacher, plan = tiny
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys, time\nfrom train.loop.state import hold_run_dir\n"
         f"with hold_run_dir({str(tmp_path / 'stage2')!r}):\n    print('held', flush=True)\n    time.sleep(120)"],
        cwd=REPO, env=subprocess_env(), stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(RunDirBusy, match=f"in use by another job [(]PID {holder.pid} on .*[)]"):
            stage2.main(train_args(teacher, plan, tmp_path, **{"stage2.iterations": 1}))
    finally:
        holder.kill()
        holder.wait()
    assert [p.name for p in (tmp_path / "stage2").iterdir()] == [LOCK_FILE]  # nothing written
    stage2.main(train_args(teacher, plan, tmp_path, **{"stage2.iterations": 1}))  # the lock died with its job
    assert latest_state(tmp_path / "stage2").name == "step_0000001"


def test_a_killed_saves_leftovers_are_removed_and_files_are_group_readable(tiny, tmp_path):
    from train import stage2

    teacher, plan = tiny
    stage_dir = tmp_path / "stage2"
    stale = stage_dir / ".tmp_step_0000004_shared"
    stale.mkdir(parents=True)
    (stale / "tensors.safetensors").write_bytes(b"half")
    (stage_dir / ".model.safetensors.x1y2.tmp").write_bytes(b"half")
    umask = os.umask(0o022)
    try:
        stage2.main(train_args(teacher, plan, tmp_path, **{"stage2.iterations": 2, "run.save_every": 1}))
    finally:
        os.umask(umask)
    assert sorted(p.name for p in stage_dir.glob(".*")) == [LOCK_FILE]
    files = [p for p in stage_dir.rglob("*") if p.is_file()]
    assert {"tensors.safetensors", "state.json", "model.safetensors", "run.json", "metrics.jsonl"} <= \
        {p.name for p in files}
    assert {p.relative_to(stage_dir).as_posix(): oct(p.stat().st_mode & 0o777) for p in files} == \
        {p.relative_to(stage_dir).as_posix(): oct(0o644) for p in files}


# ---- item 9: every value checked before anything loads -----------------------------------------

BAD = [
    ("stage2.lr", "0"), ("stage2.lr", "-1e-5"), ("stage2.lr", "inf"), ("stage2.lr", "nan"), ("stage2.lr", "3e38"),
    ("stage3.lr", "0"),
    ("stage3.fake_lr", "-1"), ("toy_teacher.lr", "0"),
    ("stage2.iterations", "-5"), ("stage2.iterations", "0"), ("stage3.iterations", "0"),
    ("toy_teacher.iterations", "0"), ("run.save_every", "0"), ("data.batch_size", "0"),
    ("data.caption_dropout", "1.5"), ("data.caption_dropout", "-0.1"), ("stage1.keep_ratio", "0"),
    ("stage1.keep_ratio", "1.5"), ("stage3.beta1", "inf"), ("stage3.beta2", "nan"), ("stage3.shift", "nan"),
    ("stage3.shift", "0"), ("stage2.sigma_shift", "nan"), ("toy_teacher.sigma_shift", "-1"),
    ("stage3.denoising_step_list", "[250, 500]"), ("stage3.denoising_step_list", "[1000, 1000]"),
    ("stage3.denoising_step_list", "[1001, 500]"), ("stage3.denoising_step_list", "[500, 0]"),
    ("stage3.denoising_step_list", "[]"), ("stage3.denoising_step_list", "[999.5]"),
    ("stage3.dmd_sigma_range", "[0.9, 0.1]"), ("stage2.skip_prob", "1.5"), ("stage2.alpha", "-0.5"),
    ("run.warmup", "-1"), ("run.max_bad_steps", "0"), ("stage3.lora_rank", "0"), ("dist.grad_clip", "nan"),
    ("dist.bf16", "true"), ("run.seed", "true"), ("stage2.target", "teacher"), ("stage2.target_ema_decay", "1"),
    ("stage2.lr_decay", "linear"),
]
ENTRY = {"stage1": "stage1", "stage3": "stage3", "toy_teacher": "toy_teacher"}


@pytest.fixture
def nothing_loads(monkeypatch):
    """Every way an entry point loads a model fails the test."""
    from train import stage1, stage2, stage3, toy_teacher
    from train.models import loading

    def loaded(*args, **kwargs):
        raise AssertionError("a model was loaded before the settings were checked")

    for module in (loading, stage1):
        monkeypatch.setattr(module, "load_teacher", loaded)
    for module in (loading, stage2, stage3):  # Stage II and III load whole or ZeRO-3-partitioned models through it
        monkeypatch.setattr(module, "load_start", loaded)
    monkeypatch.setattr(toy_teacher, "build_toy_teacher", loaded)


@pytest.mark.parametrize("mode", ["run", "dry-run"])
@pytest.mark.parametrize(("setting", "value"), BAD)
def test_a_bad_value_is_a_usage_error_before_anything_loads(setting, value, mode, tmp_path, nothing_loads, capsys):
    import importlib

    entry = importlib.import_module(f"train.{ENTRY.get(setting.split('.')[0], 'stage2')}")
    argv = ["--set", f"model.teacher={tmp_path / 'absent.safetensors'}", "--set", f"run.run_dir={tmp_path / 'run'}",
            "--set", f"{setting}={value}"] + (["--dry-run"] if mode == "dry-run" else [])
    with pytest.raises(SystemExit) as stop:
        entry.main(argv)
    assert stop.value.code == 2
    assert f"error: {setting}" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize(("setting", "value"), BAD)
def test_run_checks_a_config_built_in_code(setting, value, tmp_path, nothing_loads):
    """`run(cfg)` called directly (research.run_cache does) gets the same check: the typed error."""
    import importlib

    cfg = load_config(None, [f"model.teacher={tmp_path / 'absent.safetensors'}", f"run.run_dir={tmp_path / 'run'}"])
    section, key = setting.split(".")
    setattr(getattr(cfg, section), key, yaml.safe_load(value))
    for name in ("stage1", "stage2", "stage3", "toy_teacher", "export"):
        with pytest.raises(ConfigError, match=f"{setting.replace('.', '[.]')}"):
            importlib.import_module(f"train.{name}").run(cfg)
    assert not (tmp_path / "run").exists()


def test_a_range_error_names_the_range_and_a_fix():
    with pytest.raises(ConfigError) as err:
        load_config(None, ["stage2.lr=-1", "stage3.denoising_step_list=[250, 500]"])
    assert str(err.value) == (
        "stage2.lr must be a number in (0, 1], got -1.0 (the default: --set stage2.lr=1e-05); "
        "stage3.denoising_step_list must be a non-empty list of integer timesteps in [1, 1000], strictly decreasing "
        "(the first is the noisiest), got [250, 500] (the default: --set stage3.denoising_step_list=[1000, 750, 500, "
        "250])")


def test_the_ranges_name_real_settings_and_the_shipped_configs_are_in_range():
    cfg = load_config(None)
    for name in RANGES:
        section, key = name.split(".")
        assert hasattr(getattr(cfg, section), key), name
        assert RANGES[name].ok(getattr(getattr(cfg, section), key)), f"the default of {name} is out of range"
    for path in sorted((REPO / "configs").glob("*.yaml")):
        load_config(str(path))
