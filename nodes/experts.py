"""Which expert of a two-expert model (Wan 2.2 A14B) a MODEL is, carried on the MODEL itself.

The pack's loaders attach a `fastlightgen.expert_files.ExpertTag` (the expert, the boundary, the file) to each
expert's ModelPatcher (clones keep it; Apply Student Adapter passes it on), so the nodes taking both experts
(FastLightGen Sampler, Block Importance (two experts)) check the wiring and take the boundary from the files, and
Block Importance scores one expert only on its part of the schedule, before any model pass. A MODEL from the
stock Load Diffusion Model carries no tag: there the boundary is the node's own input, by default the one of the
model's kind (`fastlightgen.experts.requested_boundary`: I2V-A14B's for an image-conditioned model, else T2V's).
"""
from __future__ import annotations

from comfy.model_patcher import ModelPatcher
from comfy_api.latest import io

from fastlightgen.expert_files import ExpertTag, pair_boundary
from fastlightgen.experts import AUTO_BOUNDARY, I2V_BOUNDARY, T2V_BOUNDARY, requested_boundary, sigma_range

from .validate import image_channels

TAG = "fastlightgen_expert"


def expert_tag(model: ModelPatcher) -> ExpertTag | None:
    return model.get_attachment(TAG)


def tag_expert(model: ModelPatcher, tag: ExpertTag | None) -> None:
    """Tag `model` (in place: call it on a fresh model or a clone)."""
    if tag is not None:
        model.set_attachments(TAG, tag)


def boundary_input(**options) -> io.Float.Input:
    """The boundary input of the nodes taking both experts. Its default, 0, is automatic: prompts saved with an
    explicit 0.875 or 0.9 keep it."""
    return io.Float.Input("boundary", default=AUTO_BOUNDARY, min=0.0, max=0.99, step=0.005, **options,
                          tooltip="The sigma where the low-noise expert takes over, used only when the experts' "
                                  "files name none (a student's metadata does; ComfyUI's A14B teacher files and "
                                  "Load Diffusion Model's MODELs do not). 0 (default): from the model, 0.9 for "
                                  "I2V-A14B (36 input channels), 0.875 for T2V-A14B; another value overrides it.")


def model_channels(model: ModelPatcher) -> tuple[int, int]:
    """(input, output) channels of a MODEL's DiT: the latent's, and an I2V model's start image beside it."""
    latent = model.get_model_object("latent_format").latent_channels
    return latent + image_channels(model), latent


def experts_boundary(node: str, high: ModelPatcher, low: ModelPatcher, boundary: float) -> float:
    """The boundary between the experts `high` and `low` as wired into `node`: the one their files name, else
    the node's `boundary` input (AUTO_BOUNDARY: the one of the model's kind); a wrongly wired pair is an error
    naming the fix."""
    try:
        return pair_boundary(expert_tag(high), expert_tag(low),
                             requested_boundary(boundary, *model_channels(high)))
    except ValueError as err:
        raise ValueError(f"{node}: {err}") from None


def check_not_a_lone_expert(node: str, model: ModelPatcher) -> None:
    """One expert alone runs the whole schedule wrongly: the other expert's input must be connected."""
    tag = expert_tag(model)
    if tag is not None:
        raise ValueError(f"{node}: {tag.source} is the {tag.expert}-noise expert of a two-expert model (Wan 2.2 "
                         "A14B); connect the high-noise expert to 'model' and the low-noise expert to "
                         "'model_low_noise' (Load FastLightGen Expert Pair loads both)")


def check_expert_range(node: str, model: ModelPatcher, scored: tuple[float, float]) -> None:
    """An expert scored outside its own part of the schedule measures blocks where it never runs: an error naming
    its range."""
    tag = expert_tag(model)
    if tag is None:
        return
    if tag.boundary is not None:
        low, high = sigma_range(tag.expert, tag.boundary)
    else:  # a file without metadata may be T2V-A14B's (0.875) or I2V-A14B's (0.9): the wider part of either
        low, high = (T2V_BOUNDARY, 1.0) if tag.expert == "high" else (0.0, I2V_BOUNDARY)
    if not low <= scored[0] < scored[1] <= high:
        raise ValueError(f"{node}: {tag.source} is the {tag.expert}-noise expert of a two-expert model, which runs "
                         f"on sigmas in [{low:g}, {high:g}] only, but sigma_min / sigma_max are {scored[0]:g} / "
                         f"{scored[1]:g}: set them to {low:g} / {high:g} (I2V-A14B: boundary 0.9), or score both "
                         "experts with Block Importance (two experts)")
