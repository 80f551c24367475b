"""research.bench.adapter's structure: --quick sweeps the fixed ranks and the energies beside whole deltas on
training prompts, reports each file's size and ratio to the full student and both paired intervals, chooses
the smallest setting within tolerance, and reports that one alone on the held-out prompts. The toy's
generation and scoring are replaced by a score that falls with the weight error (the bench's real numbers
come from `python -m research.bench.adapter`), on the small random pair of test_student_adapter.
"""
from __future__ import annotations

import re

import pytest
import torch
from test_student_adapter import KEPT, SHAPE, make_student

from fastlightgen.adapters import adapt
from fastlightgen.checkpoint import CheckpointMeta, save_checkpoint
from fastlightgen.toy.evaluate import EvalTable
from fastlightgen.toy.teacher import build_toy_teacher
from fastlightgen.toy.world import split_combinations
from research.bench import adapter as bench
from research.report import Samples
from research.stats import Interval


@pytest.fixture
def files(tmp_path, monkeypatch):
    teacher = build_toy_teacher(SHAPE, seed=3).float()
    student = make_student(teacher)
    save_checkpoint(tmp_path / "t.safetensors", teacher, CheckpointMeta(4, list(range(4))))
    save_checkpoint(tmp_path / "s.safetensors", student, CheckpointMeta(4, KEPT), dtype=torch.bfloat16)
    target = {k: v.bfloat16().float() for k, v in student.state_dict().items()}
    base = adapt(teacher).pruned_state_dict(KEPT)
    change = sum((target[k] - base[k].float()).pow(2).sum() for k in target).sqrt()

    def scores(model, prompts, seeds, few):  # 0.6 minus the relative error of the student's change
        state = model.state_dict()
        err = sum((state[k].float() - v).pow(2).sum() for k, v in target.items()).sqrt() / change
        keys = [(batch.mode, seed, i) for batch in prompts for seed in seeds for i in range(len(batch.factors))]
        clusters = [(batch.mode, f.combination) for batch in prompts for _ in seeds for f in batch.factors]
        rows = [{"overall": 0.6 - 0.2 * err.item() + 0.001 * i, "faithful": 0.7 - 0.2 * err.item()}
                for i in range(len(keys))]
        calls.append((tuple(batch.mode for batch in prompts), tuple(seeds), prompts[0].factors[0].combination))
        return Samples(EvalTable([str(i) for i in range(len(rows))], rows), tuple(keys), tuple(clusters), {})

    calls = []
    monkeypatch.setattr(bench, "scores", scores)
    return tmp_path, calls


def test_quick_sweeps_ranks_and_energies_and_chooses_the_smallest_within_tolerance(files, one_thread):
    folder, calls = files
    out = folder / "report.md"
    bench.main(["--quick", "--teacher", str(folder / "t.safetensors"), "--student", str(folder / "s.safetensors"),
                "--out", str(out), "--ranks", "1,8,64"])
    report = out.read_text()
    rows = {line.split(" | ")[0][2:]: line.split(" | ") for line in report.splitlines()
            if line.startswith(("| rank", "| energy", "| full"))}
    assert list(rows) == ["rank 1", "rank 8", "rank 64", "energy 0.9", "energy 0.99", "full (whole deltas)"]
    for cells in rows.values():
        assert re.fullmatch(r"\d+\.\d\d MiB", cells[2]) and re.fullmatch(r"\d\.\d{3}", cells[3])
        assert all(re.fullmatch(r"[+-]\d\.\d{4} \[[+-]\d\.\d{4}, [+-]\d\.\d{4}\]", c) for c in cells[4:6])
    assert rows["rank 1"][6] == "no |" and rows["rank 8"][6] == "yes |"  # the deltas are rank 2
    assert "linear layers low-rank" in rows["energy 0.99"][1] and "whole" in rows["full (whole deltas)"][1]
    within = {name: float(c[2].split()[0]) for name, c in rows.items() if c[6] == "yes |" and not name.startswith("f")}
    chosen = re.search(r"within ±0.005: \*\*(.+?)\*\* \((\d+\.\d\d) MiB, (\d\.\d{3})x the full student\): target "
                       r"\(<= 0.35x\) (met|missed)", report)
    assert chosen and within[chosen[1]] == min(within.values())
    assert re.search(r"on the \*\*held-out\*\* prompts \(2 held-out combinations x 2 modes x noise seeds 0 = 4 "
                     r"paired videos; reported, never used to choose\): overall [+-]\d\.\d{4} \[.+\], faithful "
                     r"[+-]\d\.\d{4} \[.+\]; within ±0.005 on both: (yes|no)", report)
    # the reference and every setting are scored on training prompts; only the chosen one and the reference on
    # held-out prompts, at other noise seeds
    train, heldout = set(split_combinations("train")), set(split_combinations("heldout"))
    assert [(modes, seeds) for modes, seeds, _ in calls] == [(("TI2V", "T2V"), (1000,))] * 7 + [(("TI2V", "T2V"), (0,))] * 2
    assert all(combo in train for *_, combo in calls[:7]) and all(combo in heldout for *_, combo in calls[7:])
    assert "Real shapes at rank 8 (the smallest fixed rank within tolerance" in report
    assert "Wan 2.2 TI2V 5B" in report and "ComfyUI" not in report  # --quick measures no ComfyUI load


def test_the_choice_may_not_use_the_held_out_seeds(tmp_path):
    with pytest.raises(SystemExit):
        bench.main(["--quick", "--choice-seeds", "0,1000", "--teacher", str(tmp_path / "missing.safetensors")])


def test_a_bad_energy_stops_the_bench_before_any_model_is_read(tmp_path):
    with pytest.raises(SystemExit, match=r"energy must be a share in \(0, 1\]"):
        bench.main(["--quick", "--energies", "0.9,1.5", "--teacher", str(tmp_path / "missing.safetensors")])


def test_choose_takes_the_smallest_file_within_tolerance_and_never_whole_deltas(tmp_path):
    def result(setting, size, half_width):
        path = tmp_path / f"{setting.label}.bin"
        path.write_bytes(b"x" * size)
        iv = Interval(0.0, -half_width, half_width, 10, 5)
        return bench.Result(setting, path, "", iv, iv)

    results = [result(bench.Setting(rank=8), 300, 0.01), result(bench.Setting(rank=64), 500, 0.001),
               result(bench.Setting(energy=0.98), 400, 0.004), result(bench.Setting(energy=0.9), 200, 0.02),
               result(bench.Setting(), 100, 0.0)]
    assert bench.choose(results).setting == bench.Setting(energy=0.98)
    assert bench.choose(results, fixed_rank=True).setting == bench.Setting(rank=64)
    assert bench.choose(results[:1]) is None
