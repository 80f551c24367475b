"""Toy world: a CPU-sized TI2V task with known generating factors (pure torch, no ComfyUI).

world    factors, rendering, captions, the fixed train/held-out split, datasets and batches
codec    exact RGB <-> 48-channel Wan 2.2-layout latents (model space and ComfyUI LATENT space)
text     deterministic stand-in for UMT5: caption -> (TEXT_LEN, 4096) context, "" -> zeros
evaluate VBench-I2V-like scores computed from the known factors
"""
from fastlightgen.toy.codec import (
    LATENT_CHANNELS,
    decode_video,
    encode_video,
    from_comfy_latent,
    pixel_shuffle_video,
    pixel_unshuffle_video,
    to_comfy_latent,
)
from fastlightgen.toy.evaluate import COLUMNS, DIMENSIONS, EvalTable, estimate_object, evaluate_batch, evaluate_video
from fastlightgen.toy.text import TEXT_DIM, TEXT_LEN, encode_caption
from fastlightgen.toy.text import encode as encode_text
from fastlightgen.toy.world import (
    BACKGROUNDS,
    COLOR_NAMES,
    DIRECTIONS,
    SHAPES,
    TOY_WORLD,
    Factors,
    Texture,
    ToyBatch,
    ToyWorldSpec,
    caption,
    dataset,
    heldout_combinations,
    make_batch,
    render,
    render_at,
    render_background,
    sample_factors,
    shape_alpha,
    train_combinations,
    trajectory,
)

__all__ = [
    "BACKGROUNDS", "COLOR_NAMES", "COLUMNS", "DIMENSIONS", "DIRECTIONS", "LATENT_CHANNELS", "SHAPES",
    "TEXT_DIM", "TEXT_LEN", "TOY_WORLD", "EvalTable", "Factors", "Texture", "ToyBatch", "ToyWorldSpec",
    "caption", "dataset", "decode_video", "encode_caption", "encode_text", "encode_video",
    "estimate_object", "evaluate_batch", "evaluate_video", "from_comfy_latent", "heldout_combinations",
    "make_batch", "pixel_shuffle_video", "pixel_unshuffle_video", "render", "render_at",
    "render_background", "sample_factors", "shape_alpha", "to_comfy_latent", "train_combinations",
    "trajectory",
]
