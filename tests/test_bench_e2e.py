"""research.bench.e2e at the smoke size on the CPU: what it reports and how the parts add up, not how fast
(the figures are a GPU's, at the real size)."""
from __future__ import annotations

import contextlib
import io
import json
import math

import pytest
import torch

from research.bench import e2e

TI2V, T2V = "configs/wan2.2-ti2v-5b.yaml", "configs/wan2.1-t2v-1.3b.yaml"
PARTS = {"teacher": ("text", "transformer"), "student": ("text", "transformer"), "decode": ("vae", "tiny")}


def run(tmp_path, *args: str) -> tuple[dict, str]:
    out, printed = tmp_path / "e2e.json", io.StringIO()
    with contextlib.redirect_stdout(printed):
        e2e.main(["--size", "smoke", *args, "--json", str(out)])
    return json.loads(out.read_text()), printed.getvalue()


@pytest.fixture(scope="module")
def ti2v(comfy_in_process, tmp_path_factory) -> tuple[dict, str]:
    results, printed = run(tmp_path_factory.mktemp("e2e"), "--config", TI2V, "--rounds", "1")
    return results["configs"][TI2V], printed


def test_every_part_is_timed_and_finite(ti2v):
    r, _ = ti2v
    for group, parts in PARTS.items():
        for part in parts:
            seconds = r["seconds"][group][part]
            assert math.isfinite(seconds) and seconds > 0, (group, part)
    assert all(r["outputs"]["finite"].values()), r["outputs"]["finite"]
    assert r["blocks"] == {"teacher": 30, "student": 21}  # the config's keep ratio 0.7


def test_totals_and_ratios_are_the_parts(ti2v):
    r, _ = ti2v
    s, t, x = r["seconds"], r["totals"], r["ratios"]
    assert s["teacher"]["transformer"] == pytest.approx(s["teacher_transformer_timed"] * 50 / r["teacher_steps_timed"])
    for who in ("teacher", "student"):
        for decoder in ("vae", "tiny"):
            assert t[f"{who}_{decoder}"] == pytest.approx(sum(s[who].values()) + s["decode"][decoder])
    assert x["transformer"] == pytest.approx(s["teacher"]["transformer"] / s["student"]["transformer"])
    assert x["end_to_end_vae"] == pytest.approx(t["teacher_vae"] / t["student_vae"])
    assert x["end_to_end_tiny"] == pytest.approx(t["teacher_tiny"] / t["student_tiny"])
    assert x["teacher_vae_to_student_tiny"] == pytest.approx(t["teacher_vae"] / t["student_tiny"])
    assert r["vae_share_of_student"] == pytest.approx(s["decode"]["vae"] / t["student_vae"])


def test_the_tiny_decoder_gives_the_full_vaes_frames_and_pixels(ti2v):
    r, _ = ti2v
    shapes = r["outputs"]["shapes"]
    assert shapes["tiny"] == shapes["vae"] == [1, 3, *r["video"]]  # 5 frames at 64x64 from a 2x4x4 latent
    assert r["latent"] == [1, 48, 2, 4, 4]


def test_the_table_names_each_part_and_the_scaled_teacher(ti2v):
    _, printed = ti2v
    assert "a test of the bench, not a figure" in printed
    for row in ("text encoding (UMT5)", "transformer", "decode, Wan VAE", "decode, tiny decoder",
                "end to end, Wan VAE", "end to end, tiny decoder"):
        assert f"\n{row} " in printed
    assert "teacher: 2 of its 50 steps timed, x25" in printed


def test_the_wan21_decoders_alone(comfy_in_process, tmp_path):
    results, printed = run(tmp_path, "--config", T2V, "--decode-only", "--latent-frames", "1", "--rounds", "1")
    r = results["configs"][T2V]
    assert r["latent"] == [1, 16, 1, 8, 8]  # the first latent frame: one video frame at 64x64
    assert r["outputs"]["shapes"]["tiny"] == r["outputs"]["shapes"]["vae"] == [1, 3, 1, 64, 64]
    assert r["ratios"]["vae_to_tiny"] == pytest.approx(r["seconds"]["decode"]["vae"] / r["seconds"]["decode"]["tiny"])
    assert "Wan VAE" in printed and "tiny decoder" in printed


def test_summarise_scales_only_the_teachers_transformer():
    seconds = {"teacher_text": 0.2, "student_text": 0.1, "teacher_transformer": 4.0, "student_transformer": 2.0,
               "vae": 6.0, "tiny": 0.5}
    r = e2e.summarise(seconds, teacher_scale=25)
    assert r["seconds"]["teacher"] == {"text": 0.2, "transformer": 100.0}
    assert r["totals"] == pytest.approx({"teacher_vae": 106.2, "teacher_tiny": 100.7, "student_vae": 8.1,
                                         "student_tiny": 2.6})
    assert r["ratios"]["transformer"] == pytest.approx(50.0)
    assert r["ratios"]["end_to_end_vae"] == pytest.approx(106.2 / 8.1)


def test_random_taehv_weights_are_drawn(comfy_in_process):
    model = e2e.random_taehv(48)
    weights = [p for p in model.parameters() if p.ndim > 1]
    assert all(torch.isfinite(p).all() and p.std() > 0 for p in weights)
    assert "decoder.22.bias" in model.state_dict()  # what ComfyUI's VAE loader detects a tiny decoder by


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal on a machine without CUDA")
def test_the_real_size_asks_for_a_gpu_and_bad_steps_are_refused():
    with pytest.raises(SystemExit, match="needs a CUDA GPU"):
        e2e.main(["--size", "real"])
    with pytest.raises(SystemExit):
        e2e.main(["--size", "smoke", "--teacher-steps", "0"])
