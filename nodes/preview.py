"""Video Grid: lay decoded videos out as one IMAGE (one tile per video, or one frame strip per video)."""
from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F
from comfy_api.latest import io
from PIL import Image, ImageDraw

LAST_FRAME = "last frame"
FRAME_STRIP = "all frames (strip)"


def _label(tile: torch.Tensor, text: str) -> torch.Tensor:
    """Writes `text` on a dark band at the top of an (H, W, 3) tile in [0, 1]."""
    img = Image.fromarray((tile.clamp(0, 1) * 255).byte().cpu().numpy())
    draw = ImageDraw.Draw(img)
    draw.rectangle((0, 0, img.width, 11), fill=(0, 0, 0))
    draw.text((2, 0), text, fill=(255, 255, 255))
    return torch.from_numpy(np.asarray(img).astype(np.float32) / 255.0)


def video_grid(frames: torch.Tensor, videos: int, mode: str, scale: int, columns: int,
               labels: list[str]) -> torch.Tensor:
    """frames: (videos * F, H, W, 3) as VAE Decode returns videos -> (1, rows*H', cols*W', 3)."""
    if videos < 1 or frames.shape[0] % videos:
        raise ValueError(f"{frames.shape[0]} frames cannot be split into {videos} videos of equal length")
    clips = frames.reshape(videos, frames.shape[0] // videos, *frames.shape[1:])
    if mode == LAST_FRAME:
        tiles = clips[:, -1]
        columns = columns or math.ceil(math.sqrt(videos))
    else:
        tiles = clips.permute(0, 2, 1, 3, 4).flatten(2, 3)  # each video's frames side by side
        columns = 1
    tiles = F.interpolate(tiles.movedim(-1, 1), scale_factor=scale, mode="nearest").movedim(1, -1)
    if labels:
        tiles = torch.stack([_label(t, text) for t, text in zip(tiles, labels)] + list(tiles[len(labels):]))
    rows = math.ceil(videos / columns)
    pad = tiles.new_zeros(rows * columns - videos, *tiles.shape[1:])
    grid = torch.cat([tiles, pad]).reshape(rows, columns, *tiles.shape[1:])
    return grid.permute(0, 2, 1, 3, 4).reshape(1, rows * tiles.shape[1], columns * tiles.shape[2], 3)


class VideoGrid(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="FastLightGenVideoGrid",
            display_name="FastLightGen Video Grid",
            category="FastLightGen",
            description="Shows a batch of decoded videos as one image: the last frame of each video in a grid, "
                        "or each video as a strip of frames, labelled (e.g. with the sweep's betas).",
            inputs=[
                io.Image.Input("images", tooltip="Decoded frames of all videos, video after video."),
                io.Int.Input("videos", default=1, min=1, max=4096,
                             tooltip="How many videos the frames hold; ignored when labels are connected "
                                     "(one line per video)."),
                io.Combo.Input("mode", options=[LAST_FRAME, FRAME_STRIP], default=LAST_FRAME,
                               tooltip="Last frame per video (the first is the given image in TI2V), or all."),
                io.Int.Input("scale", default=4, min=1, max=16, tooltip="Nearest-neighbour upscaling of tiny frames."),
                io.Int.Input("columns", default=0, min=0, max=64,
                             tooltip="Tiles per row for 'last frame'; 0 picks a square-ish grid."),
                io.String.Input("labels", optional=True, force_input=True,
                                tooltip="One label per video, one per line (e.g. the sweep's labels)."),
            ],
            outputs=[io.Image.Output()],
        )

    @classmethod
    def execute(cls, images: torch.Tensor, videos: int, mode: str, scale: int, columns: int,
                labels: str | None = None) -> io.NodeOutput:
        lines = [line for line in (labels or "").splitlines() if line.strip()]
        return io.NodeOutput(video_grid(images, len(lines) or videos, mode, scale, columns, lines))
