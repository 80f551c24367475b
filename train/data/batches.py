"""Training batches as a pure function of (seed, stream, step, rank): the toy world or preprocessed shards.

Shards (written by `train.preprocess`) are safetensors files of `latents` (N, C, F, h, w) and `text`
(N, L, D) (HunyuanVideo also `text_mask`, `pooled`), listed in `index.json` with each item's source
file and caption, so a bad batch can be named. The index also names the null conditioning: the text
encoder's encoding of the null prompt ("" unless configured), stored once beside the shards. Every
batch carries it as `Batch.null` (eq. 9's vP(null), CFG), and caption dropout replaces a caption's
conditioning by it, so the unconditional prediction that CFG and eq. 9 need keeps being trained on the
very input they give it. The toy world's null is its encoder's "" too (all zeros there).
A Wan I2V model's shards also hold `image_latents` (N, C, F, h, w): a batch carries their condition
(`fastlightgen.image_condition`) on its conditioning and on its null alike, since the null prompt drops the text,
not the image.
A batch reads from the shard files only its rows' bytes (located by the files' headers), never whole files.
Every shard's header and size are checked against the index when the set is opened, so a truncated, missing or
foreign file stops the run at start with its name, not when a batch first draws it hours later.
"""
from __future__ import annotations

import hashlib
import json
import math
import os
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
from safetensors.torch import load_file

from fastlightgen.adapters import Conditioning
from fastlightgen.checkpoint import CheckpointError, read_safetensors_header
from fastlightgen.image_condition import image_condition

from ..config import Config

SHARD_FORMAT = "fastlightgen.shards/2"  # /2: the null conditioning is stored
LATENTS = ("latents", "image_latents")  # a shard's per-video tensors; the rest is the caption's conditioning


@dataclass
class Batch:
    x0: torch.Tensor  # clean latents (B, C, F, h, w)
    cond: Conditioning
    null: Conditioning
    desc: str  # names the samples, for error reports
    ti2v: bool = True  # the first latent frame is given (fastlightgen.first_frame); False: T2V


    def to(self, device: torch.device, dtype: torch.dtype) -> "Batch":
        def move(c: Conditioning) -> Conditioning:
            f = lambda t: None if t is None else t.to(device, dtype if t.is_floating_point() else t.dtype)  # noqa: E731
            return Conditioning(f(c.text), f(c.image), f(c.text_mask), f(c.pooled), f(c.latent_condition))
        return Batch(self.x0.to(device, dtype), move(self.cond), move(self.null), self.desc, self.ti2v)


BatchFn = Callable[[torch.Generator, int], Batch]  # (generator, batch size) -> batch


def _drop_captions(cond: Conditioning, null: Conditioning, generator: torch.Generator, p: float) -> Conditioning:
    """Each row's text conditioning replaced by the null one with probability p (image tokens and latents kept)."""
    keep = torch.rand(cond.text.shape[0], generator=generator) >= p

    def choose(a: torch.Tensor | None, b: torch.Tensor | None) -> torch.Tensor | None:
        return None if a is None else torch.where(keep.view(-1, *[1] * (a.ndim - 1)), a, b)
    return Conditioning(choose(cond.text, null.text), cond.image, choose(cond.text_mask, null.text_mask),
                        choose(cond.pooled, null.pooled), cond.latent_condition)


def toy_batch(generator: torch.Generator, size: int, backgrounds: tuple[str, ...]) -> Batch:
    from fastlightgen.toy.teacher import batch_latents, conditioning
    from fastlightgen.toy.world import make_batch

    seed = int(torch.randint(0, 2 ** 62, (1,), generator=generator).item())
    batch = make_batch("train", size, seed=seed, backgrounds=backgrounds)
    return Batch(batch_latents(batch), conditioning(batch.captions), conditioning([""] * size),
                 f"toy train seed {seed}: {batch.captions}")


def _conditioning(tensors: dict[str, torch.Tensor]) -> Conditioning:
    """The conditioning among a shard's tensors, floats in fp32 (stored in bf16; image latents in fp32)."""
    floats = lambda key: tensors[key].float() if key in tensors else None  # noqa: E731
    image = floats("image_latents")
    return Conditioning(text=floats("text"), text_mask=tensors.get("text_mask"), pooled=floats("pooled"),
                        latent_condition=None if image is None else image_condition(image))


_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
           "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
           "BOOL": torch.bool}


def _header(path: Path) -> dict[str, tuple[torch.dtype, tuple[int, ...], int]]:
    """The tensors of a safetensors file as (dtype, shape, offset of the first byte in the file); ValueError
    naming the file when it is missing, cut short or no safetensors file."""
    try:
        header = read_safetensors_header(path)  # whole, not cut short, no pickle
    except CheckpointError as err:
        raise ValueError(f"shard {err}; run `python -m train.preprocess` again with the same settings (it "
                         "re-encodes what is missing)") from None
    header.pop("__metadata__", None)
    with open(path, "rb", buffering=0) as f:  # unbuffered: the header's bytes alone are read
        (length,) = struct.unpack("<Q", f.read(8))
    return {k: (_DTYPES[v["dtype"]], tuple(v["shape"]), 8 + length + v["data_offsets"][0]) for k, v in header.items()}


class ShardSet:
    def __init__(self, folder: str | Path):
        self.folder = Path(folder)
        index_path = self.folder / "index.json"
        if not index_path.is_file():
            raise FileNotFoundError(f"{self.folder} holds no index.json; run `python -m train.preprocess` first")
        self.index = json.loads(index_path.read_text())
        if self.index.get("format") == "fastlightgen.shards/1":
            raise ValueError(f"{index_path}: written before the null prompt's encoding was stored with the shards; "
                             f"run `python -m train.preprocess` again")
        if self.index.get("format") != SHARD_FORMAT:
            raise ValueError(f"{index_path}: not a FastLightGen shard index (format {self.index.get('format')!r})")
        self.headers: dict[str, dict[str, tuple[torch.dtype, tuple[int, ...], int]]] = {}
        self.items = [(s["file"], i, item) for s in self.index["shards"] for i, item in enumerate(s["items"])]
        if not self.items:
            raise ValueError(f"{self.folder}: the shard set is empty")
        null_file = self.folder / self.index["null"]["file"]
        null, first = load_file(str(null_file)), self.shard(self.items[0][0])
        shapes = {k: tuple(v.shape[1:]) for k, v in null.items()}
        if shapes != {k: shape[1:] for k, (_, shape, _) in first.items() if k not in LATENTS}:
            raise ValueError(f"{null_file} holds {shapes}, unlike the conditioning of the shards; write both with "
                             f"the same text encoder (`python -m train.preprocess`)")
        self.null = _conditioning(null)
        self._check_files()

    def _check_files(self) -> None:
        """Each shard as the index lists it: its size (and so its tensors' bytes) and one row per item."""
        for entry in self.index["shards"]:
            path, rows = self.folder / entry["file"], len(entry["items"])
            tensors = self.shard(entry["file"])
            if "bytes" in entry and path.stat().st_size != entry["bytes"]:
                raise ValueError(f"shard {path} is {path.stat().st_size} bytes, but the index recorded "
                                 f"{entry['bytes']}: it was cut short or replaced; run `python -m train.preprocess` "
                                 f"again, or copy the shard set whole")
            bad = {k: shape[0] for k, (_, shape, _) in tensors.items() if shape[0] != rows}
            if bad or "latents" not in tensors:
                raise ValueError(f"shard {path} holds {bad or 'no latents'} rows where the index lists {rows} "
                                 f"items: it belongs to another shard set; write the set again with "
                                 f"`python -m train.preprocess`")

    def check_model(self, latent_channels: int, text_dim: int) -> None:
        """Latents and text of the width the model takes, named with the fix before the model loads."""
        _, latents, _ = self.shard(self.items[0][0])["latents"]
        _, text, _ = self.shard(self.items[0][0])["text"]
        if latents[1] != latent_channels or text[-1] != text_dim:
            raise ValueError(f"the shards in {self.folder} hold {latents[1]}-channel latents and {text[-1]}-wide "
                             f"text, but the teacher takes {latent_channels}-channel latents and {text_dim}-wide text: they "
                             f"were made for another model; run `python -m train.preprocess` with this config's "
                             f"model, or point data.shards at that model's shards")

    def shard(self, name: str) -> dict[str, tuple[torch.dtype, tuple[int, ...], int]]:
        """Each tensor of shard `name` as (dtype, shape, file offset of its bytes), from the safetensors header."""
        if name not in self.headers:
            self.headers[name] = _header(self.folder / name)
        return self.headers[name]

    def row(self, name: str, key: str, i: int) -> torch.Tensor:
        """Row i of tensor `key` in shard `name`: its bytes alone read from the file (one pread)."""
        dtype, shape, start = self.shard(name)[key]
        size = math.prod(shape[1:]) * dtype.itemsize
        fd = os.open(self.folder / name, os.O_RDONLY)
        try:
            data = bytearray(os.pread(fd, size, start + i * size))
        finally:
            os.close(fd)
        if len(data) != size:
            raise ValueError(f"{self.folder / name}: {key}[{i}] ends past the end of the file")
        return torch.frombuffer(data, dtype=dtype).reshape(shape[1:]) if size else torch.empty(shape[1:], dtype=dtype)

    def batch(self, generator: torch.Generator, size: int) -> Batch:
        picks = torch.randint(0, len(self.items), (size,), generator=generator).tolist()
        rows = [self.items[k] for k in picks]
        stacked = {k: torch.stack([self.row(f, k, i) for f, i, _ in rows]) for k in self.shard(rows[0][0])}
        desc = ", ".join(f"{f}[{i}] ({item['file']})" for f, i, item in rows)
        cond, null = _conditioning(stacked), self.null.repeat(size)
        null.latent_condition = cond.latent_condition
        return Batch(stacked["latents"].float(), cond, null, desc)

    def fingerprint(self) -> str:
        return hashlib.sha256(json.dumps(self.index, sort_keys=True).encode()).hexdigest()[:16]


def batch_source(cfg: Config) -> BatchFn:
    """Batches with caption dropout applied and, for a TI2V model, the first frame dropped (a T2V batch) with
    probability data.first_frame_dropout, as Wan 2.2 TI2V serves both."""
    from fastlightgen.toy.world import BACKGROUNDS

    shards = None if cfg.data.source == "toy" else ShardSet(cfg.data.shards)
    t2v_backgrounds = BACKGROUNDS if cfg.data.toy_t2v_background == "any" else (cfg.data.toy_t2v_background,)

    def draw(generator: torch.Generator, size: int) -> Batch:
        # A whole batch at a time: the first-frame helpers take one rule per tensor.
        p = cfg.data.first_frame_dropout
        ti2v = cfg.model.ti2v and not (p > 0 and torch.rand((), generator=generator).item() < p)
        if shards is None:
            batch = toy_batch(generator, size, BACKGROUNDS if ti2v else t2v_backgrounds)
        else:
            batch = shards.batch(generator, size)
        batch.cond = _drop_captions(batch.cond, batch.null, generator, cfg.data.caption_dropout)
        batch.ti2v = ti2v
        return batch
    return draw


def data_fingerprint(cfg: Config) -> str:
    if cfg.data.source == "toy":
        return f"toy-world train split (seeded per step from run.seed={cfg.run.seed})"
    return f"shards {cfg.data.shards} sha256:{ShardSet(cfg.data.shards).fingerprint()}"
