"""`python -m research.bench.training`: cost ratios of the training shortcuts, measured in one run on the CPU.

On a randomly initialised toy-teacher-shaped Wan (12 blocks x 256, 48 latent channels, 4096-wide text)
with a plan dropping the four middle blocks (Stage I's U-shape: the first dropped block is block 4):
1. Stage II step (forward, backward, AdamW) with the shared prefix vs two separate passes, over the
   same Bernoulli(0.5) skip-sets;
2. Stage III: eq. 9's three teacher predictions in one `guided_predictions` call ([c; null] as one batch
   through the prefix and the pruned path, vU(c) continuing from the c rows) vs three separate teacher
   passes (target <= 0.85x); the same plus the fake-score pass on both sides; and the whole generator
   update (backward simulation, student, teacher, backward);
3. Stage II step time with 2 processes vs 1 (DeepSpeed ZeRO-3 on gloo, the same per-process batch), from
   the runs' metrics logs (`--skip-multiprocess` leaves it out).
"""
from __future__ import annotations

import argparse
import itertools
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

from fastlightgen.adapters import adapt
from fastlightgen.checkpoint import CheckpointMeta, save_checkpoint
from fastlightgen.branches import Branch, run_branches
from fastlightgen.distill import dmd_generator_loss, mse, sample_skip, teacher_scores
from fastlightgen.flow import x0_from_velocity
from fastlightgen.guidance import mix_velocities, well_guided_velocity
from fastlightgen.lora import add_lora, lora_enabled, lora_parameters
from fastlightgen.plan import PrunePlan
from fastlightgen.toy.teacher import TOY_TEACHER, batch_latents, build_toy_teacher, conditioning, null_like
from fastlightgen.toy.world import make_batch
from train.distributed.processes import step_generator

from ..timing import seconds_per_call

DROPPED = [4, 5, 6, 7]


def compare(a: Callable[[int], object], b: Callable[[int], object], repeats: int) -> tuple[float, float]:
    """Seconds per call of a and b: the best of `repeats` alternating rounds of about 1 s (`seconds_per_call`;
    single 0.2-s calls scattered by a third on this host); both walk the same sequence of step indices."""
    steps_a, steps_b = itertools.count(), itertools.count()
    ta, tb = seconds_per_call(lambda: a(next(steps_a)), lambda: b(next(steps_b)), rounds=repeats, round_seconds=1.0)
    return ta, tb


def inputs(batch: int):
    toy = make_batch("train", batch, seed=0)
    x0 = batch_latents(toy)
    sigma = torch.full((batch,), 0.6)
    cond = conditioning(toy.captions)
    return x0 + 0.6 * torch.randn_like(x0), sigma, cond, torch.randn_like(x0)


def bench_stage2(repeats: int, batch: int) -> tuple[float, float]:
    model = build_toy_teacher(seed=0).train()
    adapter = adapt(model)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-6)
    x, sigma, cond, _ = inputs(batch)

    def step(i: int, shared: bool) -> None:
        skip = sample_skip(DROPPED, 0.5, step_generator(0, "skip", i, None))
        if shared:
            v_p, v_u = run_branches(adapter, x, sigma, cond, [Branch(skip, grad=True), Branch(frozenset())])
        else:
            v_p = adapter.forward(x, sigma, cond, skip=skip)
            with torch.no_grad():
                v_u = adapter.forward(x, sigma, cond)
        mse(v_p, v_u, True).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    return compare(lambda i: step(i, True), lambda i: step(i, False), repeats)


@dataclass
class Stage3Times:
    eq9: tuple[float, float]  # eq. 9's three predictions: one guided_predictions call vs three separate passes
    with_fake: tuple[float, float]  # the same plus the fake-score pass on both sides
    update: tuple[float, float]  # the whole generator update


def bench_stage3(repeats: int, batch: int) -> Stage3Times:
    teacher = build_toy_teacher(seed=0)
    adapter = adapt(teacher)
    kept = [i for i in range(TOY_TEACHER.num_layers) if i not in DROPPED]
    student = adapt(adapter.pruned_model(kept).train())
    teacher.requires_grad_(False)
    add_lora([adapter.blocks()[i] for i in kept], 16, 16.0)  # as train.stage3: every kept block
    for p in lora_parameters(teacher):
        p.requires_grad_(True)
    opt = torch.optim.AdamW(student.model.parameters(), lr=1e-6)
    x, sigma, cond, _ = inputs(batch)
    null, skip = null_like(cond), frozenset(DROPPED)

    def real(shared: bool) -> torch.Tensor:
        with torch.no_grad(), lora_enabled(teacher, False):
            if shared:
                return well_guided_velocity(adapter, x, sigma, cond, null, skip, 3.5, 0.25)
            return naive_real_score(adapter, x, sigma, cond, null, skip)

    def scores(shared: bool):
        with torch.no_grad():
            if shared:
                return teacher_scores(adapter, teacher, x, sigma, cond, null, skip, 3.5, 0.25)
            v_real = naive_real_score(adapter, x, sigma, cond, null, skip)
            with lora_enabled(teacher):
                return v_real, adapter.forward(x, sigma, cond, skip=skip)

    def update(shared: bool) -> None:
        with torch.no_grad():  # backward simulation: two earlier student steps
            for _ in range(2):
                student.forward(x, sigma, cond)
        x0 = x0_from_velocity(x, student.forward(x, sigma, cond), sigma)
        v_real, v_fake = scores(shared)
        dmd_generator_loss(x0, x0_from_velocity(x, v_real, sigma), x0_from_velocity(x, v_fake, sigma), True).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    return Stage3Times(compare(lambda i: real(True), lambda i: real(False), repeats),
                       compare(lambda i: scores(True), lambda i: scores(False), repeats),
                       compare(lambda i: update(True), lambda i: update(False), repeats))


def naive_real_score(adapter, x, sigma, cond, null, skip) -> torch.Tensor:
    """Eq. 9 from three separate teacher passes."""
    return mix_velocities(adapter.forward(x, sigma, cond, skip=skip), adapter.forward(x, sigma, null, skip=skip),
                          adapter.forward(x, sigma, cond), 3.5, 0.25)


# ---- 1 vs 2 processes ---------------------------------------------------------------------------

def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def bench_processes(steps: int, batch: int) -> tuple[float, float]:
    """Median Stage II step time (s) with 1 and with 2 processes, ZeRO-3 on gloo, per-process batch `batch`."""
    with tempfile.TemporaryDirectory() as tmp:
        model = build_toy_teacher(seed=0)
        teacher = save_checkpoint(Path(tmp) / "teacher.safetensors", model,
                                  CheckpointMeta(TOY_TEACHER.num_layers, list(range(TOY_TEACHER.num_layers))))
        plan = Path(tmp) / "plan.json"
        PrunePlan.from_blocks(adapt(model).fingerprint(), DROPPED).save(plan)
        times = []
        for procs in (1, 2):
            run_dir = Path(tmp) / f"p{procs}"
            sets = {"model.teacher": teacher, "stage2.plan": plan, "run.run_dir": run_dir, "stage2.iterations": steps,
                    "run.save_every": 10 ** 6, "data.batch_size": batch, "dist.deepspeed": True,
                    "dist.cpu_adam": False, "dist.prefetch_bucket_size": 0, "dist.world_size": procs}
            cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(procs), "--master_addr",
                   "127.0.0.1", "--master_port", str(_port()), "-m", "train.stage2",
                   *[a for k, v in sets.items() for a in ("--set", f"{k}={v}")]]
            env = {**os.environ, "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1"),
                   "PYTHONWARNINGS": "ignore"}
            subprocess.run(cmd, env=env, check=True, capture_output=True, timeout=600)
            records = [json.loads(x) for x in (run_dir / "stage2" / "metrics.jsonl").read_text().splitlines()]
            times.append(statistics.median(r["s_per_step"] for r in records[1:]))
    return times[0], times[1]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--process-steps", type=int, default=8)
    parser.add_argument("--skip-multiprocess", action="store_true")
    args = parser.parse_args(argv)
    torch.manual_seed(0)

    shared, separate = bench_stage2(args.repeats, args.batch)
    print(f"Stage II step, shared prefix vs two passes:        {shared:.3f}s vs {separate:.3f}s = "
          f"{shared / separate:.2f}x")
    t3 = bench_stage3(args.repeats, args.batch)
    ratio = lambda pair: f"{pair[0]:.3f}s vs {pair[1]:.3f}s = {pair[0] / pair[1]:.2f}x"  # noqa: E731
    print(f"Stage III eq. 9 teacher, one batched call vs 3 separate teacher passes: {ratio(t3.eq9)} "
          f"(target <= 0.85x; dropped {DROPPED}, batch {args.batch})")
    print(f"Stage III teacher side + fake-score pass vs naive + fake pass:        {ratio(t3.with_fake)}")
    print(f"Stage III generator update, shared vs naive:                         {ratio(t3.update)}")
    if not args.skip_multiprocess:
        one, two = bench_processes(args.process_steps, args.batch)
        print(f"Stage II step time, 2 processes vs 1 (ZeRO-3, gloo, batch {args.batch} per process): "
              f"{two:.3f}s vs {one:.3f}s = {two / one:.2f}x per step ({2 * one / two:.2f}x samples/s); "
              f"CPU cores: {os.cpu_count()}")


if __name__ == "__main__":
    main()
