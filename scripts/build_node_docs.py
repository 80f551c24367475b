"""Write the node help pages (web/docs/<node id>.md) that the ComfyUI frontend shows in its node help panel.

The frontend fetches a custom node's help from /extensions/<pack folder>/docs/<node id>.md (after trying
docs/<node id>/<locale>.md); ComfyUI serves /extensions/<pack folder>/ from the pack's WEB_DIRECTORY
(web/, declared in __init__.py). Each page is made from the node's schema (description, inputs with their
tooltips, outputs) plus a typical graph from TYPICAL below and the shipped workflows that use the node, so
the pages follow the nodes: rerun after changing a schema (tests/test_node_docs.py checks every node).

    python scripts/build_node_docs.py
"""
from __future__ import annotations

import asyncio
import importlib.util
import json
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))  # run as a file: the repository's packages (research) are importable

DOCS_DIR = REPO / "web" / "docs"

# node id -> a typical graph around the node, in words (the schema says the rest)
TYPICAL = {
    "FastLightGenBlockImportance": "Load FastLightGen Checkpoint (the teacher) and a batch of clean latents with "
    "their prompts (e.g. Toy Dataset Latents + Toy Text Encode, or VAE-encoded videos + CLIP Text Encode) -> "
    "Block Importance -> Save Prune Plan (for `train.stage2`) or Apply Prune Plan; show `plot` with Preview "
    "Image and `table` with a text preview.",
    "FastLightGenPrunePlan": "Load FastLightGen Checkpoint -> Prune Plan (drop a block list, or re-rank the "
    "scores of Block Importance wired into `scores_from`) -> Apply Prune Plan -> KSampler.",
    "FastLightGenApplyPrunePlan": "Load FastLightGen Checkpoint -> Apply Prune Plan (plan from Block Importance, "
    "Prune Plan or Load Prune Plan) -> the stock KSampler -> VAE Decode (Toy Decode for the toy world).",
    "FastLightGenLoadPrunePlan": "Load Prune Plan -> Apply Prune Plan, Well-Guided Teacher or Teacher Mix Sweep; "
    "the same plan file that training reads. A two-expert plan file (Wan 2.2 A14B): one Load Prune Plan per "
    "expert (`expert` high_noise / low_noise) -> Apply Prune Plan on that expert's MODEL.",
    "FastLightGenSavePrunePlan": "Block Importance (or Prune Plan) -> Save Prune Plan; then "
    "`python -m train.stage2 --set stage2.plan=PATH` or Load Prune Plan in another graph. Block Importance "
    "(two experts) -> Save Prune Plan (`expert_plans`) -> `train.stage2 ... stage2.expert=high` (and low).",
    "FastLightGenExpertBlockImportance": "Load FastLightGen Expert Pair (the Wan 2.2 A14B teacher's two files) "
    "and VAE Encode (Wan 2.1 VAE) of real video frames with their prompt -> Block Importance (two experts) -> Save "
    "Prune Plan (`expert_plans`, for `train.stage2`) or Apply Prune Plan per expert; show `plot` with Save Image "
    "and `table` with a text preview.",
    "FastLightGenLoadExpertPair": "Load FastLightGen Expert Pair (`model_high_noise`, `model_low_noise`, the "
    "recommended `SIGMAS`) -> FastLightGen Sampler (`model`, `model_low_noise`, `sigmas`), with CLIPLoader type "
    "wan + CLIP Text Encode and EmptyHunyuanLatentVideo (I2V-A14B: WanImageToVideo with Load Image, its positive "
    "and latent) -> VAE Decode (Wan 2.1 VAE) -> Create Video -> Save Video; or -> Block Importance (two experts).",
    "FastLightGenLoadExpertPairFolder": "Load FastLightGen Expert Pair (diffusers folder) (the downloaded "
    "Wan2.2-T2V-A14B-Diffusers folder in models/diffusers; `model_high_noise`, `model_low_noise`, `SIGMAS`) -> "
    "FastLightGen Sampler (`model`, `model_low_noise`), as Load FastLightGen Expert Pair; or -> Block Importance "
    "(two experts).",
    "FastLightGenLoadCheckpoint": "Load FastLightGen Checkpoint -> FastLightGen Sampler (`MODEL` and the "
    "recommended `SIGMAS`), with a text encoder (CLIPLoader type wan + CLIP Text Encode) and "
    "Wan22ImageToVideoLatent for the start latent -> VAE Decode -> Create Video -> Save Video.",
    "FastLightGenApplyStudentAdapter": "Load Diffusion Model (the full Wan, any format) -> Apply Student "
    "Adapter -> FastLightGen Sampler (`MODEL` and the recommended `SIGMAS`), optionally through FastLightGen "
    "LoRA (pruned student) first; text encoder, start latent and VAE as for the full model.",
    "FastLightGenWellGuidedTeacher": "Load FastLightGen Checkpoint + a prune plan -> Well-Guided Teacher (GUIDER) "
    "-> SamplerCustomAdvanced with KSamplerSelect (euler), BasicScheduler and RandomNoise -> VAE Decode.",
    "FastLightGenTeacherMixSweep": "Load FastLightGen Checkpoint + a prune plan -> Teacher Mix Sweep (sampler from "
    "KSamplerSelect, sigmas from BasicScheduler) -> VAE Decode -> Video Grid with the sweep's `labels` -> "
    "Save Image.",
    "FastLightGenVideoGrid": "Teacher Mix Sweep -> VAE Decode -> Video Grid (`labels` from the sweep) -> "
    "Save Image or Preview Image.",
    "FastLightGenFewStepSigmas": "Few-Step Sigmas -> FastLightGen Sampler `sigmas` (or SamplerCustom), to try "
    "another denoising step list than the one the checkpoint recommends.",
    "FastLightGenSampler": "Load FastLightGen Checkpoint (`MODEL`, `SIGMAS`) + a prompt + a start latent "
    "(Wan22ImageToVideoLatent, or Toy First-Frame Latent) -> FastLightGen Sampler -> VAE Decode -> "
    "Create Video -> Save Video. Wan 2.2 A14B: Load FastLightGen Expert Pair -> both experts into `model` and "
    "`model_low_noise`; I2V-A14B takes WanImageToVideo's `positive` and `latent` (the start image).",
    "FastLightGenStudentLoRA": "Load FastLightGen Checkpoint (the student) -> FastLightGen LoRA (pruned "
    "student) with a LoRA made for the full model -> FastLightGen Sampler. The stock Load LoRA would put "
    "the LoRA's blocks on the wrong student blocks.",
    "FastLightGenToyTextEncode": "Toy Text Encode -> FastLightGen Sampler `positive` (or KSampler, Block "
    "Importance); the toy world's stand-in for CLIPLoader (wan) + CLIP Text Encode.",
    "FastLightGenToyFirstFrameLatent": "Toy First-Frame Latent -> FastLightGen Sampler `latent_image`, its "
    "`caption` -> Toy Text Encode; the toy world's stand-in for Wan22ImageToVideoLatent.",
    "FastLightGenToyDatasetLatents": "Toy Dataset Latents -> Block Importance `latent`, its `captions` -> "
    "Toy Text Encode -> Block Importance `positive`.",
    "FastLightGenToyDecode": "FastLightGen Sampler (or KSampler) -> Toy Decode -> Save Image, or Create Video "
    "-> Save Video; the toy world's stand-in for VAE Decode.",
}


def node_list() -> list:
    """The pack's registered nodes, imported as ComfyUI imports the pack (ComfyUI in this process, CPU)."""
    from research import comfyui_harness

    comfyui_harness.import_comfy_in_process()
    if "FastLightGen" not in sys.modules:
        spec = importlib.util.spec_from_file_location("FastLightGen", REPO / "__init__.py",
                                                      submodule_search_locations=[str(REPO)])
        module = importlib.util.module_from_spec(spec)
        sys.modules["FastLightGen"] = module
        spec.loader.exec_module(module)
    extension = asyncio.run(sys.modules["FastLightGen"].comfy_entrypoint())
    return asyncio.run(extension.get_node_list())


def workflows_using(node_id: str) -> list[str]:
    return sorted(p.name for p in (REPO / "workflows").glob("*.json")
                  if any(n["type"] == node_id for n in json.loads(p.read_text())["nodes"]))


def _one_line(text: str | None) -> str:
    return " ".join((text or "").split())


def page(schema) -> str:
    """The help page of one node: what it does, each input under its own heading, outputs, a typical graph."""
    lines = [f"# {schema.display_name}", "", _one_line(schema.description), "", "## Inputs", ""]
    for item in schema.inputs:
        optional = ", optional" if item.optional else ""
        lines += [f"### {item.id}", "", f"*{item.get_io_type()}{optional}.* {_one_line(item.tooltip)}", ""]
    lines += ["## Outputs", ""]
    for item in schema.outputs:
        name = item.display_name or item.get_io_type()
        tooltip = f": {_one_line(item.tooltip)}" if item.tooltip else ""
        lines.append(f"- **{name}** ({item.get_io_type()}){tooltip}")
    lines += ["", "## Typical graph", "", TYPICAL.get(schema.node_id, "See the shipped workflows."), ""]
    used = workflows_using(schema.node_id)
    if used:
        lines += ["Shipped workflows with this node (Workflow > Browse Templates > FastLightGen): "
                  + ", ".join(f"`{name}`" for name in used) + ".", ""]
    return "\n".join(lines)


def main() -> None:
    DOCS_DIR.mkdir(parents=True, exist_ok=True)
    for node in node_list():
        schema = node.define_schema()
        path = DOCS_DIR / f"{schema.node_id}.md"
        path.write_text(page(schema))
        print(f"wrote {path.relative_to(REPO)}")


if __name__ == "__main__":
    main()
