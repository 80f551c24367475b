"""Process group, device and the randomness of a step.

Every random draw of a run is a pure function of (seed, stream, step, rank), so a resumed run repeats
exactly what an uninterrupted one does. Draws that decide *which modules run* (Stage II's skip-set,
Stage III's simulated step) must be the same on every rank: ZeRO-3 gathers parameters collectively, and
ranks running different blocks would wait on each other forever. Those use `shared=True`. The ranks of a
sequence-parallel group (train/distributed/sequence.py) share one sample, so per-sample draws take the data rank.
"""
from __future__ import annotations

import hashlib
import os
import warnings
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as tdist

from fastlightgen.sequence import SequenceShards

from ..config import Config


@dataclass(frozen=True)
class Dist:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device
    deepspeed: bool
    shards: SequenceShards | None = None  # this rank's slice of each sample's tokens (dist.sequence_parallel)

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def data_rank(self) -> int:
        """Which sample this rank holds: the ranks of a sequence-parallel group hold the same one."""
        return self.rank // (1 if self.shards is None else self.shards.size)

    def barrier(self) -> None:
        if self.world_size > 1:
            tdist.barrier()

    def close(self) -> None:
        """Leaves the process group together. A rank that exits with its group still open tears gloo's
        threads down at interpreter exit and can abort ('terminate called without an active exception')
        while another rank is still writing the run's output."""
        self.barrier()
        if (self.deepspeed or self.world_size > 1) and tdist.is_initialized():
            tdist.destroy_process_group()

    def any(self, flag: bool) -> bool:
        """True on every rank if `flag` is true on some rank (so all ranks take the same branch)."""
        if self.world_size == 1:
            return flag
        t = torch.tensor([1.0 if flag else 0.0], device=self.device)
        tdist.all_reduce(t, op=tdist.ReduceOp.MAX)
        return bool(t.item() > 0)

    def mean(self, value: float) -> float:
        if self.world_size == 1:
            return value
        t = torch.tensor([value], dtype=torch.float64, device=self.device)
        tdist.all_reduce(t)
        return t.item() / self.world_size


def init_dist(cfg: Config) -> Dist:
    world = int(os.environ.get("WORLD_SIZE", "1"))
    local = int(os.environ.get("LOCAL_RANK", "0"))
    if not cfg.dist.deepspeed:
        if world > 1:
            raise SystemExit(f"{world} processes were launched but dist.deepspeed is false; "
                             "set --set dist.deepspeed=true for multi-process runs")
        return Dist(0, 1, 0, torch.device("cuda" if torch.cuda.is_available() else "cpu"), False)
    import deepspeed
    from deepspeed.accelerator import get_accelerator

    # torch.distributed deprecation notices fire on every ZeRO gather; they say nothing about the run.
    warnings.filterwarnings("ignore", category=FutureWarning, module="torch.distributed")

    deepspeed.init_distributed(dist_backend=get_accelerator().communication_backend_name())
    name = get_accelerator().device_name()
    device = torch.device(name, local) if name != "cpu" else torch.device("cpu")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    from .sequence import sequence_shards

    return Dist(tdist.get_rank(), tdist.get_world_size(), local, device, True,
                sequence_shards(cfg.dist.sequence_parallel))


def init_workers(timeout: timedelta = timedelta(days=2)) -> Dist:
    """The processes torchrun started, for work that shares files, not tensors (train.preprocess): a gloo group
    for barriers only, on any machine; each rank on its own GPU when there are GPUs. `timeout`: how long a
    barrier waits for the slowest rank, which may still be encoding its share long after the others (the
    default of 30 minutes would end a long run)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank, local = int(os.environ.get("RANK", "0")), int(os.environ.get("LOCAL_RANK", "0"))
    device = torch.device("cuda", local) if torch.cuda.is_available() else torch.device("cpu")
    if device.type == "cuda":
        if local >= torch.cuda.device_count():
            raise SystemExit(f"rank {rank} is process {local} of its node, which has {torch.cuda.device_count()} "
                             f"GPUs: start at most one process per GPU (--nproc_per_node)")
        torch.cuda.set_device(device)
    if world > 1:
        tdist.init_process_group("gloo", timeout=timeout)
    return Dist(rank, world, local, device, False)


def step_generator(seed: int, stream: str, step: int, rank: int | None) -> torch.Generator:
    """A CPU generator for one (seed, stream, step, rank); rank None = the same on every rank."""
    key = f"{seed}:{stream}:{step}:{'shared' if rank is None else rank}".encode()
    return torch.Generator().manual_seed(int.from_bytes(hashlib.sha256(key).digest()[:8], "little") >> 1)
