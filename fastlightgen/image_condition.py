"""The image-to-video input of Wan's I2V models (Wan 2.2 I2V-A14B, Wan 2.1 I2V): the rule, owned here.

Unlike TI2V's pinned first frame (`fastlightgen.first_frame`: the given frame is part of the latent, held at
sigma 0 and left out of the loss), an I2V model is given the image as extra input channels and noises and
predicts every latent frame. Its input is, concatenated on the channel axis, as diffusers'
WanImageToVideoPipeline builds it:
  the noisy latents x_t                 (B, C, F, h, w), C = 16
  a mask                                (B, S, F, h, w), S = the VAE's temporal stride (4): latent frame f folds
                                        video frames 4f-3..4f (frame 0 alone, repeated, for f = 0) into S
                                        channels, 1 where that video frame is given (the first), else 0
  the conditioning video's latents      (B, C, F, h, w): the VAE's encoding of the image followed by F' - 1
                                        zero frames, normalized like the training latents
so 16 + 4 + 16 = 36 channels in and 16 out. The mask and the latents are the condition (`image_condition`);
`model_input` puts it beside x_t for every prediction.
"""
from __future__ import annotations

import torch

TEMPORAL_STRIDE = 4  # Wan's VAE: 4 video frames per latent frame after the first


def frame_mask(latents: torch.Tensor) -> torch.Tensor:
    """The mask channels for latents (B, C, F, h, w) of a video of 4(F - 1) + 1 frames whose first frame is given:
    (B, 4, F, h, w)."""
    b, _, f, h, w = latents.shape
    video = torch.zeros(TEMPORAL_STRIDE * (f - 1) + 1)
    video[0] = 1.0
    # frame 0 fills a whole latent frame's S slots, as the VAE encodes it alone
    slots = torch.cat([video[:1].repeat(TEMPORAL_STRIDE), video[1:]]).view(f, TEMPORAL_STRIDE).T
    return slots.view(1, TEMPORAL_STRIDE, f, 1, 1).expand(b, -1, -1, h, w).to(latents)


def image_condition(image_latents: torch.Tensor) -> torch.Tensor:
    """The condition of an I2V model: the mask, then the conditioning video's latents (B, 16, F, h, w)."""
    return torch.cat([frame_mask(image_latents), image_latents], dim=1)


def model_input(x_t: torch.Tensor, condition: torch.Tensor | None) -> torch.Tensor:
    """What an I2V model takes at every step: x_t with its condition beside it (x_t alone without one)."""
    if condition is None:
        return x_t
    if condition.shape[0] != x_t.shape[0] or condition.shape[2:] != x_t.shape[2:]:
        raise ValueError(f"the I2V condition {tuple(condition.shape)} does not fit the latents {tuple(x_t.shape)}: "
                         "encode it from the same video shape")
    return torch.cat([x_t, condition.to(x_t)], dim=1)


def condition_channels(in_channels: int, out_channels: int) -> int:
    """How many input channels of a Wan model are the I2V condition: 20 for an I2V model (36 in, 16 out), 0 for
    T2V and TI2V (as many in as out); other counts are no model we know."""
    extra = in_channels - out_channels
    if extra not in (0, TEMPORAL_STRIDE + out_channels):
        raise ValueError(f"a Wan model of {in_channels} input and {out_channels} output channels is neither T2V/TI2V "
                         f"({out_channels} in) nor I2V ({2 * out_channels + TEMPORAL_STRIDE} in)")
    return extra
