"""Toy-world nodes: the embedded default that runs the shipped workflows with no downloaded weights.

Toy Text Encode stands in for UMT5, the toy latent nodes for Wan22ImageToVideoLatent, Toy Decode for the
Wan VAE. Latents are ComfyUI LATENTs in the Wan 2.2 layout (48 channels), so stock samplers and the Wan22
latent format apply unchanged.
"""
from __future__ import annotations

import dataclasses
import math
import random

import torch
from comfy_api.latest import io

from fastlightgen.toy import codec, text, world

FIRST_FRAME_MASK_NOTE = "noise_mask is 0 on the first frame, so the samplers keep it (TI2V)"


def _video_latent(videos: torch.Tensor, first_frame_only: bool) -> dict:
    """(B, 3, F, H, W) RGB -> LATENT with the first frame pinned, as Wan22ImageToVideoLatent builds it."""
    model_space = codec.encode_video(videos)
    if first_frame_only:  # frames to generate hold model-space zeros, as the stock node leaves them
        model_space[:, :, 1:] = 0.0
    mask = torch.ones(model_space.shape[0], 1, *model_space.shape[2:])
    mask[:, :, 0] = 0.0
    return {"samples": codec.to_comfy_latent(model_space), "noise_mask": mask}


def _images(videos: torch.Tensor) -> torch.Tensor:
    """(B, 3, F, H, W) in [-1, 1] -> IMAGE (B*F, H, W, 3) in [0, 1], the layout VAE Decode gives videos."""
    frames = videos.permute(0, 2, 3, 4, 1).flatten(0, 1)
    return ((frames + 1) / 2).clamp(0, 1)


def factors_from_caption(caption: str) -> dict[str, str]:
    words = set(text.tokenize(caption))
    found = {}
    for name, vocab in (("color", world.COLOR_NAMES), ("shape", world.SHAPES),
                        ("direction", tuple(world.DIRECTIONS)), ("background", world.BACKGROUNDS)):
        hits = [v for v in vocab if v in words]
        if len(hits) != 1:
            raise ValueError(f"caption {caption!r} must name exactly one {name} of {list(vocab)}; "
                             f"e.g. '{world.caption(world.sample_factors(0))}'")
        found[name] = hits[0]
    return found


def toy_factors(color: str, shape: str, direction: str, background: str, seed: int) -> world.Factors:
    """The given combination with a start position (and stripes) drawn from `seed`."""
    factors = world.sample_factors(seed, [(color, shape, direction)])
    if factors.background == background:
        return factors
    texture = None
    if background == "textured":
        rng = random.Random(seed)
        texture = world.Texture(rng.uniform(0, math.pi), rng.uniform(*world.TOY_WORLD.texture_period),
                                rng.uniform(0, 2 * math.pi))
    return dataclasses.replace(factors, background=background, texture=texture)


class ToyTextEncode(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="FastLightGenToyTextEncode",
            display_name="FastLightGen Toy Text Encode",
            category="FastLightGen/toy",
            description=f"The toy world's text encoder (a stand-in for UMT5): each line is a caption and becomes "
                        f"a ({text.TEXT_LEN}, {text.TEXT_DIM}) context; several lines make a batch; an empty "
                        f"text is the null conditioning (zeros).",
            inputs=[io.String.Input("prompt", multiline=True, default="a red circle moving right on a plain background",
                                    tooltip="One caption per line, e.g. 'a red circle moving right on a plain "
                                            "background'; empty for the negative / null prompt.")],
            outputs=[io.Conditioning.Output()],
        )

    @classmethod
    def execute(cls, prompt: str) -> io.NodeOutput:
        captions = [line for line in prompt.splitlines() if line.strip()] or [""]
        return io.NodeOutput([[text.encode(captions), {}]])


def _factor_inputs() -> list:
    return [
        io.Combo.Input("color", options=list(world.COLOR_NAMES), default="red", tooltip="Object colour."),
        io.Combo.Input("shape", options=list(world.SHAPES), default="circle", tooltip="Object shape."),
        io.Combo.Input("direction", options=list(world.DIRECTIONS), default="right",
                       tooltip="Direction the object moves in (stated in the caption, not the first frame)."),
        io.Combo.Input("background", options=list(world.BACKGROUNDS), default="plain", tooltip="Background."),
    ]


class ToyFirstFrameLatent(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="FastLightGenToyFirstFrameLatent",
            display_name="FastLightGen Toy First-Frame Latent",
            category="FastLightGen/toy",
            description="A TI2V start latent of the toy world: the rendered first frame, the other frames to be "
                        f"generated; {FIRST_FRAME_MASK_NOTE}. Also returns the matching caption and first frame.",
            inputs=[
                *_factor_inputs(),
                io.Int.Input("seed", default=0, min=0, max=0xFFFFFFFFFFFFFFFF,
                             tooltip="Draws the start position (and the stripes of a textured background)."),
                io.String.Input("caption", default="",
                                tooltip="If given, its words choose the factors instead, e.g. 'a blue square moving "
                                        "up on a textured background'."),
                io.Int.Input("batch_size", default=1, min=1, max=64, tooltip="Copies of the latent."),
            ],
            outputs=[
                io.Latent.Output(),
                io.String.Output(display_name="caption", tooltip="The caption of these factors."),
                io.Image.Output(display_name="first_frame"),
            ],
        )

    @classmethod
    def execute(cls, color: str, shape: str, direction: str, background: str, seed: int, caption: str,
                batch_size: int) -> io.NodeOutput:
        chosen = factors_from_caption(caption) if caption.strip() else \
            {"color": color, "shape": shape, "direction": direction, "background": background}
        factors = toy_factors(**chosen, seed=seed)
        video = world.render(factors)[None].repeat(batch_size, 1, 1, 1, 1)
        return io.NodeOutput(_video_latent(video, first_frame_only=True), world.caption(factors),
                             _images(video[:1, :, :1]))


class ToyDatasetLatents(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="FastLightGenToyDatasetLatents",
            display_name="FastLightGen Toy Dataset Latents",
            category="FastLightGen/toy",
            description=f"Clean toy-world videos as a LATENT batch with their captions (one per line), e.g. "
                        f"for Block Importance; {FIRST_FRAME_MASK_NOTE}.",
            inputs=[
                io.Combo.Input("split", options=list(world.SPLITS), default="train",
                               tooltip="Training combinations, or the held-out ones."),
                io.Int.Input("count", default=4, min=1, max=256, tooltip="Number of videos."),
                io.Int.Input("seed", default=0, min=0, max=0xFFFFFFFFFFFFFFFF, tooltip="Which videos."),
            ],
            outputs=[io.Latent.Output(), io.String.Output(display_name="captions")],
        )

    @classmethod
    def execute(cls, split: str, count: int, seed: int) -> io.NodeOutput:
        batch = world.make_batch(split, count, seed)
        return io.NodeOutput(_video_latent(batch.videos, first_frame_only=False), "\n".join(batch.captions))


class ToyDecode(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="FastLightGenToyDecode",
            display_name="FastLightGen Toy Decode",
            category="FastLightGen/toy",
            description="Decodes toy-world LATENT videos exactly into IMAGE frames (video after video), like "
                        "VAE Decode does for Wan; feed CreateVideo/SaveVideo or a preview.",
            inputs=[io.Latent.Input("samples", tooltip="A 48-channel toy-world video latent.")],
            outputs=[io.Image.Output()],
        )

    @classmethod
    def execute(cls, samples: dict) -> io.NodeOutput:
        latent = samples["samples"]
        if latent.shape[0] == 0:
            raise ValueError("FastLightGen Toy Decode: the LATENT batch is empty")
        if latent.ndim != 5 or latent.shape[1] != codec.LATENT_CHANNELS:
            raise ValueError(f"FastLightGen Toy Decode needs a toy-world video latent (B, {codec.LATENT_CHANNELS}, "
                             f"F, h, w), got shape {tuple(latent.shape)}")
        return io.NodeOutput(_images(codec.decode_video(codec.from_comfy_latent(latent.float().cpu()))))
