"""Toy-world nodes: the embedded default that runs the shipped workflows with no downloaded weights.

Toy Text Encode stands in for UMT5, the toy latent nodes for Wan22ImageToVideoLatent (TI2V with a start
image, T2V without), Toy Decode for the Wan VAE. Latents are ComfyUI LATENTs in the Wan 2.2 layout (48
channels), so stock samplers and the Wan22 latent format apply unchanged.
"""
from __future__ import annotations

import random

import torch
from comfy_api.latest import io

from fastlightgen.captions import clean_caption
from fastlightgen.toy import codec, text, world

FIRST_FRAME_MASK_NOTE = "noise_mask is 0 on the first frame, so the samplers keep it (TI2V)"
MODES = ("TI2V", "T2V")
NO_CHANGE = "none"  # the `turning` choice for an object that keeps its color
EXAMPLE_CAPTION = world.caption(world.Factors("red", "circle", "right", "plain", (16.0, 16.0), speed="quickly",
                                              end_color="blue"))


def _video_latent(videos: torch.Tensor, first_frame_only: bool) -> dict:
    """(B, 3, F, H, W) RGB -> LATENT with the first frame pinned, as Wan22ImageToVideoLatent builds it."""
    model_space = codec.encode_video(videos)
    if first_frame_only:  # frames to generate hold model-space zeros, as the stock node leaves them
        model_space[:, :, 1:] = 0.0
    mask = torch.ones(model_space.shape[0], 1, *model_space.shape[2:])
    mask[:, :, 0] = 0.0
    return {"samples": codec.to_comfy_latent(model_space), "noise_mask": mask}


def _empty_latent(batch_size: int) -> dict:
    """A T2V start latent: zeros and no noise_mask, as Wan22ImageToVideoLatent gives without a start_image;
    every frame is generated, the first one from the caption too."""
    w = world.TOY_WORLD
    return {"samples": torch.zeros(batch_size, codec.LATENT_CHANNELS, w.frames, w.height // codec.PATCH,
                                   w.width // codec.PATCH)}


def _images(videos: torch.Tensor) -> torch.Tensor:
    """(B, 3, F, H, W) in [-1, 1] -> IMAGE (B*F, H, W, 3) in [0, 1], the layout VAE Decode gives videos."""
    frames = videos.permute(0, 2, 3, 4, 1).flatten(0, 1)
    return ((frames + 1) / 2).clamp(0, 1)


def factors_from_caption(caption: str) -> dict[str, str]:
    """The factors a caption names, as the node's inputs: color (the first color word), shape, direction,
    speed, background and turning (the color after the word "turning", or "none")."""
    words = text.tokenize(caption)

    def fail(problem: str) -> ValueError:
        return ValueError(f"caption {caption!r} {problem}; e.g. '{EXAMPLE_CAPTION}' (leave out 'and turning "
                          f"<color>' for an object that keeps its color)")

    found = {}
    for name, vocab in (("shape", world.SHAPES), ("direction", tuple(world.DIRECTIONS)),
                        ("speed", tuple(world.SPEEDS)), ("background", world.BACKGROUNDS)):
        hits = [v for v in vocab if v in words]
        if len(hits) != 1:
            raise fail(f"must name exactly one {name} of {list(vocab)}, but names "
                       f"{hits if hits else 'none'}")
        found[name] = hits[0]
    turns = [i for i, word in enumerate(words) if word == "turning"]
    if len(turns) > 1:
        raise fail("says 'turning' more than once; an object changes color at most once")
    end_at = turns[0] + 1 if turns else None
    if end_at is not None and (end_at == len(words) or words[end_at] not in world.COLOR_NAMES):
        raise fail(f"must follow 'turning' with the color the object turns, one of {list(world.COLOR_NAMES)}")
    own = list(dict.fromkeys(w for i, w in enumerate(words) if w in world.COLOR_NAMES and i != end_at))
    if len(own) != 1:
        raise fail(f"must name exactly one object color of {list(world.COLOR_NAMES)} (the first color word; "
                   f"the color after 'turning' is the one it turns), but names {own if own else 'none'}")
    found["color"] = own[0]
    found["turning"] = words[end_at] if end_at is not None else NO_CHANGE
    if found["turning"] == found["color"]:
        raise fail(f"turns the {found['color']} object {found['color']}, its own color; name another color "
                   f"after 'turning'")
    return found


def toy_factors(color: str, shape: str, direction: str, background: str, seed: int, speed: str = "quickly",
                turning: str = NO_CHANGE) -> world.Factors:
    """The given factors with a start position (and stripes) drawn from `seed`; the object stays in frame at
    its speed."""
    if speed not in world.SPEEDS:
        raise ValueError(f"speed must be one of {list(world.SPEEDS)}, got {speed!r}")
    if turning != NO_CHANGE and turning not in world.COLOR_NAMES:
        raise ValueError(f"turning must be {NO_CHANGE!r} or one of {list(world.COLOR_NAMES)}, got {turning!r}")
    if turning == color:
        raise ValueError(f"turning is {turning!r}, the object's own color: choose another color for it to turn, "
                         f"or {NO_CHANGE!r} to keep it {color}")
    rng = random.Random(seed)
    start = world.sample_start(rng, shape, direction, speed)
    texture = world.sample_texture(rng) if background == "textured" else None
    return world.Factors(color, shape, direction, background, start, texture, speed,
                         None if turning == NO_CHANGE else turning)


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
            inputs=[io.String.Input("prompt", multiline=True,
                                    default="a red circle moving right quickly on a plain background",
                                    tooltip=f"One caption per line, e.g. '{EXAMPLE_CAPTION}'; empty for the "
                                            f"negative / null prompt.")],
            outputs=[io.Conditioning.Output()],
        )

    @classmethod
    def execute(cls, prompt: str) -> io.NodeOutput:
        captions = [clean_caption(line) for line in prompt.splitlines() if line.strip()] or [""]
        return io.NodeOutput([[text.encode(captions), {}]])


def _factor_inputs() -> list:
    return [
        io.Combo.Input("color", options=list(world.COLOR_NAMES), default="red",
                       tooltip="Object colour (in the first frame)."),
        io.Combo.Input("shape", options=list(world.SHAPES), default="circle", tooltip="Object shape."),
        io.Combo.Input("direction", options=list(world.DIRECTIONS), default="right",
                       tooltip="Direction the object moves in (stated in the caption, not the first frame)."),
        io.Combo.Input("background", options=list(world.BACKGROUNDS), default="plain", tooltip="Background."),
    ]


def _change_inputs() -> list:
    """Inputs added after the first release: optional and last, so workflows saved before them still load (the
    editor fills widget values in order and keeps the defaults of missing ones; API prompts may omit them)."""
    speeds = ", ".join(f"{name} {px:g}" for name, px in world.SPEEDS.items())
    return [
        io.Combo.Input("speed", options=list(world.SPEEDS), default="quickly", optional=True,
                       tooltip=f"How fast the object moves, in pixels per frame ({speeds}); stated in the caption, "
                               "not the first frame."),
        io.Combo.Input("turning", options=[NO_CHANGE, *world.COLOR_NAMES], default=NO_CHANGE, optional=True,
                       tooltip=f"The colour the object turns from frame {world.TOY_WORLD.change_frame} on "
                               f"('and turning blue' in the caption), or {NO_CHANGE} to keep its colour; not its "
                               "own colour."),
    ]


class ToyFirstFrameLatent(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="FastLightGenToyFirstFrameLatent",
            display_name="FastLightGen Toy First-Frame Latent",
            category="FastLightGen/toy",
            description="A start latent of the toy world, as Wan22ImageToVideoLatent makes it. TI2V: the rendered "
                        f"first frame, the other frames to be generated; {FIRST_FRAME_MASK_NOTE}. T2V: zeros and "
                        "no noise_mask, every frame generated from the caption (as the stock node without a "
                        "start_image). Also returns the matching caption and first frame.",
            inputs=[
                *_factor_inputs(),
                io.Int.Input("seed", default=0, min=0, max=0xFFFFFFFFFFFFFFFF,
                             tooltip="Draws the start position (and the stripes of a textured background)."),
                io.String.Input("caption", default="",
                                tooltip=f"If given, its words choose the factors instead, e.g. '{EXAMPLE_CAPTION}'; "
                                        "it names a speed, and 'turning <color>' for a colour change."),
                io.Int.Input("batch_size", default=1, min=1, max=64, tooltip="Copies of the latent."),
                *_change_inputs(),
                io.Combo.Input("mode", options=list(MODES), default="TI2V", optional=True,
                               tooltip="TI2V: the latent holds the first frame and the samplers keep it. T2V: no "
                                       "first frame (zeros, no noise_mask); the model draws every frame from the "
                                       "caption."),
            ],
            outputs=[
                io.Latent.Output(),
                io.String.Output(display_name="caption", tooltip="The caption of these factors."),
                io.Image.Output(display_name="first_frame",
                                tooltip="The rendered first frame: in TI2V the one the latent holds; in T2V for "
                                        "reference only (the model draws its own)."),
            ],
        )

    @classmethod
    def execute(cls, color: str, shape: str, direction: str, background: str, seed: int, caption: str,
                batch_size: int, speed: str = "quickly", turning: str = NO_CHANGE,
                mode: str = "TI2V") -> io.NodeOutput:
        if mode not in MODES:
            raise ValueError(f"FastLightGen Toy First-Frame Latent: mode must be one of {list(MODES)}, got {mode!r}")
        chosen = factors_from_caption(caption) if caption.strip() else \
            {"color": color, "shape": shape, "direction": direction, "background": background, "speed": speed,
             "turning": turning}
        factors = toy_factors(**chosen, seed=seed)
        video = world.render(factors)[None]
        latent = _empty_latent(batch_size) if mode == "T2V" else \
            _video_latent(video.repeat(batch_size, 1, 1, 1, 1), first_frame_only=True)
        return io.NodeOutput(latent, world.caption(factors), _images(video[:, :, :1]))


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
