"""train.toy_teacher on the shared loop, with a 2-block teacher: a run killed mid-way and resumed ends exactly
where an uninterrupted one does (weights, AdamW state and EMA); the export is the EMA, loads, and carries
its config; --export-only re-exports the newest checkpoint; export settings may change on resume, the
recipe may not; toy_teacher.init continues an exported teacher."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from fastlightgen.checkpoint import load_wan, read_checkpoint
from train import toy_teacher
from train.loop.run import CheckpointMismatch
from train.loop.state import TENSORS_FILE, latest_state

REPO = Path(__file__).resolve().parents[1]
TINY = {"num_layers": 2, "num_attention_heads": 2, "attention_head_dim": 16, "ffn_dim": 64}


def args(run_dir: Path, **settings) -> list[str]:
    base = {"toy_teacher.shape": json.dumps(TINY), "run.run_dir": run_dir, "data.batch_size": 2,
            "toy_teacher.iterations": 6, "run.save_every": 2, "run.warmup": 2, "toy_teacher.cfg_candidates": "[2]",
            "toy_teacher.out": run_dir / "teacher.safetensors", **settings}
    return [a for k, v in base.items() for a in ("--set", f"{k}={v}")]


def checkpoint_tensors(run_dir: Path, step: int) -> dict[str, torch.Tensor]:
    return load_file(str(run_dir / "toy_teacher" / f"step_{step:07d}" / TENSORS_FILE))


def without_config(provenance: dict) -> dict:
    return {k: v for k, v in provenance.items() if k != "config"}



def test_resume_after_sigkill_matches_an_uninterrupted_run(tmp_path, one_thread):
    killed = tmp_path / "killed"
    cmd = [sys.executable, "-m", "train.toy_teacher", *args(killed, **{"toy_teacher.iterations": 10_000})]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO), "PYTHONWARNINGS": "ignore"}
    proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        deadline = time.time() + 120
        while not (killed / "toy_teacher" / "step_0000004").exists() and proc.poll() is None \
                and time.time() < deadline:
            time.sleep(0.01)
        assert proc.poll() is None, proc.stderr.read().decode()[-2000:]
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    stopped = int(latest_state(killed / "toy_teacher").name.removeprefix("step_"))
    total = stopped + 3  # the run length is no part of the recipe: the resumed run may end elsewhere

    toy_teacher.main(args(killed, **{"toy_teacher.iterations": total}) + ["--resume"])
    toy_teacher.main(args(tmp_path / "straight", **{"toy_teacher.iterations": total}))
    a, b = checkpoint_tensors(tmp_path / "straight", total), checkpoint_tensors(killed, total)
    assert any(k.startswith("ema.model.") for k in a) and any(k.startswith("model.opt.") for k in a)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    exported = [read_checkpoint(run / "teacher.safetensors") for run in (tmp_path / "straight", killed)]
    assert all(torch.equal(exported[0].state_dict[k], exported[1].state_dict[k]) for k in exported[0].state_dict)
    assert without_config(exported[0].meta.provenance) == without_config(exported[1].meta.provenance)
    steps = [json.loads(x)["step"] for x in (killed / "toy_teacher" / "metrics.jsonl").read_text().splitlines()]
    assert steps == list(range(1, total + 1))


def test_export_is_the_ema_with_its_config_and_re_exports(tmp_path, capsys):
    run = tmp_path / "run"
    toy_teacher.main(args(run, **{"toy_teacher.cfg_candidates": "[2, 5]"}))
    ckpt = read_checkpoint(run / "teacher.safetensors")
    meta = ckpt.meta
    assert meta.provenance["trainer"] == "train.toy_teacher" and meta.provenance["step"] == 6
    assert meta.provenance["config"]["toy_teacher"]["shape"] == TINY
    assert meta.provenance["config"]["data"]["caption_dropout"] == 0.1
    scores = meta.provenance["cfg_selection"]
    assert set(scores) == {"2", "5"} and meta.recommended.cfg_scale == float(max(scores, key=scores.get))
    assert meta.recommended.steps == 50 and not meta.recommended.is_few_step
    assert meta.original_num_blocks == 2 and meta.kept_blocks == [0, 1] and meta.head_dim == 16

    state = checkpoint_tensors(run, 6)
    ema = {k.removeprefix("ema.model."): v for k, v in state.items() if k.startswith("ema.model.")}
    live = {k.removeprefix("model.model."): v for k, v in state.items() if k.startswith("model.model.")}
    assert ema.keys() == live.keys() and set(ema) <= set(ckpt.state_dict)
    assert all(torch.equal(ckpt.state_dict[k], v.to(torch.bfloat16)) for k, v in ema.items())
    assert any(not torch.equal(ckpt.state_dict[k], v.to(torch.bfloat16)) for k, v in live.items())
    model, _ = load_wan(run / "teacher.safetensors")
    assert len(model.blocks) == 2

    # export settings are no part of the recipe: another output and candidate list from the same checkpoint
    other = tmp_path / "other.safetensors"
    toy_teacher.main(args(run, **{"toy_teacher.out": other, "toy_teacher.cfg_candidates": "[3.5]"})
                     + ["--export-only"])
    again = read_checkpoint(other)
    assert again.meta.recommended.cfg_scale == 3.5 and again.meta.provenance["step"] == 6
    assert all(torch.equal(again.state_dict[k], v) for k, v in ckpt.state_dict.items())
    with pytest.raises(CheckpointMismatch, match=r"toy_teacher\.ema_decay: 0\.999 != 0\.9"):
        toy_teacher.main(args(run, **{"toy_teacher.ema_decay": 0.9}) + ["--resume"])
    with pytest.raises(SystemExit, match="holds no checkpoint"):
        toy_teacher.main(args(tmp_path / "empty") + ["--export-only"])


def test_help_names_the_shared_options_and_export_only(capsys):
    with pytest.raises(SystemExit) as exit_info:
        toy_teacher.main(["--help"])
    out = capsys.readouterr().out
    assert exit_info.value.code == 0 and all(flag in out for flag in ("--set", "--resume", "--export-only"))


def test_init_continues_an_exported_teacher_and_refuses_a_missing_or_other_shaped_one(tmp_path):
    """toy_teacher.init starts from the file's weights (at learning rate 1e-9 the export is that file again); a missing
    file or one of another shape stops the run before its folder is made, each naming the fix."""
    first = tmp_path / "first"
    toy_teacher.main(args(first))
    start = read_checkpoint(first / "teacher.safetensors").state_dict
    again = tmp_path / "again"
    toy_teacher.main(args(again, **{"toy_teacher.init": first / "teacher.safetensors", "toy_teacher.lr": 1e-9,
                                    "toy_teacher.iterations": 2}))
    continued = read_checkpoint(again / "teacher.safetensors").state_dict
    assert continued.keys() == start.keys()
    assert all(torch.allclose(continued[k].float(), v.float(), rtol=0, atol=1e-6) for k, v in start.items())

    missing = r"toy_teacher\.init .*missing\.safetensors does not exist: give a toy teacher"
    with pytest.raises(SystemExit, match=missing):
        toy_teacher.main(args(tmp_path / "none", **{"toy_teacher.init": tmp_path / "missing.safetensors"}))
    assert not (tmp_path / "none").exists()
    wider = json.dumps({**TINY, "ffn_dim": 96})
    with pytest.raises(SystemExit, match=r"holds a teacher of shape .*'ffn_dim': 64.*set toy_teacher\.shape"):
        toy_teacher.main(args(tmp_path / "other", **{"toy_teacher.init": first / "teacher.safetensors",
                                                     "toy_teacher.shape": wider}))
    assert not (tmp_path / "other").exists()
