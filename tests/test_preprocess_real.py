"""`train.preprocess` on real-layout models and real video files.

The models are tiny, random diffusers / transformers models saved as Hugging Face distributes Wan
(`tests/tiny_models.py`: `WanPipeline.save_pretrained`, a tokenizer trained here); the videos are mp4
files written here. Covers: one model path and the error naming a missing part; the null prompt encoded
by the real text encoder, stored with the shards and used by caption dropout, Stage II and Stage III; the
dataset forms; any video size and frame rate, and the frame count and size checked before any model loads.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from fastlightgen.video_io import write_mp4
from tiny_models import tiny_wan_folder
from train.config import load_config

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def wan21(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("models") / "Wan2.1-T2V-tiny-Diffusers"
    tiny_wan_folder(root, "2.1")
    return root


def clip(path: Path, frames: int, height: int, width: int, fps: int = 8, seed: int = 0) -> Path:
    g = torch.Generator().manual_seed(seed)
    return write_mp4(path, torch.rand(3, frames, height, width, generator=g) * 2 - 1, fps=fps)


def settings(**values) -> list[str]:
    return [f"{k}={v}" for k, v in values.items()]


def wan_settings(root: Path, out: Path, **values) -> list[str]:
    return settings(**{"model.path": root, "model.ti2v": False, "preprocess.encoder": "wan", "preprocess.out": out,
                       "preprocess.frames": 5, "preprocess.height": 32, "preprocess.width": 32, **values})


def pipeline_encoding(root: Path, prompt: str) -> torch.Tensor:
    """What Wan's own diffusers pipeline feeds its transformer for `prompt` (512 tokens, zero-padded)."""
    from diffusers import WanPipeline

    pipe = WanPipeline.from_pretrained(str(root))
    embeds, _ = pipe.encode_prompt(prompt, do_classifier_free_guidance=False, max_sequence_length=512)
    return embeds


@pytest.fixture(scope="module")
def shards21(wan21, tmp_path_factory) -> Path:
    """Two captioned clips of other sizes and rates, one without a caption, through the tiny Wan 2.1 encoders."""
    from train import preprocess

    base = tmp_path_factory.mktemp("data")
    videos = base / "videos"
    clip(videos / "square.mp4", 12, 60, 60, fps=24)
    clip(videos / "wide.mp4", 6, 48, 80, seed=1)
    clip(videos / "uncaptioned.mp4", 6, 32, 32, seed=2)
    (videos / "square.txt").write_text("a red circle moves left\n")
    (videos / "wide.txt").write_text("a blue square jumps")
    out = base / "shards"
    preprocess.run(load_config(None, wan_settings(wan21, out, **{"preprocess.videos": videos})))
    return out


# ---- 1. one model path ----------------------------------------------------------------------------

def test_model_path_finds_every_part_and_overrides_win(wan21, tmp_path):
    from diffusers import WanPipeline

    from train.models.loading import load_teacher, model_part

    cfg = load_config(None, [f"model.path={wan21}"])
    assert {p: model_part(cfg, p) for p in ("transformer", "vae", "text_encoder", "tokenizer")} == \
        {p: wan21 / p for p in ("transformer", "vae", "text_encoder", "tokenizer")}
    teacher = load_teacher(cfg)
    reference = WanPipeline.from_pretrained(str(wan21)).transformer  # the layout is the one diffusers reads
    assert all(torch.equal(a, b) for a, b in zip(teacher.state_dict().values(), reference.state_dict().values()))

    elsewhere = shutil.copytree(wan21 / "tokenizer", tmp_path / "my_tokenizer")
    cfg = load_config(None, [f"model.path={wan21}", f"preprocess.tokenizer={elsewhere}"])
    assert model_part(cfg, "tokenizer") == elsewhere and model_part(cfg, "vae") == wan21 / "vae"


def test_a_missing_part_is_named_before_any_model_loads(wan21, tmp_path):
    from train import preprocess
    from train.models.loading import model_part

    partial = tmp_path / "Wan-partial"
    partial.mkdir()
    shutil.copy(wan21 / "model_index.json", partial)
    for part in ("transformer", "vae", "text_encoder"):  # no tokenizer/: the download left it out
        (partial / part).symlink_to(wan21 / part)
    clip(tmp_path / "videos" / "a.mp4", 5, 32, 32)
    (tmp_path / "videos" / "a.txt").write_text("a caption")
    args = ["--set", f"preprocess.videos={tmp_path / 'videos'}"]
    with pytest.raises(SystemExit, match=r"has no tokenizer/ subfolder.*preprocess\.tokenizer"):
        preprocess.main([a for s in wan_settings(partial, tmp_path / "out") for a in ("--set", s)] + args)
    assert not (tmp_path / "out").exists()
    with pytest.raises(FileNotFoundError, match="holds no model_index.json: point it at the model's root folder"):
        model_part(load_config(None, [f"model.path={wan21 / 'transformer'}"]), "transformer")
    with pytest.raises(FileNotFoundError, match="no vae: set model.path"):
        model_part(load_config(None, []), "vae")
    with pytest.raises(FileNotFoundError, match=r"preprocess\.text_encoder '/nowhere' does not exist"):
        model_part(load_config(None, [f"model.path={wan21}", "preprocess.text_encoder=/nowhere"]), "text_encoder")


# ---- 2. the real null prompt ----------------------------------------------------------------------

def test_stored_null_is_the_text_encoders_empty_prompt(wan21, shards21, tmp_path):
    from train import preprocess

    index = json.loads((shards21 / "index.json").read_text())
    assert index["null"] == {"file": "null.safetensors", "prompt": ""}
    null = load_file(str(shards21 / "null.safetensors"))["text"]
    expected = pipeline_encoding(wan21, "")
    assert null.dtype == torch.bfloat16 and null.shape == expected.shape == (1, 512, 64)
    torch.testing.assert_close(null, expected.to(torch.bfloat16))
    assert null[0, 0].abs().sum() > 0  # not the all-zero null of the toy encoder
    captions = [item["caption"] for item in index["shards"][0]["items"]]
    torch.testing.assert_close(load_file(str(shards21 / "shard_00000.safetensors"))["text"],
                               pipeline_encoding(wan21, captions).to(torch.bfloat16))

    negative = "blurred details, static, worst quality"
    out = tmp_path / "negative"
    preprocess.run(load_config(None, wan_settings(wan21, out, **{
        "preprocess.videos": shards21.parent / "videos", "preprocess.null_prompt": f"'{negative}'"})))
    assert json.loads((out / "index.json").read_text())["null"]["prompt"] == negative
    torch.testing.assert_close(load_file(str(out / "null.safetensors"))["text"],
                               pipeline_encoding(wan21, negative).to(torch.bfloat16))


def test_batches_carry_the_stored_null_and_dropped_captions_equal_it(shards21):
    from train.data.batches import batch_source

    null = load_file(str(shards21 / "null.safetensors"))["text"].float()
    for dropout in (0.0, 1.0):
        draw = batch_source(load_config(None, settings(**{"data.source": "shards", "data.shards": shards21,
                                                          "data.caption_dropout": dropout})))
        batch = draw(torch.Generator().manual_seed(0), 3)
        assert torch.equal(batch.null.text, null.expand(3, -1, -1))
        dropped = [torch.equal(row, null[0]) for row in batch.cond.text]
        assert dropped == [dropout == 1.0] * 3


def test_old_shards_without_a_null_are_refused(shards21, tmp_path):
    from train.data.batches import ShardSet

    old = shutil.copytree(shards21, tmp_path / "old")
    index = json.loads((old / "index.json").read_text())
    (old / "index.json").write_text(json.dumps({**index, "format": "fastlightgen.shards/1"}))
    with pytest.raises(ValueError, match="run `python -m train.preprocess` again"):
        ShardSet(old)


def test_toy_shards_store_the_toy_encoders_null(tmp_path):
    from fastlightgen.toy.text import encode
    from train import preprocess

    preprocess.run(load_config(None, settings(**{"preprocess.out": tmp_path, "preprocess.toy_samples": 2})))
    null = load_file(str(tmp_path / "null.safetensors"))["text"]
    assert torch.equal(null.float(), encode([""])) and null.abs().sum() == 0


# ---- 3. dataset forms -----------------------------------------------------------------------------

def test_dataset_forms(tmp_path):
    from train.config import PreprocessConfig
    from train.data.dataset import entries

    videos = tmp_path / "videos"
    for name in ("a.mp4", "sub/b.mov", "c.mp4", "d.mp4"):
        (videos / name).parent.mkdir(parents=True, exist_ok=True)
        (videos / name).write_bytes(b"")
    (videos / "a.txt").write_text("first caption\n")
    (videos / "sub" / "b.txt").write_text("second caption")
    (videos / "c.txt").write_text("  \n")  # empty: no caption
    (videos / "notes.json").write_text("{}")  # not a video: not listed
    got = entries(PreprocessConfig(videos=str(videos)))
    assert [(e.name, e.path, e.caption) for e in got] == [
        ("a.mp4", videos / "a.mp4", "first caption"), ("c.mp4", videos / "c.mp4", None),
        ("d.mp4", videos / "d.mp4", None), ("sub/b.mov", videos / "sub" / "b.mov", "second caption")]

    jsonl = tmp_path / "meta.jsonl"
    jsonl.write_text('{"clip": "a.mp4", "description": "one"}\n\n{"clip": "c.mp4", "description": ""}\n')
    got = entries(PreprocessConfig(videos=str(videos), captions=str(jsonl), video_column="clip",
                                   caption_column="description"))
    assert [(e.path, e.caption) for e in got] == [(videos / "a.mp4", "one"), (videos / "c.mp4", None)]

    csv_file = tmp_path / "meta.csv"
    csv_file.write_text('video_name,text\na.mp4,"one, with a comma"\nsub/b.mov,two\n')
    got = entries(PreprocessConfig(videos=str(videos), captions=str(csv_file), video_column="video_name"))
    assert [(e.path, e.caption) for e in got] == [(videos / "a.mp4", "one, with a comma"),
                                                  (videos / "sub" / "b.mov", "two")]

    fastvideo = videos / "videos2caption.json"  # paths relative to its folder when preprocess.videos is empty
    fastvideo.write_text(json.dumps([{"path": "a.mp4", "cap": ["first", "second"], "fps": 24},
                                     {"path": "d.mp4", "cap": []}, {"cap": ["no path"]}]))
    got = entries(PreprocessConfig(captions=str(fastvideo)))
    assert [(e.path, e.caption) for e in got] == [(videos / "a.mp4", "first"), (videos / "d.mp4", None),
                                                  (None, "no path")]

    with pytest.raises(ValueError, match=r"no field 'clip' \(their fields: video_name, text\).*video_column"):
        entries(PreprocessConfig(videos=str(videos), captions=str(csv_file), video_column="clip"))
    with pytest.raises(ValueError, match="any of caption, cap, text, prompt.*caption_column"):
        jsonl.write_text('{"file": "a.mp4", "label": "x"}\n')
        entries(PreprocessConfig(videos=str(videos), captions=str(jsonl)))
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="holds no video"):
        entries(PreprocessConfig(videos=str(tmp_path / "empty")))


def test_captions_are_read_as_people_write_them(tmp_path, capsys):
    """Byte-order marks (spreadsheets, Notepad), other encodings named per file, the right JSONL line, and
    captions cleaned by the rule prompts are cleaned by at inference (fastlightgen.captions)."""
    from fastlightgen.captions import clean_caption
    from train.config import PreprocessConfig
    from train.data.dataset import entries, videos

    folder = tmp_path / "videos"
    folder.mkdir()
    for name in ("a", "b", "c"):
        (folder / f"{name}.mp4").write_bytes(b"")
    (folder / "a.txt").write_bytes("\ufeffa caf\u00e9 at  night\r\n".encode("utf-8"))  # Notepad: BOM, CRLF
    (folder / "b.txt").write_bytes("a caf\u00e9 &amp;quot;noir&amp;quot;".encode("latin-1"))  # not UTF-8
    (folder / "c.txt").write_text("Tom &amp; Jerry\n\trun")
    got = {e.name: e for e in entries(PreprocessConfig(videos=str(folder)))}
    assert got["a.mp4"].caption == "a caf\u00e9 at night" and got["c.mp4"].caption == "Tom & Jerry run"
    assert got["b.mp4"].caption is None and "b.txt is not UTF-8" in got["b.mp4"].caption_error
    skipped: dict[str, int] = {}
    assert list(videos([got["b.mp4"]], PreprocessConfig(), skipped)) == [] and skipped == {"caption not UTF-8": 1}
    assert "b.txt is not UTF-8 (byte 5); save it as UTF-8" in capsys.readouterr().out

    sheet = tmp_path / "sheet.csv"  # Excel's "CSV UTF-8": a byte-order mark before the first field name
    sheet.write_bytes("\ufeffvideo,caption\na.mp4,\"two\nlines\"\n".encode("utf-8"))
    assert [(e.name, e.caption) for e in entries(PreprocessConfig(videos=str(folder), captions=str(sheet)))] == [
        ("a.mp4", "two lines")]
    latin = tmp_path / "latin.csv"
    latin.write_bytes("video,caption\na.mp4,caf\u00e9\n".encode("latin-1"))
    with pytest.raises(ValueError, match=r"latin\.csv is not UTF-8 \(byte 23\); save it as UTF-8"):
        entries(PreprocessConfig(videos=str(folder), captions=str(latin)))
    lines = tmp_path / "meta.jsonl"
    lines.write_text('{"file": "a.mp4", "caption": "one"}\n\n{"file": "b.mp4", "caption": "two"\n')
    with pytest.raises(ValueError, match=r"meta\.jsonl: line 3 is not valid JSON"):
        entries(PreprocessConfig(videos=str(folder), captions=str(lines)))
    assert clean_caption(" x &amp;lt;b&amp;gt;\u3000 y ") == "x <b> y"


def test_every_skip_is_reported_and_counted(tmp_path, capsys):
    from train import preprocess

    videos = tmp_path / "videos"
    clip(videos / "good.mp4", 6, 40, 56)
    clip(videos / "uncaptioned.mp4", 6, 32, 32)
    clip(videos / "short.mp4", 3, 32, 32)
    (videos / "broken.mp4").write_bytes(b"not a video")
    records = tmp_path / "records.json"
    records.write_text(json.dumps([{"path": n, "caption": f"caption of {n}"} for n in ("good.mp4", "short.mp4",
                                                                                       "broken.mp4", "gone.mp4")]
                                  + [{"path": "uncaptioned.mp4"}, {"caption": "a record without a video"}]))
    out = tmp_path / "shards"
    preprocess.main(["--set", f"preprocess.videos={videos}", "--set", f"preprocess.captions={records}",
                     "--set", f"preprocess.out={out}"])
    index = json.loads((out / "index.json").read_text())
    assert index["skipped"] == {"too short": 1, "unreadable": 1, "missing file": 1, "no caption": 1, "no video": 1}
    assert [i["file"] for i in index["shards"][0]["items"]] == ["good.mp4"]
    text = capsys.readouterr().out
    assert "skipping uncaptioned.mp4: no caption" in text and "skipped 5" in text


# ---- 4. any video size and frame rate ---------------------------------------------------------------

def test_videos_are_scaled_to_cover_center_cropped_and_sampled(tmp_path):
    from train.config import PreprocessConfig
    from train.data.dataset import BadVideo, read_video

    # 96x48, thirds red | green | blue: scaled to 64x32 (aspect kept), then columns 16..47 kept
    thirds = torch.full((3, 4, 48, 96), -1.0)
    for c in range(3):
        thirds[c, :, :, 32 * c:32 * (c + 1)] = 1.0
    video = read_video(write_mp4(tmp_path / "wide.mp4", thirds), PreprocessConfig(frames=4, height=32, width=32))
    assert video.shape == (3, 4, 32, 32)
    colour = video[:, 0, 16].argmax(0)  # the dominant channel of each column of the middle row
    assert colour[:4].eq(0).all() and colour[8:24].eq(1).all() and colour[28:].eq(2).all()  # stretched: 8 red, 24 blue
    assert read_video(clip(tmp_path / "small.mp4", 4, 16, 24), PreprocessConfig(frames=4)).shape == (3, 4, 32, 32)

    # frame i is grey level 10 i: every 3rd frame, or 24 fps resampled to 8 fps, is levels 0, 30, 60, ...
    grey = torch.arange(24).float().mul(10 / 127.5).sub(1).view(1, 24, 1, 1).expand(3, 24, 32, 32)
    source = write_mp4(tmp_path / "ramp.mp4", grey, fps=24)
    for sampling in ({"frame_stride": 3}, {"fps": 8.0}):
        levels = read_video(source, PreprocessConfig(frames=5, **sampling)).add(1).mul(127.5).mean(dim=(0, 2, 3))
        torch.testing.assert_close(levels, torch.tensor([0.0, 30, 60, 90, 120]), atol=3, rtol=0)
    with pytest.raises(BadVideo, match="8 frames at frame stride 3, need 9"):
        read_video(source, PreprocessConfig(frames=9, frame_stride=3))


def test_frame_count_and_size_are_checked_before_any_model_loads(wan21, tmp_path):
    from train.preprocess import read_inputs

    wan22 = tmp_path / "Wan2.2-TI2V-tiny-Diffusers"
    tiny_wan_folder(wan22, "2.2")
    for weights in wan22.glob("*/*.safetensors"):
        weights.write_bytes(b"never read")  # the checks read config.json files only
    (tmp_path / "videos").mkdir()
    (tmp_path / "videos" / "a.mp4").write_bytes(b"")

    def check(root: Path, **values):
        read_inputs(load_config(None, wan_settings(root, tmp_path / "out", **{
            "preprocess.videos": tmp_path / "videos", **values})))

    check(wan22, **{"preprocess.height": 64, "preprocess.width": 96})  # multiples of 16 x 2
    with pytest.raises(ValueError, match=r"preprocess.height 48 is not a multiple of 32 \(the spatial stride 16 "
                                         r"of the VAE .* x the transformer's patch size 2\); use 32 or 64"):
        check(wan22, **{"preprocess.height": 48})
    check(wan21, **{"preprocess.height": 48})  # Wan 2.1: multiples of 8 x 2
    with pytest.raises(ValueError, match=r"preprocess.width 60 is not a multiple of 16 .*; use 48 or 64"):
        check(wan21, **{"preprocess.width": 60})
    with pytest.raises(ValueError, match=r"preprocess.frames 6: .* takes 4k\+1 frames .*; use 5 or 9"):
        check(wan22, **{"preprocess.frames": 6})
    with pytest.raises(ValueError, match="preprocess.frame_stride must be an integer >= 1"):
        check(wan21, **{"preprocess.frame_stride": 0})
    with pytest.raises(ValueError, match="preprocess.fps 16.0: set a positive rate with frame_stride 1"):
        check(wan21, **{"preprocess.fps": 16, "preprocess.frame_stride": 2})
    with pytest.raises(ValueError, match=r"preprocess.width 20 is not a multiple of 8 \(the spatial stride 4 of the "
                                         r"toy codec"):
        read_inputs(load_config(None, ["preprocess.width=20"]))


@pytest.mark.parametrize(("setting", "value"), [
    ("preprocess.frames", "0"), ("preprocess.height", "-32"), ("preprocess.width", "0"),
    ("preprocess.frame_stride", "0"), ("preprocess.fps", "-1"), ("preprocess.fps", "nan"),
    ("preprocess.fps", "inf"), ("preprocess.shard_size", "0"), ("preprocess.toy_samples", "0"),
    ("preprocess.frames", "true")])
def test_preprocess_values_are_checked_like_every_section(setting, value, tmp_path, capsys):
    """A usage error when the config is read (by every entry point), and the same check for a config built in
    code: nothing is written."""
    import yaml

    from train import preprocess
    from train.config import ConfigError

    out = tmp_path / "out"
    with pytest.raises(SystemExit) as stop:
        preprocess.main(["--set", f"preprocess.out={out}", "--set", f"{setting}={value}"])
    assert stop.value.code == 2 and f"error: {setting} must be " in capsys.readouterr().err
    cfg = load_config(None, [f"preprocess.out={out}"])
    setattr(cfg.preprocess, setting.split(".")[1], yaml.safe_load(value))
    with pytest.raises(ConfigError, match=f"^{setting} must be .*, got "):
        preprocess.run(cfg)
    assert not out.exists()


# ---- end to end ------------------------------------------------------------------------------------

def test_folder_of_videos_to_stage2_and_stage3_batches_with_the_stored_null(wan21, tmp_path, monkeypatch):
    """A folder of mp4 + .txt of other sizes and rates -> `python -m train.preprocess` -> Stage II and III
    steps on the teacher of the same model.path, each fed the stored null."""
    import train.stage2
    import train.stage3
    from fastlightgen.adapters import adapt
    from fastlightgen.plan import PrunePlan
    from train.models.loading import load_teacher

    videos = tmp_path / "videos"
    clip(videos / "square.mp4", 12, 60, 60, fps=24)
    clip(videos / "tall" / "portrait.mp4", 16, 72, 40, fps=30, seed=1)
    clip(videos / "no_caption.mp4", 10, 32, 32, seed=2)
    (videos / "square.txt").write_text("a red circle moves left")
    (videos / "tall" / "portrait.txt").write_text("a blue square jumps")
    shards = tmp_path / "shards"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO), "PYTHONWARNINGS": "ignore"}
    args = [a for s in wan_settings(wan21, shards, **{"preprocess.videos": videos, "preprocess.fps": 12})
            for a in ("--set", s)]
    done = subprocess.run([sys.executable, "-m", "train.preprocess", *args], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr
    assert "wrote 2 samples in 1 shards" in done.stdout and "skipping no_caption.mp4: no caption" in done.stdout
    assert load_file(str(shards / "shard_00000.safetensors"))["latents"].shape == (2, 16, 2, 4, 4)
    null = load_file(str(shards / "null.safetensors"))["text"].float()

    run = settings(**{"model.path": wan21, "model.ti2v": False, "data.source": "shards", "data.shards": shards,
                      "data.batch_size": 2, "data.caption_dropout": 1.0, "run.run_dir": tmp_path / "run",
                      "stage2.iterations": 1, "stage3.iterations": 1, "stage3.fake_updates": 1,
                      "stage3.init": "teacher"})
    plan = tmp_path / "plan.json"
    PrunePlan.from_blocks(adapt(load_teacher(load_config(None, run))).fingerprint(), [1]).save(plan)
    seen = []

    def spy(module, name: str, position: int):
        real = getattr(module, name)
        monkeypatch.setattr(module, name, lambda *a, **k: seen.append((name, a[position])) or real(*a, **k))
    spy(train.stage2, "stage2_loss", 3)  # (adapter, x_t, sigma, cond, ...): every caption dropped
    spy(train.stage3, "teacher_scores", 5)  # (adapter, lora, x_t, sigma, cond, null_cond, ...): eq. 9's null
    flags = [a for s in run + [f"stage2.plan={plan}", f"stage3.plan={plan}"] for a in ("--set", s)]
    train.stage2.main(flags)
    train.stage3.main(flags)
    assert [name for name, _ in seen] == ["stage2_loss", "teacher_scores"]
    for _, cond in seen:
        torch.testing.assert_close(cond.text.float().cpu(), null.expand(2, -1, -1), rtol=0, atol=0)


def test_the_shards_identity_follows_the_code_that_decodes_and_encodes():
    """A shard written by other decoding or encoding code is encoded again: the identity must see those files
    (it saw nothing, silently, when train/ was regrouped and it still looked beside preprocess.py)."""
    from train.config import PreprocessConfig
    from train.data import dataset, encoders
    from train.preprocess import run_identity

    code = run_identity(PreprocessConfig(), "wan", {})["code"]
    for module in (dataset, encoders):
        stat = Path(module.__file__).stat()
        assert code[Path(module.__file__).name] == [stat.st_size, stat.st_mtime_ns]
