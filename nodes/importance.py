"""Block Importance: Stage I (paper eq. 3-4) inside ComfyUI, on ComfyUI's own model forward.

score_i = mean || x0_hat(x_t with block i skipped) - x0 ||^2 over timesteps and noise draws, where x0_hat
is the model's denoised output. The probe runs as a ComfyUI `Sampler` under a scale-1 CFGGuider, so model
loading, conditioning, latent normalization and TI2V first-frame pinning (noise_mask) are ComfyUI's.
Blocks are skipped per call through patches_replace. With prefix reuse, the full pass records every
block's output and the pass skipping block i replays the recorded outputs of blocks 0..i-1 instead of
recomputing them, as `fastlightgen.importance.block_importance` does.
"""
from __future__ import annotations

import comfy.model_management
import comfy.samplers
import comfy.utils
import numpy as np
import torch
from comfy.model_patcher import ModelPatcher
from comfy_api.latest import io, ui
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from fastlightgen.importance import ImportanceResult, stage1_sigmas
from fastlightgen.plan import PrunePlan

from .dit import BlockPatch, Slot, block_slots, fingerprint, skip_block, with_block_patches
from .sampling import check_latent
from .types import PrunePlanType


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
        n = len(self.slots)
        totals, reference = torch.zeros(n, dtype=torch.float64), 0.0
        generator = torch.Generator().manual_seed(self.seed)  # same draw order as the library's Stage I
        pbar = comfy.utils.ProgressBar(len(self.sigmas) * self.num_samples * n)
        for s in self.sigmas:
            sigma = torch.full((latent_image.shape[0],), s, device=latent_image.device)
            for _ in range(self.num_samples):
                eps = torch.randn(latent_image.shape, generator=generator).to(latent_image)
                x_t = model_sampling.noise_scaling(sigma.view(-1, *[1] * (eps.ndim - 1)), eps, latent_image)

                def error(patches: dict[Slot, BlockPatch]) -> float:
                    options = with_block_patches(extra_args["model_options"], patches)
                    x0 = denoiser(x_t, sigma, denoise_mask=denoise_mask, model_options=options,
                                  seed=extra_args.get("seed"))
                    return (x0 - latent_image).double().pow(2).mean().item()

                outputs: dict[int, dict] = {}
                reference += error(self._recording(outputs) if self.prefix_reuse else {})
                for i in range(n):
                    comfy.model_management.throw_exception_if_processing_interrupted()
                    totals[i] += error(self._skipping(i, outputs))
                    pbar.update(1)
        count = len(self.sigmas) * self.num_samples
        self.result = ImportanceResult((totals / count).tolist(), reference / count, count, list(self.sigmas))
        return latent_image

    def _recording(self, outputs: dict[int, dict]) -> dict[Slot, BlockPatch]:
        def record(i: int) -> BlockPatch:
            def patch(args: dict, extra: dict) -> dict:
                out = extra["original_block"](args)
                outputs[i] = _copy_streams(out)
                return out
            return patch
        return {slot: record(i) for i, slot in enumerate(self.slots)}

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
               prefix_reuse: bool = True) -> ImportanceResult:
    samples = check_latent(latent, "FastLightGen Block Importance")
    sigmas = stage1_sigmas(num_timesteps)
    probe = ImportanceProbe(block_slots(model), sigmas, num_samples, seed, prefix_reuse)
    guider = comfy.samplers.CFGGuider(model)
    guider.inner_set_conds({"positive": positive})  # scale 1: eq. 3 scores the conditional prediction
    guider.sample(torch.zeros_like(samples), samples, probe, torch.tensor([*sigmas, 0.0]),
                  denoise_mask=latent.get("noise_mask"), disable_pbar=True, seed=seed)
    return probe.result


def importance_plot(result: ImportanceResult, plan: PrunePlan) -> torch.Tensor:
    """Bar chart of the scores, kept blocks and dropped blocks in two colours, as an IMAGE (1, H, W, 3)."""
    fig = Figure(figsize=(8, 3.6), dpi=100)
    canvas = FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    kept = set(plan.kept)
    colors = ["tab:blue" if i in kept else "tab:red" for i in range(len(result.scores))]
    ax.bar(range(len(result.scores)), result.scores, color=colors)
    ax.axhline(result.reference_error, color="gray", linestyle="--", label="full model")
    ax.bar([], [], color="tab:blue", label=f"kept ({len(plan.kept)})")
    ax.bar([], [], color="tab:red", label=f"dropped ({len(plan.dropped)})")
    ax.set_xlabel("block")
    ax.set_ylabel("x0 error with the block skipped")
    ax.set_title(f"Stage I block importance ({result.num_samples} draws)")
    ax.set_xticks(range(len(result.scores)))
    ax.legend(loc="upper right", fontsize="small")
    fig.tight_layout()
    canvas.draw()
    rgb = np.asarray(canvas.buffer_rgba())[..., :3].astype(np.float32) / 255.0
    return torch.from_numpy(rgb)[None]


class BlockImportance(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="FastLightGenBlockImportance",
            display_name="FastLightGen Block Importance",
            category="FastLightGen",
            description="Stage I: scores every block by how much the denoised estimate degrades when that block "
                        "is skipped (no weight copy), plots the scores with the kept/dropped split, and makes a "
                        "prune plan keeping the most important blocks.",
            inputs=[
                io.Model.Input("model", tooltip="A Wan (or HunyuanVideo) diffusion model."),
                io.Latent.Input("latent", tooltip="Clean latents (a batch of videos); a noise_mask keeps "
                                                  "TI2V first frames clean, as at inference."),
                io.Conditioning.Input("positive", tooltip="Their prompts (one per latent, or one for all)."),
                io.Int.Input("num_timesteps", default=4, min=1, max=100,
                             tooltip="Evenly spaced noise levels (k + 0.5) / T at which errors are averaged."),
                io.Int.Input("num_samples", default=1, min=1, max=64, tooltip="Noise draws per noise level."),
                io.Int.Input("seed", default=0, min=0, max=0xFFFFFFFFFFFFFFFF, tooltip="Seed of the noise draws."),
                io.Float.Input("keep_ratio", default=0.7, min=0.01, max=1.0, step=0.01,
                               tooltip="Fraction of blocks the plan keeps (paper: 0.7, i.e. ~30% pruned)."),
                io.Boolean.Input("prefix_reuse", default=True,
                                 tooltip="Replay the full pass's outputs of the blocks before the skipped one "
                                         "(same scores, about half the compute)."),
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
                keep_ratio: float, prefix_reuse: bool) -> io.NodeOutput:
        result = run_stage1(model, latent, positive, num_timesteps, num_samples, seed, prefix_reuse)
        plan = PrunePlan.from_scores(fingerprint(model), result.scores, keep_ratio=keep_ratio,
                                     reference_error=result.reference_error)
        plot = importance_plot(result, plan)
        table = result.table() + f"\nkept: {plan.kept}\ndropped: {plan.dropped}"
        return io.NodeOutput(plot, plan, table, ui=ui.PreviewImage(plot, cls=cls))
