"""Stage II's distillation target (`stage2.target`), single process on the tiny toy teacher.

`shared` (the default, the paper's form) trains exactly as before the setting existed; `frozen` distills toward
the starting weights' unpruned velocity, which never moves; `ema` toward an EMA of the trained weights that
follows the EMA rule and resumes bit-identically; a bad value is a config error before anything loads.
"""
from __future__ import annotations

import json
import re

import pytest
import torch
from safetensors.torch import load_file
from test_train import make_tiny_teacher, train_args
from tiny_models import tiny_wan, wan_inputs

from fastlightgen.adapters import adapt
from fastlightgen.branches import Branch, run_branches
from fastlightgen.distill import mse, stage2_loss
from train.config import ConfigError, load_config
from train.loop.identity import identity_diff, run_identity
from train.models.loading import load_teacher
from train.models.record import StageRecord


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return make_tiny_teacher(tmp_path_factory.mktemp("tiny_target"))


def teacher_model(teacher):
    return load_teacher(load_config(None, [f"model.teacher={teacher}"]))


def spy_loss(monkeypatch, calls: list):
    """Records (x_t, sigma, cond, unpruned_target) of every Stage II loss call."""
    from train import stage2

    real = stage2.stage2_loss

    def spy(adapter, x_t, sigma, cond, target, skip, alpha, ti2v, unpruned_target=None):
        calls.append((x_t, sigma, cond, unpruned_target))
        return real(adapter, x_t, sigma, cond, target, skip, alpha, ti2v, unpruned_target)

    monkeypatch.setattr(stage2, "stage2_loss", spy)


def losses(folder) -> list[dict]:
    return [{k: v for k, v in json.loads(line).items() if k != "s_per_step"}
            for line in (folder / "metrics.jsonl").read_text().splitlines()]


def equal_files(a, b) -> bool:
    x, y = load_file(str(a)), load_file(str(b))
    return x.keys() == y.keys() and all(torch.equal(x[k], y[k]) for k in x)


# ---- shared: the paper's form, unchanged -------------------------------------------------------

def paper_loss(adapter, x_t, sigma, cond, target, skip, alpha, ti2v, unpruned_target=None):
    """Stage II's loss as written before stage2.target existed (one shared-prefix call, vU of the same weights)."""
    assert unpruned_target is None
    v_pruned, v_unpruned = run_branches(adapter, x_t, sigma, cond,
                                        [Branch(skip, grad=True), Branch(frozenset(), grad=alpha < 1)])
    distill = mse(v_pruned, v_unpruned.detach(), ti2v)
    loss, parts = alpha * distill, {"distill": distill.item()}
    if alpha < 1:
        fm_pruned, fm_unpruned = mse(v_pruned, target, ti2v), mse(v_unpruned, target, ti2v)
        loss = loss + (1 - alpha) * (fm_pruned + fm_unpruned)
        parts.update(fm_pruned=fm_pruned.item(), fm_unpruned=fm_unpruned.item())
    return loss, parts


@pytest.mark.parametrize("alpha", [1.0, 0.5])
def test_shared_target_trains_bit_identically_to_the_paper_form(alpha, tiny, tmp_path, monkeypatch):
    from train import stage2

    assert load_config(None).stage2.target == "shared"
    teacher, plan = tiny
    settings = {"stage2.alpha": alpha, "stage2.iterations": 4, "stage2.lr": 1e-3}
    stage2.main(train_args(teacher, plan, tmp_path / "shared", **settings, **{"stage2.target": "shared"}))
    monkeypatch.setattr(stage2, "stage2_loss", paper_loss)
    stage2.main(train_args(teacher, plan, tmp_path / "paper", **settings))
    a, b = tmp_path / "shared" / "stage2", tmp_path / "paper" / "stage2"
    assert losses(a) == losses(b) and len(losses(a)) == 4
    assert equal_files(a / "model.safetensors", b / "model.safetensors")
    assert equal_files(a / "step_0000004" / "tensors.safetensors", b / "step_0000004" / "tensors.safetensors")


# ---- the loss with a given target ----------------------------------------------------------------

def test_a_given_target_is_distilled_and_alpha_below_one_still_trains_the_live_unpruned_path():
    model = tiny_wan("ti2v", layers=6)
    adapter, (x, cond), sigma = adapt(model), wan_inputs(model), torch.tensor([0.3, 0.7])
    flow_target, given = torch.randn_like(x), torch.randn_like(x)
    loss, parts = stage2_loss(adapter, x, sigma, cond, flow_target, frozenset({3}), 1.0, True, given)
    loss.backward()
    with torch.no_grad():
        v_pruned = adapter.forward(x, sigma, cond, frozenset({3}))
    assert set(parts) == {"distill"} and parts["distill"] == pytest.approx(mse(v_pruned, given, True).item(), rel=1e-6)
    assert model.blocks[3].ffn.net[2].weight.grad is None  # only the pruned path ran with gradients
    model.zero_grad()
    loss, parts = stage2_loss(adapter, x, sigma, cond, flow_target, frozenset({3}), 0.5, True, given)
    loss.backward()
    assert set(parts) == {"distill", "fm_pruned", "fm_unpruned"}
    assert model.blocks[3].ffn.net[2].weight.grad.abs().sum() > 0  # the live unpruned path, by flow matching
    with torch.no_grad():
        v_unpruned = adapter.forward(x, sigma, cond)
    assert parts["fm_unpruned"] == pytest.approx(mse(v_unpruned, flow_target, True).item(), rel=1e-6)
    assert parts["distill"] == pytest.approx(mse(v_pruned, given, True).item(), rel=1e-6)


# ---- frozen: the teacher's unpruned velocity, every step -------------------------------------------

@pytest.mark.parametrize("alpha", [1.0, 0.5])
def test_frozen_target_is_the_teachers_unpruned_velocity_at_every_step(alpha, tiny, tmp_path, monkeypatch):
    from train import stage2

    teacher, plan = tiny
    calls = []
    spy_loss(monkeypatch, calls)
    stage2.main(train_args(teacher, plan, tmp_path, **{"stage2.target": "frozen", "stage2.alpha": alpha,
                                                       "stage2.iterations": 3, "stage2.lr": 1e-3}))
    reference = adapt(teacher_model(teacher))
    assert len(calls) == 3
    for x_t, sigma, cond, unpruned_target in calls:
        with torch.no_grad():
            assert torch.equal(unpruned_target, reference.forward(x_t, sigma, cond))
    trained = load_file(str(tmp_path / "stage2" / "model.safetensors"))
    start = reference.model.state_dict()
    assert any(not torch.equal(trained[k], start[k]) for k in start)  # the live weights moved; the target did not
    assert StageRecord.load(tmp_path / "stage2").config["stage2"]["target"] == "frozen"


# ---- ema: the EMA rule, and an exact resume ------------------------------------------------------

def test_ema_target_follows_the_ema_rule_from_the_teacher(tiny, tmp_path, monkeypatch):
    from train import stage2

    teacher, plan = tiny
    decay, steps = 0.9, 3
    calls = []
    spy_loss(monkeypatch, calls)
    stage2.main(train_args(teacher, plan, tmp_path, **{
        "stage2.target": "ema", "stage2.target_ema_decay": decay, "stage2.iterations": steps, "stage2.lr": 1e-3,
        "run.save_every": 1, "run.keep_checkpoints": steps}))
    start = teacher_model(teacher)
    with torch.no_grad():  # the first target: the EMA before any update, the teacher itself
        assert torch.equal(calls[0][3], adapt(start).forward(*calls[0][:3]))
    previous = {k: p.detach() for k, p in start.named_parameters()}
    for step in range(1, steps + 1):
        tensors = load_file(str(tmp_path / "stage2" / f"step_{step:07d}" / "tensors.safetensors"))
        live = {k: tensors[f"model.model.{k}"] for k in previous}
        averaged = {k: tensors[f"target_ema.model.{k}"] for k in previous}
        assert averaged.keys() == {k[len("target_ema.model."):] for k in tensors if k.startswith("target_ema.")}
        for k in previous:  # decay from the first step: no warm-up toward the live weights
            torch.testing.assert_close(averaged[k], decay * previous[k] + (1 - decay) * live[k])
        assert any(not torch.equal(averaged[k], live[k]) for k in live)
        previous = averaged
    ema = teacher_model(teacher)  # the last step's target: the EMA after step 2's update
    after_two = load_file(str(tmp_path / "stage2" / "step_0000002" / "tensors.safetensors"))
    ema.load_state_dict({k: after_two[f"target_ema.model.{k}"] for k in previous}, strict=False)
    with torch.no_grad():
        torch.testing.assert_close(calls[2][3], adapt(ema).forward(*calls[2][:3]))


def test_ema_target_resumes_bit_identically(tiny, tmp_path):
    from train import stage2

    teacher, plan = tiny
    settings = {"stage2.target": "ema", "stage2.target_ema_decay": 0.9, "stage2.lr": 1e-3, "run.save_every": 2}
    stage2.main(train_args(teacher, plan, tmp_path / "straight", **settings, **{"stage2.iterations": 4}))
    stage2.main(train_args(teacher, plan, tmp_path / "stopped", **settings, **{"stage2.iterations": 2}))
    stage2.main(train_args(teacher, plan, tmp_path / "stopped", **settings, **{"stage2.iterations": 4}) + ["--resume"])
    a, b = tmp_path / "straight" / "stage2", tmp_path / "stopped" / "stage2"
    assert losses(a) == losses(b) and [r["step"] for r in losses(b)] == [1, 2, 3, 4]
    assert equal_files(a / "model.safetensors", b / "model.safetensors")
    final = b / "step_0000004" / "tensors.safetensors"
    assert equal_files(a / "step_0000004" / "tensors.safetensors", final)
    assert any(k.startswith("target_ema.model.") for k in load_file(str(final)))


# ---- settings ----------------------------------------------------------------------------------

@pytest.mark.parametrize(("sets", "message"), [
    (["stage2.target=teacher"], "stage2.target must be one of shared, frozen, ema, got 'teacher'"),
    (["stage2.target_ema_decay=1"], "stage2.target_ema_decay must be a number in [0, 1)"),
    (["stage2.target=ema", "dist.deepspeed=true"], "stage2.target=ema needs the plain loop"),
])
def test_a_bad_target_setting_is_a_config_error(sets, message):
    with pytest.raises(ConfigError, match=re.escape(message)):
        load_config(None, sets)


def test_ema_under_deepspeed_is_a_usage_error_before_anything_loads(tmp_path, monkeypatch, capsys):
    from train import stage2

    monkeypatch.setattr(stage2, "load_start", lambda cfg, init: pytest.fail("a model was loaded"))
    with pytest.raises(SystemExit) as stop:
        stage2.main(["--set", "stage2.target=ema", "--set", "dist.deepspeed=true", "--set", f"run.run_dir={tmp_path}"])
    assert stop.value.code == 2 and "stage2.target=ema needs the plain loop" in capsys.readouterr().err
    cfg = load_config(None, [f"run.run_dir={tmp_path}"])
    cfg.stage2.target = "bogus"  # changed in code after it was read: run() checks it too
    with pytest.raises(ConfigError, match="stage2.target must be one of"):
        stage2.run(cfg)
    assert not any(tmp_path.iterdir())


def test_the_target_is_in_the_identity_and_its_decay_only_for_ema(tiny):
    teacher, plan = tiny
    base = [f"model.teacher={teacher}", f"stage2.plan={plan}"]

    def identity(*sets):
        return run_identity(load_config(None, [*base, *sets]), "stage2", 1)

    assert identity()["stage2"]["target"] == "shared" and "target_ema_decay" not in identity()["stage2"]
    assert identity_diff(identity(), identity("stage2.target=frozen")) == ["stage2.target: 'shared' != 'frozen'"]
    assert identity("stage2.target_ema_decay=0.5") == identity()  # read only by the EMA target
    assert identity_diff(identity("stage2.target=ema"), identity("stage2.target=ema", "stage2.target_ema_decay=0.5")) \
        == ["stage2.target_ema_decay: 0.99 != 0.5"]


def test_the_memory_estimate_counts_the_target_copy_whole_or_partitioned():
    """Whole on every rank in the plain loop and with dist.sharded_load off; partitioned (bytes / W) under
    sharded ZeRO-3 loading."""
    from train.models.memory import GIB, ParamCounts, estimate

    counts = ParamCounts(total=10_000, per_block=[2_000] * 4, lora_per_block=[10] * 4, width=8, ffn=16)
    zero3 = ["dist.deepspeed=true", "dist.world_size=4", "dist.bf16=true", "stage2.target=frozen"]
    for sets, whole in ([], 0), (["stage2.target=frozen"], 4), (["stage2.target=ema"], 4), \
            ([*zero3, "dist.sharded_load=false"], 2), (zero3, 2 / 4):
        cfg = load_config(None, sets)
        shared = estimate(load_config(None, [s for s in sets if not s.startswith("stage2.")]), counts)
        assert estimate(cfg, counts)["stage2"]["parameters"] - shared["stage2"]["parameters"] == \
            pytest.approx(10_000 * whole / GIB)
