"""`python -m train.preprocess`: videos + captions -> shards of latents and text embeddings, and the null.

Inputs: the dataset forms of train/data/dataset.py (a folder of videos with same-name .txt captions, or a JSONL,
CSV or JSON list of records); every video is scaled to cover preprocess.width x preprocess.height,
center-cropped and sampled at preprocess.frame_stride or preprocess.fps; its first preprocess.frames
frames are encoded. A video that cannot be used (no caption, missing, unreadable, too short) is reported
and skipped, and the run ends with the counts.
Encoders (train/data/encoders.py): preprocess.encoder = "toy" (the toy world's exact codec and text encoder), or
model.family's own, named the same: "wan" (the Wan VAE, UMT5 and its tokenizer) or "hunyuanvideo" (its
VAE, Llama and CLIP text encoders and their tokenizers), from model.path, the model's folder as downloaded;
preprocess.vae / text_encoder / tokenizer / text_encoder_2 / tokenizer_2 override its parts. With the toy
encoder and no videos, preprocess.toy_samples training videos of the toy world are rendered instead.
Checked before any model loads: every setting's range, the encoder fits model.family, the model's parts
exist, the frame count fits the VAE's temporal stride (4k+1 for Wan and HunyuanVideo) and the size its
spatial stride times the transformer's patch size (from the configs, never the weights), the dataset's
records have the named fields.
Several processes: `torchrun --nproc_per_node N -m train.preprocess -c CFG` gives input i (in the dataset's
order) to rank i % N; each rank encodes its inputs preprocess.shard_size at a time into its own shards
(shard_r<rank>_NNNNN; one process writes shard_NNNNN), and rank 0, once every rank is done, encodes the
null prompt and writes the one index. A shard is finished when its file and its record (shard_*.json: its
items, skips and the identity of what made it) exist; the record is written after the shard. Run the
same command again after an interruption: finished shards whose record matches (the same settings, model
files, input files and encoding code, files by path, size and modification time) are kept, the others are
encoded.
Output: preprocess.out/shard_*.safetensors (`latents`, `text`; HunyuanVideo also `text_mask`, `pooled`; a Wan I2V
model (36 input channels, fastlightgen/image_condition.py) also `image_latents`, in fp32 like the latents: the VAE's
encoding of each video's first frame followed by zero frames, the image its condition is made of),
null.safetensors (the encoding of preprocess.null_prompt, "" by default: the null conditioning of CFG,
caption dropout and eq. 9) and index.json naming them, shard by shard in rank order. API: `run(cfg)`;
`write_shard`, `write_null` and `write_index` are the shard format's writers for other producers of shards.
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import save_file

from fastlightgen.image_condition import condition_channels
from fastlightgen.io_utils import atomic_path, atomic_write_text

from .cli import parse
from .config import Config, PreprocessConfig
from .data.batches import SHARD_FORMAT
from .data.dataset import Entry, entries, videos
from .distributed.processes import Dist, init_workers
from .data.encoders import ENCODERS, check_parts, default
from .data.fingerprint import file_sha256
from .models.loading import model_class, model_part, teacher_config

NULL_FILE = "null.safetensors"
RECORD_FORMAT = "fastlightgen.shard-record/1"


# ---- settings, checked before any model loads ----------------------------------------------------

@dataclass
class Inputs:
    family: str  # the encoders (train/data/encoders.py ENCODERS): "toy", "wan", "hunyuanvideo"
    items: list[Entry] | None  # None: toy world videos are rendered
    parts: dict[str, Path]  # the encoders' folders (vae, text_encoder, tokenizer, ...)
    image: bool = False  # an I2V model: the shards also hold each video's image latents


def transformer_config(cfg: Config) -> dict:
    """model.arch, else the teacher's config (no weights read), else {} (preprocessing needs no teacher)."""
    if cfg.model.arch:
        return cfg.model.arch
    try:
        return teacher_config(cfg)
    except (OSError, ValueError):
        return {}


def patch_size(cfg: Config) -> int:
    """The transformer's spatial patch (transformer_config), else the family's default."""
    patch = transformer_config(cfg).get("patch_size") or default(model_class(cfg.model.family), "patch_size")
    return patch[-1] if isinstance(patch, (list, tuple)) else patch


def image_conditioned(cfg: Config, family: str) -> bool:
    """Whether the model is a Wan I2V model, whose shards hold image latents (fastlightgen.image_condition)."""
    config = transformer_config(cfg)
    return family == "wan" and "in_channels" in config and \
        condition_channels(config["in_channels"], config["out_channels"]) > 0


def check_video_shape(cfg: Config, family: str, parts: dict[str, Path]) -> None:
    p = cfg.preprocess
    encoders = ENCODERS[family]
    temporal, spatial = encoders.strides(parts)
    codec = f"{encoders.codec} ({parts['vae']})" if "vae" in parts else encoders.codec
    if (p.frames - 1) % temporal:
        low = max(1, p.frames - (p.frames - 1) % temporal)
        raise ValueError(f"preprocess.frames {p.frames}: {codec} takes {temporal}k+1 frames (temporal stride "
                         f"{temporal}); use {low} or {low + temporal}")
    patch = patch_size(cfg)
    multiple = spatial * patch
    for name in ("height", "width"):
        value = getattr(p, name)
        if value % multiple:
            low = max(multiple, value - value % multiple)
            raise ValueError(f"preprocess.{name} {value} is not a multiple of {multiple} (the spatial stride {spatial} "
                             f"of {codec} x the transformer's patch size {patch}); use {low} or {low + multiple}")


def check_sampling(p: PreprocessConfig) -> None:
    if p.fps and p.frame_stride != 1:
        raise ValueError(f"preprocess.fps {p.fps}: set a positive rate with frame_stride 1, or 0 to sample by "
                         f"preprocess.frame_stride ({p.frame_stride})")


def encoder_family(cfg: Config) -> str:
    """Which encoders run: the toy world's, or model.family's (preprocess.encoder must name the same family)."""
    p = cfg.preprocess
    if p.encoder not in ("toy", cfg.model.family):
        raise ValueError(f"preprocess.encoder {p.encoder} does not encode for model.family {cfg.model.family}: set "
                         f"preprocess.encoder={cfg.model.family} (or model.family={p.encoder})")
    return p.encoder


def encoder_parts(cfg: Config, family: str) -> dict[str, Path]:
    """The encoders' folders, each checked for the file that says what it is."""
    parts = {part: model_part(cfg, part) for part in ENCODERS[family].PARTS}
    check_parts(parts)
    return parts


def read_inputs(cfg: Config) -> Inputs:
    """Every setting and the dataset's list, checked; raises OSError / ValueError naming the problem and the fix."""
    p = cfg.validate().preprocess
    check_sampling(p)
    family = encoder_family(cfg)
    parts = encoder_parts(cfg, family)
    check_video_shape(cfg, family, parts)
    if not (p.videos or p.captions):
        if family != "toy":
            raise ValueError("no dataset: set preprocess.videos to a folder of videos with same-name .txt captions, "
                             "or preprocess.captions to a JSONL / CSV / JSON list of records")
        return Inputs(family, None, parts)
    return Inputs(family, entries(p), parts, image_conditioned(cfg, family))


def toy_videos(p: PreprocessConfig) -> dict[str, tuple[torch.Tensor, str]]:
    from fastlightgen.toy.world import dataset

    return {f"toy:{i}": (video, caption) for i, (video, caption, _) in
            enumerate(dataset("train", p.toy_samples, seed=0))}


# ---- which process encodes what, and what is finished -------------------------------------------

@dataclass(frozen=True)
class Job:
    """One shard's inputs: preprocess.shard_size consecutive inputs of one rank."""
    name: str  # the shard's file name without .safetensors; its record is name.json
    items: list[Entry]


def jobs(items: list[Entry], rank: int, world: int, shard_size: int) -> list[Job]:
    """Rank `rank`'s shards: inputs rank, rank + world, ... in shard_size groups. A function of the list alone,
    so every rank knows every rank's shards and a rerun cuts them the same way."""
    mine = items[rank::world]
    stem = "shard_" if world == 1 else f"shard_r{rank}_"
    return [Job(f"{stem}{k:05d}", mine[start:start + shard_size])
            for k, start in enumerate(range(0, len(mine), shard_size))]


def file_identity(path: Path | None) -> list | None:
    """A file by size and modification time (reading gigabytes of videos and weights to hash them would
    cost as much as encoding them)."""
    if path is None or not path.is_file():
        return None
    stat = path.stat()
    return [stat.st_size, stat.st_mtime_ns]


def folder_identity(folder: Path, pattern: str = "*") -> dict:
    return {str(f.relative_to(folder)): file_identity(f) for f in sorted(folder.rglob(pattern)) if f.is_file()}


def run_identity(p: PreprocessConfig, family: str, parts: dict[str, Path], image: bool = False) -> dict:
    """What every shard's encoding depends on besides its inputs: the settings, the encoders' files, and the code
    that decodes and encodes (a shard written by older code is not kept)."""
    import diffusers
    import transformers

    from fastlightgen import toy

    settings = {k: getattr(p, k) for k in ("frames", "height", "width", "frame_stride", "fps")}
    if image:  # only then, so the shards of every other model keep their identity
        settings["image_latents"] = True
    from .data import dataset, encoders

    code = {"versions": [torch.__version__, diffusers.__version__, transformers.__version__],
            **{Path(m.__file__).name: file_identity(Path(m.__file__)) for m in (dataset, encoders)}}
    if family == "toy":
        settings["toy_samples"] = p.toy_samples  # the toy world renders its videos from it
        code["toy"] = folder_identity(Path(toy.__file__).parent, "*.py")
    files = {part: folder_identity(folder) for part, folder in parts.items()}
    return {"family": family, "settings": settings, "files": files, "code": code}


def digest(*parts) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()


def job_source(identity: dict, job: Job) -> str:
    return digest(identity, [(e.name, str(e.path), e.caption, file_identity(e.path)) for e in job.items])


def finished(out: Path, name: str, source: str) -> dict | None:
    """The record of `name` if it is finished: the record names `source` and its file exists."""
    try:
        record = json.loads((out / f"{name}.json").read_text())
    except (OSError, ValueError):
        return None
    if record.get("format") != RECORD_FORMAT or record.get("source") != source:
        return None
    return record if record["file"] is None or (out / record["file"]).is_file() else None


def write_record(out: Path, name: str, source: str, **record) -> dict:
    """name.json, atomically, after the file it describes: a crash before it leaves the shard unfinished."""
    record = {"format": RECORD_FORMAT, "source": source, **record}
    atomic_write_text(out / f"{name}.json", json.dumps(record, indent=1))
    return record


# ---- output -------------------------------------------------------------------------------------

def to_stored(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Conditioning as shards store it: floats in bf16, masks as they are."""
    return {k: (v.to(torch.bfloat16) if v.is_floating_point() else v).contiguous() for k, v in tensors.items()}


def write_shard(out: Path, index: int | str, latents: torch.Tensor,
                text: torch.Tensor | dict[str, torch.Tensor], image_latents: torch.Tensor | None = None) -> str:
    """Shard number `index` of `out` (or the shard named `index`): latents (and an I2V model's image latents) as
    given and the conditioning (a `text` tensor, or the tensors by key) in bf16; returns its file name."""
    name = f"shard_{index:05d}.safetensors" if isinstance(index, int) else f"{index}.safetensors"
    cond = text if isinstance(text, dict) else {"text": text}
    image = {} if image_latents is None else {"image_latents": image_latents.contiguous()}
    with atomic_path(out / name) as tmp:
        save_file({"latents": latents.contiguous(), **image, **to_stored(cond)}, str(tmp))
    return name


def write_null(out: Path, tensors: dict[str, torch.Tensor], prompt: str) -> dict:
    """null.safetensors: the conditioning of the null prompt, one row (`text`; HunyuanVideo also `text_mask`,
    `pooled`), floats in bf16 as the shards hold text, so a dropped caption equals it exactly; returns the
    index's `null` entry."""
    with atomic_path(out / NULL_FILE) as tmp:
        save_file(to_stored(tensors), str(tmp))
    return {"file": NULL_FILE, "prompt": prompt}


def write_index(out: Path, shards: list[dict], null: dict, **details) -> None:
    """index.json: the shard list (each shard's file and items), the null conditioning's entry (`write_null`)
    and what made them (`details`)."""
    index = {"format": SHARD_FORMAT, **details, "null": null, "shards": shards}
    atomic_write_text(out / "index.json", json.dumps(index, indent=1))


# ---- the run ------------------------------------------------------------------------------------

class Encoding:
    """One rank's share: its shards, encoded unless finished, with the encoders loaded on first use (a rank
    whose shards are all finished loads none)."""

    def __init__(self, cfg: Config, inputs: Inputs, dist: Dist):
        self.p, self.inputs, self.dist = cfg.preprocess, inputs, dist
        self.out = Path(self.p.out)
        self.identity = run_identity(self.p, inputs.family, inputs.parts, inputs.image)
        self.toy = toy_videos(self.p) if inputs.items is None else None
        self.items = inputs.items if self.toy is None else [Entry(n, None, c) for n, (_, c) in self.toy.items()]
        self.tag = f"[rank {dist.rank}] " if dist.world_size > 1 else ""
        self._encoders = None

    @property
    def encoders(self):
        if self._encoders is None:
            self._encoders = ENCODERS[self.inputs.family](self.inputs.parts, self.dist.device)
        return self._encoders

    def jobs(self, rank: int) -> list[Job]:
        return jobs(self.items, rank, self.dist.world_size, self.p.shard_size)

    def clips(self, job: Job, skipped: dict[str, int]):
        if self.toy is None:
            yield from videos(job.items, self.p, skipped)
        else:
            yield from ((e.name, self.toy[e.name][0], e.caption) for e in job.items)

    def shard(self, job: Job) -> None:
        """Encodes one shard, a video at a time (a shard of decoded 720p videos would not fit in memory), and
        writes its file, then its record."""
        source = job_source(self.identity, job)
        if finished(self.out, job.name, source):
            print(f"{self.tag}kept {job.name} (finished earlier)")
            return
        skipped: dict[str, int] = {}
        latents, images, items = [], [], []
        for name, video, caption in self.clips(job, skipped):
            latents.append(self.encoders.video(video[None]))
            if self.inputs.image:
                images.append(self.encoders.image_latents(video[None]))
            items.append({"file": name, "caption": caption})
        file, content = None, {}
        if items:
            cond = self.encoders.text([item["caption"] for item in items])
            file = write_shard(self.out, job.name, torch.cat(latents), cond, torch.cat(images) if images else None)
            content = file_sha256(self.out / file)
        write_record(self.out, job.name, source, file=file, items=items, skipped=skipped, **content)
        print(f"{self.tag}encoded {job.name}: {len(items)} samples, {sum(skipped.values())} skipped")

    def null(self) -> dict:
        """null.safetensors (kept when finished earlier with the same prompt and encoders)."""
        source = digest(self.identity, self.p.null_prompt)
        if not finished(self.out, "null", source):
            entry = write_null(self.out, self.encoders.text([self.p.null_prompt]), self.p.null_prompt)
            write_record(self.out, "null", source, **entry)
        return {"file": NULL_FILE, "prompt": self.p.null_prompt}

    def index(self, null: dict) -> tuple[int, int, dict[str, int]]:
        """index.json from every rank's records, shard by shard in rank order; (samples, shards, skips)."""
        shards, skipped = [], {}
        for rank in range(self.dist.world_size):
            for job in self.jobs(rank):
                record = finished(self.out, job.name, job_source(self.identity, job))
                if record is None:
                    raise RuntimeError(f"{self.out / job.name}.json: rank {rank} did not finish this shard; run "
                                       f"the same command again to encode what is missing")
                for kind, n in record["skipped"].items():
                    skipped[kind] = skipped.get(kind, 0) + n
                if record["file"]:
                    content = {k: record[k] for k in ("bytes", "sha256") if k in record}  # not in older records
                    shards.append({"file": record["file"], "items": record["items"], **content})
        skipped = dict(sorted(skipped.items()))
        p = self.p
        write_index(self.out, shards, null, encoder=p.encoder, frames=p.frames, height=p.height, width=p.width,
                    frame_stride=p.frame_stride, fps=p.fps, skipped=skipped)
        return sum(len(s["items"]) for s in shards), len(shards), skipped


def write_shards(cfg: Config, inputs: Inputs) -> Path:
    """Encodes this rank's share of the checked inputs (or of rendered toy videos) into shards; rank 0 then
    writes the null and the index. Returns the shard folder."""
    dist = init_workers()
    run = Encoding(cfg, inputs, dist)
    run.out.mkdir(parents=True, exist_ok=True)
    mine = run.jobs(dist.rank)
    print(f"{run.tag}{sum(len(j.items) for j in mine)} of {len(run.items)} inputs in {len(mine)} shards")
    for job in mine:
        run.shard(job)
    null = run.null() if dist.is_main else None  # while the other ranks finish their shards
    dist.barrier()
    total = 0
    if dist.is_main:
        total, count, skipped = run.index(null)
        processes = f" by {dist.world_size} processes" if dist.world_size > 1 else ""
        print(f"wrote {total} samples in {count} shards to {run.out}{processes}; skipped {sum(skipped.values())} "
              f"({', '.join(f'{k}: {v}' for k, v in skipped.items()) or 'none'})")
    dist.close()
    if dist.is_main and total == 0:
        raise SystemExit("no usable video: nothing to train on")
    return run.out


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
