"""The loop machinery every training stage shares: resume, steps, non-finite losses, checkpoints, logs.

A stage supplies its units (and any other resumable state, such as an EMA) and a `step(step) -> metrics`
function; `train` does the rest:
- resumes from the newest complete checkpoint of `run_dir/<stage>` (refusing one written for another
  config or world size, with the differing settings named),
- runs the steps with a tqdm bar (loss, s/step) and a JSONL metrics log,
- skips a step whose loss or gradients are non-finite (reported with the step and the batch) and stops after
  `run.max_bad_steps` in a row, leaving the last good checkpoint as it was; stops at once if an applied
  update made weights non-finite (it cannot be undone),
- writes a checkpoint every `run.save_every` steps and at the end (staged, then renamed: atomic), none
  while non-finite steps are streaking and never one holding a non-finite weight,
- plots the loss curves to a PNG.
"""
from __future__ import annotations

import json
import math
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch

from fastlightgen.io_utils import atomic_write_text

from ..config import Config
from ..distributed.processes import Dist, step_generator
from .identity import identity_diff, identity_hash, run_identity
from .state import STATE_FILE, TENSORS_FILE, commit_state, latest_state, load_state, staging_dir, write_state_files
from ..models.units import NonFiniteStep, NonFiniteWeights, Resumable

StepFn = Callable[[int], dict]


class CheckpointMismatch(SystemExit):
    """A checkpoint that belongs to another run; resuming it would silently train something else."""


class TooManyBadSteps(RuntimeError):
    pass


class PoisonedWeights(RuntimeError):
    """An applied update made weights non-finite: the run stops, its checkpoints untouched."""


@dataclass
class Run:
    cfg: Config
    stage: str
    dist: Dist
    identity: dict = field(init=False)

    def __post_init__(self):
        # taken once the stage has read its inputs: their digests as this run read them, not at a later save
        self.identity = run_identity(self.cfg, self.stage, self.dist.world_size)

    @property
    def dir(self) -> Path:
        return self.cfg.stage_dir(self.stage)

    def generator(self, step: int, stream: str, shared: bool = False) -> torch.Generator:
        return step_generator(self.cfg.run.seed, stream, step, None if shared else self.dist.data_rank)

    def print_on_main(self, text: str) -> None:
        if self.dist.is_main:
            print(text, file=sys.stderr, flush=True)

    # ---- checkpoints ---------------------------------------------------------------------------
    def save(self, step: int, units: list[Resumable], extra: dict) -> Path:
        bad = [unit.name for unit in units if not unit.all_finite()]
        if self.dist.any(bool(bad)):
            raise PoisonedWeights(f"{self.stage}: refusing to write the step {step} checkpoint: non-finite weights "
                                  f"in {', '.join(bad) if bad else 'the units of another rank'}")
        tmp = self.dir / f".tmp_step_{step:07d}_shared"
        if self.dist.is_main:
            staging_dir(self.dir, step, "shared")
        self.dist.barrier()
        tensors, info = {}, {}
        for unit in units:
            t, i = unit.save(tmp)
            tensors.update(t)
            info[unit.name] = i
        self.dist.barrier()  # every rank has written its DeepSpeed files
        path = self.dir / f"step_{step:07d}"
        if self.dist.is_main:
            state = {"identity": self.identity, "identity_hash": identity_hash(self.identity), "units": info, **extra}
            write_state_files(tmp, step, tensors, state)
            path = commit_state(self.dir, tmp, step, self.cfg.run.keep_checkpoints)
        self.dist.barrier()
        return path

    def check_compatible(self, path: Path, info: dict) -> None:
        if info.get("identity_hash") != identity_hash(self.identity):
            diff = identity_diff(info.get("identity", {}), self.identity)
            raise CheckpointMismatch(
                f"refusing to resume {path}: it was written by another run configuration "
                f"({'; '.join(diff) or 'unknown identity'}; checkpoint value first). Resume with the same config "
                f"and number of processes, or start a fresh run_dir")

    def resume(self, units: list[Resumable]) -> tuple[int, dict]:
        """(start step, extra state) from the newest complete checkpoint, or (0, {})."""
        path = latest_state(self.dir)
        if path is None:
            return 0, {}
        info = json.loads((path / STATE_FILE).read_text())
        self.check_compatible(path, info)
        tensors = load_state(path)[0] if (path / TENSORS_FILE).is_file() else {}
        for unit in units:
            unit.load(path, tensors, info["units"][unit.name])
        self.print_on_main(f"resumed {self.stage} from {path} at step {info['step']}")
        return info["step"], info

    def refuse_existing(self) -> None:
        if latest_state(self.dir) is not None:
            raise CheckpointMismatch(f"{self.dir} already holds checkpoints; pass --resume to continue that run, "
                                     "or choose another run.run_dir")


# ---- metrics ------------------------------------------------------------------------------------

def log_path(run: Run) -> Path:
    return run.dir / "metrics.jsonl"


def truncate_log(path: Path, start: int) -> None:
    """Drop records of steps a resumed run will redo (and a line cut short by a kill), so the log reads
    as one uninterrupted run."""
    if not path.is_file():
        return
    keep = []
    for line in path.read_text().splitlines():
        try:
            if json.loads(line)["step"] <= start:
                keep.append(line)
        except (json.JSONDecodeError, KeyError):
            continue
    atomic_write_text(path, "".join(line + "\n" for line in keep))


def plot_metrics(path: Path, out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    records = [json.loads(line) for line in path.read_text().splitlines() if line]
    keys = sorted({k for r in records for k in r if k.endswith("loss") or k in ("distill", "fm_pruned", "fm_unpruned")})
    fig, ax = plt.subplots(figsize=(7, 4))
    for key in keys:
        # log scale; steps with an exactly zero loss (Stage II drawing an empty skip-set) are left out
        pts = [(r["step"], r[key]) for r in records if r.get(key, 0) > 0]
        ax.plot([p[0] for p in pts], [p[1] for p in pts], label=key)
    ax.set_xlabel("step")
    ax.set_yscale("log")
    ax.legend()
    ax.set_title(out.parent.name)
    fig.tight_layout()
    fig.savefig(out, dpi=100)
    plt.close(fig)


# ---- the loop -----------------------------------------------------------------------------------

def learning_rate(base: float, step: int, warmup: int, decay: str = "constant", total: int = 0,
                  cycle: int = 0) -> float:
    """Linear warm-up over `warmup` steps, then constant or (decay="cosine") a cosine fall to zero at `total`.
    With `cycle` > 0 the schedule restarts every `cycle` steps, warm-up included, and `total` is not read: a run
    of whole cycles can be continued by more cycles and its first steps do not depend on its length."""
    if cycle > 0:
        step, total = step % cycle, cycle
    rate = base * min(1.0, (step + 1) / warmup) if warmup > 0 else base
    if decay == "cosine" and step >= warmup:
        rate *= 0.5 * (1.0 + math.cos(math.pi * (step - warmup) / max(1, total - warmup)))
    return rate


def train(run: Run, units: list[Resumable], step_fn: StepFn, iterations: int, resume: bool) -> int:
    """Runs steps [start, iterations) and returns the number of steps done in total."""
    from tqdm import tqdm

    if resume:
        start, extra = run.resume(units)
    else:
        run.refuse_existing()
        start, extra = 0, {}
    bad_in_row = extra.get("bad_in_row", 0)
    log = log_path(run)
    if run.dist.is_main:
        run.dir.mkdir(parents=True, exist_ok=True)
        truncate_log(log, start)
    last_good = run.dir / f"step_{start:07d}" if start else None
    bar = tqdm(range(start, iterations), initial=start, total=iterations, desc=run.stage,
               disable=not run.dist.is_main, dynamic_ncols=True, file=sys.stderr)
    for step in bar:
        tic = time.perf_counter()
        try:
            metrics = step_fn(step)
            bad_in_row = 0
        except NonFiniteWeights as err:
            raise PoisonedWeights(
                f"{run.stage}: step {step}: {err}; an applied update cannot be undone, so the run stops. Last good "
                f"checkpoint: {last_good or 'none yet'} (untouched); resume it with a lower learning rate") from None
        except NonFiniteStep as err:
            bad_in_row += 1
            if err.local or run.dist.is_main:  # the rank that saw it names its batch
                where = f" (rank {run.dist.rank})" if run.dist.world_size > 1 else ""
                print(f"step {step}{where}: {err}; step skipped ({bad_in_row} in a row)", file=sys.stderr, flush=True)
            metrics = {"skipped": 1}
            if bad_in_row > run.cfg.run.max_bad_steps:
                raise TooManyBadSteps(
                    f"{run.stage}: {bad_in_row} consecutive non-finite steps (last at step {step}: {err}); "
                    f"stopping. Last good checkpoint: {last_good or 'none yet'} (untouched)") from None
        metrics["s_per_step"] = time.perf_counter() - tic
        if run.dist.device.type == "cuda":  # the run's high-water mark so far, per process
            metrics["gpu_peak_gib"] = torch.cuda.max_memory_allocated(run.dist.device) / 2 ** 30
        if run.dist.is_main and (step + 1) % run.cfg.run.log_every == 0:
            with log.open("a") as f:
                f.write(json.dumps({"step": step + 1, **metrics}) + "\n")
            bar.set_postfix({k: f"{v:.4g}" for k, v in metrics.items() if k in ("loss", "gen_loss", "fake_loss",
                                                                                "s_per_step")})
        # No checkpoint inside a streak of non-finite losses: the last good one must survive the rotation.
        if bad_in_row == 0 and ((step + 1) % run.cfg.run.save_every == 0 or step + 1 == iterations):
            last_good = run.save(step + 1, units, {"bad_in_row": bad_in_row})
    if run.dist.is_main and log.is_file():
        plot_metrics(log, run.dir / "loss.png")
    return iterations

