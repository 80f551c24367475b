"""`torchrun --nproc_per_node 2 -m train.preprocess` (2 CPU processes on gloo) against one process, and a run
killed mid-way then resumed, on the tiny Wan 2.1 folder in the Hugging Face layout and mp4 files written here.

torchrun starts its workers in their own sessions: a torchrun killed by a timeout would leave them running. Every
worker writes its PID first, and the test ends the ones still alive by PID.
"""
from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from fastlightgen.video_io import write_mp4
from tiny_models import tiny_wan_folder
from train.config import load_config

REPO = Path(__file__).resolve().parents[1]

# A worker: records its PID, optionally SIGKILLs itself (KILL_AFTER="rank:count") once that rank has written its
# count-th shard file and before that shard's record, then runs the entry point.
WORKER = """
import os, signal, sys
from pathlib import Path

Path(os.environ["PID_DIR"], str(os.getpid())).touch()
from train import preprocess

if os.environ.get("KILL_AFTER"):
    rank, count = map(int, os.environ["KILL_AFTER"].split(":"))
    real, written = preprocess.write_shard, []

    def write_shard(*args, **kwargs):
        name = real(*args, **kwargs)
        written.append(name)
        if int(os.environ["RANK"]) == rank and len(written) == count:
            os.kill(os.getpid(), signal.SIGKILL)
        return name
    preprocess.write_shard = write_shard
preprocess.main(sys.argv[1:])
"""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextmanager
def worker_pids(folder: Path):
    """Ends every worker that recorded its PID in `folder` and is still running, on the way out."""
    folder.mkdir(parents=True, exist_ok=True)
    try:
        yield folder
    finally:
        for entry in folder.iterdir():
            pid = int(entry.name)
            try:
                cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
            except OSError:
                continue  # ended
            if b"worker.py" in cmdline:  # still ours, not a reused PID
                os.kill(pid, signal.SIGKILL)


def torchrun_preprocess(tmp: Path, settings: list[str], kill_after: str = "",
                        timeout: int = 300) -> subprocess.CompletedProcess:
    worker = tmp / "worker.py"
    worker.write_text(WORKER)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO), "PYTHONWARNINGS": "ignore",
           "PID_DIR": str(tmp / "pids"), "KILL_AFTER": kill_after}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
           "--master_port", str(free_port()), str(worker), *[a for s in settings for a in ("--set", s)]]
    with worker_pids(tmp / "pids"):
        return subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)


def wan_settings(root: Path, videos: Path, out: Path, **values) -> list[str]:
    base = {"model.path": root, "model.ti2v": False, "preprocess.encoder": "wan", "preprocess.videos": videos,
            "preprocess.out": out, "preprocess.frames": 5, "preprocess.height": 32, "preprocess.width": 32,
            "preprocess.shard_size": 2, **values}
    return [f"{k}={v}" for k, v in base.items()]


def write_videos(folder: Path, count: int, uncaptioned: tuple[int, ...] = ()) -> list[str]:
    """`count` short clips of assorted sizes, captioned but for `uncaptioned`; their names, sorted."""
    g = torch.Generator().manual_seed(0)
    names = []
    for i in range(count):
        size = [(32, 32), (40, 56), (48, 32)][i % 3]
        name = f"clip_{i:02d}.mp4"
        write_mp4(folder / name, torch.rand(3, 6 + i % 3, *size, generator=g) * 2 - 1, fps=8 + 4 * (i % 2))
        if i not in uncaptioned:
            (folder / name).with_suffix(".txt").write_text(["a red circle moves left", "a blue square jumps"][i % 2])
        names.append(name)
    return names


def rows(out: Path) -> dict[str, dict]:
    """Every item of a shard set by its video: caption, and its row of each shard tensor."""
    index = json.loads((out / "index.json").read_text())
    found = {}
    for shard in index["shards"]:
        tensors = load_file(str(out / shard["file"]))
        for i, item in enumerate(shard["items"]):
            found[item["file"]] = {"caption": item["caption"], **{k: v[i] for k, v in tensors.items()}}
    return found


def encoded(output: str) -> list[str]:
    return sorted(line.split("encoded ")[1].split(":")[0] for line in output.splitlines() if "] encoded shard_" in line)


@pytest.fixture(scope="module")
def wan21(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("models") / "Wan2.1-T2V-tiny-Diffusers"
    tiny_wan_folder(root, "2.1")
    return root


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    videos = tmp_path_factory.mktemp("data") / "videos"
    write_videos(videos, 9, uncaptioned=(4,))
    return videos


@pytest.fixture(scope="module")
def two_processes(wan21, data, tmp_path_factory) -> Path:
    tmp = tmp_path_factory.mktemp("two")
    done = torchrun_preprocess(tmp, wan_settings(wan21, data, tmp / "shards"))
    assert done.returncode == 0, done.stderr[-4000:]
    assert "wrote 8 samples in 5 shards" in done.stdout and "by 2 processes; skipped 1 (no caption: 1)" in done.stdout
    return tmp / "shards"


def test_two_processes_write_the_index_one_process_writes(wan21, data, two_processes, tmp_path, one_thread):
    from train import preprocess

    one = tmp_path / "one"
    preprocess.run(load_config(None, wan_settings(wan21, data, one)))
    index1, index2 = (json.loads((out / "index.json").read_text()) for out in (one, two_processes))
    assert {k: v for k, v in index1.items() if k != "shards"} == {k: v for k, v in index2.items() if k != "shards"}
    assert index2["skipped"] == {"no caption": 1}
    # input i goes to rank i % 2, two inputs per shard, shards in rank order
    assert [(s["file"], [i["file"] for i in s["items"]]) for s in index2["shards"]] == [
        ("shard_r0_00000.safetensors", ["clip_00.mp4", "clip_02.mp4"]),
        ("shard_r0_00001.safetensors", ["clip_06.mp4"]),  # clip_04 has no caption
        ("shard_r0_00002.safetensors", ["clip_08.mp4"]),
        ("shard_r1_00000.safetensors", ["clip_01.mp4", "clip_03.mp4"]),
        ("shard_r1_00001.safetensors", ["clip_05.mp4", "clip_07.mp4"])]
    assert [s["file"] for s in index1["shards"]] == [f"shard_{k:05d}.safetensors" for k in range(5)]
    by_one, by_two = rows(one), rows(two_processes)
    assert sorted(by_one) == sorted(by_two) == [f"clip_{i:02d}.mp4" for i in range(9) if i != 4]
    for name, row in by_one.items():  # bit for bit: each video and caption is encoded alone
        assert row.keys() == by_two[name].keys() == {"caption", "latents", "text"}
        assert row["caption"] == by_two[name]["caption"]
        for key in ("latents", "text"):
            assert torch.equal(row[key], by_two[name][key]), (name, key)
    assert torch.equal(load_file(str(one / "null.safetensors"))["text"],
                       load_file(str(two_processes / "null.safetensors"))["text"])
    assert not (two_processes / "shard_00000.safetensors").exists()  # the names carry the rank


def test_a_killed_run_resumes_encoding_only_the_unfinished_shards(wan21, data, two_processes, tmp_path):
    out = tmp_path / "shards"
    settings = wan_settings(wan21, data, out)
    killed = torchrun_preprocess(tmp_path, settings, kill_after="1:2")
    assert killed.returncode != 0
    assert (out / "shard_r1_00001.safetensors").is_file() and not (out / "shard_r1_00001.json").exists()
    assert not (out / "index.json").exists()
    planned = {f"shard_r0_{k:05d}" for k in range(3)} | {f"shard_r1_{k:05d}" for k in range(2)}
    finished = {p.stem for p in out.glob("shard_*.json")}
    assert "shard_r1_00000" in finished and "shard_r1_00001" not in finished

    resumed = torchrun_preprocess(tmp_path, settings)
    assert resumed.returncode == 0, resumed.stderr[-4000:]
    assert encoded(resumed.stdout) == sorted(planned - finished)
    assert sorted(line.split("kept ")[1].split(" ")[0] for line in resumed.stdout.splitlines()
                  if "] kept shard_" in line) == sorted(finished)
    # the same index and bytes as the uninterrupted run
    assert json.loads((out / "index.json").read_text()) == json.loads((two_processes / "index.json").read_text())
    for shard in json.loads((out / "index.json").read_text())["shards"]:
        assert (out / shard["file"]).read_bytes() == (two_processes / shard["file"]).read_bytes(), shard["file"]

    again = torchrun_preprocess(tmp_path, settings)  # nothing left to do: no model loads, the index is rewritten
    assert again.returncode == 0 and encoded(again.stdout) == [] and "wrote 8 samples in 5 shards" in again.stdout


def test_a_changed_input_or_setting_is_encoded_again(wan21, tmp_path, one_thread, capsys):
    from train import preprocess

    videos = tmp_path / "videos"
    write_videos(videos, 3)
    settings = wan_settings(wan21, videos, tmp_path / "shards")
    preprocess.run(load_config(None, settings))
    assert capsys.readouterr().out.count("encoded shard_") == 2
    preprocess.run(load_config(None, settings))
    assert capsys.readouterr().out.count("kept shard_") == 2
    (videos / "clip_02.txt").write_text("another caption")  # shard 1's input
    preprocess.run(load_config(None, settings))
    text = capsys.readouterr().out
    assert "kept shard_00000" in text and "encoded shard_00001" in text
    preprocess.run(load_config(None, settings + ["preprocess.height=48"]))
    assert capsys.readouterr().out.count("encoded shard_") == 2
