"""Digests of the files a run reads besides its data (the teacher, the plan, the Stage II weights), so that a
resumed or cached run never mixes two versions of one input kept at the same path.

A file is known by its size and content: whole up to SAMPLE_ALL bytes, else its first and last MiB and
SAMPLES evenly spaced MiB between them. Training or fine-tuning changes nearly every weight, so any sample
of a retrained model differs, while a model of tens of GB costs ~70 MiB of reading, once per process and
version of the file (cached by path, size and modification time). Copying a file keeps its digest.
"""
from __future__ import annotations

import functools
import hashlib
import json
from pathlib import Path

MIB = 1 << 20
SAMPLE_ALL = 64 * MIB
SAMPLES = 64


def file_digest(path: str | Path) -> str | None:
    """A file's digest, a folder's (every file's name and digest: a diffusers model), or None if absent."""
    if not str(path):  # an unset path setting
        return None
    p = Path(path)
    if p.is_file():
        st = p.stat()
        return _sampled_digest(str(p.resolve()), st.st_size, st.st_mtime_ns)
    if not p.is_dir():
        return None
    h = hashlib.sha256()
    for f in sorted(q for q in p.rglob("*") if q.is_file()):
        h.update(f"{f.relative_to(p)}:{file_digest(f)}\n".encode())
    return h.hexdigest()[:16]


def json_digest(path: str | Path) -> str | None:
    """The digest of a JSON file's content, whatever its layout (indentation, key order), or None if absent
    or unreadable (the stage that reads it says why)."""
    try:
        data = json.loads(Path(path).read_text())
    except (OSError, ValueError):
        return None
    return hashlib.sha256(json.dumps(data, sort_keys=True).encode()).hexdigest()[:16]


def file_sha256(path: Path) -> dict:
    """{"bytes", "sha256"} of a whole file: what `train.preprocess` records of each shard it writes, so that a
    shard set re-encoded at the same path (same shapes, other latents) is another shard set."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(16 * MIB), b""):
            h.update(chunk)
    return {"bytes": Path(path).stat().st_size, "sha256": h.hexdigest()}


@functools.lru_cache(maxsize=None)
def _sampled_digest(path: str, size: int, mtime_ns: int) -> str:
    h = hashlib.sha256(str(size).encode())
    with open(path, "rb") as f:
        if size <= SAMPLE_ALL:
            h.update(f.read())
        else:
            last = size - MIB
            for i in range(SAMPLES + 2):
                f.seek(last * i // (SAMPLES + 1))
                h.update(f.read(MIB))
    return h.hexdigest()[:16]
