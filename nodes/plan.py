"""Prune Plan (from a block list or a keep ratio over Stage I scores) and Apply Prune Plan (skip blocks)."""
from __future__ import annotations

from comfy_api.latest import io

from fastlightgen.plan import PrunePlan

from .dit import check_plan, fingerprint, skip_patches, with_block_patches
from .types import PrunePlanType

DROP_LIST = "drop listed blocks"
KEEP_RATIO = "keep ratio over scores"


def parse_numbers(text: str, what: str, cast: type = int) -> list:
    """'3, 5 7' -> [3, 5, 7]; a clear error naming the bad entry."""
    items = [t for t in text.replace(",", " ").split() if t]
    try:
        return [cast(t) for t in items]
    except ValueError:
        raise ValueError(f"{what}: cannot read {text!r} as a list of {cast.__name__}s separated by commas") from None


class PrunePlanNode(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="FastLightGenPrunePlan",
            display_name="FastLightGen Prune Plan",
            category="FastLightGen",
            description="Makes a prune plan for this model: either drop the listed blocks, or keep the given "
                        "fraction of blocks with the highest Stage I scores (most important).",
            inputs=[
                io.Model.Input("model", tooltip="The model the plan is for; the plan records its block count "
                                                "and width and refuses any other model."),
                io.Combo.Input("method", options=[DROP_LIST, KEEP_RATIO], default=DROP_LIST,
                               tooltip="Drop an explicit block list, or rank blocks by scores and keep the best."),
                io.String.Input("blocks", default="", tooltip="Blocks to drop (0-based), e.g. '3, 5, 7'. "
                                                              "Used with 'drop listed blocks'."),
                io.Float.Input("keep_ratio", default=0.7, min=0.01, max=1.0, step=0.01,
                               tooltip="Fraction of blocks to keep with 'keep ratio over scores' (paper: 0.7)."),
                io.String.Input("scores", default="", tooltip="Per-block importance scores separated by commas "
                                                              "(larger = more important); leave empty to use "
                                                              "the scores of 'scores_from'."),
                io.String.Input("protected", default="", tooltip="Blocks always kept with 'keep ratio over "
                                                                 "scores', e.g. '0'."),
                PrunePlanType.Input("scores_from", optional=True,
                                    tooltip="A plan from Block Importance whose scores are re-ranked."),
            ],
            outputs=[
                PrunePlanType.Output(display_name="prune_plan"),
                io.String.Output(display_name="plan_json", tooltip="The plan as JSON (what training reads)."),
            ],
        )

    @classmethod
    def execute(cls, model, method: str, blocks: str, keep_ratio: float, scores: str, protected: str,
                scores_from: PrunePlan | None = None) -> io.NodeOutput:
        fp = fingerprint(model)
        if method == DROP_LIST:
            plan = PrunePlan.from_blocks(fp, parse_numbers(blocks, "blocks"))
        else:
            values = parse_numbers(scores, "scores", float)
            if not values:
                if scores_from is None or scores_from.scores is None:
                    raise ValueError("'keep ratio over scores' needs scores: type them into 'scores' or connect "
                                     "a plan from FastLightGen Block Importance to 'scores_from'")
                scores_from.check(fp)
                values = scores_from.scores
            if len(values) != fp.num_blocks:
                raise ValueError(f"got {len(values)} scores for a model of {fp.num_blocks} blocks")
            plan = PrunePlan.from_scores(fp, values, keep_ratio=keep_ratio,
                                         protected=parse_numbers(protected, "protected"))
        return io.NodeOutput(plan, plan.to_json())


class ApplyPrunePlan(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="FastLightGenApplyPrunePlan",
            display_name="FastLightGen Apply Prune Plan",
            category="FastLightGen",
            description="Returns the model with the plan's dropped blocks skipped (a clone sharing the weights), "
                        "for the stock KSampler or any sampler. Load the exported checkpoint instead to save memory.",
            inputs=[
                io.Model.Input("model", tooltip="The model the plan was made for."),
                PrunePlanType.Input("prune_plan", tooltip="Which blocks to skip."),
            ],
            outputs=[io.Model.Output(tooltip="The pruned model (dropped blocks bypassed).")],
        )

    @classmethod
    def execute(cls, model, prune_plan: PrunePlan) -> io.NodeOutput:
        check_plan(model, prune_plan)
        pruned = model.clone()
        pruned.model_options = with_block_patches(pruned.model_options, skip_patches(model, prune_plan.skip))
        return io.NodeOutput(pruned)
