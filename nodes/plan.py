"""Prune Plan (from a block list or a keep ratio over Stage I scores), Apply Prune Plan (skip blocks), and Load /
Save Prune Plan: the JSON `train.stage1` writes and `train.stage2 --set stage2.plan=PATH` reads, kept in
models/fastlightgen_plans (registered with folder_paths) or pasted, so a plan travels in a workflow."""
from __future__ import annotations

import hashlib
import json
import math
import os
import re
from pathlib import Path

import folder_paths
from comfy_api.latest import io, ui

from fastlightgen.plan import EXPERT_PLANS_FORMAT, ExpertPlans, PrunePlan

from .dit import check_plan, fingerprint, skip_patches, with_block_patches
from .types import ExpertPlansType, PrunePlanType
from .validate import check_finite, file_choice

DROP_LIST = "drop listed blocks"
KEEP_RATIO = "keep ratio over scores"
PLAN_FOLDER = "fastlightgen_plans"
PASTED = "(pasted JSON below)"
EXPERT_CHOICES = ["high_noise", "low_noise"]  # Load Prune Plan's choice of one expert's plan of a two-expert file
_PLAIN_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_. -]*")


def parse_numbers(text: str, what: str, cast: type = int) -> list:
    """'3, 5 7' -> [3, 5, 7]; a clear error naming the bad entry (NaN and inf are not numbers here)."""
    items = [t for t in text.replace(",", " ").split() if t]
    try:
        values = [cast(t) for t in items]
    except ValueError:
        raise ValueError(f"{what}: cannot read {text!r} as a list of {cast.__name__}s separated by commas") from None
    bad = [t for t, v in zip(items, values) if not math.isfinite(v)]
    if bad:
        raise ValueError(f"{what}: {bad} are not finite numbers; give finite numbers separated by commas")
    return values


def register_plan_folder() -> None:
    """models/fastlightgen_plans, holding .json plans. Appended: a folder extra_model_paths.yaml names (e.g. one
    shared with a cluster) stays first, and Save Prune Plan writes there."""
    folder_paths.add_model_folder_path(PLAN_FOLDER, os.path.join(folder_paths.models_dir, PLAN_FOLDER))
    paths, _ = folder_paths.folder_names_and_paths[PLAN_FOLDER]
    folder_paths.folder_names_and_paths[PLAN_FOLDER] = (paths, {".json"})


def plan_names() -> list[str]:
    return sorted(folder_paths.get_filename_list(PLAN_FOLDER))


def read_plan(text: str, source: str, expert: str = EXPERT_CHOICES[0]) -> tuple[PrunePlan, str]:
    """A plan from plan.json text, or from a stage's run.json (which holds it under "plan"); from the expert plans
    of a two-expert model (Block Importance (two experts), train.stage1), `expert`'s plan and a line saying so."""
    try:
        data = json.loads(text)
    except json.JSONDecodeError as err:
        raise ValueError(f"{source} is not JSON ({err}); give the contents of a plan.json written by train.stage1 "
                         "or FastLightGen Save Prune Plan") from None
    if isinstance(data, dict) and "format" not in data and isinstance(data.get("plan"), dict):
        data = data["plan"]
    if not isinstance(data, dict):
        raise ValueError(f"{source} is a JSON {type(data).__name__}, not a prune plan object")
    try:
        if data.get("format") != EXPERT_PLANS_FORMAT:
            return PrunePlan.from_dict(data), ""
        plans = ExpertPlans.from_dict(data)
    except ValueError as err:
        raise ValueError(f"{source}: {err}") from None
    name = expert.removesuffix("_noise")
    return plans.plans[name], f"the {name}-noise expert's plan of two (boundary {plans.boundary:g}): "


def plan_file(filename: str) -> Path:
    """Where Save Prune Plan writes `filename`: a plain name in the first plans folder, '.json' added."""
    name = filename.strip()
    if not _PLAIN_NAME.fullmatch(name):
        raise ValueError(f"filename {filename!r} must be a plain file name (letters, digits, '_', '-', '.', spaces; "
                         f"no folders); the plan is saved in models/{PLAN_FOLDER}")
    return Path(folder_paths.get_folder_paths(PLAN_FOLDER)[0]) / (name if name.endswith(".json") else name + ".json")


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
        check_finite("FastLightGen Prune Plan", keep_ratio=keep_ratio)
        fp = fingerprint(model)
        if method == DROP_LIST:
            plan = PrunePlan.from_blocks(fp, parse_numbers(blocks, "blocks"))
        else:
            values, already_dropped = parse_numbers(scores, "scores", float), []
            if not values:
                if scores_from is None or scores_from.scores is None:
                    raise ValueError("'keep ratio over scores' needs scores: type them into 'scores' or connect "
                                     "a plan from FastLightGen Block Importance to 'scores_from'")
                scores_from.check(fp)
                values, already_dropped = scores_from.scores, scores_from.already_dropped
            if len(values) != fp.num_blocks:
                raise ValueError(f"got {len(values)} scores for a model of {fp.num_blocks} blocks")
            plan = PrunePlan.from_scores(fp, values, keep_ratio=keep_ratio,
                                         protected=parse_numbers(protected, "protected"),
                                         already_dropped=already_dropped)
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


class LoadPrunePlan(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="FastLightGenLoadPrunePlan",
            display_name="FastLightGen Load Prune Plan",
            category="FastLightGen",
            description="Loads a prune plan: a plan.json from models/fastlightgen_plans (written by train.stage1 "
                        "or Save Prune Plan, or a stage's run.json), or JSON pasted into the node, so a plan found "
                        "on a cluster can be shared in a workflow; of a two-expert model's plans (Wan 2.2 A14B), "
                        "the chosen expert's. Apply Prune Plan refuses it on another model.",
            inputs=[
                io.Combo.Input("plan_name", options=[PASTED, *plan_names()],
                               tooltip=f"A .json plan in models/{PLAN_FOLDER}, or '{PASTED}' to use plan_json."),
                io.String.Input("plan_json", multiline=True, default="",
                                tooltip=f"The plan's JSON, used when plan_name is '{PASTED}'."),
                # optional: a prompt saved before this input existed still validates
                io.Combo.Input("expert", options=EXPERT_CHOICES, default=EXPERT_CHOICES[0], optional=True,
                               tooltip="For the plans of a two-expert model (Block Importance (two experts), "
                                       "train.stage1 on Wan 2.2 A14B): which expert's plan to load, for that "
                                       "expert's MODEL. A one-model plan has no experts and ignores it."),
            ],
            outputs=[
                PrunePlanType.Output(display_name="prune_plan"),
                io.String.Output(display_name="info", tooltip="Which blocks the plan keeps, of which model."),
            ],
        )

    @classmethod
    def fingerprint_inputs(cls, plan_name: str, plan_json: str):
        if plan_name == PASTED:
            return plan_json
        path = folder_paths.get_full_path(PLAN_FOLDER, plan_name)
        return hashlib.sha256(Path(path).read_bytes()).hexdigest() if path else plan_name  # an edited file reloads

    @classmethod
    def validate_inputs(cls, plan_name: str) -> bool | str:
        return file_choice(plan_name, [PASTED, *plan_names()], "prune plan", f"put the plan's JSON in "
                           f"models/{PLAN_FOLDER} and press R to refresh, or paste it with '{PASTED}'")

    @classmethod
    def execute(cls, plan_name: str, plan_json: str, expert: str = EXPERT_CHOICES[0]) -> io.NodeOutput:
        if plan_name == PASTED:
            if not plan_json.strip():
                raise ValueError(f"FastLightGen Load Prune Plan: plan_name is '{PASTED}' but plan_json is empty; "
                                 f"paste a plan's JSON or pick a file of models/{PLAN_FOLDER}")
            plan, what = read_plan(plan_json, "plan_json", expert)
        else:
            path = folder_paths.get_full_path_or_raise(PLAN_FOLDER, plan_name)
            plan, what = read_plan(Path(path).read_text(errors="replace"), plan_name, expert)
        info = f"{what}{plan.fingerprint}: keeps {len(plan.kept)} blocks {plan.kept}, drops {plan.dropped}"
        return io.NodeOutput(plan, info)


class SavePrunePlan(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="FastLightGenSavePrunePlan",
            display_name="FastLightGen Save Prune Plan",
            category="FastLightGen",
            description="Saves a prune plan (e.g. from Block Importance) to models/fastlightgen_plans as the JSON "
                        "training reads (python -m train.stage2 --set stage2.plan=PATH) and Load Prune Plan lists. "
                        "The file is written whole or not at all.",
            inputs=[
                io.MultiType.Input(PrunePlanType.Input("prune_plan", tooltip="The plan to save: one model's, or "
                                                                             "both experts' of a two-expert model."),
                                   types=[PrunePlanType, ExpertPlansType]),
                io.String.Input("filename", default="prune_plan",
                                tooltip=f"File name ('.json' is added) in models/{PLAN_FOLDER}, or in the plans "
                                        "folder extra_model_paths.yaml names first."),
                io.Boolean.Input("overwrite", default=False,
                                 tooltip="Replace an existing file holding another plan (the same plan is "
                                         "always fine)."),
            ],
            outputs=[io.String.Output(display_name="path", tooltip="The saved file.")],
            is_output_node=True,
        )

    @classmethod
    def execute(cls, prune_plan: PrunePlan | ExpertPlans, filename: str, overwrite: bool) -> io.NodeOutput:
        path, text = plan_file(filename), prune_plan.to_json()
        if path.exists() and not overwrite and path.read_text() != text:
            raise ValueError(f"FastLightGen Save Prune Plan: {path} already holds another plan; choose another "
                             "filename or turn on overwrite")
        prune_plan.save(path)
        message = f"saved {path}\ntrain with: python -m train.stage2 --set stage2.plan={path}"
        if isinstance(prune_plan, ExpertPlans):  # one Stage II run per expert
            message += " stage2.expert=high (and again with stage2.expert=low)"
        return io.NodeOutput(str(path), ui=ui.PreviewText(message))
