"""Wan 2.2 A14B on the training side (issue #41): the shipped configs' memory, the two experts as the user holds
them (a diffusers folder with transformer/ and transformer_2/, checked before any load), I2V's 36-channel input,
Stage I per expert and Stage II of one expert on its part of the schedule. Tiny random-weight models in the real
diffusers layout."""
from __future__ import annotations

import csv
import json
import re
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from fastlightgen.experts import I2V_BOUNDARY, T2V_BOUNDARY
from tiny_models import tiny_wan_a14b_folder
from train.config import load_config
from train.loop.identity import identity_hash, run_identity
from train.models.record import StageRecord

REPO = Path(__file__).resolve().parents[1]
A14B = {name: str(REPO / "configs" / f"wan2.2-{name}-a14b.yaml") for name in ("t2v", "i2v")}
LAYERS = 4


@pytest.fixture(scope="module")
def folders(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("models")
    out = {}
    for variant in ("t2v", "i2v"):
        out[variant] = root / f"Wan2.2-{variant.upper()}-A14B-tiny-Diffusers"
        tiny_wan_a14b_folder(out[variant], variant, layers=LAYERS)
    return out


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> Path:
    """A shard set of the tiny Wan's widths (16-channel latents of 3 x 8 x 8, 64-wide text)."""
    from train.preprocess import write_index

    folder = tmp_path_factory.mktemp("shards")
    gen = torch.Generator().manual_seed(0)
    tensors = {"latents": torch.randn(4, 16, 3, 8, 8, generator=gen),
               "text": torch.randn(4, 7, 64, generator=gen).bfloat16()}
    save_file(tensors, str(folder / "shard_00000.safetensors"))
    save_file({"text": torch.zeros(1, 7, 64).bfloat16()}, str(folder / "null.safetensors"))
    write_index(folder, [{"file": "shard_00000.safetensors", "items": [{"file": f"{i}.mp4", "caption": "c"}
                                                                      for i in range(4)]}],
                {"file": "null.safetensors", "prompt": ""})
    return folder


def a14b_settings(folder: Path, shards: Path, run_dir: Path, **values) -> list[str]:
    return [f"{k}={v}" for k, v in {"model.path": folder, "model.ti2v": False, "data.source": "shards",
                                    "data.shards": shards, "run.run_dir": run_dir, "stage1.samples": 2,
                                    "stage1.timesteps": 2, **values}.items()]


# ---- 1. configs and memory ---------------------------------------------------------------------------

@pytest.mark.parametrize("name", ["t2v", "i2v"])
def test_a14b_dry_run_names_both_experts_and_the_80_gb_verdict(name, tmp_path, capsys):
    """Without weights or the folder: the config's architecture (40 blocks of width 5120, 14.3 B parameters per
    expert) at 81 x 720 x 1280 (75,600 tokens), and 480p as the override."""
    from train import stage2, stage3

    for main in (stage2.main, stage3.main):
        main(["-c", A14B[name], "--set", f"model.path={tmp_path / 'absent'}", "--dry-run"])
        lines = capsys.readouterr().out.splitlines()
        assert re.match(r"wan: 14\.2\d\d B parameters in 40 blocks per expert, 2 experts .*Stage III both: 28\.5",
                        lines[0])
        assert "81 x 720 x 1280 video -> 75600 tokens of width 5120 (FFN 13824)" in lines[1]
        assert any(re.fullmatch(r"fits in 80 GB per GPU: yes \(estimate 69\.3 GiB\)", line) for line in lines)
    stage3.main(["-c", A14B[name], "--set", "preprocess.height=480", "--set", "preprocess.width=832", "--dry-run"])
    assert "81 x 480 x 832 video -> 32760 tokens" in capsys.readouterr().out


def test_two_experts_count_twice_in_stage3_only():
    """Stage I scores the experts one after the other and Stage II trains one per run: their rows are one expert's.
    Stage III holds both: its parameter, gradient and optimizer terms double, its activations (one expert runs at a
    time) do not."""
    from train.models.memory import GPUS_PER_NODE, PROCESS_GIB, count_params, estimate

    pair = load_config(A14B["t2v"])
    one = load_config(A14B["t2v"], ["model.boundary=0", "stage2.expert="])  # the same architecture, one expert
    counts = count_params(one)
    two, single = estimate(pair, counts), estimate(one, counts)
    assert two["stage1"] == single["stage1"] and two["stage2"] == single["stage2"]
    for term in ("parameters", "gradients", "optimizer"):
        assert two["stage3"][term] == pytest.approx(2 * single["stage3"][term], rel=1e-12)
    assert two["stage3"]["activations"] == single["stage3"]["activations"]
    assert two["stage3"]["host_ram_per_node"] == pytest.approx(  # the offloaded optimizer of both
        GPUS_PER_NODE * (PROCESS_GIB + 20 / 12 * two["stage3"]["optimizer"]), rel=1e-12)


def test_added_settings_leave_the_identity_of_existing_configs_unchanged():
    """research.run_cache keys runs by run_identity: the two-expert settings at their defaults are not in it (the
    committed report's keys stay valid); set, they change it."""
    cfg = load_config(str(REPO / "configs" / "toy.yaml"))
    before = {"model": {"family", "ti2v", "teacher (contents)"},
              "stage1": {"samples", "timesteps", "keep_ratio", "protected", "plan"},
              "stage2": {"plan (contents)", "lr", "alpha", "target", "skip_prob", "lr_decay", "weight_decay",
                         "sigma_law", "sigma_shift", "iterations"}}
    for stage in ("stage1", "stage2"):
        identity = run_identity(cfg, stage, 1, whole_run=True)
        assert set(identity["model"]) == before["model"] and set(identity[stage]) == before[stage]
    base = identity_hash(run_identity(cfg, "stage1", 1, whole_run=True))
    for setting in ("model.boundary=0.5", "stage1.expert_keep_ratios={low: 0.5}"):
        changed = load_config(str(REPO / "configs" / "toy.yaml"), [setting])
        assert identity_hash(run_identity(changed, "stage1", 1, whole_run=True)) != base, setting
    expert = run_identity(load_config(str(REPO / "configs" / "toy.yaml"), ["stage2.expert=low"]), "stage2", 1)
    assert expert["stage2"]["expert"] == "low"


# ---- 2. the experts as the user holds them ------------------------------------------------------------

def test_a_diffusers_folder_gives_both_experts_and_its_boundary(folders, tmp_path):
    from fastlightgen.diffusers_folder import ExpertPaths
    from train.models.loading import model_experts

    for variant, boundary in (("t2v", T2V_BOUNDARY), ("i2v", I2V_BOUNDARY)):
        root = folders[variant]
        assert model_experts(load_config(None, [f"model.path={root}"])) == \
            ExpertPaths(root / "transformer", root / "transformer_2", boundary)
    root = folders["t2v"]
    other = tmp_path / "low.safetensors"
    other.write_bytes(b"")
    given = model_experts(load_config(None, [f"model.path={root}", "model.boundary=0.5", f"model.teacher_2={other}"]))
    assert (given.low, given.boundary) == (other, 0.5)
    assert model_experts(load_config(None, [f"model.teacher={root / 'transformer'}"])) is None  # one expert


def test_a_missing_expert_or_boundary_is_named_with_its_setting_before_any_load(folders, tmp_path, monkeypatch):
    import diffusers

    from train import stage2
    from train.models.loading import model_experts

    monkeypatch.setattr(diffusers.WanTransformer3DModel, "from_pretrained",
                        classmethod(lambda *a, **k: pytest.fail("a model loaded")))
    partial = tmp_path / "partial"
    partial.mkdir()
    (partial / "transformer").symlink_to(folders["t2v"] / "transformer")
    (partial / "model_index.json").write_text((folders["t2v"] / "model_index.json").read_text())
    with pytest.raises(FileNotFoundError, match=r"no transformer_2/ subfolder.*model\.teacher_2"):
        model_experts(load_config(None, [f"model.path={partial}"]))
    index = json.loads((folders["t2v"] / "model_index.json").read_text())
    (partial / "transformer_2").symlink_to(folders["t2v"] / "transformer_2")
    (partial / "model_index.json").write_text(json.dumps({k: v for k, v in index.items() if k != "boundary_ratio"}))
    with pytest.raises(ValueError, match=r"names no boundary_ratio: set model.boundary \(Wan2.2-T2V-A14B 0.875"):
        model_experts(load_config(None, [f"model.path={partial}"]))
    with pytest.raises(FileNotFoundError, match=r"model.teacher_2 .* does not exist"):
        model_experts(load_config(None, [f"model.path={folders['t2v']}", f"model.teacher_2={tmp_path / 'absent'}"]))
    run = tmp_path / "run"
    with pytest.raises(ValueError, match=r"has two experts: set stage2.expert to high or low"):
        stage2.run(load_config(None, [f"model.path={folders['t2v']}", f"run.run_dir={run}"]))
    with pytest.raises(ValueError, match=r"stage2.expert=low needs a two-expert model"):
        stage2.run(load_config(None, [f"model.teacher={folders['t2v'] / 'transformer'}", "stage2.expert=low",
                                      f"run.run_dir={run}"]))
    assert not run.exists()


def test_i2v_input_is_the_pipelines_36_channels(folders):
    """fastlightgen.image_condition builds what WanImageToVideoPipeline feeds its experts: noisy latents, the 4-channel
    mask, then the normalized latents of the image followed by zero frames."""
    from diffusers import WanImageToVideoPipeline

    from fastlightgen.image_condition import condition_channels, image_condition, model_input

    pipe = WanImageToVideoPipeline.from_pretrained(str(folders["i2v"]))
    g = torch.Generator().manual_seed(0)
    image = torch.rand(1, 3, 16, 16, generator=g) * 2 - 1
    latents, condition = pipe.prepare_latents(image, 1, 16, 16, 16, 9, torch.float32, torch.device("cpu"),
                                              torch.Generator().manual_seed(1))
    video = torch.cat([image.unsqueeze(2), torch.zeros(1, 3, 8, 16, 16)], dim=2)
    vae = pipe.vae.config
    encoded = (pipe.vae.encode(video).latent_dist.mode() - torch.tensor(vae.latents_mean).view(1, -1, 1, 1, 1)) \
        / torch.tensor(vae.latents_std).view(1, -1, 1, 1, 1)
    assert condition.shape == (1, 20, 3, 2, 2)
    torch.testing.assert_close(image_condition(encoded), condition)
    assert condition_channels(pipe.transformer.config.in_channels, pipe.transformer.config.out_channels) == 20
    x = model_input(latents, condition)
    assert x.shape[1] == 36 and torch.equal(x[:, :16], latents)
    out = pipe.transformer_2(x, torch.tensor([500.0]), torch.randn(1, 7, 64, generator=g), return_dict=False)[0]
    assert out.shape == latents.shape


def test_the_wan_adapter_puts_the_i2v_condition_beside_its_input(folders):
    """Conditioning.latent_condition travels with its rows (repeat, cat: eq. 9's [c; null] batch) and the adapter
    feeds the expert model_input(x_t, condition), as the pipeline feeds it."""
    from diffusers import WanTransformer3DModel

    from fastlightgen.adapters import Conditioning, adapt
    from fastlightgen.image_condition import image_condition, model_input

    model = WanTransformer3DModel.from_pretrained(str(folders["i2v"] / "transformer")).eval()
    g = torch.Generator().manual_seed(0)
    x, text = torch.randn(1, 16, 3, 4, 4, generator=g), torch.randn(1, 7, 64, generator=g)
    condition = image_condition(torch.randn(1, 16, 3, 4, 4, generator=g))
    cond = Conditioning(text=text, latent_condition=condition)
    with torch.no_grad():
        expected = model(model_input(x, condition), torch.tensor([300.0]), text, return_dict=False)[0]
        adapter = adapt(model)
        torch.testing.assert_close(adapter.forward(x, torch.tensor([0.3]), cond), expected)
        null = Conditioning(text=torch.zeros_like(text), latent_condition=condition)
        both = adapter.forward(x.repeat(2, 1, 1, 1, 1), torch.tensor([0.3, 0.3]), cond.cat(null))
        torch.testing.assert_close(both[:1], expected)
        assert cond.repeat(2).latent_condition.shape == (2, 20, 3, 4, 4)


def test_an_i2v_teacher_is_refused_without_image_latents(folders, shards, tmp_path):
    from train import stage1, stage2

    with pytest.raises(ValueError, match=r"I2V model \(36 input channels.*hold no image latents: run `python -m "
                                         r"train.preprocess` with this model's config"):
        stage1.run(load_config(None, a14b_settings(folders["i2v"], shards, tmp_path)))
    with pytest.raises(ValueError, match=r"the toy world's data hold no image latents"):
        stage2.run(load_config(None, [f"model.path={folders['i2v']}", "stage2.expert=low", "data.source=toy",
                                      f"run.run_dir={tmp_path}"]))
    assert not (tmp_path / "stage1").exists()


def test_a_wan21_i2v_teacher_is_refused_for_its_clip_tokens(i2v_shards, tmp_path):
    from tiny_models import tiny_wan
    from train import stage1

    tiny_wan("i2v", layers=2).save_pretrained(str(tmp_path / "transformer"))
    with pytest.raises(ValueError, match=r"Wan 2.1 I2V model: it also takes CLIP image tokens \(image_dim 24\)"):
        stage1.run(load_config(None, [f"model.teacher={tmp_path / 'transformer'}", "model.ti2v=false",
                                      "data.source=shards", f"data.shards={i2v_shards[0]}"]))


@pytest.fixture(scope="module")
def i2v_shards(folders, tmp_path_factory) -> tuple[Path, list[str]]:
    """Two clips through train.preprocess with the tiny I2V-A14B folder's encoders: its settings and shard folder."""
    from test_preprocess_real import clip

    from train import preprocess

    base = tmp_path_factory.mktemp("i2v_data")
    for k, caption in enumerate(("a red circle moves left", "a blue square jumps")):
        clip(base / "videos" / f"{k}.mp4", 9, 32, 32, seed=k)
        (base / "videos" / f"{k}.txt").write_text(caption)
    settings = [f"model.path={folders['i2v']}", "model.ti2v=false", "preprocess.encoder=wan",
                f"preprocess.videos={base / 'videos'}", f"preprocess.out={base / 'shards'}", "preprocess.frames=9",
                "preprocess.height=32", "preprocess.width=32"]
    preprocess.run(load_config(None, settings))
    return base / "shards", settings


def test_preprocess_writes_the_image_latents_the_pipeline_conditions_on(folders, i2v_shards):
    """For an I2V model each row also holds the VAE's latents of its video's first frame followed by zero frames:
    with the mask, the condition WanImageToVideoPipeline builds from that frame."""
    from diffusers import WanImageToVideoPipeline

    from fastlightgen.image_condition import image_condition
    from train.data.dataset import entries, videos

    out, settings = i2v_shards
    cfg = load_config(None, settings)
    stored = load_file(str(out / "shard_00000.safetensors"))
    assert stored["image_latents"].dtype == torch.float32 and stored["image_latents"].shape == (2, 16, 3, 4, 4)
    pipe = WanImageToVideoPipeline.from_pretrained(str(folders["i2v"]))
    for row, (_, video, _) in enumerate(videos(entries(cfg.preprocess), cfg.preprocess, {})):
        _, expected = pipe.prepare_latents(video[None, :, 0], 1, 16, 32, 32, 9, torch.float32, torch.device("cpu"),
                                           torch.Generator().manual_seed(0))
        torch.testing.assert_close(image_condition(stored["image_latents"][row:row + 1]), expected, atol=1e-5,
                                   rtol=1e-5)


def test_an_i2v_expert_trains_on_its_image_latents(folders, i2v_shards, tmp_path, monkeypatch):
    """Stage I and a Stage II step of the I2V-A14B low-noise expert on those shards: every prediction gets the
    condition, on the caption's and the null's rows alike."""
    from train import stage1, stage2
    from train.data import batches

    out, _ = i2v_shards
    settings = a14b_settings(folders["i2v"], out, tmp_path, **{"stage2.expert": "low", "stage2.iterations": 1,
                                                                "stage2.alpha": 0.5})
    drawn = []
    real_batch = batches.ShardSet.batch
    monkeypatch.setattr(batches.ShardSet, "batch", lambda self, g, n: drawn.append(real_batch(self, g, n)) or drawn[-1])
    stage1.run(load_config(None, settings))
    stage2.run(load_config(None, settings))
    assert len(drawn) == 3 and all(b.cond.latent_condition.shape == (1, 20, 3, 4, 4) for b in drawn)
    assert all(torch.equal(b.null.latent_condition, b.cond.latent_condition) for b in drawn)
    assert StageRecord.load(tmp_path / "stage2_low").sigma_range == (0.0, I2V_BOUNDARY)


# ---- 3. Stage I per expert ------------------------------------------------------------------------------

def test_stage1_scores_each_expert_on_its_part_of_the_schedule(folders, shards, tmp_path):
    from diffusers import WanTransformer3DModel

    from fastlightgen.adapters import adapt
    from fastlightgen.importance import block_importance, stage1_sigmas
    from fastlightgen.plan import ExpertPlans, PrunePlan, read_plan
    from fastlightgen.plot import HEIGHT
    from train import stage1
    from train.data.batches import batch_source
    from train.distributed.processes import step_generator

    root = folders["t2v"]
    cfg = load_config(None, a14b_settings(root, shards, tmp_path, **{"stage1.expert_keep_ratios": "{high: 0.5}"}))
    out = stage1.run(cfg)
    plans = ExpertPlans.from_dict(json.loads(out.read_text()))
    assert plans.boundary == T2V_BOUNDARY
    assert (len(plans.plans["high"].kept), len(plans.plans["low"].kept)) == (2, 3)  # 0.5 and 0.7 of 4 blocks

    draw = batch_source(cfg)
    batches = [draw(step_generator(0, "stage1", i, None), 1) for i in range(2)]
    for expert, folder, (low, high) in (("high", "transformer", (T2V_BOUNDARY, 1.0)),
                                        ("low", "transformer_2", (0.0, T2V_BOUNDARY))):
        adapter = adapt(WanTransformer3DModel.from_pretrained(str(root / folder)).eval())
        expected = block_importance(adapter, [(b.x0, b.cond) for b in batches], stage1_sigmas(2, low, high))
        assert plans.plans[expert].scores == pytest.approx(expected.scores, rel=1e-6), expert
        assert read_plan(out, expert).kept == plans.plans[expert].kept
    assert plans.plans["high"].scores != pytest.approx(plans.plans["low"].scores, rel=1e-3)

    rows = list(csv.DictReader((out.parent / "scores.csv").open()))
    assert [(r["expert"], int(r["block"])) for r in rows] == [(e, b) for e in ("high", "low") for b in range(4)]
    from PIL import Image
    assert Image.open(out.parent / "importance.png").height == 2 * HEIGHT
    with pytest.raises(ValueError, match="one plan per expert .*stage2.expert"):
        PrunePlan.load(out)


def test_two_files_in_the_comfyui_layout_are_the_experts_with_the_boundary_given(shards, tmp_path):
    """Two single files (the original Wan keys ComfyUI distributes, no folder): model.teacher, model.teacher_2 and
    model.boundary, which nothing else can supply; Stage I scores the file each setting names on its range."""
    from fastlightgen.adapters import adapt
    from fastlightgen.importance import block_importance, stage1_sigmas
    from fastlightgen.plan import read_plan
    from fastlightgen.wan_keys import diffusers_to_original
    from tiny_models import tiny_wan
    from train import stage1
    from train.data.batches import batch_source
    from train.distributed.processes import step_generator

    experts = {name: tiny_wan("t2v", layers=LAYERS, seed=seed, heads=1, head_dim=128)  # ComfyUI's 128-wide heads
               for name, seed in (("high", 3), ("low", 4))}
    for name, model in experts.items():
        save_file({k: v.contiguous() for k, v in diffusers_to_original(model.state_dict()).items()},
                  str(tmp_path / f"{name}.safetensors"))
    files = [f"model.teacher={tmp_path / 'high.safetensors'}", f"model.teacher_2={tmp_path / 'low.safetensors'}"]
    run = ["data.source=shards", f"data.shards={shards}", f"run.run_dir={tmp_path / 'run'}", "model.ti2v=false",
           "stage1.samples=1", "stage1.timesteps=2"]
    with pytest.raises(ValueError, match="set model.boundary"):
        stage1.run(load_config(None, [*files, *run]))
    cfg = load_config(None, [*files, *run, "model.boundary=0.6"])
    out = stage1.run(cfg)
    batch = batch_source(cfg)(step_generator(0, "stage1", 0, None), 1)
    for name, (low, high) in (("high", (0.6, 1.0)), ("low", (0.0, 0.6))):
        expected = block_importance(adapt(experts[name]), [(batch.x0, batch.cond)], stage1_sigmas(2, low, high))
        assert read_plan(out, name).scores == pytest.approx(expected.scores, rel=1e-5), name


def test_a_one_expert_plan_is_not_read_as_an_experts(tmp_path):
    from fastlightgen.adapters.base import ModelFingerprint
    from fastlightgen.plan import PrunePlan, read_plan

    PrunePlan.from_blocks(ModelFingerprint("wan", 4, 64), [1]).save(tmp_path / "plan.json")
    assert read_plan(tmp_path / "plan.json").kept == [0, 2, 3]
    with pytest.raises(ValueError, match="plan of a one-expert model, not of 'low'"):
        read_plan(tmp_path / "plan.json", "low")


def test_stage2_refuses_a_plan_scored_at_another_boundary(folders, shards, tmp_path):
    """The boundary a run uses is the one its plan was scored at: Stage I's identity holds the folder's, and Stage
    II of an expert stops before any load when the model's boundary has changed since."""
    from train import stage1, stage2

    settings = a14b_settings(folders["t2v"], shards, tmp_path, **{"stage2.expert": "high"})
    assert run_identity(load_config(None, settings), "stage1", 1)["model"]["boundary"] == T2V_BOUNDARY
    stage1.run(load_config(None, settings))
    with pytest.raises(ValueError, match=r"scored with the experts' boundary at 0.875, but the model's is 0.5: run "
                                         r"Stage I again, or set model.boundary=0.875"):
        stage2.run(load_config(None, [*settings, "model.boundary=0.5"]))
    assert not (tmp_path / "stage2_high").exists()


# ---- 4. Stage II of one expert ---------------------------------------------------------------------------

@pytest.mark.parametrize("expert", ["high", "low"])
def test_stage2_trains_the_chosen_expert_on_its_sigmas(expert, folders, shards, tmp_path, monkeypatch):
    from fastlightgen import distill
    from train import stage1, stage2

    root = folders["t2v"]
    settings = a14b_settings(root, shards, tmp_path, **{"stage2.expert": expert, "stage2.iterations": 3,
                                                         "stage2.lr": 1e-9, "stage2.alpha": 0.5})
    stage1.run(load_config(None, settings))
    sigmas = []
    real_loss = distill.stage2_loss
    monkeypatch.setattr(stage2, "stage2_loss", lambda a, x_t, sigma, *rest: sigmas.append(sigma.clone())
                        or real_loss(a, x_t, sigma, *rest))
    out = stage2.run(load_config(None, settings))
    assert out == tmp_path / f"stage2_{expert}" / "model.safetensors"
    record = StageRecord.load(out.parent)
    expected_range = (T2V_BOUNDARY, 1.0) if expert == "high" else (0.0, T2V_BOUNDARY)
    assert record.expert == expert and record.sigma_range == expected_range
    plan = json.loads((tmp_path / "stage1" / "plan.json").read_text())["experts"][expert]
    assert record.plan.to_dict() == plan
    drawn = torch.cat(sigmas)
    assert len(drawn) == 3 and bool(((drawn >= expected_range[0]) & (drawn <= expected_range[1])).all())
    trained = load_file(str(out))  # lr 1e-9: the weights it started from, that expert's
    for folder, same in (("transformer", expert == "high"), ("transformer_2", expert == "low")):
        start = load_file(str(root / folder / "diffusion_pytorch_model.safetensors"))
        close = all(torch.allclose(trained[k], start[k].float(), atol=1e-6) for k in start)
        assert close == same, folder


def test_stage2_of_one_expert_under_zero3_two_processes_matches_the_single_process(folders, shards, tmp_path):
    """The low-noise expert's Stage II as 2 processes under DeepSpeed ZeRO-3 (gloo, CPU), its weights read as each
    rank's partitions from transformer_2/: the first loss (before any update, rank 0 drawing the single process's
    batch and sigma) equals the plain loop's, and the gathered model is that expert's architecture."""
    pytest.importorskip("deepspeed")
    from test_train_distributed import ZERO3, metrics, torchrun

    from train import stage1, stage2

    run = {"stage2.expert": "low", "stage2.alpha": 0.5}  # alpha < 1: a loss even when the draw skips nothing
    settings = a14b_settings(folders["t2v"], shards, tmp_path / "single", **run, **{"stage2.iterations": 1})
    stage1.run(load_config(None, settings))
    stage2.run(load_config(None, settings))
    plan = tmp_path / "single" / "stage1" / "plan.json"
    zero3 = a14b_settings(folders["t2v"], shards, tmp_path / "zero3", **ZERO3, **run,
                          **{"stage2.iterations": 2, "stage2.plan": plan})
    torchrun("train.stage2", [arg for setting in zero3 for arg in ("--set", setting)])
    single, sharded = metrics(tmp_path / "single" / "stage2_low"), metrics(tmp_path / "zero3" / "stage2_low")
    assert [r["step"] for r in sharded] == [1, 2]
    assert sharded[0]["loss"] > 0 and sharded[0]["loss"] == pytest.approx(single[0]["loss"], rel=1e-5)
    gathered = load_file(str(tmp_path / "zero3" / "stage2_low" / "model.safetensors"))
    start = load_file(str(folders["t2v"] / "transformer_2" / "diffusion_pytorch_model.safetensors"))
    assert {k: v.shape for k, v in gathered.items()} == {k: v.shape for k, v in start.items()}
    record = StageRecord.load(tmp_path / "zero3" / "stage2_low")
    assert (record.expert, record.sigma_range) == ("low", (0.0, T2V_BOUNDARY))


# ---- 5. Stage III of two experts ---------------------------------------------------------------------------

def two_expert_stage2(settings: list[str]) -> None:
    """Stage I, then one Stage II step of each expert: the runs Stage III of a two-expert model starts from."""
    from train import stage1, stage2

    stage1.run(load_config(None, settings))
    for expert in ("high", "low"):
        stage2.run(load_config(None, [*settings, f"stage2.expert={expert}"]))


STAGE3 = {"stage2.iterations": 1, "stage2.alpha": 0.5, "stage3.iterations": 2, "stage3.fake_updates": 2,
          "run.save_every": 1}


def hook_stage3_models(monkeypatch, hook) -> None:
    """Stage III's models as built, each expert's generator ("generator") and score model ("scores") handed to
    `hook(models, unit, role, model)` before the run trains."""
    from train import stage3

    real_build = stage3.build

    def build(cfg):
        m = real_build(cfg)
        for unit in m.experts:
            for role, model in (("generator", unit.generator.module.model), ("scores", unit.lora_model)):
                hook(m, unit, role, model)
        return m

    monkeypatch.setattr(stage3, "build", build)


def test_stage3_takes_each_step_and_each_draw_with_the_expert_of_its_sigma_and_exports_a_pair(folders, shards, tmp_path,
                                                                                              monkeypatch):
    """Every forward of a generator, a real score and a fake score runs at sigmas of its own expert's range; the few-step
    list at shift 5 gives its first two steps to the high-noise expert; each expert's student is written with its
    record, pruned to its own plan."""
    from fastlightgen.plan import ExpertPlans
    from train import stage3

    settings = a14b_settings(folders["t2v"], shards, tmp_path, **STAGE3)
    two_expert_stage2(settings)
    calls, routes = [], set()

    def record(m, unit, role, model):
        routes.add(tuple(m.expert_at(s).name for s in m.sigmas[:-1]))
        model.condition_embedder.register_forward_pre_hook(
            lambda _, args: calls.append((role, unit.name, float(args[0].max()) / 1000)))

    hook_stage3_models(monkeypatch, record)
    out = stage3.run(load_config(None, settings))
    assert routes == {("high", "high", "low", "low")}
    assert out == tmp_path / "stage3"
    seen = {(role, name) for role, name, _ in calls}
    assert {("scores", "high"), ("scores", "low"), ("generator", "high")} <= seen
    for role, name, sigma in calls:
        assert (sigma >= T2V_BOUNDARY) == (name == "high"), (role, name, sigma)
    plans = ExpertPlans.from_dict(json.loads((tmp_path / "stage1" / "plan.json").read_text()))
    for expert, expected_range in (("high", (T2V_BOUNDARY, 1.0)), ("low", (0.0, T2V_BOUNDARY))):
        record = StageRecord.load(out / expert)
        assert (record.expert, record.sigma_range) == (expert, expected_range)
        assert record.plan.kept == plans.plans[expert].kept
        assert record.student_config["num_layers"] == len(plans.plans[expert].kept)
        student = load_file(str(out / expert / "model.safetensors"))
        assert {int(k.split(".")[1]) for k in student if k.startswith("blocks.")} == set(range(len(record.plan.kept)))
    export_the_pair(load_config(None, settings), plans)


def export_the_pair(cfg, plans) -> None:
    """train.export writes one checkpoint per expert, named after export.out and the expert, each naming its expert, the boundary and
    its kept blocks, renumbered for ComfyUI's loader; --convert keeps them in fp8_scaled."""
    from dataclasses import replace

    from fastlightgen.checkpoint import load_wan, read_checkpoint
    from train import export

    root = Path(cfg.run.run_dir)
    written = export.run(cfg)
    assert written == [root / "student_high_noise.safetensors", root / "student_low_noise.safetensors"]
    for path, expert in zip(written, ("high", "low")):
        model, meta = load_wan(path)
        assert (meta.expert, meta.boundary, meta.kept_blocks) == (expert, T2V_BOUNDARY, plans.plans[expert].kept)
        assert meta.recommended.denoising_step_list == (1000, 750, 500, 250)
        assert model.config.num_layers == len(meta.kept_blocks)
        fp8 = export.convert(replace(cfg, export=replace(cfg.export, dtype="fp8_scaled")), path)
        converted = read_checkpoint(fp8)
        assert converted.marker is not None and converted.meta == meta


def test_stage3_draws_each_expert_with_its_share_of_the_dmd_law(folders, shards, tmp_path):
    """The expert of a DMD draw is the same on every rank and chosen with its share of stage3.dmd_sigma_range after
    the shift warp; its sigmas lie in its range. A one-expert run draws as before experts existed."""
    from types import SimpleNamespace

    from fastlightgen.flow import shift_sigma, unshift_sigma
    from train import stage3
    from train.loop.run import Run

    cfg = load_config(None, a14b_settings(folders["t2v"], shards, tmp_path))
    units = [SimpleNamespace(name=n, sigma_range=r) for n, r in (("high", (T2V_BOUNDARY, 1.0)),
                                                                  ("low", (0.0, T2V_BOUNDARY)))]
    dist = SimpleNamespace(data_rank=1)
    m = SimpleNamespace(cfg=cfg, experts=units, run=Run.__new__(Run))
    m.run.cfg, m.run.dist = cfg, dist
    lo, hi = cfg.stage3.dmd_sigma_range
    share = (hi - float(unshift_sigma(T2V_BOUNDARY, cfg.stage3.shift))) / (hi - lo)
    chosen = [stage3.dmd_expert(m, i, "gen").name for i in range(2000)]
    assert chosen.count("high") / len(chosen) == pytest.approx(share, abs=0.035)
    dist.data_rank = 0
    assert [stage3.dmd_expert(m, i, "gen").name for i in range(2000)] == chosen
    g = torch.Generator().manual_seed(0)
    for unit in units:
        drawn = stage3.dmd_sigma(m, g, 500, unit)
        assert bool(((drawn >= unit.sigma_range[0]) & (drawn <= unit.sigma_range[1])).all()), unit.name
    whole = SimpleNamespace(name=None, sigma_range=(0.0, 1.0))
    torch.testing.assert_close(stage3.dmd_sigma(m, torch.Generator().manual_seed(1), 8, whole),
                               shift_sigma(lo + (hi - lo) * torch.rand(8, generator=torch.Generator().manual_seed(1)),
                                           cfg.stage3.shift), rtol=0, atol=0)


def test_stage3_of_two_experts_refuses_one_stage2_file_and_names_a_missing_expert(folders, shards, tmp_path):
    from train import stage1, stage2, stage3

    settings = a14b_settings(folders["t2v"], shards, tmp_path)
    one_file = tmp_path / "x.safetensors"
    one_file.write_bytes(b"")
    with pytest.raises(ValueError, match=r"stage3.init=.*x.safetensors is one Stage II run's file.*set stage3.init to "
                                         r"the run folder holding stage2_high/ and stage2_low/"):
        stage3.run(load_config(None, [*settings, f"stage3.init={one_file}"]))
    stage1.run(load_config(None, [*settings, "stage2.iterations=1"]))
    stage2.run(load_config(None, [*settings, "stage2.iterations=1", "stage2.expert=high"]))
    with pytest.raises(FileNotFoundError, match=r"stage3.init\[low\] .*stage2_low/model.safetensors does not exist: "
                                                r"run `python -m train.stage2 --set stage2.expert=low` first"):
        stage3.run(load_config(None, settings))
    assert not (tmp_path / "stage3").exists()


def test_stage3_of_two_experts_under_zero3_two_processes_matches_the_single_process(folders, shards, tmp_path):
    """Both experts' students and scores partitioned over 2 processes (DeepSpeed ZeRO-3, gloo, CPU): the first fake
    loss (before any update, rank 0 drawing the single process's batch) equals the plain loop's, and each gathered
    student is its expert's pruned architecture."""
    pytest.importorskip("deepspeed")
    from test_train_distributed import ZERO3, metrics, torchrun

    from train import stage3

    run = {**STAGE3, "stage3.fake_updates": 1}
    single = a14b_settings(folders["t2v"], shards, tmp_path / "single", **run)
    two_expert_stage2(single)
    stage3.run(load_config(None, [*single, "stage3.iterations=1"]))
    zero3 = a14b_settings(folders["t2v"], shards, tmp_path / "zero3", **ZERO3, **run, **{  # the same Stage I and II runs
        "stage3.init": tmp_path / "single", "stage3.plan": tmp_path / "single" / "stage1" / "plan.json"})
    torchrun("train.stage3", [arg for setting in zero3 for arg in ("--set", setting)])
    first, sharded = metrics(tmp_path / "single" / "stage3")[0], metrics(tmp_path / "zero3" / "stage3")
    assert [r["step"] for r in sharded] == [1, 2]
    assert sharded[0]["fake_loss"] > 0 and sharded[0]["fake_loss"] == pytest.approx(first["fake_loss"], rel=1e-5)
    for expert in ("high", "low"):
        gathered = load_file(str(tmp_path / "zero3" / "stage3" / expert / "model.safetensors"))
        plain = load_file(str(tmp_path / "single" / "stage3" / expert / "model.safetensors"))
        assert {k: v.shape for k, v in gathered.items()} == {k: v.shape for k, v in plain.items()}
        assert StageRecord.load(tmp_path / "zero3" / "stage3" / expert).expert == expert


def test_stage3_of_the_i2v_experts_feeds_every_prediction_its_36_channels(folders, i2v_shards, tmp_path, monkeypatch):
    """I2V-A14B through Stage III: each expert's student, real and fake score take the latents, the mask and the image
    latents (36 channels) at every call."""
    from train import stage3

    out, _ = i2v_shards
    settings = a14b_settings(folders["i2v"], out, tmp_path, **{**STAGE3, "stage3.iterations": 1})
    two_expert_stage2(settings)
    widths = []
    hook_stage3_models(monkeypatch, lambda m, unit, role, model: model.patch_embedding.register_forward_pre_hook(
        lambda _, args: widths.append(args[0].shape[1])))
    stage3.run(load_config(None, settings))
    assert len(widths) > 4 and set(widths) == {36}
    assert StageRecord.load(tmp_path / "stage3" / "low").sigma_range == (0.0, I2V_BOUNDARY)


def test_stage3_of_two_experts_resumes_bit_identically(folders, shards, tmp_path):
    """A two-expert Stage III stopped after its first iteration and resumed ends with the same students, bit for bit,
    as one run straight through: both experts' generators, fake scores and optimizers are in its checkpoints."""
    from train import stage3

    straight = a14b_settings(folders["t2v"], shards, tmp_path / "straight", **STAGE3)
    two_expert_stage2(straight)
    stage3.run(load_config(None, straight))
    resumed = a14b_settings(folders["t2v"], shards, tmp_path / "resumed", **STAGE3, **{  # the same Stage I and II runs
        "stage3.init": tmp_path / "straight", "stage3.plan": tmp_path / "straight" / "stage1" / "plan.json"})
    stage3.run(load_config(None, [*resumed, "stage3.iterations=1"]))
    students = {e: tmp_path / "resumed" / "stage3" / e / "model.safetensors" for e in ("high", "low")}
    after_one = {e: load_file(str(path)) for e, path in students.items()}
    stage3.run(load_config(None, resumed), resume=True)
    for expert in ("high", "low"):
        a = load_file(str(tmp_path / "straight" / "stage3" / expert / "model.safetensors"))
        b = load_file(str(students[expert]))
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), expert
    assert any(not torch.equal(after_one[e][k], load_file(str(students[e]))[k]) for e in students
               for k in after_one[e])  # the second iteration changed a student
