"""`python -m train.preprocess`: videos + captions -> shards of latents and text embeddings, and the null.

Inputs: the dataset forms of train/dataset.py (a folder of videos with same-name .txt captions, or a JSONL,
CSV or JSON list of records); every video is scaled to cover preprocess.width x preprocess.height,
center-cropped and sampled at preprocess.frame_stride or preprocess.fps; its first preprocess.frames
frames are encoded. A video that cannot be used (no caption, missing, unreadable, too short) is reported
and skipped, and the run ends with the counts.
Encoders: preprocess.encoder = "toy" (the toy world's exact codec and text encoder) or "wan" (the
diffusers Wan VAE and the UMT5 encoder and tokenizer of model.path, the model's folder as downloaded;
preprocess.vae / text_encoder / tokenizer override its parts). With the toy encoder and no videos,
preprocess.toy_samples training videos of the toy world are rendered instead.
Checked before any model loads: the model's parts exist, the frame count fits the VAE's temporal stride
(4k+1 for Wan) and the size its spatial stride times the transformer's patch size (from the configs,
never the weights), the dataset's records have the named fields.
Output: preprocess.out/shard_NNNNN.safetensors (`latents`, `text`), null.safetensors (the encoding of
preprocess.null_prompt, "" by default: the null conditioning of CFG, caption dropout and eq. 9) and
index.json naming them. API: `run(cfg)`; `write_shard`, `write_null` and `write_index` are the shard
format's writers for other producers of shards.
"""
from __future__ import annotations

import inspect
import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import save_file

from fastlightgen.io_utils import atomic_path, atomic_write_text

from .cli import parse
from .config import Config, PreprocessConfig
from .data import SHARD_FORMAT
from .dataset import Entry, entries, videos
from .models import model_class, model_part, teacher_config

NULL_FILE = "null.safetensors"
TOKENIZER_FILES = ("tokenizer.json", "spiece.model", "tokenizer_config.json")


# ---- settings, checked before any model loads ----------------------------------------------------

@dataclass
class Inputs:
    items: list[Entry] | None  # None: toy world videos are rendered
    parts: dict[str, Path]  # the Wan encoders' folders: vae, text_encoder, tokenizer


def default(cls: type, name: str):
    """A diffusers class's default for `name`: what a config.json that leaves it out means."""
    return inspect.signature(cls.__init__).parameters[name].default


def vae_strides(folder: Path) -> tuple[int, int]:
    """(temporal, spatial) compression of the Wan VAE, from its config.json."""
    from diffusers import AutoencoderKLWan

    config = AutoencoderKLWan.load_config(str(folder))
    # Wan 2.1's config.json leaves them out: diffusers' defaults (4, 8) are its values
    keys = ("scale_factor_temporal", "scale_factor_spatial")
    return tuple(config.get(k) or default(AutoencoderKLWan, k) for k in keys)


def patch_size(cfg: Config) -> int:
    """The transformer's spatial patch: model.arch's, else the teacher's config (no weights read), else the
    family's default (preprocessing needs no teacher)."""
    config = cfg.model.arch
    if not config:
        try:
            config = teacher_config(cfg)
        except (OSError, ValueError):
            config = {}
    patch = config.get("patch_size") or default(model_class(cfg.model.family), "patch_size")
    return patch[-1] if isinstance(patch, (list, tuple)) else patch


def check_video_shape(cfg: Config, parts: dict[str, Path]) -> None:
    p = cfg.preprocess
    if p.encoder == "wan":
        temporal, spatial = vae_strides(parts["vae"])
        codec = f"the VAE ({parts['vae']})"
    else:
        from fastlightgen.toy.codec import PATCH
        temporal, spatial, codec = 1, PATCH, "the toy codec"
    if p.frames < 1 or (p.frames - 1) % temporal:
        low = max(1, p.frames - (p.frames - 1) % temporal)
        raise ValueError(f"preprocess.frames {p.frames}: {codec} takes {temporal}k+1 frames (temporal stride "
                         f"{temporal}); use {low} or {low + temporal}")
    patch = patch_size(cfg)
    multiple = spatial * patch
    for name in ("height", "width"):
        value = getattr(p, name)
        if value < 1 or value % multiple:
            low = max(multiple, value - value % multiple)
            raise ValueError(f"preprocess.{name} {value} is not a multiple of {multiple} (the spatial stride {spatial} "
                             f"of {codec} x the transformer's patch size {patch}); use {low} or {low + multiple}")


def check_sampling(p: PreprocessConfig) -> None:
    if p.frame_stride < 1:
        raise ValueError(f"preprocess.frame_stride must be 1 or more, got {p.frame_stride}")
    if p.fps < 0 or (p.fps and p.frame_stride != 1):
        raise ValueError(f"preprocess.fps {p.fps}: set a positive rate with frame_stride 1, or 0 to sample by "
                         f"preprocess.frame_stride ({p.frame_stride})")


def encoder_parts(cfg: Config) -> dict[str, Path]:
    """The Wan encoders' folders, each checked for the file that says what it is."""
    parts = {part: model_part(cfg, part) for part in ("vae", "text_encoder", "tokenizer")}
    for part in ("vae", "text_encoder"):
        if not (parts[part] / "config.json").is_file():
            raise FileNotFoundError(f"the {part} folder {parts[part]} holds no config.json: not a {part} as "
                                    f"diffusers / transformers save it")
    if not any((parts["tokenizer"] / f).is_file() for f in TOKENIZER_FILES):
        raise FileNotFoundError(f"the tokenizer folder {parts['tokenizer']} holds none of "
                                f"{', '.join(TOKENIZER_FILES)}; set model.path to the downloaded model folder or "
                                f"preprocess.tokenizer to its tokenizer/ folder")
    return parts


def read_inputs(cfg: Config) -> Inputs:
    """Every setting and the dataset's list, checked; raises OSError / ValueError naming the problem and the fix."""
    p = cfg.preprocess
    check_sampling(p)
    parts = encoder_parts(cfg) if p.encoder == "wan" else {}
    check_video_shape(cfg, parts)
    if not (p.videos or p.captions):
        if p.encoder == "wan":
            raise ValueError("no dataset: set preprocess.videos to a folder of videos with same-name .txt captions, "
                             "or preprocess.captions to a JSONL / CSV / JSON list of records")
        return Inputs(None, parts)
    return Inputs(entries(p), parts)


def toy_videos(p: PreprocessConfig) -> Iterator[tuple[str, torch.Tensor, str]]:
    from fastlightgen.toy.world import dataset

    for i, (video, caption, _) in enumerate(dataset("train", p.toy_samples, seed=0)):
        yield f"toy:{i}", video, caption


# ---- encoders -----------------------------------------------------------------------------------

class ToyEncoders:
    def video(self, videos: torch.Tensor) -> torch.Tensor:
        from fastlightgen.toy.codec import encode_video
        return encode_video(videos)

    def text(self, captions: list[str]) -> torch.Tensor:
        from fastlightgen.toy.text import encode
        return encode(captions)


class WanEncoders:
    """The diffusers Wan VAE (latents normalized with its latents_mean/std) and UMT5 (512 tokens, zero-padded
    past the prompt, as Wan's pipeline feeds its transformer)."""

    def __init__(self, parts: dict[str, Path]):
        from diffusers import AutoencoderKLWan
        from transformers import AutoTokenizer, UMT5EncoderModel

        self.device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        self.vae = AutoencoderKLWan.from_pretrained(str(parts["vae"])).to(self.device).eval()
        self.tokenizer = AutoTokenizer.from_pretrained(str(parts["tokenizer"]))
        self.encoder = UMT5EncoderModel.from_pretrained(str(parts["text_encoder"])).to(self.device).eval()

    @torch.no_grad()
    def video(self, videos: torch.Tensor) -> torch.Tensor:
        latents = self.vae.encode(videos.to(self.device)).latent_dist.mode()
        c = self.vae.config
        mean = torch.tensor(c.latents_mean).view(1, -1, 1, 1, 1).to(latents)
        std = torch.tensor(c.latents_std).view(1, -1, 1, 1, 1).to(latents)
        return ((latents - mean) / std).cpu()

    @torch.no_grad()
    def text(self, captions: list[str]) -> torch.Tensor:
        tok = self.tokenizer(captions, padding="max_length", max_length=512, truncation=True, return_tensors="pt")
        mask = tok.attention_mask.to(self.device)
        hidden = self.encoder(tok.input_ids.to(self.device), mask).last_hidden_state
        return (hidden * mask.unsqueeze(-1)).cpu()


# ---- output -------------------------------------------------------------------------------------

def write_shard(out: Path, index: int, latents: torch.Tensor, text: torch.Tensor) -> str:
    """Shard number `index` of `out` (latents as given, text embeddings in bf16); returns its file name."""
    name = f"shard_{index:05d}.safetensors"
    with atomic_path(out / name) as tmp:
        save_file({"latents": latents.contiguous(), "text": text.to(torch.bfloat16).contiguous()}, str(tmp))
    return name


def write_null(out: Path, tensors: dict[str, torch.Tensor], prompt: str) -> dict:
    """null.safetensors: the conditioning of the null prompt, one row (`text`; HunyuanVideo also `text_mask`,
    `pooled`), floats in bf16 as the shards hold text, so a dropped caption equals it exactly; returns the
    index's `null` entry."""
    with atomic_path(out / NULL_FILE) as tmp:
        save_file({k: (v.to(torch.bfloat16) if v.is_floating_point() else v).contiguous() for k, v in tensors.items()},
                  str(tmp))
    return {"file": NULL_FILE, "prompt": prompt}


def write_index(out: Path, shards: list[dict], null: dict, **details) -> None:
    """index.json: the shard list (each shard's file and items), the null conditioning's entry (`write_null`)
    and what made them (`details`)."""
    index = {"format": SHARD_FORMAT, **details, "null": null, "shards": shards}
    atomic_write_text(out / "index.json", json.dumps(index, indent=1))


def write_shards(cfg: Config, inputs: Inputs) -> Path:
    """Encodes the checked inputs (or renders toy videos) into shards and the null; returns the shard folder."""
    p = cfg.preprocess
    out = Path(p.out)
    out.mkdir(parents=True, exist_ok=True)
    enc = ToyEncoders() if p.encoder == "toy" else WanEncoders(inputs.parts)
    skipped: dict[str, int] = {}
    shards, pending = [], []

    def flush() -> None:
        names, clips, captions = zip(*pending)
        latents = torch.cat([enc.video(v[None]) for v in clips])
        shard = write_shard(out, len(shards), latents, enc.text(list(captions)))
        shards.append({"file": shard, "items": [{"file": n, "caption": c} for n, c in zip(names, captions)]})
        pending.clear()

    for item in toy_videos(p) if inputs.items is None else videos(inputs.items, p, skipped):
        pending.append(item)
        if len(pending) == p.shard_size:
            flush()
    if pending:
        flush()
    total = sum(len(s["items"]) for s in shards)
    null = write_null(out, {"text": enc.text([p.null_prompt])}, p.null_prompt)
    write_index(out, shards, null, encoder=p.encoder, frames=p.frames, height=p.height, width=p.width,
                frame_stride=p.frame_stride, fps=p.fps, skipped=skipped)
    print(f"wrote {total} samples in {len(shards)} shards to {out}; skipped {sum(skipped.values())} "
          f"({', '.join(f'{k}: {v}' for k, v in skipped.items()) or 'none'})")
    if total == 0:
        raise SystemExit("no usable video: nothing to train on")
    return out


def run(cfg: Config) -> Path:
    """Checks the settings and the dataset, then writes the shards; returns the shard folder."""
    return write_shards(cfg, read_inputs(cfg))


def main(argv: list[str] | None = None) -> None:
    cfg, _ = parse(__doc__, argv, training=False)
    try:
        inputs = read_inputs(cfg)
    except (OSError, ValueError) as err:  # a bad setting or dataset file: the message names it and the fix
        raise SystemExit(f"error: {err}")
    write_shards(cfg, inputs)


if __name__ == "__main__":
    main()
