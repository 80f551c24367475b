"""Resumable training state without pickle: tensors in safetensors, everything else in JSON.

A state is a folder `step_000123/` holding `tensors.safetensors` and `state.json`; it is written under a
temporary name and renamed, so a folder that exists is complete. `latest_state` finds the newest one.
A run folder belongs to one job at a time (`hold_run_dir`).
"""
from __future__ import annotations

import fcntl
import json
import os
import shutil
import socket
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

import torch
from safetensors.torch import load_file, save_file

from fastlightgen.io_utils import atomic_path

STATE_FILE = "state.json"
TENSORS_FILE = "tensors.safetensors"
LOCK_FILE = ".lock"


class RunDirBusy(SystemExit):
    """Another job holds the run folder: two jobs writing one folder garble its log and checkpoints."""


@contextmanager
def hold_run_dir(folder: Path) -> Iterator[None]:
    """Holds an exclusive lock on `folder` (flock on folder/.lock, released by the kernel however the job ends)
    for the body, then removes what a killed save left behind. Taken by the job's main process (RANK 0): the
    other ranks of the job write into the folder under its lock."""
    if os.environ.get("RANK", "0") != "0":
        yield
        return
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    with open(folder / LOCK_FILE, "a+") as lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            lock.seek(0)
            holder = lock.read().strip() or "unknown"
            raise RunDirBusy(f"{folder} is in use by another job ({holder}, lock {folder / LOCK_FILE}); wait for it "
                             "to end, or set another run.run_dir") from None
        lock.seek(0)
        lock.truncate()
        lock.write(f"PID {os.getpid()} on {socket.gethostname()}\n")
        lock.flush()
        remove_leftovers(folder)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def remove_leftovers(folder: Path) -> None:
    """Staging folders and temporary files of saves that a kill interrupted (never a complete `step_*`)."""
    for tmp in Path(folder).glob(".tmp_step_*"):
        shutil.rmtree(tmp, ignore_errors=True)
    for tmp in Path(folder).glob(".*.tmp"):  # fastlightgen.io_utils.atomic_path
        tmp.unlink(missing_ok=True)


def flatten_optimizer(opt: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], dict]:
    """Optimizer state as named tensors plus its JSON-able remainder (param groups, scalar entries)."""
    sd = opt.state_dict()
    tensors, scalars = {}, {}
    for index, entries in sd["state"].items():
        for name, value in entries.items():
            if torch.is_tensor(value):
                tensors[f"{index}.{name}"] = value
            else:
                scalars[f"{index}.{name}"] = value
    return tensors, {"param_groups": sd["param_groups"], "scalars": scalars}


def unflatten_optimizer(opt: torch.optim.Optimizer, tensors: dict[str, torch.Tensor], rest: dict) -> None:
    state: dict[int, dict[str, Any]] = {}
    for key, value in [*tensors.items(), *rest["scalars"].items()]:
        index, name = key.split(".", 1)
        state.setdefault(int(index), {})[name] = value
    opt.load_state_dict({"state": state, "param_groups": rest["param_groups"]})


def staging_dir(run_dir: Path, step: int, tag: str) -> Path:
    """An empty temporary folder for the state of `step`; several writers (ranks) may share it by tag."""
    tmp = Path(run_dir) / f".tmp_step_{step:07d}_{tag}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    return tmp


def write_state_files(folder: Path, step: int, tensors: dict[str, torch.Tensor], info: dict) -> None:
    # atomic_path gives the file the umask's mode: safetensors alone writes 0600, unreadable to the group
    with atomic_path(Path(folder) / TENSORS_FILE) as tmp:
        save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, str(tmp))
    (Path(folder) / STATE_FILE).write_text(json.dumps({**info, "step": step}, indent=1))


def commit_state(run_dir: Path, tmp: Path, step: int, keep: int = 2) -> Path:
    """Rename a complete staging folder to `step_NNNNNNN` (atomic) and drop all but the newest `keep`."""
    run_dir = Path(run_dir)
    final = run_dir / f"step_{step:07d}"
    shutil.rmtree(final, ignore_errors=True)
    os.replace(tmp, final)
    for old in sorted(run_dir.glob("step_*"))[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def latest_state(run_dir: Path) -> Path | None:
    done = sorted(p for p in Path(run_dir).glob("step_*") if (p / STATE_FILE).is_file())
    return done[-1] if done else None


def load_state(path: Path) -> tuple[dict[str, torch.Tensor], dict]:
    return load_file(str(Path(path) / TENSORS_FILE)), json.loads((Path(path) / STATE_FILE).read_text())


def split_prefix(tensors: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    return {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}


def with_prefix(tensors: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    return {prefix + k: v for k, v in tensors.items()}
