"""Block Importance (two experts): Stage I of Wan 2.2 A14B, each expert scored on its own part of the schedule.

The high-noise expert is scored on sigmas in [boundary, 1], the low-noise one on [0, boundary]
(`fastlightgen.experts.sigma_range`), each by the one-model Block Importance's Stage I; the result is a plan per
expert, together the `ExpertPlans` file train.stage2 reads, and one chart per expert.
"""
from __future__ import annotations

from comfy_api.latest import io, ui

from fastlightgen.experts import sigma_range
from fastlightgen.plan import ExpertPlans
from fastlightgen.plot import expert_charts

from .experts import boundary_input, experts_boundary
from .importance import as_image, check_settings, plan_table, prefix_reuse_input, score_blocks, stage1_inputs
from .types import ExpertPlansType, PrunePlanType
from .validate import check_conditioning, check_finite

NAME = "FastLightGen Block Importance (two experts)"


def ratio_input(expert: str) -> io.Float.Input:
    return io.Float.Input(f"keep_ratio_{expert}_noise", default=0.7, min=0.01, max=1.0, step=0.01,
                          tooltip=f"Fraction of the {expert}-noise expert's blocks its plan keeps (paper: 0.7). "
                                  "Equal values give both experts one shared ratio.")


class ExpertBlockImportance(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="FastLightGenExpertBlockImportance",
            display_name="FastLightGen Block Importance (two experts)",
            category="FastLightGen",
            description="Stage I of a two-expert model (Wan 2.2 A14B): scores each expert's blocks on its own part "
                        "of the schedule (the high-noise expert on sigmas above the boundary, the low-noise one "
                        "below), plots both, and makes a plan per expert at its keep ratio: the expert plans "
                        "train.stage2 reads (Save Prune Plan writes them), and each expert's plan for Apply Prune "
                        "Plan.",
            inputs=[
                io.Model.Input("model_high_noise", tooltip="The high-noise expert (Load FastLightGen Expert Pair "
                                                           "or Load Diffusion Model)."),
                io.Model.Input("model_low_noise", tooltip="The low-noise expert."),
                io.Latent.Input("latent", tooltip="Clean videos encoded by the Wan 2.1 VAE (VAE Encode of video "
                                                  "frames; not an empty latent); each expert is scored on them at "
                                                  "its own noise levels."),
                *stage1_inputs(),
                ratio_input("high"),
                ratio_input("low"),
                prefix_reuse_input(),
                boundary_input(),
            ],
            outputs=[
                io.Image.Output(display_name="plot", tooltip="One chart per expert, each on its sigma range."),
                ExpertPlansType.Output(display_name="expert_plans", tooltip="Both plans and the boundary: what "
                                                                            "train.stage2 reads."),
                PrunePlanType.Output(display_name="prune_plan_high_noise"),
                PrunePlanType.Output(display_name="prune_plan_low_noise"),
                io.String.Output(display_name="table", tooltip="Each expert's block | score | rank."),
            ],
            is_output_node=True,
        )

    @classmethod
    def execute(cls, model_high_noise, model_low_noise, latent: dict, positive, num_timesteps: int,
                num_samples: int, seed: int, keep_ratio_high_noise: float, keep_ratio_low_noise: float,
                prefix_reuse: bool, boundary: float) -> io.NodeOutput:
        check_finite(NAME, keep_ratio_high_noise=keep_ratio_high_noise, keep_ratio_low_noise=keep_ratio_low_noise,
                     boundary=boundary)
        boundary = experts_boundary(NAME, model_high_noise, model_low_noise, boundary)
        experts = {"high": (model_high_noise, keep_ratio_high_noise), "low": (model_low_noise, keep_ratio_low_noise)}
        for name, (model, ratio) in experts.items():  # every setting of both experts, before the first pass
            check_settings(model, ratio, num_timesteps, sigma_range(name, boundary))
            check_conditioning(positive, NAME, model)
        scored = {name: score_blocks(model, latent, positive, num_timesteps, num_samples, seed, ratio, prefix_reuse,
                                     sigma_range(name, boundary))
                  for name, (model, ratio) in experts.items()}
        plans = ExpertPlans(boundary, {name: plan for name, (_, plan) in scored.items()})
        plot = as_image(expert_charts({name: (*scored[name], sigma_range(name, boundary)) for name in scored}))
        table = "\n\n".join(f"{name}-noise expert, sigma in {list(sigma_range(name, boundary))}:\n"
                            f"{plan_table(*scored[name])}" for name in scored)
        return io.NodeOutput(plot, plans, plans.plans["high"], plans.plans["low"], table,
                             ui=ui.PreviewImage(plot, cls=cls))
