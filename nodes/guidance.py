"""Well-Guided Teacher (paper eq. 9) as a GUIDER, and a sweep over (beta1, beta2) to choose them.

    x0 = beta1 (xP(c) - xP(null)) + beta2 (xU(c) - xP(c)) + xP(null)

on x0 predictions: eq. 9's weights sum to 1, so mixing x0s equals mixing velocities. The pruned path xP
skips the plan's dropped blocks through a per-call block replacement on the same weights.
"""
from __future__ import annotations

import comfy.model_management
import comfy.sample
import comfy.samplers
import comfy.utils
import torch
from comfy.model_patcher import ModelPatcher
from comfy_api.latest import io

from fastlightgen.guidance import mix_velocities
from fastlightgen.plan import PrunePlan

from .dit import check_plan, skip_patches, with_block_patches
from .plan import parse_numbers
from .types import PrunePlanType
from .validate import check_conditioning, check_finite, check_finite_result, check_fits, check_latent

BETA_MAX = 30.0
TEACHER = "FastLightGen Well-Guided Teacher"
SWEEP = "FastLightGen Teacher Mix Sweep"


class WellGuidedGuider(comfy.samplers.CFGGuider):
    """Eq. 9 as a guider. It checks the latent the sampler hands it against the model before the first step
    and refuses to return a non-finite result, in any sampler (SamplerCustomAdvanced, the sweep)."""

    def __init__(self, model: ModelPatcher, plan: PrunePlan, beta1: float, beta2: float, node: str = TEACHER):
        super().__init__(model)
        check_finite(node, beta1=beta1, beta2=beta2)
        check_plan(model, plan)
        self.skip = skip_patches(model, plan.skip)
        self.beta1, self.beta2, self.node = beta1, beta2, node

    def sample(self, noise, latent_image, sampler, sigmas, denoise_mask=None, callback=None, disable_pbar=False,
               seed=None):
        check_fits(latent_image, self.node, self.model_patcher)
        if not torch.isfinite(sigmas).all():
            raise ValueError(f"{self.node}: the SIGMAS hold NaN or inf values: {sigmas.tolist()}")
        out = super().sample(noise, latent_image, sampler, sigmas, denoise_mask, callback, disable_pbar, seed)
        return check_finite_result(out, self.node)

    def predict_noise(self, x, timestep, model_options={}, seed=None):
        positive, negative = self.conds.get("positive"), self.conds.get("negative")
        pruned_options = with_block_patches(model_options, self.skip)
        x_pc, x_pn = comfy.samplers.calc_cond_batch(self.inner_model, [positive, negative], x, timestep,
                                                    pruned_options)
        if self.beta2 == 0.0:  # no pull toward the unpruned path: skip its forward
            x_uc = x_pc
        else:
            (x_uc,) = comfy.samplers.calc_cond_batch(self.inner_model, [positive], x, timestep, model_options)
        return mix_velocities(x_pc, x_pn, x_uc, self.beta1, self.beta2)


def beta_input(name: str, default: float, tooltip: str) -> io.Float.Input:
    return io.Float.Input(name, default=default, min=0.0, max=BETA_MAX, step=0.05, tooltip=tooltip)


def teacher_inputs() -> list:
    return [
        io.Model.Input("model", tooltip="The Stage II model: unpruned weights, the plan picks the pruned path."),
        PrunePlanType.Input("prune_plan", tooltip="Blocks the pruned path skips."),
        io.Conditioning.Input("positive", tooltip="The prompt."),
        io.Conditioning.Input("negative", tooltip="The null / negative prompt of the CFG term."),
    ]


class WellGuidedTeacher(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="FastLightGenWellGuidedTeacher",
            display_name="FastLightGen Well-Guided Teacher",
            category="FastLightGen",
            description="GUIDER for SamplerCustomAdvanced implementing eq. 9: CFG with scale beta1 on the pruned "
                        "path plus beta2 times the pull toward the unpruned path, with one set of weights. "
                        "beta2 = 0 is plain CFG on the pruned model.",
            inputs=[
                *teacher_inputs(),
                beta_input("beta1", 3.5, "Inter-CFG scale on the pruned path (paper: 3.5)."),
                beta_input("beta2", 0.25, "Intra-CFG pull toward the unpruned model (paper: 0.25)."),
            ],
            outputs=[io.Guider.Output()],
        )

    @classmethod
    def execute(cls, model, prune_plan: PrunePlan, positive, negative, beta1: float,
                beta2: float) -> io.NodeOutput:
        check_finite(TEACHER, beta1=beta1, beta2=beta2)
        check_conditioning(positive, TEACHER, model, "positive")
        check_conditioning(negative, TEACHER, model, "negative")
        guider = WellGuidedGuider(model, prune_plan, beta1, beta2)
        guider.set_conds(positive, negative)
        return io.NodeOutput(guider)


def parse_betas(text: str, name: str) -> list[float]:
    values = parse_numbers(text, name, float)
    if not values:
        raise ValueError(f"{name}: give at least one value, e.g. '2.5, 3.5, 4.5'")
    bad = [v for v in values if not 0.0 <= v <= BETA_MAX]
    if bad:
        raise ValueError(f"{name}: values {bad} are out of range; betas must lie in [0, {BETA_MAX}]")
    return values


class TeacherMixSweep(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="FastLightGenTeacherMixSweep",
            display_name="FastLightGen Teacher Mix Sweep",
            category="FastLightGen",
            description="Samples the well-guided teacher once per (beta1, beta2) pair with the same noise and "
                        "returns the videos as one LATENT batch (beta1-major order) plus their labels; decode "
                        "it and show it with FastLightGen Video Grid to pick betas before a Stage III run.",
            inputs=[
                *teacher_inputs(),
                io.Latent.Input("latent_image", tooltip="Start latent (one video), e.g. a first-frame latent."),
                io.Int.Input("seed", default=0, min=0, max=0xFFFFFFFFFFFFFFFF, control_after_generate=True,
                             tooltip="Noise seed, shared by every pair so only the betas differ."),
                io.Sampler.Input("sampler", tooltip="Teacher sampler, e.g. euler from KSamplerSelect."),
                io.Sigmas.Input("sigmas", tooltip="Teacher schedule, e.g. BasicScheduler simple with "
                                                  "ModelSamplingSD3 shift 5."),
                io.String.Input("beta1_values", default="2.5, 3.5, 4.5",
                                tooltip=f"beta1 values separated by commas, each in [0, {BETA_MAX}]."),
                io.String.Input("beta2_values", default="0, 0.25, 0.5",
                                tooltip=f"beta2 values separated by commas, each in [0, {BETA_MAX}]."),
            ],
            outputs=[
                io.Latent.Output(tooltip="One video per pair, beta1-major."),
                io.String.Output(display_name="labels", tooltip="One 'b1=.. b2=..' line per video."),
            ],
        )

    @classmethod
    def execute(cls, model, prune_plan: PrunePlan, positive, negative, latent_image: dict, seed: int, sampler,
                sigmas: torch.Tensor, beta1_values: str, beta2_values: str) -> io.NodeOutput:
        samples = check_latent(latent_image, SWEEP, model)
        if samples.shape[0] != 1:
            raise ValueError(f"{SWEEP} takes one video, got a batch of {samples.shape[0]}")
        check_conditioning(positive, SWEEP, model, "positive")
        check_conditioning(negative, SWEEP, model, "negative")
        check_plan(model, prune_plan)
        pairs = [(b1, b2) for b1 in parse_betas(beta1_values, "beta1_values")
                 for b2 in parse_betas(beta2_values, "beta2_values")]
        noise = comfy.sample.prepare_noise(samples, seed)
        pbar = comfy.utils.ProgressBar(len(pairs))
        videos = []
        for b1, b2 in pairs:
            guider = WellGuidedGuider(model, prune_plan, b1, b2, f"{SWEEP} (b1={b1:g} b2={b2:g})")
            guider.set_conds(positive, negative)
            videos.append(guider.sample(noise, samples, sampler, sigmas, denoise_mask=latent_image.get("noise_mask"),
                                        disable_pbar=True, seed=seed))
            pbar.update(1)
        out = {"samples": torch.cat(videos).to(comfy.model_management.intermediate_device())}
        labels = "\n".join(f"b1={b1:g} b2={b2:g}" for b1, b2 in pairs)
        return io.NodeOutput(out, labels)
