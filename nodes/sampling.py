"""Few-Step Sigmas and the FastLightGen Sampler: the 4-step, CFG-free contract of a distilled student.

The sampler is ComfyUI's own machinery (CFGGuider at scale 1, the `lcm` sampler, KSampler's preview
callback): `lcm` predicts x0 and re-noises it to the next sigma with fresh noise, which is exactly
FastLightGen's few-step rule, so the node equals the stock SamplerCustom with lcm and the same sigmas.
Given a second, low-noise model (Wan 2.2 A14B's two experts), each step goes to the expert whose range holds
its sigma (`fastlightgen.experts`; the boundary is the experts' files' when the pack loaded them, see
`experts`): the high-noise part, then the low-noise part continuing without new noise, as the stock graph of
two samplers on split sigmas does.
"""
from __future__ import annotations

import logging

import comfy.model_management
import comfy.sample
import comfy.samplers
import comfy.utils
import latent_preview
import torch
from comfy_api.latest import io, ui

from fastlightgen.experts import AUTO_BOUNDARY, split_sigmas
from fastlightgen.flow import denoising_list_sigmas
from fastlightgen.sampling import FEW_STEP

from .experts import boundary_input, check_not_a_lone_expert, experts_boundary
from .plan import parse_numbers
from .validate import check_conditioning, check_finite, check_finite_result, check_latent

DEFAULT_STEP_LIST = ", ".join(str(t) for t in FEW_STEP.denoising_step_list)
SAMPLER_NAME = "lcm"
SAMPLER = "FastLightGen Sampler"


def few_step_sigmas(step_list: str, shift: float) -> torch.Tensor:
    return denoising_list_sigmas(parse_numbers(step_list, "denoising_step_list"), shift)


class FewStepSigmas(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="FastLightGenFewStepSigmas",
            display_name="FastLightGen Few-Step Sigmas",
            category="FastLightGen",
            description="SIGMAS of a LightX2V-style denoising step list warped by shift; the default "
                        "[1000, 750, 500, 250] with shift 5 gives [1, 0.9375, 0.8333, 0.625, 0].",
            inputs=[
                io.String.Input("denoising_step_list", default=DEFAULT_STEP_LIST,
                                tooltip="Strictly decreasing timesteps in (0, 1000], separated by commas."),
                io.Float.Input("shift", default=5.0, min=0.01, max=100.0, step=0.01,
                               tooltip="Timestep shift s' = k s / (1 + (k - 1) s); 5 as in Wan and the paper."),
            ],
            outputs=[io.Sigmas.Output()],
        )

    @classmethod
    def execute(cls, denoising_step_list: str, shift: float) -> io.NodeOutput:
        check_finite("FastLightGen Few-Step Sigmas", shift=shift)
        sigmas = few_step_sigmas(denoising_step_list, shift)
        text = "sigmas: [" + ", ".join(f"{s:.4f}" for s in sigmas.tolist()) + "]"
        logging.info("FastLightGen Few-Step Sigmas %s", text)
        return io.NodeOutput(sigmas, ui=ui.PreviewText(text))


def sample_lcm(model, positive, latent: dict, seed: int, sigmas: torch.Tensor, add_noise: bool = True) -> dict:
    """What SamplerCustom does with cfg 1 and lcm, with only a positive conditioning; without `add_noise` it
    continues a latent that already holds the noise of sigmas[0]."""
    samples = comfy.sample.fix_empty_latent_channels(model, latent["samples"])
    noise = comfy.sample.prepare_noise(samples, seed, latent.get("batch_index")) if add_noise else \
        torch.zeros(samples.size(), dtype=samples.dtype, layout=samples.layout, device="cpu")
    guider = comfy.samplers.CFGGuider(model)
    guider.inner_set_conds({"positive": positive})  # scale 1: the negative would never be evaluated
    guider.set_cfg(1.0)
    callback = latent_preview.prepare_callback(model, sigmas.shape[-1] - 1)
    out = guider.sample(noise, samples, comfy.samplers.sampler_object(SAMPLER_NAME), sigmas,
                        denoise_mask=latent.get("noise_mask"), callback=callback,
                        disable_pbar=not comfy.utils.PROGRESS_BAR_ENABLED, seed=seed)
    check_finite_result(out, SAMPLER)
    return {**latent, "samples": out.to(comfy.model_management.intermediate_device())}


class FastLightGenSampler(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="FastLightGenSampler",
            display_name="FastLightGen Sampler",
            category="FastLightGen",
            description="Samples a FastLightGen student: 4 steps by default, CFG off (one model call per "
                        "step), progress and previews like KSampler. TI2V: a latent with a noise_mask keeps "
                        "its first frame.",
            inputs=[
                io.Model.Input("model", tooltip="The few-step student (or any flow model)."),
                io.Conditioning.Input("positive", tooltip="The prompt; there is no negative since CFG is off."),
                io.Latent.Input("latent_image", tooltip="Start latent, e.g. a first-frame latent for TI2V."),
                io.Int.Input("seed", default=0, min=0, max=0xFFFFFFFFFFFFFFFF, control_after_generate=True,
                             tooltip="Seed of the initial noise and of the fresh noise of each step."),
                io.Sigmas.Input("sigmas", optional=True,
                                tooltip="Override the schedule, e.g. the SIGMAS recommended by the checkpoint "
                                        "loader; default [1000, 750, 500, 250] with shift 5."),
                io.Model.Input("model_low_noise", optional=True,
                               tooltip="A two-expert model (Wan 2.2 A14B): the low-noise expert; 'model' is then "
                                       "the high-noise one. Each step goes to the expert whose range holds its "
                                       "sigma."),
                boundary_input(optional=True),
            ],
            outputs=[io.Latent.Output()],
        )

    @classmethod
    def execute(cls, model, positive, latent_image: dict, seed: int, sigmas: torch.Tensor | None = None,
                model_low_noise=None, boundary: float = AUTO_BOUNDARY) -> io.NodeOutput:
        check_finite(SAMPLER, boundary=boundary)
        if model_low_noise is None:
            check_not_a_lone_expert(SAMPLER, model)
        else:  # a wrongly wired pair fails here, before any step
            boundary = experts_boundary(SAMPLER, model, model_low_noise, boundary)
        for expert in (model, model_low_noise):
            if expert is not None:
                check_latent(latent_image, SAMPLER, expert)
                check_conditioning(positive, SAMPLER, expert)
        if sigmas is None:
            sigmas = FEW_STEP.sigmas
        if sigmas.shape[-1] < 2 or float(sigmas[-1]) != 0.0 or not torch.isfinite(sigmas).all():
            raise ValueError(f"FastLightGen Sampler needs finite sigmas ending at 0 with at least one step, got "
                             f"{sigmas.tolist()}")
        if model_low_noise is None:
            return io.NodeOutput(sample_lcm(model, positive, latent_image, seed, sigmas))
        high, low = split_sigmas(sigmas, boundary)
        latent = sample_lcm(model, positive, latent_image, seed, high) if len(high) else latent_image
        if len(low):
            latent = sample_lcm(model_low_noise, positive, latent, seed, low, add_noise=not len(high))
        return io.NodeOutput(latent)
