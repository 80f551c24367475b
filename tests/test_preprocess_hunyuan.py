"""`train.preprocess` for HunyuanVideo: its two text encoders, its prompt template and its VAE, from a model
folder in the Hugging Face layout (`tests/tiny_models.py`: tiny random LlamaModel, CLIPTextModel,
AutoencoderKLHunyuanVideo and a guidance-distilled HunyuanVideoTransformer3DModel, tokenizers trained here),
on mp4 files written here. The reference is diffusers' own HunyuanVideoPipeline.encode_prompt.
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from fastlightgen.video_io import write_mp4
from tiny_models import tiny_hunyuan_folder
from train.config import load_config

REPO = Path(__file__).resolve().parents[1]
CAPTIONS = {"circle.mp4": "a red circle moves left", "square.mp4": "a blue square jumps over the green line",
            "street.mp4": "the camera pans slowly across a quiet street at night"}


@pytest.fixture(scope="module")
def hunyuan(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("models") / "HunyuanVideo-tiny"
    tiny_hunyuan_folder(root)
    return root


def hunyuan_settings(root: Path, out: Path, **values) -> list[str]:
    base = {"model.family": "hunyuanvideo", "model.path": root, "model.ti2v": False,
            "preprocess.encoder": "hunyuanvideo", "preprocess.out": out, "preprocess.frames": 5,
            "preprocess.height": 32, "preprocess.width": 32, "preprocess.shard_size": 2, **values}
    return [f"{k}={v}" for k, v in base.items()]


@pytest.fixture(scope="module")
def shards(hunyuan, tmp_path_factory) -> Path:
    """Three captioned clips of other sizes and one without a caption, through the tiny HunyuanVideo encoders."""
    from train import preprocess

    base = tmp_path_factory.mktemp("hunyuan_data")
    videos = base / "videos"
    g = torch.Generator().manual_seed(0)
    for (name, caption), (frames, h, w) in zip(CAPTIONS.items(), [(6, 40, 56), (9, 32, 32), (5, 48, 32)]):
        write_mp4(videos / name, torch.rand(3, frames, h, w, generator=g) * 2 - 1)
        (videos / name).with_suffix(".txt").write_text(caption)
    write_mp4(videos / "uncaptioned.mp4", torch.rand(3, 5, 32, 32, generator=g) * 2 - 1)
    out = base / "shards"
    preprocess.run(load_config(None, hunyuan_settings(hunyuan, out, **{"preprocess.videos": videos})))
    return out


def pipeline(root: Path):
    """diffusers' HunyuanVideoPipeline from the folder. Its Llama 3 tokenizer is given as AutoTokenizer reads it
    (the class tokenizer_config.json names): through model_index.json's LlamaTokenizerFast, transformers 5 rebuilds
    a sentencepiece-style tokenizer that splits words otherwise than the saved tokenizer.json."""
    from diffusers import HunyuanVideoPipeline
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(root / "tokenizer"))
    return HunyuanVideoPipeline.from_pretrained(str(root), tokenizer=tokenizer)


def encode(pipe, prompt: str) -> dict[str, torch.Tensor]:
    with torch.no_grad():
        text, pooled, mask = pipe.encode_prompt(prompt, device=torch.device("cpu"))
    return {"text": text.to(torch.bfloat16), "text_mask": mask.bool(), "pooled": pooled.to(torch.bfloat16)}


def test_the_tokenizer_is_read_as_saved_and_the_template_crop_keeps_the_caption(hunyuan):
    from diffusers.pipelines.hunyuan_video.pipeline_hunyuan_video import DEFAULT_PROMPT_TEMPLATE
    from tokenizers import Tokenizer
    from transformers import AutoTokenizer

    text = DEFAULT_PROMPT_TEMPLATE["template"].format("a red circle moves left")
    ids = AutoTokenizer.from_pretrained(str(hunyuan / "tokenizer"))(text).input_ids
    assert ids == Tokenizer.from_file(str(hunyuan / "tokenizer" / "tokenizer.json")).encode(text).ids
    # like Llama 3's, the tiny tokenizer makes the template's system part crop_start (95) tokens long
    crop = DEFAULT_PROMPT_TEMPLATE["crop_start"]
    assert AutoTokenizer.from_pretrained(str(hunyuan / "tokenizer")).decode(ids[crop:]) == \
        "a red circle moves left<|eot_id|>"


def test_null_and_rows_are_the_pipelines_encoding(hunyuan, shards):
    from diffusers import AutoencoderKLHunyuanVideo

    from train.config import PreprocessConfig
    from train.data.dataset import read_video

    index = json.loads((shards / "index.json").read_text())
    assert index["null"] == {"file": "null.safetensors", "prompt": ""} and index["encoder"] == "hunyuanvideo"
    assert index["skipped"] == {"no caption": 1}
    pipe = pipeline(hunyuan)
    null = load_file(str(shards / "null.safetensors"))
    expected = encode(pipe, "")
    assert {k: (v.dtype, tuple(v.shape)) for k, v in null.items()} == {"text": (torch.bfloat16, (1, 256, 32)),
                                                                        "text_mask": (torch.bool, (1, 256)),
                                                                        "pooled": (torch.bfloat16, (1, 16))}
    for key in expected:
        assert torch.equal(null[key], expected[key]), key
    assert null["pooled"].abs().sum() > 0 and null["text"].abs().sum() > 0  # CLIP's and Llama's "" are not zeros
    assert null["text_mask"].sum() == 1  # the user message is empty: the template's <|eot_id|> alone

    vae = AutoencoderKLHunyuanVideo.from_pretrained(str(hunyuan / "vae")).eval()
    p = PreprocessConfig(frames=5, height=32, width=32)
    rows = 0
    for shard in index["shards"]:
        tensors = load_file(str(shards / shard["file"]))
        assert set(tensors) == {"latents", "text", "text_mask", "pooled"}
        for i, item in enumerate(shard["items"]):
            assert item["caption"] == CAPTIONS[item["file"]]
            expected = encode(pipe, item["caption"])
            for key in expected:
                assert torch.equal(tensors[key][i], expected[key][0]), (item, key)
            with torch.no_grad():
                video = read_video(shards.parent / "videos" / item["file"], p)
                latents = vae.encode(video[None]).latent_dist.mode() * vae.config.scaling_factor
            assert tensors["latents"].shape[1:] == (4, 2, 4, 4)
            torch.testing.assert_close(tensors["latents"][i], latents[0], rtol=1e-5, atol=1e-5)
            rows += 1
    assert rows == 3


def test_hunyuan_shards_train_a_stage2_step(hunyuan, shards, tmp_path, monkeypatch):
    """configs/hunyuanvideo.yaml's settings on one CPU process (no DeepSpeed, fp32) and the tiny folder: the batch
    carries the stored text, mask and pooled features, and the guidance-distilled teacher embeds its guidance."""
    import train.stage2
    from fastlightgen.adapters import adapt
    from fastlightgen.plan import PrunePlan
    from train.models.loading import load_teacher

    settings = [f"model.path={hunyuan}", "model.arch={}", f"data.shards={shards}", "data.batch_size=2",
                "data.caption_dropout=0.5", "dist.deepspeed=false", "dist.bf16=false", "dist.world_size=1",
                f"run.run_dir={tmp_path / 'run'}", "stage2.iterations=1"]
    cfg = load_config(str(REPO / "configs" / "hunyuanvideo.yaml"), settings)
    teacher = load_teacher(cfg)
    assert teacher.config.guidance_embeds and cfg.model.gradient_checkpointing
    plan = tmp_path / "plan.json"
    PrunePlan.from_blocks(adapt(teacher).fingerprint(), [1, 2]).save(plan)  # a double and a single block
    seen = []
    real = train.stage2.stage2_loss
    monkeypatch.setattr(train.stage2, "stage2_loss", lambda *a, **k: seen.append(a[3]) or real(*a, **k))
    train.stage2.main(["-c", str(REPO / "configs" / "hunyuanvideo.yaml"), "--set", f"stage2.plan={plan}"]
                      + [a for s in settings for a in ("--set", s)])
    (cond,) = seen
    assert cond.text.shape == (2, 256, 32) and cond.text_mask.dtype == torch.bool and cond.pooled.shape == (2, 16)
    records = [json.loads(line) for line in (tmp_path / "run" / "stage2" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [1] and records[0]["loss"] > 0
    weights = load_file(str(tmp_path / "run" / "stage2" / "model.safetensors"))
    assert any(not torch.equal(weights[k], v) for k, v in teacher.state_dict().items())  # the step changed them


def test_hunyuan_settings_are_checked_before_any_model_loads(hunyuan, tmp_path):
    from train.preprocess import read_inputs

    (tmp_path / "videos").mkdir()
    (tmp_path / "videos" / "a.mp4").write_bytes(b"")

    def check(root: Path = hunyuan, **values):
        read_inputs(load_config(None, hunyuan_settings(root, tmp_path / "out", **{
            "preprocess.videos": tmp_path / "videos", **values})))

    check(**{"preprocess.height": 48, "preprocess.frames": 9})  # 8 (the VAE) x 2 (the patch); 4k+1
    with pytest.raises(ValueError, match=r"preprocess.width 40 is not a multiple of 16 \(the spatial stride 8 of the "
                                         r"VAE .* x the transformer's patch size 2\); use 32 or 48"):
        check(**{"preprocess.width": 40})
    with pytest.raises(ValueError, match=r"preprocess.frames 6: .* takes 4k\+1 frames .*; use 5 or 9"):
        check(**{"preprocess.frames": 6})
    with pytest.raises(ValueError, match="preprocess.encoder wan does not encode for model.family hunyuanvideo: "
                                         "set preprocess.encoder=hunyuanvideo"):
        check(**{"preprocess.encoder": "wan"})

    partial = tmp_path / "HunyuanVideo-partial"
    partial.mkdir()
    shutil.copy(hunyuan / "model_index.json", partial)
    for part in ("transformer", "vae", "text_encoder", "tokenizer", "tokenizer_2"):  # no text_encoder_2/ (CLIP)
        (partial / part).symlink_to(hunyuan / part)
    with pytest.raises(FileNotFoundError, match=r"has no text_encoder_2/ subfolder.*preprocess\.text_encoder_2"):
        check(partial)
    check(partial, **{"preprocess.text_encoder_2": hunyuan / "text_encoder_2"})
    with pytest.raises(FileNotFoundError, match=r"the tokenizer_2 folder .* holds none of"):
        check(**{"preprocess.tokenizer_2": hunyuan / "vae"})
