"""Writing videos as mp4 (PyAV, h264) atomically."""
from __future__ import annotations

from pathlib import Path

import av
import numpy as np
import torch

from .io_utils import atomic_path


def to_uint8_frames(video: torch.Tensor) -> np.ndarray:
    """(3, F, H, W) in [-1, 1] -> (F, H, W, 3) uint8."""
    frames = ((video.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    return frames.permute(1, 2, 3, 0).contiguous().numpy()


def write_mp4(path: str | Path, video: torch.Tensor, fps: int = 8, upscale: int = 1) -> Path:
    """Write a (3, F, H, W) video in [-1, 1]; `upscale` enlarges tiny toy frames by pixel repetition."""
    frames = to_uint8_frames(video)
    if upscale > 1:
        frames = frames.repeat(upscale, axis=1).repeat(upscale, axis=2)
    path = Path(path)
    with atomic_path(path) as tmp:
        with av.open(str(tmp), mode="w", format="mp4") as container:
            stream = container.add_stream("libx264", rate=fps)
            stream.height, stream.width = frames.shape[1], frames.shape[2]
            stream.pix_fmt = "yuv420p"
            stream.options = {"crf": "12"}
            for frame in frames:
                container.mux(stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")))
            container.mux(stream.encode(None))
    return path
