"""The main job (research.demo) and mp4 writing, on a tiny random toy-shaped teacher."""
import re

import av
import torch

from fastlightgen.checkpoint import CheckpointMeta, Recommended, save_checkpoint
from fastlightgen.toy.teacher import ToyTeacherShape, build_toy_teacher
from fastlightgen.video_io import write_mp4
from research import demo


def test_write_mp4_round_trip(tmp_path):
    video = torch.rand(3, 6, 32, 32) * 2 - 1
    path = write_mp4(tmp_path / "v.mp4", video, upscale=2)
    with av.open(str(path)) as container:
        frames = [f.to_ndarray(format="rgb24") for f in container.decode(video=0)]
    assert len(frames) == 6 and frames[0].shape == (64, 64, 3)
    assert not list(tmp_path.glob(".*.tmp"))


def test_demo_writes_videos_and_table(tmp_path):
    model = build_toy_teacher(ToyTeacherShape(num_layers=2), seed=0)
    teacher = tmp_path / "teacher.safetensors"
    save_checkpoint(teacher, model, CheckpointMeta(2, [0, 1], recommended=Recommended(steps=3, denoising_step_list=[],
                                                                                    cfg_scale=2.0)))
    demo.main(["--teacher", str(teacher), "--student", str(tmp_path / "absent.safetensors"),
               "--out", str(tmp_path / "out")])
    report = (tmp_path / "out" / "report.md").read_text()
    assert "teacher (3-step Euler, CFG 2.0)" in report and "| mean (n=12) |" in report
    assert "no student" in report and re.search(r"s per video \([0-9.]+ GFLOP\)", report)
    assert len(list((tmp_path / "out").rglob("*.mp4"))) == 12
