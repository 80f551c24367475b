"""Block Importance: Stage I (paper eq. 3-4) inside ComfyUI, on ComfyUI's own model forward.

score_i = mean || x0_hat(x_t with block i skipped) - x0 ||^2 over timesteps and noise draws, where x0_hat
is the model's denoised output. The probe runs as a ComfyUI `Sampler` under a scale-1 CFGGuider, so model
loading, conditioning, latent normalization and TI2V first-frame pinning (noise_mask) are ComfyUI's.
Blocks are skipped per call through patches_replace. With prefix reuse, the full pass records every
block's output and the pass skipping block i replays the recorded outputs of blocks 0..i-1 instead of
recomputing them, as `fastlightgen.importance.block_importance` does.

A MODEL that already skips blocks (Apply Prune Plan) is scored as it runs: the reference is the patched model,
the full pass records the blocks' outputs through the MODEL's own block replacements, an already skipped block
scores the reference (skipping it again changes nothing) and is never kept by the new plan, whose keep ratio
is then a fraction of the blocks the MODEL still runs. So iterating Stage I prunes further, never back.
"""
from __future__ import annotations

import comfy.model_management
import comfy.samplers
import comfy.utils
import numpy as np
import torch
from comfy.model_patcher import ModelPatcher
from comfy_api.latest import io, ui
from PIL import Image

from fastlightgen.importance import ImportanceResult, check_error, stage1_sigmas
from fastlightgen.plan import PrunePlan, count_kept
from fastlightgen.plot import importance_chart

from .dit import (BlockPatch, Slot, block_patches, block_slots, fingerprint, skip_block, skipped_blocks,
                  with_block_patches)
from .experts import check_expert_range
from .types import PrunePlanType
from .validate import check_clean_videos, check_conditioning, check_finite, check_latent

NAME = "FastLightGen Block Importance"


class ImportanceProbe(comfy.samplers.Sampler):
    """Computes the Stage I scores where a sampler would sample; returns the clean latent unchanged."""

    def __init__(self, slots: list[Slot], sigmas: list[float], num_samples: int, seed: int, prefix_reuse: bool):
        self.slots, self.sigmas, self.num_samples, self.seed = slots, sigmas, num_samples, seed
        self.prefix_reuse = prefix_reuse
        self.result: ImportanceResult | None = None

    def sample(self, model_wrap, sigmas, extra_args, callback, noise, latent_image=None, denoise_mask=None,
               disable_pbar=False):
        denoiser = comfy.samplers.KSamplerX0Inpaint(model_wrap, sigmas)  # pins frames where noise_mask is 0
        denoiser.latent_image, denoiser.noise = latent_image, noise
        model_sampling = model_wrap.inner_model.model_sampling
        existing = block_patches(extra_args["model_options"])  # the MODEL's own replacements (Apply Prune Plan)
        n = len(self.slots)
        active = [i for i, slot in enumerate(self.slots) if existing.get(slot) is not skip_block]
        totals, reference = torch.zeros(n, dtype=torch.float64), 0.0
        generator = torch.Generator().manual_seed(self.seed)  # same draw order as the library's Stage I
        pbar = comfy.utils.ProgressBar(len(self.sigmas) * self.num_samples * len(active))
        for s in self.sigmas:
            sigma = torch.full((latent_image.shape[0],), s, device=latent_image.device)
            for _ in range(self.num_samples):
                eps = torch.randn(latent_image.shape, generator=generator).to(latent_image)
                x_t = model_sampling.noise_scaling(sigma.view(-1, *[1] * (eps.ndim - 1)), eps, latent_image)

                def error(patches: dict[Slot, BlockPatch], block: int | None) -> float:
                    options = with_block_patches(extra_args["model_options"], patches)
                    x0 = denoiser(x_t, sigma, denoise_mask=denoise_mask, model_options=options,
                                  seed=extra_args.get("seed"))
                    return check_error((x0 - latent_image).double().pow(2).mean().item(), block, s)

                outputs: dict[int, dict] = {}
                full = error(self._recording(outputs, existing) if self.prefix_reuse else {}, None)
                # an already skipped block: skipping it again leaves the model as it runs
                per_block = torch.full((n,), full, dtype=torch.float64)
                for i in active:
                    comfy.model_management.throw_exception_if_processing_interrupted()
                    per_block[i] = error(self._skipping(i, outputs), i)
                    pbar.update(1)
                totals += per_block
                reference += full
        count = len(self.sigmas) * self.num_samples
        self.result = ImportanceResult((totals / count).tolist(), reference / count, count, list(self.sigmas))
        return latent_image

    def _recording(self, outputs: dict[int, dict], existing: dict[Slot, BlockPatch]) -> dict[Slot, BlockPatch]:
        def record(i: int, replacement: BlockPatch | None) -> BlockPatch:
            def patch(args: dict, extra: dict) -> dict:
                out = replacement(args, extra) if replacement is not None else extra["original_block"](args)
                outputs[i] = _copy_streams(out)
                return out
            return patch
        return {slot: record(i, existing.get(slot)) for i, slot in enumerate(self.slots)}

    def _skipping(self, index: int, outputs: dict[int, dict]) -> dict[Slot, BlockPatch]:
        patches: dict[Slot, BlockPatch] = {self.slots[index]: skip_block}
        if self.prefix_reuse:  # blocks before `index` see the same input as in the full pass: replay them
            patches.update({self.slots[j]: (lambda args, extra, j=j: _copy_streams(outputs[j]))
                            for j in range(index)})
        return patches


def _copy_streams(streams: dict) -> dict:
    """HunyuanVideo's blocks (and ControlNet/VACE residuals) add into their input streams in place, so a
    recorded output must not alias the tensors the forward goes on to modify, nor may a replayed one."""
    return {k: v.clone() for k, v in streams.items()}


def run_stage1(model: ModelPatcher, latent: dict, positive, num_timesteps: int, num_samples: int, seed: int,
               prefix_reuse: bool = True, sigma_range: tuple[float, float] = (0.0, 1.0)) -> ImportanceResult:
    samples = check_latent(latent, NAME)
    check_clean_videos(samples, NAME, model)
    check_conditioning(positive, NAME, model)
    sigmas = stage1_sigmas(num_timesteps, *sigma_range)
    probe = ImportanceProbe(block_slots(model), sigmas, num_samples, seed, prefix_reuse)
    guider = comfy.samplers.CFGGuider(model)
    guider.inner_set_conds({"positive": positive})  # scale 1: eq. 3 scores the conditional prediction
    guider.sample(torch.zeros_like(samples), samples, probe, torch.tensor([*sigmas, 0.0]),
                  denoise_mask=latent.get("noise_mask"), disable_pbar=True, seed=seed)
    return probe.result


def as_image(chart: Image.Image) -> torch.Tensor:
    """One of the library's importance charts as an IMAGE (1, H, W, 3)."""
    return torch.from_numpy(np.asarray(chart, dtype=np.float32) / 255.0)[None]


def stage1_inputs() -> list[io.Input]:
    """The prompts, noise levels, draws and seed of a Stage I run, as both Block Importance nodes take them."""
    return [
        io.Conditioning.Input("positive", tooltip="Their prompts (one per latent, or one for all)."),
        io.Int.Input("num_timesteps", default=4, min=1, max=100,
                     tooltip="Evenly spaced noise levels (k + 0.5) / T of the sigma range at which errors are "
                             "averaged."),
        io.Int.Input("num_samples", default=1, min=1, max=64, tooltip="Noise draws per noise level."),
        io.Int.Input("seed", default=0, min=0, max=0xFFFFFFFFFFFFFFFF, tooltip="Seed of the noise draws."),
    ]


def prefix_reuse_input() -> io.Boolean.Input:
    return io.Boolean.Input("prefix_reuse", default=True, tooltip="Replay the full pass's outputs of the blocks "
                                                                  "before the skipped one (same scores, about half "
                                                                  "the compute).")


class BlockImportance(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="FastLightGenBlockImportance",
            display_name="FastLightGen Block Importance",
            category="FastLightGen",
            description="Stage I: scores every block by how much the denoised estimate degrades when that block "
                        "is skipped (no weight copy), plots the scores with the kept/dropped split, and makes a "
                        "prune plan keeping the most important blocks. A model that already skips blocks (Apply "
                        "Prune Plan) is scored as it runs and its skipped blocks stay dropped.",
            inputs=[
                io.Model.Input("model", tooltip="A Wan (or HunyuanVideo) diffusion model."),
                io.Latent.Input("latent", tooltip="Clean videos encoded by the model's VAE (VAE Encode of video "
                                                  "frames; not an empty latent); a noise_mask keeps TI2V first "
                                                  "frames clean, as at inference."),
                *stage1_inputs(),
                io.Float.Input("keep_ratio", default=0.7, min=0.01, max=1.0, step=0.01,
                               tooltip="Fraction of the blocks the model runs that the plan keeps (paper: 0.7, "
                                       "i.e. ~30% pruned)."),
                prefix_reuse_input(),
                io.Float.Input("sigma_min", default=0.0, min=0.0, max=1.0, step=0.005, optional=True,
                               tooltip="The noise levels scored lie in [sigma_min, sigma_max]. One expert of Wan "
                                       "2.2 A14B is scored where it runs: the high-noise one on [0.875, 1] (T2V; "
                                       "I2V 0.9), the low-noise one on [0, 0.875]."),
                io.Float.Input("sigma_max", default=1.0, min=0.0, max=1.0, step=0.005, optional=True,
                               tooltip="The upper end of the noise levels scored (see sigma_min)."),
            ],
            outputs=[
                io.Image.Output(display_name="plot"),
                PrunePlanType.Output(display_name="prune_plan"),
                io.String.Output(display_name="table", tooltip="block | score | rank"),
            ],
            is_output_node=True,
        )

    @classmethod
    def execute(cls, model, latent: dict, positive, num_timesteps: int, num_samples: int, seed: int,
                keep_ratio: float, prefix_reuse: bool, sigma_min: float = 0.0, sigma_max: float = 1.0) -> io.NodeOutput:
        check_finite(NAME, keep_ratio=keep_ratio, sigma_min=sigma_min, sigma_max=sigma_max)
        check_settings(model, keep_ratio, num_timesteps, (sigma_min, sigma_max))
        check_expert_range(NAME, model, (sigma_min, sigma_max))
        result, plan = score_blocks(model, latent, positive, num_timesteps, num_samples, seed, keep_ratio,
                                    prefix_reuse, (sigma_min, sigma_max))
        plot = as_image(importance_chart(result, plan))
        return io.NodeOutput(plot, plan, plan_table(result, plan), ui=ui.PreviewImage(plot, cls=cls))


def check_settings(model: ModelPatcher, keep_ratio: float, num_timesteps: int,
                   sigma_range: tuple[float, float]) -> None:
    """A bad keep ratio or sigma range fails now, not after Stage I."""
    count_kept(fingerprint(model).num_blocks - len(skipped_blocks(model)), keep_ratio)
    stage1_sigmas(num_timesteps, *sigma_range)


def score_blocks(model: ModelPatcher, latent: dict, positive, num_timesteps: int, num_samples: int, seed: int,
                 keep_ratio: float, prefix_reuse: bool,
                 sigma_range: tuple[float, float]) -> tuple[ImportanceResult, PrunePlan]:
    """Stage I on `model` over `sigma_range`, and the plan keeping `keep_ratio` of the blocks it runs."""
    result = run_stage1(model, latent, positive, num_timesteps, num_samples, seed, prefix_reuse, sigma_range)
    plan = PrunePlan.from_scores(fingerprint(model), result.scores, keep_ratio=keep_ratio,
                                 reference_error=result.reference_error, already_dropped=skipped_blocks(model))
    return result, plan


def plan_table(result: ImportanceResult, plan: PrunePlan) -> str:
    table = result.table() + f"\nkept: {plan.kept}\ndropped: {plan.dropped}"
    if plan.already_dropped:
        table += (f" (already skipped by the MODEL: {plan.already_dropped}; scored as the MODEL runs, "
                  "never kept)")
    return table
