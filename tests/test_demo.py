"""The main job (research.demo) and mp4 writing, on a tiny random toy-shaped teacher."""
import re

import av
import torch

from fastlightgen.checkpoint import CheckpointMeta, save_checkpoint
from fastlightgen.sampling import Sampling
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


def test_demo_writes_videos_and_table(tmp_path, capsys):
    model = build_toy_teacher(ToyTeacherShape(num_layers=2), seed=0)
    teacher = tmp_path / "teacher.safetensors"
    save_checkpoint(teacher, model, CheckpointMeta(2, [0, 1], recommended=Sampling(steps=3, cfg_scale=2.0)))
    demo.main(["--teacher", str(teacher), "--student", str(tmp_path / "absent.safetensors"),
               "--out", str(tmp_path / "out"), "--seeds", "0,1"])
    report = (tmp_path / "out" / "report.md").read_text()
    assert "teacher (3-step Euler, CFG 2.0)" in report and "| mean (n=24) |" in report
    assert "no student" in report and re.search(r"\| [0-9.]+ \| [0-9.]+ \|\n", report)  # s and GFLOP per video
    assert "Sanity table" in report and "ordering **" in report
    for mode in ("TI2V", "T2V"):  # the first seed's videos, per mode, under a plain folder name
        assert [p.name for p in (tmp_path / "out" / mode).iterdir()] == ["teacher"]
        assert len(list((tmp_path / "out" / mode / "teacher").glob("*.mp4"))) == 12
    progress = capsys.readouterr().err  # a bar over the 48 videos, with the time left
    assert "demo: 100%" in progress and re.search(r"48/48 \[[0-9:]+<[0-9:]+, +[0-9.]+(video/s|s/video)", progress)
    assert "## TI2V: scores" in report and "## T2V: scores" in report


def test_demo_compares_a_student_with_its_interval(tmp_path):
    model = build_toy_teacher(ToyTeacherShape(num_layers=2), seed=0)
    teacher, student = tmp_path / "teacher.safetensors", tmp_path / "student.safetensors"
    save_checkpoint(teacher, model, CheckpointMeta(2, [0, 1], recommended=Sampling(steps=3, cfg_scale=2.0)))
    save_checkpoint(student, model, CheckpointMeta(2, [0, 1], recommended=Sampling.few_step((1000, 500), 5.0)))
    demo.main(["--teacher", str(teacher), "--student", str(student), "--out", str(tmp_path / "out"),
               "--seeds", "0,1", "--limit", "4"])
    report = (tmp_path / "out" / "report.md").read_text()
    rows = re.findall(r"\| (faithful|overall) \| ([+-][0-9.]+) \[([+-][0-9.]+), ([+-][0-9.]+)\] \| ([a-z, ]+) \|", report)
    assert [r[0] for r in rows] == ["faithful", "overall"] * 2  # TI2V, then T2V
    assert all(float(low) <= float(mean) <= float(high) for _, mean, low, high, _ in rows)
    # a random teacher fails the sanity ordering in both modes, so no verdict is drawn from its comparisons
    assert report.count("the ordering **FAILS**") == 2 and {r[4] for r in rows} == {demo.NOT_EVIDENCE}
    assert sorted(p.name for p in (tmp_path / "out" / "T2V").iterdir()) == ["student", "teacher"]
