"""The real-data path end to end: a folder of mp4 + same-name .txt captions -> `train.preprocess` as 2 processes
(torchrun, gloo, CPU) -> Stage I -> Stage II -> Stage III -> `train.export` -> the pack's loader
(`fastlightgen.checkpoint.load_wan`, what the Load FastLightGen Checkpoint node reads with), all on a tiny random
Wan 2.1 folder in the Hugging Face layout. About a minute on one thread.
"""
from __future__ import annotations

import json

import torch
from safetensors.torch import load_file
from test_preprocess_dist import torchrun_preprocess, wan_settings, write_videos

from tiny_models import tiny_wan_folder
from train.models.record import StageRecord


def test_videos_to_a_student_the_loader_reads(tmp_path, one_thread):
    from fastlightgen.checkpoint import load_wan
    from fastlightgen.plan import PrunePlan
    from train import export, stage1, stage2, stage3

    root = tmp_path / "Wan2.1-T2V-tiny-Diffusers"
    tiny_wan_folder(root, "2.1", layers=4)
    videos = tmp_path / "videos"
    write_videos(videos, 5, uncaptioned=(3,))
    shards = tmp_path / "shards"
    done = torchrun_preprocess(tmp_path, wan_settings(root, videos, shards))
    assert done.returncode == 0, done.stderr[-4000:]
    assert "wrote 4 samples in 3 shards to" in done.stdout and "skipped 1 (no caption: 1)" in done.stdout

    run = tmp_path / "run"
    settings = {"model.path": root, "model.ti2v": False, "data.source": "shards", "data.shards": shards,
                "data.batch_size": 2, "run.run_dir": run, "stage1.samples": 2, "stage1.timesteps": 2,
                "stage1.keep_ratio": 0.5, "stage2.iterations": 2, "stage3.iterations": 2, "stage3.fake_updates": 1,
                "export.out": tmp_path / "student.safetensors"}
    flags = [a for k, v in settings.items() for a in ("--set", f"{k}={v}")]
    stage1.main(flags)
    plan = PrunePlan.load(run / "stage1" / "plan.json")
    assert len(plan.kept) == 2 and plan.fingerprint.num_blocks == 4
    stage2.main(flags)
    stage3.main(flags)
    for stage, key in (("stage2", "loss"), ("stage3", "gen_loss")):
        records = [json.loads(line) for line in (run / stage / "metrics.jsonl").read_text().splitlines()]
        assert [r["step"] for r in records] == [1, 2] and all(torch.isfinite(torch.tensor(r[key])) for r in records)
    assert StageRecord.load(run / "stage3").data.startswith(f"shards {shards} sha256:")
    export.main(flags)

    model, meta = load_wan(tmp_path / "student.safetensors")
    assert meta.kept_blocks == plan.kept and meta.original_num_blocks == 4 and len(model.blocks) == 2
    assert meta.recommended.denoising_step_list == (1000, 750, 500, 250)
    student = load_file(str(run / "stage3" / "model.safetensors"))  # the trained student, fp32
    loaded = model.state_dict()
    assert loaded.keys() == student.keys()
    assert all(torch.equal(loaded[k], v.to(torch.bfloat16)) for k, v in student.items())
    shard = load_file(str(shards / json.loads((shards / "index.json").read_text())["shards"][0]["file"]))
    with torch.no_grad():
        out = model.float()(shard["latents"][:1], torch.tensor([500]), shard["text"][:1].float()).sample
    assert out.shape == shard["latents"][:1].shape and torch.isfinite(out).all()
