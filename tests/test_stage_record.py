"""StageRecord: the typed hand-off of a finished Stage II or III run (train/models/record.py)."""
from __future__ import annotations

import json

import pytest

from fastlightgen.adapters.base import ModelFingerprint
from fastlightgen.plan import PrunePlan
from fastlightgen.sampling import Sampling
from train.models.record import RUN_FILE, StageRecord

PLAN = PrunePlan.from_blocks(ModelFingerprint("wan", 4, 32), [1, 2])


def record(**changes) -> StageRecord:
    fields = dict(stage="stage3", plan=PLAN, plan_path="runs/x/stage1/plan.json", steps=7,
                  sampling=Sampling.few_step([1000, 500], 3.0), data={"source": "toy"}, config={"run": {"seed": 0}},
                  alpha=0.5, betas=(2.0, 0.25), student_config={"num_layers": 2})
    return StageRecord(**{**fields, **changes})


def test_a_record_round_trips_through_its_file(tmp_path):
    original = record()
    original.save(tmp_path)
    assert StageRecord.load(tmp_path) == original
    stage2 = record(stage="stage2", sampling=Sampling(), betas=None, student_config=None)
    stage2.save(tmp_path)
    assert StageRecord.load(tmp_path) == stage2
    assert stage2.provenance()["trainer"] == "train.stage2" and stage2.provenance()["betas"] == [None, None]


def test_an_unknown_version_is_refused_naming_both(tmp_path):
    data = record().to_dict()
    (tmp_path / RUN_FILE).write_text(json.dumps({**data, "version": 2}))
    with pytest.raises(ValueError, match="version 2; this code reads version 1"):
        StageRecord.load(tmp_path)


def test_a_record_written_before_versions_reads_as_version_1(tmp_path):
    """The flat keys Stage II and III wrote until the record existed (a finished run must still export)."""
    flat = {"stage": "stage3", "plan": PLAN.to_dict(), "plan_path": "p", "steps": 7, "alpha": 0.5, "beta1": 2.0,
            "beta2": 0.25, "plan_teacher": "pruned", "denoising_step_list": [1000, 500], "shift": 3.0,
            "student_config": {"num_layers": 2}, "data": {"source": "toy"}, "config": {"run": {"seed": 0}}}
    (tmp_path / RUN_FILE).write_text(json.dumps(flat))
    assert StageRecord.load(tmp_path) == record(plan_path="p")


def test_a_missing_record_and_a_wrong_stage_are_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="that stage has not finished"):
        StageRecord.load(tmp_path)
    with pytest.raises(ValueError, match="stage2 or stage3"):
        record(stage="stage1")
    with pytest.raises(ValueError, match="student's config"):
        record(student_config=None)
