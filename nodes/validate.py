"""Input checks shared by the nodes: each names the input, what the model expects and which stock node makes it.

Every check runs before the expensive part of its node (a model pass, a Stage I run, a sampling loop):
ComfyUI's widget bounds let NaN through (NaN is neither below min nor above max), and a latent or conditioning
of the wrong width otherwise surfaces deep in the forward as a bare torch shape error. A sampler or guider of
the pack that ends with a non-finite latent raises instead of reporting success with a NaN video.
"""
from __future__ import annotations

import math

import comfy.sample
import torch
from comfy.model_patcher import ModelPatcher

from .dit import family

TOY_LATENT = "FastLightGen Toy First-Frame Latent / Toy Dataset Latents for the toy models"
# (family, latent channels) -> how the latent is named and which stock nodes make it
LATENT_SOURCES = {
    ("wan", 48): ("Wan 2.2 TI2V latents", "Wan22ImageToVideoLatent (Wan 2.2 VAE) or EmptyHunyuanLatentVideo, or "
                  + TOY_LATENT),
    ("wan", 16): ("Wan 2.1 / Wan 2.2 A14B latents", "EmptyHunyuanLatentVideo, WanImageToVideo or VAE Encode with "
                  "the Wan 2.1 VAE"),
    ("hunyuanvideo", 16): ("HunyuanVideo latents", "EmptyHunyuanLatentVideo or HunyuanImageToVideo"),
}
# (family, latent channels) -> the VAE whose encoding of real video frames Stage I scores against
VIDEO_ENCODERS = {("wan", 48): "the Wan 2.2 VAE", ("wan", 16): "the Wan 2.1 VAE",
                  ("hunyuanvideo", 16): "the HunyuanVideo VAE"}
# Stage I runs (blocks + 1) x timesteps x draws passes, each quadratic in the tokens: a latent past four times
# the tokens of an 81-frame 720p Wan clip (21 x 45 x 80 after patching) is a mistake (an unscaled video, an
# image-sized latent), refused before the first pass rather than discovered hours into it.
MAX_STAGE1_TOKENS = 4 * 21 * 45 * 80
TEXT_SOURCES = {
    "wan": ("UMT5 conditioning", "CLIPLoader type wan (umt5_xxl) + CLIP Text Encode, or FastLightGen Toy Text "
            "Encode for the toy models"),
    "hunyuanvideo": ("HunyuanVideo conditioning", "DualCLIPLoader type hunyuan_video + CLIP Text Encode"),
}


def file_choice(value: str, options: list[str], what: str, fix: str) -> bool | str:
    """`validate_inputs`' answer for a file COMBO: ComfyUI checks no V3 combo against its options, so without this
    a missing file would pass validation and fail only when its node runs."""
    return True if value in options else f"{what} {value!r} is not there: {fix}"


def check_finite(node: str, **values: float) -> None:
    """NaN or inf in a FLOAT input: an error naming the input (call it first in `execute`)."""
    bad = [f"{name} is {value}" for name, value in values.items() if not math.isfinite(value)]
    if bad:
        raise ValueError(f"{node}: {', '.join(bad)}; every number must be finite, set it to a number")


def expected_latent(model: ModelPatcher) -> tuple[int, str]:
    """(latent channels, 'what it is: which stock nodes make it') for `model`."""
    channels = model.get_model_object("latent_format").latent_channels
    name, sources = LATENT_SOURCES.get((family(model), channels), (f"{channels}-channel latents", "its own VAE"))
    return channels, f"{name} ({channels} channels): use {sources}"


def clean_video_sources(model: ModelPatcher) -> str:
    """Which nodes make the clean, VAE-encoded videos Stage I needs, for `model`."""
    channels = model.get_model_object("latent_format").latent_channels
    vae = VIDEO_ENCODERS.get((family(model), channels), "the model's own VAE")
    return (f"clean videos encoded by {vae} ({channels} channels): load real video frames (Load Video + Get Video "
            f"Components, or Load Image) and connect them through VAE Encode, or use FastLightGen Toy Dataset "
            f"Latents for the toy models; empty-latent and image-to-video latent nodes make no video")


def check_clean_videos(samples: torch.Tensor, node: str, model: ModelPatcher) -> None:
    """Stage I scores each block against real videos: a constant frame (an empty latent, the empty frames an
    image-to-video latent node adds) or a latent too large to probe is refused before any model pass."""
    expected = clean_video_sources(model)
    if samples.ndim != 5 or samples.shape[1] != model.get_model_object("latent_format").latent_channels:
        raise ValueError(f"{node}: the LATENT has shape {tuple(samples.shape)}, but Stage I on this model needs "
                         f"{expected}")
    dit = model.model.diffusion_model
    patch = tuple(getattr(dit, "patch_size", (1, 2, 2)))
    tokens = math.prod(-(-size // step) for size, step in zip(samples.shape[2:], patch))
    if tokens > MAX_STAGE1_TOKENS:
        raise ValueError(f"{node}: a video of this LATENT is {tokens} tokens (shape {tuple(samples.shape)}), more "
                         f"than {MAX_STAGE1_TOKENS} (four 81-frame 720p clips), and Stage I runs one pass per "
                         "block per noise level; encode the videos at 720p or below and at most 81 frames (a few "
                         "short clips at 480p rank the blocks as well)")
    flat = samples.transpose(1, 2).flatten(2)  # (batch, frames, values)
    constant = (flat.amax(-1) == flat.amin(-1)).nonzero().tolist()
    if constant:
        where = ", ".join(f"video {b} frame {f}" for b, f in constant[:4]) + (" ..." if len(constant) > 4 else "")
        raise ValueError(f"{node}: the LATENT has constant frames ({where}; e.g. all zeros), so it is not an "
                         f"encoded video and the block scores would mean nothing; it needs {expected}")


def check_latent(latent: dict, node: str, model: ModelPatcher | None = None) -> torch.Tensor:
    """The LATENT's samples as the samplers will see them (an all-zero latent of another width is widened by
    ComfyUI, as in the stock samplers); an error when the batch is empty, holds NaN or does not fit `model`."""
    samples = latent["samples"]
    if samples.shape[0] == 0:
        raise ValueError(f"{node}: the LATENT batch is empty (0 samples); connect a latent with at least one")
    if not torch.isfinite(samples).all():
        raise ValueError(f"{node}: the LATENT holds NaN or inf values; connect a latent made by a latent or VAE node")
    if model is None:
        return samples
    samples = comfy.sample.fix_empty_latent_channels(model, samples)
    check_fits(samples, node, model)
    return samples


def check_fits(samples: torch.Tensor, node: str, model: ModelPatcher) -> None:
    """A latent tensor (as the samplers pass it on) of the width and rank `model` takes."""
    channels, expected = expected_latent(model)
    if samples.ndim != 5 or samples.shape[1] != channels:
        raise ValueError(f"{node}: the LATENT has shape {tuple(samples.shape)}, but this model takes {expected}")


def check_conditioning(conditioning: list, node: str, model: ModelPatcher, name: str = "positive") -> None:
    """Each entry's token width must be the model's text width (e.g. 4096 for Wan's UMT5), and an image-to-video
    model's conditioning must carry its start image."""
    width = text_width(model)
    kind, sources = TEXT_SOURCES[family(model)]
    extra = image_channels(model)
    for tensor, options in conditioning:
        if tensor.shape[-1] != width:
            raise ValueError(f"{node}: the {name} conditioning is {tensor.shape[-1]} wide, but this model takes "
                             f"{kind} ({width} wide): use {sources}")
        if not torch.isfinite(tensor).all():
            raise ValueError(f"{node}: the {name} conditioning holds NaN or inf values; re-encode the prompt")
        # ComfyUI fills a missing image with zeros and samples from a blank start image without a word
        if extra and options.get("concat_latent_image") is None:
            raise ValueError(f"{node}: this is an image-to-video model ({extra} of its input channels are the "
                             f"start image: a mask and the image's latents), but the {name} conditioning carries "
                             "no start image; connect the prompts through WanImageToVideo with a start_image and "
                             "the Wan 2.1 VAE, and use its positive, negative and latent")


def image_channels(model: ModelPatcher) -> int:
    """How many input channels of a Wan model are an image condition beside the latent (I2V: 4 mask + 16 image
    latents, fastlightgen.image_condition); 0 for T2V, TI2V and HunyuanVideo, whose input is the latent alone."""
    if family(model) != "wan":
        return 0
    return int(model.model.diffusion_model.in_dim) - model.get_model_object("latent_format").latent_channels


def text_width(model: ModelPatcher) -> int:
    dit = model.model.diffusion_model
    return int(dit.text_dim) if family(model) == "wan" else int(dit.txt_in.input_embedder.in_features)


def check_finite_result(samples: torch.Tensor, node: str) -> torch.Tensor:
    """A sampler's output: NaN/inf means a broken run, never a success with a NaN video."""
    if not torch.isfinite(samples).all():
        bad = (~torch.isfinite(samples)).float().mean().item()
        raise ValueError(f"{node}: sampling produced NaN or inf values ({bad:.0%} of the latent), so there is no "
                         "video to return. The model overflowed or holds NaN weights: load it in a wider "
                         "weight dtype (default instead of fp8), check the checkpoint file, lower the guidance")
    return samples
