"""The training entry points on the toy world with a tiny teacher, single process.

Covers: every entry point (--help, a few steps), the stage1 -> stage2 -> stage3 -> export pipeline with
the export read back by `read_checkpoint`, preprocess skipping bad videos, resume after SIGKILL giving
bit-identical weights, a planted NaN, too many NaNs, and a foreign checkpoint being refused.
"""
from __future__ import annotations

import hashlib
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from fastlightgen.checkpoint import CheckpointError, CheckpointMeta, read_checkpoint, save_checkpoint
from fastlightgen.plan import PrunePlan
from fastlightgen.toy.teacher import ToyTeacherShape, build_toy_teacher
from train.models.record import StageRecord

REPO = Path(__file__).resolve().parents[1]
TINY = ToyTeacherShape(num_layers=4, num_attention_heads=2, attention_head_dim=16, ffn_dim=64)


def make_tiny_teacher(folder: Path) -> tuple[Path, Path]:
    """A 4-block toy teacher file and an explicit plan dropping blocks 1 and 2."""
    from fastlightgen.adapters import adapt

    model = build_toy_teacher(TINY, seed=0)
    teacher = save_checkpoint(folder / "teacher.safetensors", model,
                              CheckpointMeta(original_num_blocks=4, kept_blocks=[0, 1, 2, 3], head_dim=16))
    plan_file = folder / "plan.json"
    PrunePlan.from_blocks(adapt(model).fingerprint(), [1, 2]).save(plan_file)
    return teacher, plan_file


def train_args(teacher: Path, plan: Path, run_dir: Path, **settings) -> list[str]:
    base = {"model.teacher": teacher, "run.run_dir": run_dir, "stage2.plan": plan, "stage3.plan": plan,
            "data.batch_size": 2, "stage2.iterations": 3, "stage3.iterations": 2, "stage3.fake_updates": 2,
            "run.save_every": 2, **settings}
    return [a for k, v in base.items() for a in ("--set", f"{k}={v}")]


def subprocess_env() -> dict:
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO), "PYTHONWARNINGS": "ignore"}


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return make_tiny_teacher(tmp_path_factory.mktemp("tiny"))



@pytest.mark.parametrize("entry", ["preprocess", "stage1", "stage2", "stage3", "export"])
def test_help(entry, capsys):
    import importlib

    with pytest.raises(SystemExit) as exit_info:
        importlib.import_module(f"train.{entry}").main(["--help"])
    assert exit_info.value.code == 0
    assert "--set" in capsys.readouterr().out


def test_pipeline_stage1_to_export(tiny, tmp_path):
    from train import export, preprocess, stage1, stage2, stage3

    teacher, _ = tiny
    shards = tmp_path / "shards"
    preprocess.main(["--set", f"preprocess.out={shards}", "--set", "preprocess.toy_samples=6",
                     "--set", "preprocess.shard_size=4"])
    # empty plan paths: the stages read run_dir/stage1/plan.json
    args = train_args(teacher, "", tmp_path / "run", **{"data.source": "shards", "data.shards": shards})
    stage1.main(args + ["--set", "stage1.samples=2", "--set", "stage1.timesteps=2", "--set", "stage1.keep_ratio=0.5"])
    stage1_dir = tmp_path / "run" / "stage1"
    assert {p.name for p in stage1_dir.iterdir()} >= {"plan.json", "scores.csv", "importance.png"}
    plan = PrunePlan.load(stage1_dir / "plan.json")
    stage2.main(args)
    stage3.main(args)
    for stage in ("stage2", "stage3"):
        folder = tmp_path / "run" / stage
        assert {p.name for p in folder.iterdir()} >= {"model.safetensors", "run.json", "metrics.jsonl", "loss.png"}
    records = [json.loads(x) for x in (tmp_path / "run" / "stage3" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [1, 2] and all("gen_loss" in r and "fake_loss" in r for r in records)

    out = tmp_path / "student.safetensors"
    export.main(args + ["--set", f"export.out={out}", "--set", f"export.diffusers_out={tmp_path / 'diffusers'}"])
    ckpt = read_checkpoint(out, plan)
    assert ckpt.meta.kept_blocks == plan.kept and ckpt.config["num_layers"] == 2
    assert ckpt.meta.recommended.denoising_step_list == (1000, 750, 500, 250)
    assert ckpt.meta.provenance["iterations"] == 2 and ckpt.meta.provenance["betas"] == [3.5, 0.25]
    assert "shards" in ckpt.meta.provenance["data"]
    student = load_file(str(tmp_path / "run" / "stage3" / "model.safetensors"))
    torch.testing.assert_close(ckpt.state_dict["proj_out.weight"], student["proj_out.weight"].to(torch.bfloat16))
    assert (tmp_path / "diffusers" / "config.json").is_file()

    from fastlightgen.checkpoint import load_wan
    from fastlightgen.student_adapter import apply_adapter, read_adapter
    from train import export_adapter

    export_adapter.main(args + ["--rank", "0", "--dtype", "float32", "--out", str(tmp_path / "adapter.safetensors")])
    adapter = read_adapter(tmp_path / "adapter.safetensors")  # whole deltas: the stage III student exactly
    assert adapter.meta.kept_blocks == plan.kept and adapter.meta.recommended == ckpt.meta.recommended
    rebuilt = apply_adapter(load_wan(teacher, dtype=torch.float32)[0], adapter)
    torch.testing.assert_close(rebuilt.proj_out.weight.detach(), student["proj_out.weight"].float())


def write_video(path: Path, frames: int, size: int) -> None:
    import av
    import numpy as np

    with av.open(str(path), "w") as container:
        stream = container.add_stream("mpeg4", rate=8)
        stream.width = stream.height = size
        stream.pix_fmt = "yuv420p"
        for i in range(frames):
            img = np.full((size, size, 3), 40 * i % 255, dtype=np.uint8)
            container.mux(stream.encode(av.VideoFrame.from_ndarray(img, format="rgb24")))
        container.mux(stream.encode())


def test_preprocess_reports_and_skips_bad_videos(tmp_path, capsys):
    from safetensors.torch import load_file as load

    from train import preprocess

    videos = tmp_path / "videos"
    videos.mkdir()
    write_video(videos / "good.mp4", 8, 32)
    write_video(videos / "short.mp4", 3, 32)
    write_video(videos / "big.mp4", 8, 48)
    (videos / "broken.mp4").write_bytes(b"not a video at all")
    captions = tmp_path / "captions.jsonl"
    captions.write_text("".join(json.dumps({"file": f, "caption": f"a red circle {f}"}) + "\n"
                                for f in ("good.mp4", "short.mp4", "big.mp4", "broken.mp4", "missing.mp4")))
    out = tmp_path / "shards"
    preprocess.main(["--set", f"preprocess.videos={videos}", "--set", f"preprocess.captions={captions}",
                     "--set", f"preprocess.out={out}"])
    text = capsys.readouterr().out
    index = json.loads((out / "index.json").read_text())
    assert index["skipped"] == {"too short": 1, "unreadable": 1, "missing file": 1}  # big.mp4 is scaled down
    assert "wrote 2 samples" in text and "skipped 3" in text and "skipping broken.mp4: unreadable" in text
    assert load(str(out / "shard_00000.safetensors"))["latents"].shape == (2, 48, 6, 8, 8)


def test_dry_run_prints_memory_per_gpu(capsys):
    from train import stage3

    for name in ("wan2.1-t2v-1.3b", "wan2.2-ti2v-5b", "hunyuanvideo", "wan2.2-t2v-a14b", "wan2.2-i2v-a14b"):
        stage3.main(["--config", str(REPO / "configs" / f"{name}.yaml"), "--dry-run"])
        text = capsys.readouterr().out
        assert "GiB per GPU" in text and "stage3" in text and "world size 16" in text


@pytest.mark.parametrize("name", ["wan2.1-t2v-1.3b", "wan2.2-ti2v-5b", "hunyuanvideo", "wan2.2-t2v-a14b",
                                  "wan2.2-i2v-a14b", "toy"])
def test_dry_run_gives_the_80_gb_verdict_of_each_shipped_config(name, tmp_path, capsys):
    """Without weights: the real-model configs carry model.arch; the toy one reads its committed teacher's
    header, and names what it needs when that is missing."""
    from train import stage2, stage3

    config = str(REPO / "configs" / f"{name}.yaml")
    for main in (stage2.main, stage3.main):
        if name != "toy":  # model.arch wins: neither the model folder nor a teacher file is read
            main(["-c", config, "--set", f"model.teacher={tmp_path / 'absent'}", "--dry-run"])
        else:
            main(["-c", config, "--dry-run"])
        lines = capsys.readouterr().out.splitlines()
        assert re.fullmatch(r"fits in 80 GB per GPU: (yes|no) \(estimate \d+\.\d GiB\)", lines[-2])
        assert lines[-1].startswith("sequence parallelism")
        assert "activations" in lines[2] and "host RAM/node" in lines[2]
    if name == "toy":
        with pytest.raises(SystemExit, match="model.arch or the teacher"):
            stage3.main(["-c", config, "--set", f"model.teacher={tmp_path / 'absent'}", "--dry-run"])


def test_dry_run_reads_the_teacher_header_not_its_weights(tmp_path, capsys, monkeypatch):
    """Without model.arch the architecture comes from the teacher file's header: a file cut off after it (which
    no loader could read) is enough, and the model is built once."""
    from train import stage3
    from train.config import load_config
    from train.models import memory

    model = build_toy_teacher(TINY, seed=0)
    full = save_checkpoint(tmp_path / "full.safetensors", model,
                           CheckpointMeta(original_num_blocks=4, kept_blocks=[0, 1, 2, 3], head_dim=16))
    raw = full.read_bytes()
    header_only = tmp_path / "header_only.safetensors"
    header_only.write_bytes(raw[:8 + int.from_bytes(raw[:8], "little")])
    with pytest.raises(CheckpointError, match="truncated"):
        read_checkpoint(header_only)

    built = []
    real_meta_model = memory.meta_model
    monkeypatch.setattr(memory, "meta_model", lambda cfg: built.append(cfg) or real_meta_model(cfg))
    stage3.main(["--set", f"model.teacher={header_only}", "--dry-run"])
    assert "GiB per GPU" in capsys.readouterr().out and len(built) == 1
    counts = memory.count_params(load_config(None, [f"model.teacher={header_only}"]))
    assert counts.total == sum(p.numel() for p in model.parameters())
    assert counts.per_block == [sum(p.numel() for p in b.parameters()) for b in model.blocks]

    with pytest.raises(SystemExit, match="model.arch or the teacher"):
        stage3.main(["--dry-run"])


def test_resume_after_sigkill_gives_identical_weights(tiny, tmp_path, one_thread):
    from train import stage2

    teacher, plan = tiny
    settings = {"stage2.iterations": 8, "run.save_every": 2}
    stage2.main(train_args(teacher, plan, tmp_path / "straight", **settings))

    killed_dir = tmp_path / "killed"
    cmd = [sys.executable, "-m", "train.stage2", *train_args(teacher, plan, killed_dir, **settings)]
    proc = subprocess.Popen(cmd, cwd=REPO, env=subprocess_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.time() + 120
    while not (killed_dir / "stage2" / "step_0000004").exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (killed_dir / "stage2" / "model.safetensors").exists(), "the run finished before it was killed"

    stage2.main(train_args(teacher, plan, killed_dir, **settings) + ["--resume"])
    a = load_file(str(tmp_path / "straight" / "stage2" / "model.safetensors"))
    b = load_file(str(killed_dir / "stage2" / "model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    steps = [json.loads(x)["step"] for x in (killed_dir / "stage2" / "metrics.jsonl").read_text().splitlines()]
    assert steps == list(range(1, 9))


def test_stage3_resume_is_exact(tiny, tmp_path):
    """Two units (generator, fake-score LoRA), TTUR and a seeded LoRA init: 3 iterations straight equal
    2 iterations + resume, and neither depends on the global RNG state."""
    from train import stage2, stage3

    teacher, plan = tiny
    settings = {"stage2.iterations": 1, "stage3.iterations": 3, "run.save_every": 1}
    stage2.main(train_args(teacher, plan, tmp_path / "a", **settings))
    init = {"stage3.init": tmp_path / "a" / "stage2" / "model.safetensors"}
    torch.manual_seed(1)
    stage3.main(train_args(teacher, plan, tmp_path / "a", **settings))
    torch.manual_seed(2)
    stage3.main(train_args(teacher, plan, tmp_path / "b", **{**settings, **init, "stage3.iterations": 2}))
    stage3.main(train_args(teacher, plan, tmp_path / "b", **settings, **init) + ["--resume"])
    for name in ("model.safetensors", "step_0000003/tensors.safetensors"):
        a, b = (load_file(str(tmp_path / r / "stage3" / name)) for r in "ab")
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), name


def test_foreign_checkpoint_is_refused(tiny, tmp_path):
    from train import stage2
    from train.loop.run import CheckpointMismatch

    teacher, plan = tiny
    stage2.main(train_args(teacher, plan, tmp_path))
    with pytest.raises(CheckpointMismatch, match=r"stage2\.lr: 1e-05 != 2e-05"):
        stage2.main(train_args(teacher, plan, tmp_path, **{"stage2.lr": 2e-5}) + ["--resume"])
    with pytest.raises(CheckpointMismatch, match="--resume"):
        stage2.main(train_args(teacher, plan, tmp_path))


def test_planted_nan_is_skipped_then_too_many_stop(tiny, tmp_path, monkeypatch, capsys):
    from train import stage2
    from train.loop.run import TooManyBadSteps
    from train.loop.state import latest_state

    teacher, plan = tiny
    real_source = stage2.batch_source
    poisoned_calls = {2}

    def poisoned_source(cfg):
        draw = real_source(cfg)
        calls = []

        def wrapped(g, size):
            batch = draw(g, size)
            calls.append(1)
            if len(calls) in poisoned_calls or "all" in poisoned_calls:
                batch.x0[0, 0, 1, 0, 0] = float("nan")
                batch.desc = "POISONED " + batch.desc
            return batch
        return wrapped

    monkeypatch.setattr(stage2, "batch_source", poisoned_source)
    stage2.main(train_args(teacher, plan, tmp_path, **{"stage2.iterations": 4}))
    err = capsys.readouterr().err
    assert "step 1: non-finite model loss (nan) on batch POISONED toy train seed" in err
    records = [json.loads(x) for x in (tmp_path / "stage2" / "metrics.jsonl").read_text().splitlines()]
    assert records[1] == {"step": 2, "skipped": 1, "s_per_step": records[1]["s_per_step"]}
    assert all(torch.isfinite(v).all() for v in load_file(str(tmp_path / "stage2" / "model.safetensors")).values())

    good = latest_state(tmp_path / "stage2")
    before = {p.name: p.read_bytes() for p in good.iterdir()}
    poisoned_calls.add("all")
    with pytest.raises(TooManyBadSteps, match=f"Last good checkpoint: {good}"):
        stage2.main(train_args(teacher, plan, tmp_path, **{"stage2.iterations": 20, "run.max_bad_steps": 3})
                    + ["--resume"])
    assert latest_state(tmp_path / "stage2") == good
    assert {p.name: p.read_bytes() for p in good.iterdir()} == before


def test_stage3_ablations_step_only_and_unpruned_teacher(tiny, tmp_path, capsys):
    """The paper's Table 2 and 9 variants: step-only DMD from the teacher (a plan keeping every block, no
    Stage II) gives a whole-model student; the unpruned teacher trains a different student than eq. 9."""
    from fastlightgen.adapters import adapt
    from train import stage2, stage3

    teacher, plan = tiny
    keep_all = tmp_path / "keep_all.json"
    PrunePlan.from_blocks(adapt(build_toy_teacher(TINY)).fingerprint(), []).save(keep_all)
    stage3.main(train_args(teacher, keep_all, tmp_path / "dmd", **{"stage3.init": "teacher"}))
    record = StageRecord.load(tmp_path / "dmd" / "stage3")
    assert record.student_config["num_layers"] == 4 and record.alpha is None

    stage2.main(train_args(teacher, plan, tmp_path / "s2"))
    init = {"stage3.init": tmp_path / "s2" / "stage2" / "model.safetensors", "stage3.iterations": 1}
    students = {}
    for path in ("pruned", "unpruned"):
        stage3.main(train_args(teacher, plan, tmp_path / path, **init, **{"stage3.plan_teacher": path}))
        students[path] = load_file(str(tmp_path / path / "stage3" / "model.safetensors"))
    assert students["pruned"].keys() == students["unpruned"].keys()
    assert any(not torch.equal(students["pruned"][k], students["unpruned"][k]) for k in students["pruned"])
    with pytest.raises(SystemExit):  # a usage error (exit status 2) before anything is loaded or written
        stage3.main(train_args(teacher, plan, tmp_path / "bad", **init, **{"stage3.plan_teacher": "strong"}))
    assert "stage3.plan_teacher must be one of pruned, unpruned" in capsys.readouterr().err
    assert not (tmp_path / "bad").exists()


def _shard_set(folder: Path, rows: tuple[int, ...]) -> dict[str, dict[str, torch.Tensor]]:
    """A HunyuanVideo-like shard set (fp32 latents, bf16 text and pooled, a bool mask), `rows[s]` rows in shard s."""
    from safetensors.torch import save_file

    from train.preprocess import write_index

    gen, shards, entries = torch.Generator().manual_seed(0), {}, []
    for s, n in enumerate(rows):
        name = f"shard_{s:05d}.safetensors"
        shards[name] = {"latents": torch.randn(n, 4, 4, 16, 16, generator=gen),
                        "text": torch.randn(n, 5, 6, generator=gen).bfloat16(),
                        "text_mask": torch.rand(n, 5, generator=gen) > 0.5,
                        "pooled": torch.randn(n, 7, generator=gen).bfloat16()}
        save_file(shards[name], str(folder / name))
        entries.append({"file": name, "items": [{"file": f"{s}_{i}.mp4", "caption": ""} for i in range(n)]})
    null = {k: v[:1] for k, v in shards[entries[0]["file"]].items() if k != "latents"}
    save_file(null, str(folder / "null.safetensors"))
    write_index(folder, entries, {"file": "null.safetensors", "prompt": ""})
    return shards


def test_shard_batches_are_the_drawn_rows_of_the_whole_files(tmp_path):
    from train.data.batches import ShardSet

    shards = _shard_set(tmp_path, (3, 5, 1))
    items = [(name, i) for name, t in shards.items() for i in range(len(t["latents"]))]
    gen = torch.Generator().manual_seed(4)
    for _ in range(4):
        picks = torch.randint(0, len(items), (6,), generator=gen.clone_state()).tolist()
        batch = ShardSet(tmp_path).batch(gen, 6)
        whole = {k: torch.stack([shards[items[p][0]][k][items[p][1]] for p in picks]) for k in shards[items[0][0]]}
        assert torch.equal(batch.x0, whole["latents"]) and torch.equal(batch.cond.text, whole["text"].float())
        assert torch.equal(batch.cond.text_mask, whole["text_mask"])
        assert torch.equal(batch.cond.pooled, whole["pooled"].float())


def test_shard_draw_reads_only_its_rows(tmp_path):
    """Every row but the drawn one is overwritten on disk with NaN bytes (headers kept): the batch is unchanged,
    and the draw read (rchar, the loader uses read() alone) the row's bytes and little more."""
    import struct

    from research.bench.shards import rchar
    from train.data.batches import ShardSet

    for seed in range(6):
        shards = _shard_set(tmp_path, (4, 4))
        items = [(name, i) for name in shards for i in range(4)]
        gen = torch.Generator().manual_seed(seed)
        name, row = items[torch.randint(0, len(items), (1,), generator=gen.clone_state()).item()]
        for shard in shards:
            path = tmp_path / shard
            data = bytearray(path.read_bytes())
            (length,) = struct.unpack("<Q", data[:8])
            header = json.loads(data[8:8 + length])
            for meta in header.values():
                begin, end = (8 + length + o for o in meta["data_offsets"])
                size = (end - begin) // meta["shape"][0]
                for i in range(meta["shape"][0]):
                    if (shard, i) != (name, row):
                        data[begin + i * size:begin + (i + 1) * size] = b"\xff" * size
            path.write_bytes(data)
        loader, before = ShardSet(tmp_path), rchar()
        batch = loader.batch(gen, 1)
        read, used = rchar() - before, sum(t[row].numel() * t.itemsize for t in shards[name].values())
        assert used <= read < used + 4096  # the row's bytes, a header, /proc/self/io; the file holds 4 rows
        assert torch.equal(batch.x0[0], shards[name]["latents"][row]), (seed, name, row)
        assert torch.equal(batch.cond.text[0], shards[name]["text"][row].float())
        assert torch.equal(batch.cond.text_mask[0], shards[name]["text_mask"][row])
        assert f"{name}[{row}]" in batch.desc


@pytest.mark.parametrize("dropout, ti2v, expected", [(0.0, True, {True}), (1.0, True, {False}),
                                                     (0.5, True, {True, False}), (1.0, False, {False})])
def test_first_frame_dropout_makes_t2v_batches(dropout, ti2v, expected):
    from train.config import load_config
    from train.data.batches import batch_source

    cfg = load_config(None, [f"data.first_frame_dropout={dropout}", f"model.ti2v={ti2v}", "data.batch_size=1"])
    draw = batch_source(cfg)
    modes = [draw(torch.Generator().manual_seed(i), 1).ti2v for i in range(16)]
    assert set(modes) == expected
    assert modes == [draw(torch.Generator().manual_seed(i), 1).ti2v for i in range(16)]  # a function of the seed


@pytest.mark.parametrize("dropout, background, plain_only", [(1.0, "plain", True), (1.0, "any", False),
                                                              (0.0, "plain", False)])
def test_toy_t2v_background_setting_limits_t2v_batches_alone(dropout, background, plain_only):
    """data.toy_t2v_background=plain puts every T2V batch on the plain background (every pixel away from the object
    exactly gray); "any" draws textured ones too, and TI2V batches, whose first frame shows it, always do."""
    from fastlightgen.toy.codec import decode_video
    from train.config import load_config
    from train.data.batches import batch_source

    cfg = load_config(None, [f"data.first_frame_dropout={dropout}", f"data.toy_t2v_background={background}",
                             "model.ti2v=true", "data.source=toy"])
    batch = batch_source(cfg)(torch.Generator().manual_seed(0), 32)
    assert batch.ti2v == (dropout == 0.0)
    gray = (decode_video(batch.x0).abs() < 1e-3).all(dim=1).flatten(2).float().mean(-1)  # (B, F) share of gray px
    plain = (gray > 0.5).all(dim=1)  # the object never covers half the frame
    assert bool(plain.all()) == plain_only and bool(plain.any()), plain.tolist()


@pytest.mark.parametrize("stage", ["toy_teacher", "stage2", "stage3"])
def test_every_trainer_follows_the_batch_first_frame_rule(stage, tiny, tmp_path, monkeypatch):
    """A T2V batch (first frame dropped) is trained with the plain flow rule: frame 0 noised and in the loss."""
    import importlib

    from fastlightgen import distill

    module = importlib.import_module(f"train.{stage}")
    rules = []
    real_loss_frames = distill.loss_frames  # every training loss takes its frames through this rule
    monkeypatch.setattr(distill, "loss_frames", lambda x, ti2v: rules.append(ti2v) or real_loss_frames(x, ti2v))
    teacher, plan = tiny
    settings = {"data.first_frame_dropout": 1.0, "toy_teacher.iterations": 1, "toy_teacher.cfg_candidates": "[2.0]",
                "toy_teacher.shape": "{num_layers: 2, attention_head_dim: 16, ffn_dim: 64}",
                "toy_teacher.out": tmp_path / "t.safetensors", "stage3.init": "teacher", "stage2.iterations": 1,
                "stage3.iterations": 1, "stage3.fake_updates": 1}
    module.main(train_args(teacher, plan, tmp_path / "run", **settings))
    assert rules and not any(rules)


def test_a_damaged_or_foreign_shard_is_named_when_the_set_opens(tmp_path):
    """Checked at start, not when a batch first draws the shard: size, header, rows, and the model's widths."""
    from train.data.batches import ShardSet

    _shard_set(tmp_path, (3, 5))
    ShardSet(tmp_path).check_model(4, 6)
    with pytest.raises(ValueError, match=r"hold 4-channel latents and 6-wide text, but the teacher takes "
                                         r"48-channel latents and 4096-wide text.*train\.preprocess"):
        ShardSet(tmp_path).check_model(48, 4096)
    shard = tmp_path / "shard_00001.safetensors"
    data = shard.read_bytes()
    shard.write_bytes(data[:-100])  # a copy cut short
    with pytest.raises(ValueError, match=r"shard .*shard_00001\.safetensors: truncated: .*copy it again; run `python -m train\.preprocess`"):
        ShardSet(tmp_path)
    shard.write_bytes(b"\x80\x04 a pickle")
    with pytest.raises(ValueError, match=r"shard_00001\.safetensors: not a safetensors file .*pickle"):
        ShardSet(tmp_path)
    shard.unlink()
    with pytest.raises(ValueError, match=r"shard_00001\.safetensors: no such file; run `python -m train\.preprocess`"):
        ShardSet(tmp_path)
    _shard_set(tmp_path, (3, 4))  # the second shard rewritten with fewer rows than the first index listed
    index = json.loads((tmp_path / "index.json").read_text())
    index["shards"][1]["items"].append({"file": "extra.mp4", "caption": ""})
    (tmp_path / "index.json").write_text(json.dumps(index))
    with pytest.raises(ValueError, match=r"holds \{.*'latents': 4.*\} rows where the index lists 5 items"):
        ShardSet(tmp_path)


def test_resume_identity_follows_contents_not_paths(tmp_path):
    """A shard set and teacher copied elsewhere keep the identity; shards re-encoded in place change it."""
    import shutil

    from train import preprocess
    from train.config import load_config
    from train.loop.identity import identity_diff, run_identity

    shards = tmp_path / "a" / "shards"
    preprocess.main(["--set", f"preprocess.out={shards}", "--set", "preprocess.toy_samples=4",
                     "--set", "preprocess.shard_size=2"])
    index = json.loads((shards / "index.json").read_text())
    assert all(len(s["sha256"]) == 64 and s["bytes"] > 0 for s in index["shards"])
    teacher = REPO / "models" / "fastlightgen" / "toy_teacher.safetensors"
    moved_teacher = tmp_path / "b" / "teacher.safetensors"
    moved_teacher.parent.mkdir()
    shutil.copy(teacher, moved_teacher)
    shutil.copytree(shards, tmp_path / "b" / "shards")

    def identity(folder: Path, model: Path) -> dict:
        sets = ["data.source=shards", f"data.shards={folder}", f"model.teacher={model}"]
        return run_identity(load_config(str(REPO / "configs" / "toy.yaml"), sets), "stage2", 1)

    before = identity(shards, teacher)
    assert identity(tmp_path / "b" / "shards", moved_teacher) == before
    data = (shards / "shard_00000.safetensors").read_bytes()
    assert index["shards"][0]["sha256"] == hashlib.sha256(data).hexdigest()  # the latents' bytes, not their shapes
    index["shards"][0]["sha256"] = hashlib.sha256(data + b"other latents").hexdigest()  # as a re-encoding records it
    (shards / "index.json").write_text(json.dumps(index))
    assert [d.split(":")[0] for d in identity_diff(before, identity(shards, teacher))] == ["data.shards (contents)"]
