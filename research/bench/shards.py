"""`python -m research.bench.shards`: bytes the shard loader reads per byte of the rows it draws (target <= 1.1x).

Writes N shards (`train.preprocess.write_shard`, `write_null`, `write_index`) whose rows have a real Wan 2.1
row's size (latents (16, 21, 60, 104) fp32, text (512, 4096) bf16 by default) in a temporary folder, and draws
batches through the real `train.data.batches.batch_source`.

Measure: the loader reads shard files with read()/pread() only (headers, then each drawn row's bytes; no
mmap), so the bytes it reads are the growth of `rchar` in /proc/self/io across the draws (the read of
/proc/self/io itself included). Bytes used: the stored bytes of the rows in the batches. For comparison the
sizes of the shard files drawn from: what the loader before this one loaded whole (`load_file`).
"""
from __future__ import annotations

import argparse
import re
import tempfile
from pathlib import Path

import torch

from train.config import Config
from train.data.batches import batch_source
from train.preprocess import write_index, write_null, write_shard


def rchar() -> int:
    """Bytes this process has read through read() and its kin so far."""
    for line in Path("/proc/self/io").read_text().splitlines():
        if line.startswith("rchar:"):
            return int(line.split()[1])
    raise RuntimeError("/proc/self/io has no rchar")


def write_set(folder: Path, shards: int, rows: int, latent: tuple[int, ...], text: tuple[int, ...]) -> None:
    gen = torch.Generator().manual_seed(0)
    entries = []
    for s in range(shards):
        name = write_shard(folder, s, torch.randn(rows, *latent, generator=gen),
                           torch.randn(rows, *text, generator=gen))
        entries.append({"file": name, "items": [{"file": f"v{s}_{i}.mp4", "caption": ""} for i in range(rows)]})
    write_index(folder, entries, write_null(folder, {"text": torch.zeros(1, *text)}, ""), encoder="bench")


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shards", type=int, default=8)
    p.add_argument("--rows", type=int, default=4, help="rows per shard (`preprocess.shard_size` ships 64)")
    p.add_argument("--latent", type=int, nargs=4, default=(16, 21, 60, 104), metavar=("C", "F", "H", "W"))
    p.add_argument("--text", type=int, nargs=2, default=(512, 4096), metavar=("L", "D"))
    p.add_argument("--batches", type=int, default=8)
    p.add_argument("--batch-size", type=int, default=2)
    a = p.parse_args(argv)

    row_bytes = 4 * torch.Size(a.latent).numel() + 2 * torch.Size(a.text).numel()
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        write_set(folder, a.shards, a.rows, tuple(a.latent), tuple(a.text))
        cfg = Config()
        cfg.data.source, cfg.data.shards = "shards", str(folder)
        draw, gen, names = batch_source(cfg), torch.Generator().manual_seed(1), set()
        before = rchar()
        for _ in range(a.batches):
            names |= set(re.findall(r"(shard_\d+\.safetensors)\[\d+\]", draw(gen, a.batch_size).desc))
        read = rchar() - before
        whole = sum((folder / n).stat().st_size for n in names)

    used = a.batches * a.batch_size * row_bytes
    print(f"{a.shards} shards x {a.rows} rows of {row_bytes / 2 ** 20:.1f} MiB; {a.batches} batches of "
          f"{a.batch_size}: {used / 2 ** 20:.1f} MiB used")
    print(f"read by batch_source (rchar):  {read / 2 ** 20:8.1f} MiB = {read / used:.4f}x the bytes used "
          f"(target <= 1.1x)")
    print(f"whole shard files drawn from:  {whole / 2 ** 20:8.1f} MiB = {whole / used:.4f}x the bytes used")


if __name__ == "__main__":
    main()
