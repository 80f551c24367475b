"""`python -m research.reproduce --quick` on the committed toy teacher: every section of the report, well-formed
tables, finite numbers, an interval with its verdict in every comparison, and each distinct stage run trained
once however many tables use it; and two models' videos pair up one for one."""
from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from fastlightgen.toy.prompts import split_prompts
from research.demo import MODES
from research.report import PRIMARY, CostClass, Costs, Measured, all_finite, paired_samples, sample
from research.reproduce import BETA1S, BETA2S, QUICK, SECTIONS, UNTRAINED, Reproduction
from research.run_cache import stage_key
from research.sanity import copied_first_frame, ground_truth
from train.config import load_config

TOY = str(Path(__file__).resolve().parents[1] / "configs" / "toy.yaml")


def test_variants_share_upstream_runs():
    base = load_config(TOY)
    beta = load_config(TOY, ["stage3.beta2=0.5"])
    alpha = load_config(TOY, ["stage2.alpha=1.0"])
    assert stage_key(base, "stage1") == stage_key(beta, "stage1") == stage_key(alpha, "stage1")
    assert stage_key(base, "stage2") == stage_key(beta, "stage2") != stage_key(alpha, "stage2")
    assert stage_key(base, "stage3") != stage_key(beta, "stage3")


def test_retrained_teacher_at_the_same_path_gets_new_runs(tmp_path):
    teacher = tmp_path / "teacher.safetensors"
    teacher.write_bytes(b"old weights")
    cfg = load_config(TOY, [f"model.teacher={teacher}"])
    before = stage_key(cfg, "stage1")
    assert stage_key(cfg, "stage1") == before
    teacher.write_bytes(b"new weights")
    os.utime(teacher, ns=(0, 12345))  # a distinct mtime even on a coarse clock
    assert stage_key(cfg, "stage1") != before


def answering(answer):
    """A stand-in model: the sanity table's known answer for each prompt."""
    return lambda batch, seed: torch.stack([answer(f, torch.Generator().manual_seed(seed)) for f in batch.factors])


def test_a_section_run_alone_times_its_models_beside_the_teacher():
    """A run of some sections (here without Table 2) times its first section's models in alternating rounds
    with the teacher, not before it."""
    calls = []
    def row(name: str, blocks: int) -> Measured:
        return Measured(name, samples=None, params=1.0, cost_class=CostClass(blocks, 4, 4),
                        timer=lambda: calls.append(name))
    rounds = 3
    run = SimpleNamespace(costs=Costs(rounds, round_seconds=0.0), teacher_measured=row("teacher", 12))
    [student] = Reproduction.costed(run, [row("student", 8)])
    assert student.label == "student" and student.cost is not None
    assert calls[:2 * (1 + rounds)] == ["teacher", "student"] * (1 + rounds)  # warm-up, then alternating rounds
    assert CostClass(12, 4, 4) in run.costs.known


def test_two_models_pair_video_for_video():
    prompts = [split_prompts("heldout", 1, 0, 2, t2v=mode == "T2V") for mode in MODES]
    truth = sample(answering(ground_truth), prompts, (0, 1))
    copied = sample(answering(copied_first_frame), prompts, (0, 1))
    # the same videos in the same order: mode, then seed, then prompt
    assert truth.keys == copied.keys == tuple((m, s, i) for m in MODES for s in (0, 1) for i in range(2))
    assert truth.clusters == copied.clusters
    assert truth.clusters[:2] == tuple(("TI2V", f.combination) for f in prompts[0].factors)
    assert truth.table.labels == copied.table.labels and len(truth.table.rows) == 8
    assert [label.split(": ", 1)[1] for label in truth.table.labels[-2:]] == prompts[1].captions
    assert truth.subset("T2V", 1).rows == truth.table.rows[-2:]
    interval = paired_samples(truth, copied)
    assert (interval.n, interval.clusters) == (8, 4)  # clusters: (mode, combination)
    assert interval.mean == pytest.approx(truth.mean() - copied.mean())
    assert "better" in interval.verdict()  # a - b: the ground truth above a frozen first frame
    with pytest.raises(ValueError, match="same videos"):  # other seeds, or another order, do not pair
        paired_samples(truth, sample(answering(ground_truth), prompts, (1, 0)))
    with pytest.raises(ValueError, match="same videos"):
        paired_samples(truth, sample(answering(ground_truth), prompts[::-1], (0, 1)))


INTERVAL = r"[+-]\d+\.\d{4} \[[+-]\d+\.\d{4}, [+-]\d+\.\d{4}\]"
VERDICT = r"(?:,|:| \|) (?:matches|better|worse|inconclusive)"


def model_rows(section: dict) -> dict[str, dict]:
    return {name: row for name, row in section.items() if isinstance(row, dict) and "seconds_per_video" in row}


def markdown_tables(text: str) -> list[list[str]]:
    tables, current = [], []
    for line in text.splitlines() + [""]:
        if line.startswith("|"):
            current.append(line)
        elif current:
            tables.append(current)
            current = []
    return tables


@pytest.fixture(scope="module")
def quick_report(tmp_path_factory) -> tuple[Path, Path]:
    """The whole quick report (its folder, its cache), run once for the tests below."""
    from research import reproduce

    out, cache = tmp_path_factory.mktemp("quick") / "report", tmp_path_factory.mktemp("quick") / "cache"
    reproduce.main(["--quick", "--out", str(out), "--cache", str(cache)])
    return out, cache


def test_quick_report(quick_report):
    out, cache = quick_report
    text = (out / "REPORT.md").read_text()
    assert [line[3:] for line in text.splitlines() if line.startswith("## ")] == [
        "Sanity: the scorer's ranking of known answers",
        "Table 2: methods on the same prompts", "Fig. 4: Stage I importance per block of the toy teacher",
        "Table 6: with and without Stage III at 30 / 50 / 70 % pruning", "Fig. 1: sampling steps x kept parameters",
        "Table 4: distill weight alpha (Stage II)",
        "Table 9: weak (pruned) vs strong (unpruned) teacher as real and fake score",
        "Table 5: inter CFG beta1 and intra CFG beta2 (Stage III)", "Automatic beta selection"]
    assert "pending" not in text and not re.search(r"\bnan\b|\binf\b", text)
    # every section names its run; those reading Stage II and III runs, the lengths they trained with (not the
    # config's)
    assert text.count("*This section: Stage II 2 steps, Stage III 1 (run of ") == len(SECTIONS) - len(UNTRAINED)
    assert text.count("*This section: run of ") == len(UNTRAINED)
    assert "The last run (every section) took" in text
    for table in markdown_tables(text):  # every row has as many cells as its header
        assert len({line.count("|") for line in table}) == 1, table[0]
    numbers = json.loads((out / "results.json").read_text())
    assert set(numbers) == set(SECTIONS) and all_finite(numbers)
    # the sanity tables of both modes, on the teacher's videos of every seed, its least favorable seed alone too
    assert text.count("**Sanity table, ") == 2 == text.count("at its least favorable seed (")
    assert set(numbers["Sanity"]) == set(MODES)
    # every comparison is an interval followed by its verdict, and every claim section makes some
    assert len(re.findall(INTERVAL, text)) == len(re.findall(INTERVAL + VERDICT, text)) > 0
    sections = {line[3:].split(":")[0]: body for line, body in
                zip(re.findall(r"^## .*$", text, re.M), re.split(r"^## .*$", text, flags=re.M)[1:])}
    for name in ("Table 2", "Table 6", "Table 4", "Table 9", "Table 5", "Automatic beta selection"):
        assert re.search(INTERVAL + VERDICT, sections[name]), name
    # every model: the same number of videos (2 modes x seeds x prompts), and its interval against the teacher
    videos = len(MODES) * len(QUICK.seeds) * QUICK.combinations * QUICK.renders
    teacher_label = "Euler with CFG (teacher)"
    for section in ("Table 2", "Table 6", "Table 4", "Table 9", "Table 5"):
        for name, row in model_rows(numbers[section]).items():
            assert row["videos"] == videos and 0 <= row[PRIMARY] <= 1, (section, name)
            against = row.get(f"{PRIMARY}_minus_reference")
            if name == teacher_label:
                assert against is None
            else:
                assert against["low"] <= against["mean"] <= against["high"], (section, name)
                assert against["verdict"] in ("matches", "better", "worse", "matches, better", "matches, worse",
                                              "inconclusive")
    # Table 5: the beta1 sweep (the paper's values plus the recipe's) at the recipe's beta2, and the beta2
    # sweep at the recipe's beta1; the recipe's own student is one row of both
    recipe = load_config(TOY).stage3
    beta_grid = {(b1, recipe.beta2) for b1 in (*BETA1S, recipe.beta1)} | {(recipe.beta1, b2) for b2 in BETA2S}
    assert len(model_rows(numbers["Table 2"])) == 6 and len(model_rows(numbers["Table 6"])) == 6
    assert len(model_rows(numbers["Table 4"])) == 5  # alpha 0, 0.5, 1 and alpha 1 with a frozen and an EMA target
    assert len(model_rows(numbers["Table 5"])) == len(beta_grid)
    assert all(0 <= row["overall"] <= 1 and row["seconds_per_video"] > 0
               for row in model_rows(numbers["Table 2"]).values())
    # a shape (blocks, steps, CFG) is timed once per report: every table shows the same time for it
    def seconds(table, row):
        return numbers[table][row]["seconds_per_video"]
    recipe_row = f"beta1 {recipe.beta1} beta2 {recipe.beta2}"
    assert seconds("Table 5", recipe_row) == seconds("Table 2", "FastLightGen (Stage I-III)")
    assert seconds("Table 6", "no-stage3 pruning 30%") == seconds("Table 2", "Size only: Stage II pruned path")
    size_only = seconds("Table 2", "Size only: Stage II pruned path")
    assert seconds("Table 2", "Stage I prune only, no training") == size_only
    # the 50 %-pruned student of Table 2 is Table 6's run (cached, measured once)
    assert numbers["Table 2"]["FastLightGen 50 % pruned"] == numbers["Table 6"]["yes-stage3 pruning 50%"]
    # FLOPs count the blocks' work: the teacher/student ratio lies between the ratio of network evaluations
    # and that ratio times the ratio of blocks (the embeddings, head and codec run whatever the blocks)
    teacher, fast = numbers["Table 2"]["Euler with CFG (teacher)"], numbers["Table 2"]["FastLightGen (Stage I-III)"]
    nfe_ratio = teacher["nfe"] / fast["nfe"]
    assert nfe_ratio < teacher["gflops_per_video"] / fast["gflops_per_video"] < \
        nfe_ratio * teacher["blocks"] / fast["blocks"]
    for name in ("fig1_steps_params.png", "fig4_importance.png"):
        assert (out / name).stat().st_size > 1000
    # the teacher's and FastLightGen's first two videos of each mode
    assert len(list((out / "samples").glob("*.mp4"))) == 2 * len(MODES) * 2
    # 3 Stage I (keep 0.7 / 0.5 / 0.3; keeping every block needs no scoring), 7 Stage II (3 keep ratios,
    # 2 more alphas, alpha 1 with 2 stable targets), Stage III: the beta grid plus 8 (2 keep ratios, 2 alphas,
    # 2 stable targets, the unpruned teacher, DMD on all blocks); each trained once although Tables 2, 4, 5, 6,
    # 9 and Fig. 1 share them
    stage3_runs = len(beta_grid) + 8
    assert f"trained {3 + 7 + stage3_runs} stage runs" in text
    assert f"its {7 + stage3_runs} Stage II and III runs took" in text
    assert sum(1 for d in (cache / "quick").iterdir() if d.name.startswith("stage3-")) == stage3_runs


def test_some_sections_rerun_and_the_rest_kept(quick_report, tmp_path):
    """`--sections` reruns the sections it names and keeps every other section of the report in --out as it was."""
    from research import reproduce

    out, cache = tmp_path / "report", quick_report[1]
    with pytest.raises(SystemExit, match="unknown.*Table 7"):
        reproduce.main(["--quick", "--out", str(out), "--sections", "Table 2,Table 7"])
    with pytest.raises(SystemExit, match="without --sections"):  # nothing to keep yet
        reproduce.main(["--quick", "--out", str(out), "--sections", "Table 9"])
    assert not out.exists()
    shutil.copytree(quick_report[0], out)
    before, numbers = (out / "REPORT.md").read_text(), json.loads((out / "results.json").read_text())
    # the rerun section is marked by a value only its rerun can give: its numbers, poisoned beforehand
    numbers["Table 9"] = {"poisoned": 1.0}
    (out / "results.json").write_text(json.dumps(numbers))
    reproduce.main(["--quick", "--out", str(out), "--cache", str(cache), "--sections", "Table 9"])
    after, rerun = (out / "REPORT.md").read_text(), json.loads((out / "results.json").read_text())
    assert "The last run (Table 9) took" in after and "trained 0 stage runs" in after

    def body(text):  # the sections, without the header
        return dict(zip(SECTIONS, re.split(r"^(?=## )", text, flags=re.M)[1:]))
    assert {n: t for n, t in body(after).items() if n != "Table 9"} == \
        {n: t for n, t in body(before).items() if n != "Table 9"}
    assert "poisoned" not in rerun["Table 9"] and model_rows(rerun["Table 9"])
    assert {n: v for n, v in rerun.items() if n != "Table 9"} == {n: v for n, v in numbers.items() if n != "Table 9"}
