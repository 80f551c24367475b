"""Prune plans refuse non-finite numbers, write strict JSON, and never keep a block the model already dropped."""
import json

import pytest
import torch
from tiny_models import tiny_wan, wan_inputs

from fastlightgen.adapters import ModelFingerprint, adapt
from fastlightgen.importance import block_importance
from fastlightgen.plan import PrunePlan, count_kept

FP = ModelFingerprint("wan", 6, 64)
NAN, INF = float("nan"), float("inf")


def test_a_nan_score_is_refused_instead_of_ranking_anywhere():
    # sorted() with a NaN leaves the order to chance: block 0 (the lowest here) used to be kept
    with pytest.raises(ValueError, match=r"scores must be finite, but entries \[1\] are \[nan\]; Stage I produced NaN"):
        PrunePlan.from_scores(FP, [0.1, NAN, 0.5, 0.6, 0.7, 0.8], keep_ratio=0.5)
    with pytest.raises(ValueError, match=r"reference_error must be finite, but entries \[0\] are \[inf\]"):
        PrunePlan(FP, [0, 1], scores=[1.0] * 6, reference_error=INF)
    with pytest.raises(ValueError, match="keep_ratio must be finite"):
        PrunePlan(FP, [0, 1], keep_ratio=NAN)
    with pytest.raises(ValueError, match=r"keep_ratio must be in \(0, 1\], got nan"):
        count_kept(6, keep_ratio=NAN)


def test_plan_json_is_strict_and_nan_in_a_file_is_refused(tmp_path):
    plan = PrunePlan.from_scores(FP, [0.1, 0.2, 0.5, 0.6, 0.7, 0.8], keep_ratio=0.5, reference_error=0.05)
    text = plan.to_json()
    assert "NaN" not in text and PrunePlan.from_json(text) == plan
    plan.scores[2] = NAN  # mutated after the checks: writing still refuses bare NaN
    with pytest.raises(ValueError, match="Out of range float values are not JSON compliant"):
        plan.save(tmp_path / "plan.json")
    assert not list(tmp_path.iterdir())  # no partial file
    bad = json.loads(text)
    bad["scores"][2] = NAN
    (tmp_path / "nan.json").write_text(json.dumps(bad))  # bare NaN, as earlier versions wrote it
    with pytest.raises(ValueError, match=r"entries \[2\] are \[nan\]"):
        PrunePlan.load(tmp_path / "nan.json")


def test_already_dropped_blocks_are_never_kept_and_travel_in_the_json():
    scores = [0.9, 0.8, 0.1, 0.7, 0.6, 0.5]
    plan = PrunePlan.from_scores(FP, scores, keep_ratio=0.5, already_dropped=[0, 1])  # half of the 4 it still runs
    assert plan.kept == [3, 4] and plan.already_dropped == [0, 1] and plan.dropped == [0, 1, 2, 5]
    assert PrunePlan.from_json(plan.to_json()) == plan
    legacy = json.loads(plan.to_json())
    del legacy["already_dropped"]  # plans written before the field existed
    assert PrunePlan.from_dict(legacy).already_dropped == []
    with pytest.raises(ValueError, match=r"keeps blocks \[0\] that its model had already dropped"):
        PrunePlan(FP, [0, 3], already_dropped=[0])
    with pytest.raises(ValueError, match=r"protected blocks \[1\] are already dropped"):
        PrunePlan.from_scores(FP, scores, keep_ratio=0.5, protected=[1], already_dropped=[0, 1])


def test_library_stage1_stops_at_the_first_non_finite_error():
    model = tiny_wan("ti2v", layers=3)
    with torch.no_grad():
        model.proj_out.bias.fill_(NAN)
    x, cond = wan_inputs(model, batch=1)
    for prefix_reuse in (True, False):
        with pytest.raises(ValueError, match=r"Stage I: the x0 error \(the full model\) is nan at sigma 0.5.*wider "
                                             "dtype"):
            block_importance(adapt(model), [(x, cond)], [0.5], prefix_reuse=prefix_reuse)
