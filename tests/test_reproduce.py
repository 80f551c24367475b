"""`python -m research.reproduce --quick` on the committed toy teacher: every section of the report, well-formed
tables, finite numbers, and each distinct stage run trained once however many tables use it."""
from __future__ import annotations

import json
import os
import re
from pathlib import Path

from research.report import all_finite
from research.reproduce import BETA1S, BETA2S, SECTIONS
from research.run_cache import stage_key
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


def markdown_tables(text: str) -> list[list[str]]:
    tables, current = [], []
    for line in text.splitlines() + [""]:
        if line.startswith("|"):
            current.append(line)
        elif current:
            tables.append(current)
            current = []
    return tables


def test_quick_report(tmp_path):
    from research import reproduce

    out, cache = tmp_path / "report", tmp_path / "cache"
    reproduce.main(["--quick", "--out", str(out), "--cache", str(cache)])
    text = (out / "REPORT.md").read_text()
    assert [line[3:] for line in text.splitlines() if line.startswith("## ")] == [
        "Table 2: methods on the same prompts", "Fig. 4: Stage I importance per block of the toy teacher",
        "Table 6: with and without Stage III at 30 / 50 / 70 % pruning", "Fig. 1: sampling steps x kept parameters",
        "Table 4: distill weight alpha (Stage II)",
        "Table 9: weak (pruned) vs strong (unpruned) teacher as real and fake score",
        "Table 5: inter CFG beta1 and intra CFG beta2 (Stage III)", "Automatic beta selection"]
    assert "pending" not in text and not re.search(r"\bnan\b|\binf\b", text)
    for table in markdown_tables(text):  # every row has as many cells as its header
        assert len({line.count("|") for line in table}) == 1, table[0]
    numbers = json.loads((out / "results.json").read_text())
    assert set(numbers) == set(SECTIONS) and all_finite(numbers)
    # Table 5: the beta1 sweep (the paper's values plus the recipe's) at the recipe's beta2, and the beta2
    # sweep at the recipe's beta1; the recipe's own student is one row of both
    recipe = load_config(TOY).stage3
    beta_grid = {(b1, recipe.beta2) for b1 in (*BETA1S, recipe.beta1)} | {(recipe.beta1, b2) for b2 in BETA2S}
    assert len(numbers["Table 2"]) == 5 and len(numbers["Table 6"]) == 6
    assert len(numbers["Table 5"]) == len(beta_grid)
    assert all(0 <= row["overall"] <= 1 and row["seconds_per_video"] > 0 for row in numbers["Table 2"].values())
    # a shape (blocks, steps, CFG) is timed once per report: every table shows the same time for it
    def seconds(table, row):
        return numbers[table][row]["seconds_per_video"]
    recipe_row = f"beta1 {recipe.beta1} beta2 {recipe.beta2}"
    assert seconds("Table 5", recipe_row) == seconds("Table 2", "FastLightGen (Stage I-III)")
    assert seconds("Table 6", "no-stage3 pruning 30%") == seconds("Table 2", "Size only: Stage II pruned path")
    size_only = seconds("Table 2", "Size only: Stage II pruned path")
    assert seconds("Table 2", "Stage I prune only, no training") == size_only
    # FLOPs count the blocks' work: the teacher/student ratio lies between the ratio of network evaluations
    # and that ratio times the ratio of blocks (the embeddings, head and codec run whatever the blocks)
    teacher, fast = numbers["Table 2"]["Euler with CFG (teacher)"], numbers["Table 2"]["FastLightGen (Stage I-III)"]
    nfe_ratio = teacher["nfe"] / fast["nfe"]
    assert nfe_ratio < teacher["gflops_per_video"] / fast["gflops_per_video"] < \
        nfe_ratio * teacher["blocks"] / fast["blocks"]
    for name in ("fig1_steps_params.png", "fig4_importance.png"):
        assert (out / name).stat().st_size > 1000
    assert len(list((out / "samples").glob("*.mp4"))) == 4
    # 3 Stage I (keep 0.7 / 0.5 / 0.3; keeping every block needs no scoring), 5 Stage II (3 keep ratios,
    # 2 more alphas), Stage III: the beta grid plus 6 (2 keep ratios, 2 alphas, the unpruned teacher, DMD on
    # all blocks); each trained once although Tables 2, 4, 5, 6, 9 and Fig. 1 share them
    stage3_runs = len(beta_grid) + 6
    assert f"trained {3 + 5 + stage3_runs} stage runs" in text
    assert f"its {5 + stage3_runs} Stage II and III runs took" in text
    assert sum(1 for d in (cache / "quick").iterdir() if d.name.startswith("stage3-")) == stage3_runs
