"""The training videos and their captions, in the forms datasets come in, read at the size training needs.

Forms (preprocess.videos, preprocess.captions):
- a folder of videos, each with a same-name `.txt` caption (`clip.mp4` + `clip.txt`), searched recursively;
- a JSONL, CSV or JSON-list file of records naming a video and its caption, paths relative to
  preprocess.videos (or, when that is empty, to the records file's folder). The fields are
  preprocess.video_column / caption_column, by default the first present of VIDEO_FIELDS / CAPTION_FIELDS,
  so FastVideo's `[{"path": ..., "cap": [...]}]` and `{"file", "caption"}` lines both read as they are;
  a list of captions gives its first.
Text files are read as UTF-8 with or without a byte-order mark (spreadsheets and Notepad write one); a caption
file in another encoding skips its video (counted, the file named), a records file in another encoding is
refused naming it. Every caption is cleaned by `fastlightgen.captions.clean_caption`, as prompts are at inference.
Every video is sampled (every preprocess.frame_stride-th frame, or resampled to preprocess.fps), scaled
with its aspect kept until it covers preprocess.width x preprocess.height, and center-cropped to it; its
first preprocess.frames sampled frames are used. A video that cannot be used raises `BadVideo` (counted
by kind); a settings or records file that cannot be used raises ValueError / FileNotFoundError at once.
"""
from __future__ import annotations

import csv
import io
import json
import math
from collections.abc import Iterator
from pathlib import Path
from typing import NamedTuple

import torch

from fastlightgen.captions import clean_caption

from ..config import PreprocessConfig

VIDEO_SUFFIXES = (".mp4", ".mov", ".mkv", ".webm", ".avi", ".m4v", ".mpg", ".mpeg", ".wmv", ".flv", ".gif")
VIDEO_FIELDS = ("file", "path", "video")
CAPTION_FIELDS = ("caption", "cap", "text", "prompt")


class BadVideo(ValueError):
    """A video that cannot be used; the message says why (counted by kind)."""

    def __init__(self, kind: str, detail: str):
        super().__init__(detail)
        self.kind = kind


class Entry(NamedTuple):
    name: str  # as the dataset names it, for reports and the shard index
    path: Path | None  # None: the record names no video
    caption: str | None  # None: the video has no caption
    caption_error: str | None = None  # why its caption file could not be read


TEXT_ENCODING = "utf-8-sig"  # UTF-8, a leading byte-order mark dropped


def read_text(path: Path) -> str:
    """A text file as people save it; UnicodeDecodeError names the file and the fix."""
    try:
        return path.read_text(encoding=TEXT_ENCODING)
    except UnicodeDecodeError as err:
        raise UnicodeDecodeError(err.encoding, err.object, err.start, err.end,
                                 f"{path} is not UTF-8 (byte {err.start}); save it as UTF-8") from None


def caption_or_none(text: object) -> str | None:
    cleaned = clean_caption(str(text)) if text is not None else ""
    return cleaned or None


# ---- the list of videos -------------------------------------------------------------------------

def entries(p: PreprocessConfig) -> list[Entry]:
    """Every video of the dataset with its caption (None where it has none), in the dataset's order."""
    if p.captions:
        path = Path(p.captions)
        return from_records(path, Path(p.videos) if p.videos else path.parent, p)
    return from_folder(Path(p.videos))


def from_folder(folder: Path) -> list[Entry]:
    if not folder.is_dir():
        raise FileNotFoundError(f"preprocess.videos {folder} is not a folder")
    videos = sorted(f for f in folder.rglob("*") if f.suffix.lower() in VIDEO_SUFFIXES and f.is_file())
    if not videos:
        raise FileNotFoundError(f"preprocess.videos {folder} holds no video ({', '.join(VIDEO_SUFFIXES)}); "
                                f"or set preprocess.captions to a JSONL/CSV/JSON list of records")
    out = []
    for video in videos:
        text, caption, error = video.with_suffix(".txt"), None, None
        try:
            caption = caption_or_none(read_text(text)) if text.is_file() else None
        except UnicodeDecodeError as err:
            error = err.reason
        out.append(Entry(str(video.relative_to(folder)), video, caption, error))
    return out


def read_records(path: Path) -> list[dict]:
    if not path.is_file():
        raise FileNotFoundError(f"preprocess.captions {path} does not exist")
    kind = path.suffix.lower()
    if kind not in (".csv", ".jsonl", ".json"):
        raise ValueError(f"preprocess.captions {path}: a .jsonl, .csv or .json file is expected")
    try:
        text = read_text(path)
    except UnicodeDecodeError as err:
        raise ValueError(f"preprocess.captions {err.reason}") from None
    if kind == ".csv":
        return list(csv.DictReader(io.StringIO(text, newline="")))  # quoted fields may span lines
    if kind == ".jsonl":
        records = [_json_line(path, number, line) for number, line in enumerate(text.splitlines(), 1)
                   if line.strip()]
    else:
        try:
            records = json.loads(text)
        except json.JSONDecodeError as err:
            raise ValueError(f"preprocess.captions {path}: not valid JSON ({err})") from None
    if not isinstance(records, list) or not all(isinstance(r, dict) for r in records):
        raise ValueError(f"preprocess.captions {path}: expected a list of records (JSON objects)")
    return records


def _json_line(path: Path, number: int, line: str) -> object:
    try:
        return json.loads(line)
    except json.JSONDecodeError as err:
        raise ValueError(f"preprocess.captions {path}: line {number} is not valid JSON ({err.msg} at column "
                         f"{err.colno}); fix or remove that line") from None


def field_name(records: list[dict], configured: str, candidates: tuple[str, ...], setting: str, path: Path) -> str:
    """The records' field `setting` names, else the first of `candidates` the first record has."""
    keys = list(records[0])
    found = (configured if configured in keys else "") if configured else next((c for c in candidates if c in keys), "")
    if not found:
        wanted = repr(configured) if configured else f"any of {', '.join(candidates)}"
        raise ValueError(f"preprocess.captions {path}: its records have no field {wanted} (their fields: "
                         f"{', '.join(keys)}); set preprocess.{setting} to the one to use")
    return found


def from_records(path: Path, base: Path, p: PreprocessConfig) -> list[Entry]:
    records = read_records(path)
    if not records:
        raise ValueError(f"preprocess.captions {path} holds no record")
    video = field_name(records, p.video_column, VIDEO_FIELDS, "video_column", path)
    caption = field_name(records, p.caption_column, CAPTION_FIELDS, "caption_column", path)
    out = []
    for i, record in enumerate(records):
        name = str(record.get(video) or "").strip()
        text = record.get(caption)
        if isinstance(text, list):  # FastVideo keeps several captions per video
            text = next((t for t in text if isinstance(t, str) and t.strip()), None)
        out.append(Entry(name or f"record {i + 1}", base / name if name else None, caption_or_none(text)))
    return out


# ---- one video ----------------------------------------------------------------------------------

def sampled_frames(container, p: PreprocessConfig) -> Iterator:
    """The source's frames at the training rate: every frame_stride-th, or the frame nearest each 1/fps."""
    stream = container.streams.video[0]
    frames = container.decode(stream)
    if not p.fps:
        for i, frame in enumerate(frames):
            if i % p.frame_stride == 0:
                yield frame
        return
    rate = float(stream.average_rate or stream.guessed_rate or p.fps)
    start, taken = None, 0
    for i, frame in enumerate(frames):
        t = frame.time if frame.time is not None else i / rate
        start = t if start is None else start
        while t - start + 0.5 / rate >= taken / p.fps:  # repeats frames when p.fps is above the source's rate
            yield frame
            taken += 1


def fit(frame, width: int, height: int) -> torch.Tensor:
    """(H, W, 3) uint8: scaled with its aspect kept to cover width x height, then center-cropped."""
    scale = max(width / frame.width, height / frame.height)
    w, h = max(width, math.ceil(frame.width * scale - 1e-6)), max(height, math.ceil(frame.height * scale - 1e-6))
    pixels = frame.reformat(width=w, height=h, format="rgb24", interpolation="BICUBIC").to_ndarray()
    top, left = (h - height) // 2, (w - width) // 2
    return torch.from_numpy(pixels[top:top + height, left:left + width].copy())


def read_video(path: Path, p: PreprocessConfig) -> torch.Tensor:
    """(3, p.frames, p.height, p.width) in [-1, 1], or BadVideo."""
    import av

    if not path.is_file():
        raise BadVideo("missing file", f"{path} does not exist")
    frames = []
    try:
        with av.open(str(path)) as container:
            if not container.streams.video:
                raise BadVideo("unreadable", "no video stream")
            for frame in sampled_frames(container, p):
                frames.append(fit(frame, p.width, p.height))
                if len(frames) == p.frames:
                    break
    except BadVideo:
        raise
    except Exception as err:  # PyAV raises many kinds for broken files; all mean "unreadable"
        raise BadVideo("unreadable", f"{type(err).__name__}: {err}") from None
    if len(frames) < p.frames:
        rate = f"{p.fps:g} fps" if p.fps else f"frame stride {p.frame_stride}"
        raise BadVideo("too short", f"{len(frames)} frames at {rate}, need {p.frames}")
    return torch.stack(frames).permute(3, 0, 1, 2).float() / 127.5 - 1.0


def videos(items: list[Entry], p: PreprocessConfig, skipped: dict[str, int]) -> Iterator[tuple[str, torch.Tensor, str]]:
    """(name, video, caption) of every usable entry; the others are reported and counted by kind."""
    for name, path, caption, caption_error in items:
        try:
            if path is None:
                raise BadVideo("no video", "the record names no video file")
            if caption_error is not None:
                raise BadVideo("caption not UTF-8", caption_error)
            if caption is None:
                raise BadVideo("no caption", "none given (an empty one counts as none): add a same-name .txt "
                                             "beside the video or fill the record's caption")
            yield name, read_video(path, p), caption
        except BadVideo as err:
            skipped[err.kind] = skipped.get(err.kind, 0) + 1
            print(f"skipping {name}: {err.kind}: {err}")
