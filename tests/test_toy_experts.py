"""research.experts (issue #41's two-expert toy world) on tiny settings, no training and no sampling: the arms'
equal budget, the cache that runs each stage once, the comparison table's verdicts; and the toy teacher's expert
setting (train.toy_teacher), which draws training sigmas on one expert's part of the schedule only."""
from __future__ import annotations

from pathlib import Path

import pytest

from fastlightgen.experts import EXPERTS
from fastlightgen.toy.evaluate import COLUMNS, EvalTable
from research import experts
from research.draws import Scored
from research.stats import EQUIVALENCE_MARGIN
from train.config import ConfigError, load_config
from train.models.record import RUN_FILE
from train.toy_teacher import training_range

REPO = Path(__file__).resolve().parents[1]
TEACHER = REPO / "models" / "fastlightgen" / "toy_teacher.safetensors"


def test_the_arms_cost_the_same_training():
    budget = experts.Budget(stage2=7, stage3=3)
    two = load_config(str(REPO / experts.CONFIG), budget.two_experts())
    one = load_config(str(REPO / experts.CONFIG), budget.one_expert())
    assert one.stage2.iterations == 2 * two.stage2.iterations  # one Stage II run per expert
    assert one.stage3.iterations == two.stage3.iterations
    assert (two.model.boundary, two.model.teacher_2) == (experts.BOUNDARY, str(experts.EXPERT_TEACHERS["low"]))


def test_two_expert_arm_runs_each_stage_once_in_one_keyed_folder(tmp_path, monkeypatch):
    """Every stage of the arm runs when its output is absent, in order, and is reused once it exists."""
    calls = []

    def fake(stage, outputs):
        def run(cfg, resume=False):
            calls.append((stage, cfg.stage2.expert if stage == "stage2" else ""))
            for out in outputs(cfg):
                out.parent.mkdir(parents=True, exist_ok=True)
                out.write_text("{}")
        return run

    folder = lambda cfg: Path(cfg.run.run_dir)  # noqa: E731
    monkeypatch.setattr(experts.stage1, "run", fake("stage1", lambda cfg: [folder(cfg) / "stage1" / "plan.json"]))
    monkeypatch.setattr(experts.stage2, "run", fake("stage2", lambda cfg: [cfg.stage_dir("stage2") / RUN_FILE]))
    monkeypatch.setattr(experts.stage3, "run",
                        fake("stage3", lambda cfg: [folder(cfg) / "stage3" / e / RUN_FILE for e in EXPERTS]))
    monkeypatch.setattr(experts.export, "run",
                        fake("export", lambda cfg: [experts.export.expert_out(folder(cfg) / "student.safetensors", e)
                                                    for e in EXPERTS]))
    settings = [f"model.teacher={TEACHER}", f"model.teacher_2={TEACHER}", "model.boundary=0.875"]
    outs = experts.two_expert_students(tmp_path, settings, str(REPO / experts.CONFIG)).students
    assert calls == [("stage1", ""), ("stage2", "high"), ("stage2", "low"), ("stage3", ""), ("export", "")]
    assert set(outs) == set(EXPERTS) and all(p.is_file() for p in outs.values())
    assert outs["high"].parent.name.startswith("stage3-") and outs["high"].parent.parent.name.startswith("two_experts-")
    experts.two_expert_students(tmp_path, settings, str(REPO / experts.CONFIG))
    assert len(calls) == 5  # all cached
    experts.two_expert_students(tmp_path, [*settings, "stage3.iterations=5"], str(REPO / experts.CONFIG))
    assert calls[5:] == [("stage3", ""), ("export", "")]  # another Stage III budget reuses Stages I and II
    experts.two_expert_students(tmp_path, [*settings, "stage2.iterations=5"], str(REPO / experts.CONFIG))
    assert len(calls) == 12  # another Stage II budget: another folder


def test_logged_steps_reads_a_log_of_every_nth_step(tmp_path):
    (tmp_path / "metrics.jsonl").write_text('{"step": 10, "s_per_step": 2.0}\n{"step": 20, "s_per_step": 4.0}\n')
    assert experts.logged_steps(tmp_path) == (20, 1.0)


def scored(values: list[float]) -> Scored:
    rows = [{c: v for c in COLUMNS} for v in values]
    n = len(values)
    noise = [i % len(experts.NOISE_SEEDS) for i in range(n)]
    return Scored(EvalTable([str(i) for i in range(n)], rows), [0] * n, noise, [i % 4 for i in range(n)])


def test_comparison_table_gives_verdicts_only_in_an_evidence_mode():
    base = [0.5 + 0.01 * (i % 5) for i in range(40)]
    tables = {"teacher2": scored(base), "teacher1": scored(base), "student1": scored([v - 0.2 for v in base]),
              "student2": scored([v + 0.002 * (-1) ** i for i, v in enumerate(base)])}
    names = {k: k for k in tables}
    rows = experts.comparison_table(tables, names, evidence=True, mode="T2V").splitlines()
    assert f"±{EQUIVALENCE_MARGIN}" in rows[0]
    assert rows[2].startswith("| the two-expert student against its teacher") and rows[2].endswith("| matches |")
    assert "| 40 |" in rows[2] and rows[3].endswith("| better |")  # two experts - one expert: +0.2
    blind = experts.comparison_table(tables, names, evidence=False, mode="TI2V")
    assert "none (TI2V is not evidence; matches if it were)" in blind


def test_digest_of_a_pair_is_its_own_and_ordered(tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    a.write_bytes(b"a")
    b.write_bytes(b"b")
    assert len({experts.digest_of(a), experts.digest_of(a, b), experts.digest_of(b, a)}) == 3


def test_toy_teacher_expert_trains_on_its_part_of_the_schedule():
    expert = ["toy_teacher.expert=low", "toy_teacher.boundary=0.875", f"toy_teacher.init={TEACHER}"]
    assert training_range(load_config(str(REPO / "configs/toy_teacher_expert.yaml"))) == (0.875, 1.0)
    assert training_range(load_config(str(REPO / "configs/toy_teacher.yaml"), expert)) == (0.0, 0.875)
    assert training_range(load_config(str(REPO / "configs/toy_teacher.yaml"))) == (0.0, 1.0)
    with pytest.raises(ConfigError, match="toy_teacher.expert and toy_teacher.boundary go together"):
        load_config(str(REPO / "configs/toy_teacher.yaml"), ["toy_teacher.expert=high"]).validate()
    with pytest.raises(ConfigError, match="set toy_teacher.init"):
        load_config(str(REPO / "configs/toy_teacher.yaml"), expert[:2]).validate()
