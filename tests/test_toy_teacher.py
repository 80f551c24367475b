"""The committed toy teacher and student: load through our loader and ComfyUI's stock one, sample, and clear
measured floors in TI2V and T2V."""
import pytest
import torch

from fastlightgen.checkpoint import read_checkpoint
from fastlightgen.sampling import FEW_STEP
from fastlightgen.toy.codec import to_comfy_latent
from fastlightgen.toy.evaluate import EvalTable, evaluate_batch
from fastlightgen.toy.generate import generate_few_step, generate_teacher
from fastlightgen.toy.prompts import Prompts, heldout_prompts
from fastlightgen.toy.teacher import TOY_TEACHER, conditioning
from research.demo import STUDENT, TEACHER, load_fp32
from research.sanity import SANITY_MARGIN, TI2V_NEAR_MISSES, ordering_holds, ranked_below_teacher, sanity_rows

# Floors below the committed models' scores on `floor_prompts` with the near-miss gates of issue #43 (measured, in
# the comments), a step of 0.25 below on a gate, about 0.1 below on `faithful`; none where the measurement is 0.
FLOORS = {"teacher": {"TI2V": {"gate_color": 0.75, "gate_shape": 0.75, "gate_direction": 0.75, "gate_speed": 0.75,
                               "faithful": 0.08, "overall": 0.85},
                      # measured 1.0, 1.0, 1.0, 1.0, 0.183, 0.915; gate_position 0.25
                      "T2V": {"gate_color": 0.75, "gate_shape": 0.75, "gate_direction": 0.5, "faithful": 0.03,
                              "overall": 0.75}},
                      # measured 1.0, 1.0, 0.75, 0.137, 0.849; gate_speed 0.25
          "student": {"TI2V": {"gate_color": 0.75, "gate_shape": 0.75, "gate_direction": 0.75, "gate_speed": 0.5,
                               "overall": 0.85},
                      # measured 1.0, 1.0, 1.0, 0.75, 0.912; gate_position and faithful 0: every frame-1 step is off
                      "T2V": {"gate_color": 0.5, "gate_shape": 0.75, "gate_direction": 0.5, "faithful": 0.03,
                              "overall": 0.7}}}
                      # measured 0.75, 1.0, 0.75, 0.135, 0.817; gate_speed 0.25


def test_teacher_file_and_metadata():
    ckpt = read_checkpoint(TEACHER)
    assert ckpt.meta.original_num_blocks == TOY_TEACHER.num_layers == ckpt.config["num_layers"]
    assert ckpt.config["in_channels"] == ckpt.config["out_channels"] == 48 and ckpt.config["text_dim"] == 4096
    assert ckpt.meta.provenance["trainer"] == "train.toy_teacher"
    # the recommended CFG is the best of the candidates scored on training prompts at export
    scores = ckpt.meta.provenance["cfg_selection"]
    assert ckpt.meta.recommended.cfg_scale == float(max(scores, key=scores.get)) > 1.0


def floor_prompts(t2v: bool) -> Prompts:
    """Four held-out prompts of one mode."""
    return Prompts(heldout_prompts(t2v=t2v).factors[::3], t2v)


def heldout_table(model: str, t2v: bool) -> EvalTable:
    """The committed model's scores on `floor_prompts`, noise seed 0."""
    adapter, meta = load_fp32(TEACHER if model == "teacher" else STUDENT)
    prompts = floor_prompts(t2v)
    generate = generate_teacher if model == "teacher" else generate_few_step
    videos = generate(adapter, prompts, seed=0, config=meta.recommended)
    return evaluate_batch(videos, list(prompts.factors), t2v=t2v)


def heldout_means(model: str, t2v: bool) -> dict[str, float]:
    return heldout_table(model, t2v).mean()


@pytest.mark.parametrize("model", ["teacher", "student"])
@pytest.mark.parametrize("t2v", [False, True], ids=["TI2V", "T2V"])
def test_committed_models_clear_their_floors_on_heldout_prompts(model, t2v):
    """Floors a little below the committed models' measured scores (FLOORS), per factor's gate and on `faithful`:
    a retrained model, or a change to sampling or scoring, that loses a factor fails here."""
    mean = heldout_means(model, t2v)
    floors = FLOORS[model]["T2V" if t2v else "TI2V"]
    assert all(mean[column] >= floor for column, floor in floors.items()), {c: round(mean[c], 3) for c in floors}


def test_committed_teacher_clears_every_wrong_answer_in_ti2v_but_the_whole_pixel_solver():
    """TI2V, the floor prompts: the teacher clears every wrong answer and near miss by SANITY_MARGIN except the
    caption-reading whole-pixel solver, which outscores it, so the ordering fails (TI2V is not evidence:
    reports/toy/table2_draws_2026-12-05.md)."""
    rows = sanity_rows(floor_prompts(False), heldout_table("teacher", False))
    means = {name: table.mean()["faithful"] for name, table in rows.items()}
    cleared = [name for name in ranked_below_teacher(rows) if name not in TI2V_NEAR_MISSES]
    assert all(means["teacher"] - means[name] >= SANITY_MARGIN for name in cleared), means
    assert not ordering_holds(rows) and all(means[name] > means["teacher"] for name in TI2V_NEAR_MISSES), means


def test_teacher_loads_and_samples_in_comfyui(comfy_in_process):
    import comfy.sample
    import comfy.sd
    import comfy.utils

    patcher = comfy.sd.load_diffusion_model_state_dict(comfy.utils.load_torch_file(str(TEACHER)))
    assert type(patcher.model).__name__ == "WAN22"  # detected as Wan 2.2 TI2V-5B
    assert len(patcher.model.diffusion_model.blocks) == TOY_TEACHER.num_layers
    prompts = Prompts(heldout_prompts().factors[:1])
    latent = to_comfy_latent(torch.zeros(1, *prompts.latent_shape()))
    text = conditioning(prompts.captions).text
    positive, negative = [[text, {}]], [[torch.zeros_like(text), {}]]
    noise = torch.randn(latent.shape, generator=torch.Generator().manual_seed(0))
    out = comfy.sample.sample(patcher, noise, 3, 5.0, "euler", "simple", positive, negative, latent, seed=0)
    assert out.shape == latent.shape and torch.isfinite(out).all()


def test_student_is_a_pruned_four_step_model():
    """The committed Stage III student: 8 of the teacher's 12 blocks and the few-step contract."""
    adapter, meta = load_fp32(STUDENT)
    assert adapter.num_blocks == len(meta.kept_blocks) == 8 and meta.original_num_blocks == TOY_TEACHER.num_layers
    assert meta.recommended == FEW_STEP
