"""`python -m research.bench.sequence`: what sequence parallelism (Ulysses) saves per rank, side by side.

2 CPU processes on gloo (DS_ACCELERATOR=cpu). Each runs one forward and backward of the same sample through a
random Wan of the 1.3B's width (12 heads of 128, FFN 8960, text width 4096; `--blocks` blocks) twice: whole on
every rank (what each rank of a data-parallel run holds), then with the tokens split over the 2 ranks
(`dist.sequence_parallel=2`, DeepSpeed's DistributedAttention). Per rank it records the activations autograd keeps
for the backward (the bytes of every tensor saved for backward, each storage counted once: on the real models
gradient checkpointing keeps one block input per block and recomputes the rest, both split alike) and the seconds
of the forward and backward, and checks that the two agree (the prediction and the summed gradient).
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

import torch

WIDTH = {"num_attention_heads": 12, "attention_head_dim": 128, "ffn_dim": 8960, "text_dim": 4096,
         "in_channels": 16, "out_channels": 16, "patch_size": (1, 2, 2), "freq_dim": 256}
GIB = 1024 ** 3


def saved_bytes(fn, model: torch.nn.Module) -> tuple[object, int]:
    """fn()'s result and the bytes of the distinct storages autograd saves for its backward, the model's weights
    left out (they are there either way)."""
    weights = {p.untyped_storage().data_ptr() for p in model.parameters()}
    storages: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        if t.untyped_storage().data_ptr() not in weights:
            storages[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn()
    return out, sum(storages.values())


def measure(model, adapter, x, sigma, cond) -> dict:
    """One forward and backward, after an unmeasured one (first calls pay for allocations and kernel choice)."""
    adapter(x, sigma, cond).square().mean().backward()
    model.zero_grad()
    start = time.perf_counter()
    out, saved = saved_bytes(lambda: adapter(x, sigma, cond), model)
    out.square().mean().backward()
    seconds = time.perf_counter() - start
    grad = torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None])
    return {"out": out.detach(), "grad": grad, "saved": saved, "seconds": seconds}


def worker(blocks: int, frames: int, side: int) -> None:
    from diffusers import WanTransformer3DModel

    from fastlightgen.adapters import Conditioning, adapt
    from train.config import load_config
    from train.distributed.processes import init_dist

    dist = init_dist(load_config(None, ["dist.deepspeed=true", "dist.sequence_parallel=2", "dist.world_size=2"]))
    torch.manual_seed(0)
    model = WanTransformer3DModel(num_layers=blocks, **WIDTH).train()
    g = torch.Generator().manual_seed(1)
    x = torch.randn(1, 16, frames, side, side, generator=g)
    cond = Conditioning(text=torch.randn(1, 512, 4096, generator=g))
    sigma = torch.tensor([0.7])
    adapter = adapt(model)
    whole = measure(model, adapter, x, sigma, cond)
    adapter.shard_sequence(dist.shards)
    split = measure(model, adapter, x, sigma, cond)
    torch.distributed.all_reduce(split["grad"])  # the group's sum: twice the whole sample's gradient
    agree = {"out": (whole["out"] - split["out"]).abs().max().item() / whole["out"].abs().max().item(),
             "grad": (whole["grad"] - split["grad"] / 2).abs().max().item() / whole["grad"].abs().max().item()}
    tokens = frames * (side // 2) ** 2
    record = {"rank": dist.rank, "tokens": tokens, "whole": {k: whole[k] for k in ("saved", "seconds")},
              "split": {k: split[k] for k in ("saved", "seconds")}, "relative_difference": agree}
    print("RECORD " + json.dumps(record), flush=True)
    dist.close()


def table(records: list[dict], blocks: int) -> str:
    lines = [f"Wan of the 1.3B's width, {blocks} blocks, one sample of {records[0]['tokens']} tokens, 2 CPU processes "
             "on gloo; per rank:", "",
             "| rank | activations kept, whole (GiB) | split over 2 (GiB) | ratio | forward+backward whole (s) "
             "| split (s) | ratio |", "|---|---|---|---|---|---|---|"]
    for r in sorted(records, key=lambda r: r["rank"]):
        w, s = r["whole"], r["split"]
        lines.append(f"| {r['rank']} | {w['saved'] / GIB:.3f} | {s['saved'] / GIB:.3f} | {s['saved'] / w['saved']:.3f} "
                     f"| {w['seconds']:.2f} | {s['seconds']:.2f} | {s['seconds'] / w['seconds']:.2f} |")
    worst = max(max(r["relative_difference"].values()) for r in records)
    lines += ["", f"split vs whole, largest relative difference of the prediction and the gradient: {worst:.1e}"]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--blocks", type=int, default=4)
    parser.add_argument("--frames", type=int, default=4)
    parser.add_argument("--side", type=int, default=32, help="latent height and width (tokens: frames x side^2 / 4)")
    parser.add_argument("--json", default="", help="also write the records here")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        return worker(args.blocks, args.frames, args.side)
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
               "-m", "research.bench.sequence", "--worker",
               "--blocks", str(args.blocks), "--frames", str(args.frames), "--side", str(args.side)]
    done = subprocess.run(command, env={**os.environ, "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1"},
                          capture_output=True, text=True)
    if done.returncode:
        raise SystemExit(done.stderr[-4000:])
    records = [json.loads(line[7:]) for line in done.stdout.splitlines() if line.startswith("RECORD ")]
    print(table(records, args.blocks))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(records, f, indent=1)


if __name__ == "__main__":
    main()
