"""`python -m train.preprocess`: videos + captions -> shards of latents and text embeddings.

Inputs: preprocess.videos (a folder; any container PyAV reads) and preprocess.captions (JSONL lines
{"file": ..., "caption": ...} or a CSV with a header `file,caption`). Each video's first
preprocess.frames frames at exactly preprocess.height x preprocess.width are encoded; a file that cannot
be read, is too short or has another size is reported and skipped, and the run ends with the counts.
Encoders: preprocess.encoder = "toy" (the toy world's exact codec and text encoder) or "wan" (the
diffusers Wan VAE from preprocess.vae and the UMT5 encoder + tokenizer from preprocess.text_encoder,
local folders). With the toy encoder and no videos folder, preprocess.toy_samples training videos of
the toy world are rendered instead.
Output: preprocess.out/shard_NNNNN.safetensors (`latents`, `text`) and index.json.
"""
from __future__ import annotations

import csv
import json
from pathlib import Path
from typing import Iterator

import torch
from safetensors.torch import save_file

from fastlightgen.io_utils import atomic_path, atomic_write_text

from .cli import parse
from .config import Config, PreprocessConfig
from .data import SHARD_FORMAT


class BadVideo(ValueError):
    """A video that cannot be used; the message says why (counted by kind)."""

    def __init__(self, kind: str, detail: str):
        super().__init__(detail)
        self.kind = kind


# ---- inputs -------------------------------------------------------------------------------------

def read_captions(path: Path) -> list[tuple[str, str]]:
    if path.suffix == ".csv":
        with path.open(newline="") as f:
            return [(row["file"], row["caption"]) for row in csv.DictReader(f)]
    return [(d["file"], d["caption"]) for d in map(json.loads, path.read_text().splitlines()) if d]


def read_video(path: Path, p: PreprocessConfig) -> torch.Tensor:
    """(3, F, H, W) in [-1, 1] from the first p.frames frames, or BadVideo."""
    import av

    try:
        with av.open(str(path)) as container:
            frames = []
            for frame in container.decode(video=0):
                if (frame.height, frame.width) != (p.height, p.width):
                    raise BadVideo("wrong size", f"{frame.width}x{frame.height}, expected {p.width}x{p.height}")
                frames.append(torch.from_numpy(frame.to_ndarray(format="rgb24")))
                if len(frames) == p.frames:
                    break
    except BadVideo:
        raise
    except Exception as err:  # PyAV raises many kinds for broken files; all mean "unreadable"
        raise BadVideo("unreadable", f"{type(err).__name__}: {err}") from None
    if len(frames) < p.frames:
        raise BadVideo("too short", f"{len(frames)} frames, need {p.frames}")
    return torch.stack(frames).permute(3, 0, 1, 2).float() / 127.5 - 1.0


def video_items(p: PreprocessConfig, skipped: dict[str, int]) -> Iterator[tuple[str, torch.Tensor, str]]:
    """(source name, video, caption) for every usable video; bad ones are reported and counted."""
    if not p.videos:
        from fastlightgen.toy.world import dataset

        for i, (video, caption, _) in enumerate(dataset("train", p.toy_samples, seed=0)):
            yield f"toy:{i}", video, caption
        return
    for name, caption in read_captions(Path(p.captions)):
        try:
            yield name, read_video(Path(p.videos) / name, p), caption
        except BadVideo as err:
            skipped[err.kind] = skipped.get(err.kind, 0) + 1
            print(f"skipping {name}: {err.kind}: {err}")


# ---- encoders -----------------------------------------------------------------------------------

class ToyEncoders:
    def video(self, videos: torch.Tensor) -> torch.Tensor:
        from fastlightgen.toy.codec import encode_video
        return encode_video(videos)

    def text(self, captions: list[str]) -> torch.Tensor:
        from fastlightgen.toy.text import encode
        return encode(captions)


class WanEncoders:
    """The diffusers Wan VAE (latents normalized with its latents_mean/std) and UMT5 (512 tokens, zero-padded)."""

    def __init__(self, p: PreprocessConfig):
        from diffusers import AutoencoderKLWan
        from transformers import AutoTokenizer, UMT5EncoderModel

        self.device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        self.vae = AutoencoderKLWan.from_pretrained(p.vae).to(self.device).eval()
        self.tokenizer = AutoTokenizer.from_pretrained(p.text_encoder)
        self.encoder = UMT5EncoderModel.from_pretrained(p.text_encoder).to(self.device).eval()

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


def encoders(cfg: Config):
    return ToyEncoders() if cfg.preprocess.encoder == "toy" else WanEncoders(cfg.preprocess)


# ---- output -------------------------------------------------------------------------------------

def write_shard(out: Path, index: int, latents: torch.Tensor, text: torch.Tensor) -> str:
    name = f"shard_{index:05d}.safetensors"
    with atomic_path(out / name) as tmp:
        save_file({"latents": latents.contiguous(), "text": text.to(torch.bfloat16).contiguous()}, str(tmp))
    return name


def write_index(out: Path, shards: list[dict], **details) -> None:
    """index.json: the shard list (each shard's file and items) and what made it (`details`)."""
    atomic_write_text(out / "index.json", json.dumps({"format": SHARD_FORMAT, **details, "shards": shards}, indent=1))


def main(argv: list[str] | None = None) -> None:
    cfg, _ = parse(__doc__, argv, training=False)
    p = cfg.preprocess
    out = Path(p.out)
    out.mkdir(parents=True, exist_ok=True)
    enc = encoders(cfg)
    skipped: dict[str, int] = {}
    shards, pending = [], []

    def flush() -> None:
        names, videos, captions = zip(*pending)
        latents = torch.cat([enc.video(v[None]) for v in videos])
        shard = write_shard(out, len(shards), latents, enc.text(list(captions)))
        shards.append({"file": shard, "items": [{"file": n, "caption": c} for n, c in zip(names, captions)]})
        pending.clear()

    for item in video_items(p, skipped):
        pending.append(item)
        if len(pending) == p.shard_size:
            flush()
    if pending:
        flush()
    total = sum(len(s["items"]) for s in shards)
    write_index(out, shards, encoder=p.encoder, frames=p.frames, height=p.height, width=p.width, skipped=skipped)
    print(f"wrote {total} samples in {len(shards)} shards to {out}; skipped {sum(skipped.values())} "
          f"({', '.join(f'{k}: {v}' for k, v in skipped.items()) or 'none'})")
    if total == 0:
        raise SystemExit("no usable video: nothing to train on")


if __name__ == "__main__":
    main()
