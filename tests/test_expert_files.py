"""fastlightgen.expert_files: which file of a two-expert pair is which expert, and the pair's boundary and schedule."""
from __future__ import annotations

import pytest

from fastlightgen.checkpoint import CheckpointMeta
from fastlightgen.expert_files import ExpertTag, meta_tag, named_expert, pair_boundary, pair_sampling
from fastlightgen.experts import AUTO_BOUNDARY, requested_boundary
from fastlightgen.sampling import FEW_STEP, Sampling


def _meta(expert: str, boundary: float = 0.875, recommended: Sampling = FEW_STEP) -> CheckpointMeta:
    return CheckpointMeta(4, [0, 1, 3], recommended=recommended, expert=expert, boundary=boundary)


def test_the_expert_comes_from_the_metadata_else_from_comfyuis_file_names():
    assert named_expert("wan2.2_t2v_high_noise_14B_fp8_scaled.safetensors") == "high"
    assert named_expert("sub/Wan2.2-I2V-A14B-LOW-NOISE.safetensors") == "low"
    assert named_expert("wan2.2_ti2v_5B_fp16.safetensors") is None
    assert named_expert("high_noise_to_low_noise_merge.safetensors") is None  # names both: says nothing
    assert meta_tag(_meta("low", 0.9), "student_high_noise.safetensors") == ExpertTag("low", 0.9,
                                                                                    "student_high_noise.safetensors")
    assert meta_tag(CheckpointMeta(4, [0, 1]), "x_high_noise.safetensors") == ExpertTag("high", None,
                                                                                       "x_high_noise.safetensors")
    assert meta_tag(None, "toy_student.safetensors") is None


def test_the_boundary_is_the_metadatas_else_the_fallback():
    high, low = ExpertTag("high", 0.9, "h"), ExpertTag("low", 0.9, "l")
    assert pair_boundary(high, low, 0.5) == 0.9
    assert pair_boundary(ExpertTag("high", None, "h"), low, 0.5) == 0.9
    assert pair_boundary(ExpertTag("high", None, "h"), ExpertTag("low", None, "l"), 0.5) == 0.5
    assert pair_boundary(None, None, 0.875) == 0.875
    with pytest.raises(ValueError, match="boundary must be a sigma in"):
        pair_boundary(None, None, 1.5)


def test_files_without_a_boundary_take_the_one_of_their_kind_unless_a_node_asks_for_another():
    assert requested_boundary(AUTO_BOUNDARY, 36, 16) == 0.9  # I2V-A14B: the latent, a mask and the start image
    assert requested_boundary(AUTO_BOUNDARY, 16, 16) == 0.875  # T2V-A14B: the latent alone
    assert requested_boundary(0.95, 36, 16) == 0.95
    for asked in (1.0, -0.1, 1.5):
        with pytest.raises(ValueError, match="set 0 to take it from the files or the model"):
            requested_boundary(asked, 16, 16)
    with pytest.raises(ValueError, match="neither T2V/TI2V .* nor I2V"):
        requested_boundary(AUTO_BOUNDARY, 20, 16)
    untagged = (ExpertTag("high", None, "h"), ExpertTag("low", None, "l"))
    assert pair_boundary(*untagged, requested_boundary(AUTO_BOUNDARY, 36, 16)) == 0.9
    assert pair_boundary(ExpertTag("high", 0.95, "h"), None, requested_boundary(AUTO_BOUNDARY, 36, 16)) == 0.95


@pytest.mark.parametrize("high, low, message", [
    (ExpertTag("high", 0.875, "a"), ExpertTag("high", 0.875, "b"),
     "both a and b are the high-noise expert; connect the low-noise expert's file to the low-noise input"),
    (ExpertTag("low", None, "a"), ExpertTag("low", None, "b"), "are the low-noise expert; connect the high-noise"),
    (ExpertTag("low", 0.875, "a"), ExpertTag("high", 0.875, "b"), "the experts are swapped: a and b"),
    (ExpertTag("low", 0.875, "a"), None, "the experts are swapped: a went"),
    (None, ExpertTag("high", None, "b"), "the experts are swapped: b went"),
    (ExpertTag("high", 0.875, "a"), ExpertTag("low", 0.9, "b"), "a names the boundary 0.875 but b names 0.9"),
])
def test_bad_pairs_name_the_fix(high, low, message):
    with pytest.raises(ValueError, match=message):
        pair_boundary(high, low, 0.875)


def test_the_pairs_schedule_is_the_one_both_recommend():
    two_step = Sampling.few_step((1000, 500))
    assert pair_sampling(_meta("high", recommended=two_step), _meta("low", recommended=two_step), ("h", "l")) == \
        two_step
    assert pair_sampling(None, _meta("low", recommended=two_step), ("h", "l")) == two_step
    assert pair_sampling(None, None, ("h", "l")) == FEW_STEP
    with pytest.raises(ValueError, match="h recommends .* but l .*: the experts come from different exports"):
        pair_sampling(_meta("high"), _meta("low", recommended=two_step), ("h", "l"))
