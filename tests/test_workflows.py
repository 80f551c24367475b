"""The shipped workflows and FastLightGen's nodes in a real ComfyUI server (CPU).

The server gets `models/fastlightgen` of the repo plus a tmp folder holding randomly initialised stand-ins
for the toy teacher / student that are not shipped yet, so these tests run before training has finished
and use the trained files once they exist. Each workflow is converted from UI format with
scripts/workflow_to_prompt.py, posted to /prompt and must finish with checked outputs.
"""
from __future__ import annotations

import json
import sys
import urllib.error
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from research import comfyui_harness

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "scripts"))
from workflow_to_prompt import workflow_to_prompt  # noqa: E402

WORKFLOWS = sorted((REPO / "workflows").glob("*.json"))
# run in test_workflow_wan22.py, with a random full-size Wan 2.2 VAE and the toy text encoder for UMT5, and in
# test_workflow_a14b.py, on tiny experts and a tiny Wan 2.1 VAE under the real names
NOT_RUN = {"fastlightgen_wan22_ti2v_5b_4step": "needs the real Wan 2.2 TI2V-5B, UMT5 and Wan VAE weights",
           **{f"fastlightgen_wan22_{variant}_a14b_{kind}": f"needs the real Wan 2.2 {variant.upper()}-A14B, UMT5 and "
              "Wan 2.1 VAE weights" for variant, kind in (("t2v", "4step_stock"), ("t2v", "4step"),
                                                          ("t2v", "block_importance"), ("i2v", "4step_stock"),
                                                          ("i2v", "4step"))}}
NODE_IDS = {
    "FastLightGenBlockImportance", "FastLightGenPrunePlan", "FastLightGenApplyPrunePlan",
    "FastLightGenLoadCheckpoint", "FastLightGenWellGuidedTeacher", "FastLightGenTeacherMixSweep",
    "FastLightGenVideoGrid", "FastLightGenFewStepSigmas", "FastLightGenSampler", "FastLightGenToyTextEncode",
    "FastLightGenToyFirstFrameLatent", "FastLightGenToyDatasetLatents", "FastLightGenToyDecode",
    "FastLightGenStudentLoRA", "FastLightGenLoadPrunePlan", "FastLightGenSavePrunePlan",
    "FastLightGenApplyStudentAdapter", "FastLightGenLoadExpertPair", "FastLightGenExpertBlockImportance",
}
FRAMES, SIZE = 6, 32  # the toy world's videos


def _export_stand_ins(folder: Path) -> None:
    """Random toy teacher (12 blocks) / 8-block student in the shipped names, for files not shipped yet."""
    from fastlightgen.adapters import adapt
    from fastlightgen.checkpoint import CheckpointMeta, save_checkpoint
    from fastlightgen.toy.teacher import TOY_TEACHER, build_toy_teacher

    shipped = REPO / "models" / "fastlightgen"
    teacher = build_toy_teacher(TOY_TEACHER, seed=0)
    n = TOY_TEACHER.num_layers
    if not (shipped / "toy_teacher.safetensors").exists():
        save_checkpoint(folder / "toy_teacher.safetensors", teacher, CheckpointMeta(n, list(range(n))))
    if not (shipped / "toy_student.safetensors").exists():
        kept = [0, 1, 2, 4, 6, 8, 10, 11]
        save_checkpoint(folder / "toy_student.safetensors", adapt(teacher).pruned_model(kept), CheckpointMeta(n, kept))


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    if not comfyui_harness.comfyui_available():
        pytest.skip(comfyui_harness.INSTALL_HINT)
    models = tmp_path_factory.mktemp("fastlightgen_models")
    _export_stand_ins(models)
    config = models / "extra_model_paths.yaml"
    config.write_text("fastlightgen_tests:\n  base_path: /\n  fastlightgen: |\n"
                      f"    {REPO / 'models' / 'fastlightgen'}\n    {models}\n"
                      "  diffusion_models: |\n"  # the stock Load Diffusion Model reads the teacher
                      f"    {REPO / 'models' / 'fastlightgen'}\n    {models}\n"
                      f"  loras: {REPO / 'models' / 'loras'}\n"
                      f"  fastlightgen_plans: {models / 'plans'}\n")  # Save Prune Plan writes here
    handle = comfyui_harness.start_server(extra_args=["--extra-model-paths-config", str(config)])
    handle.models_dir = models
    try:
        yield handle
    finally:
        handle.stop()


@pytest.fixture(scope="module")
def object_info(server):
    return server.object_info()


def _prompt(name: str, object_info: dict) -> dict:
    return workflow_to_prompt(json.loads((REPO / "workflows" / f"{name}.json").read_text()), object_info)


def _images(server, entry: dict, node_class: str) -> list[np.ndarray]:
    ids = [k for k, v in entry["prompt"][2].items() if v["class_type"] == node_class]
    return [np.asarray(Image.open(server.output_path(item))) for k in ids
            for item in entry["outputs"][k]["images"]]


# ---------------------------------------------------------------- schema and templates


def test_every_node_in_object_info_with_its_schema(object_info):
    missing = NODE_IDS - set(object_info)
    assert not missing, f"not in /object_info: {missing}"
    for node_id in NODE_IDS:
        info = object_info[node_id]
        assert info["category"].startswith("FastLightGen") and info["description"], node_id
        for section in ("required", "optional"):
            for name, spec in info["input"].get(section, {}).items():
                assert (spec[1] if len(spec) > 1 else {}).get("tooltip"), f"{node_id}.{name} has no tooltip"
    assert object_info["FastLightGenApplyPrunePlan"]["input"]["required"]["prune_plan"][0] == "FASTLIGHTGEN_PRUNE_PLAN"
    assert object_info["FastLightGenBlockImportance"]["output"] == ["IMAGE", "FASTLIGHTGEN_PRUNE_PLAN", "STRING"]
    assert object_info["FastLightGenLoadCheckpoint"]["output"] == ["MODEL", "SIGMAS", "STRING"]
    options = object_info["FastLightGenLoadCheckpoint"]["input"]["required"]["ckpt_name"][1]["options"]
    assert {"toy_teacher.safetensors", "toy_student.safetensors"} <= set(options)
    weight_dtype = object_info["FastLightGenLoadCheckpoint"]["input"]["optional"]["weight_dtype"][1]["options"]
    assert weight_dtype == object_info["UNETLoader"]["input"]["required"]["weight_dtype"][0]
    assert object_info["FastLightGenLoadPrunePlan"]["output"] == ["FASTLIGHTGEN_PRUNE_PLAN", "STRING"]
    assert object_info["FastLightGenSavePrunePlan"]["output_node"]


def test_a_fresh_setup_lists_the_adapter_where_the_adapter_workflow_needs_it(object_info):
    """scripts/setup.sh alone puts the shipped adapter in models/fastlightgen_adapters (the server here adds no
    adapter folder), and no checkpoint loader offers it as a model."""
    adapters = object_info["FastLightGenApplyStudentAdapter"]["input"]["required"]["adapter_name"][1]["options"]
    assert "toy_student_adapter.safetensors" in adapters
    for node, section, name in (("UNETLoader", "required", "unet_name"),
                                ("FastLightGenLoadCheckpoint", "required", "ckpt_name")):
        spec = object_info[node]["input"][section][name]
        options = spec[0] if isinstance(spec[0], list) else spec[1]["options"]
        assert "toy_student_adapter.safetensors" not in options, node


def test_a_missing_file_stops_the_prompt_at_validation(server, object_info):
    """The shipped Wan 2.2 workflow names a student this server does not have: /prompt refuses it before any
    node runs, naming the file and how to make it (ComfyUI itself checks no V3 combo against its options)."""
    with pytest.raises(comfyui_harness.PromptError) as refused:
        server.queue_prompt(_prompt("fastlightgen_wan22_ti2v_5b_4step", object_info))
    errors = json.dumps(refused.value.payload["node_errors"])
    assert "checkpoint 'wan2.2_ti2v_5B_fastlightgen.safetensors' is not there" in errors
    assert "python -m train.export" in errors


def test_workflows_are_served_as_templates(server):
    names = server.get("/workflow_templates").get("FastLightGen", [])
    assert sorted(names) == sorted(p.stem for p in WORKFLOWS) and len(names) >= 5
    for path in WORKFLOWS:
        assert server.get(f"/api/workflow_templates/FastLightGen/{path.name}")["nodes"]
        assert server.get(f"/api/workflow_templates/FastLightGen/{path.stem}.jpg", raw=True)[:2] == b"\xff\xd8"


# ---------------------------------------------------------------- shipped workflows


def test_wan22_workflow_converts(object_info):
    prompt = _prompt("fastlightgen_wan22_ti2v_5b_4step", object_info)
    kinds = {v["class_type"] for v in prompt.values()}
    assert {"CLIPLoader", "VAELoader", "Wan22ImageToVideoLatent", "FastLightGenSampler", "SaveVideo"} <= kinds


@pytest.mark.parametrize("name", [p.stem for p in WORKFLOWS if p.stem not in NOT_RUN])
def test_shipped_workflow_runs(server, object_info, name):
    entry = server.run_prompt(_prompt(name, object_info), timeout=300)
    assert entry["status"]["status_str"] == "success"
    frames = _images(server, entry, "SaveImage")
    assert frames, "no images saved"
    for image in frames:
        assert np.isfinite(image).all() and image.std() > 0  # something was drawn
    if name in ("fastlightgen_block_importance", "fastlightgen_toy_two_experts_block_importance"):
        (plot,) = frames
        assert plot.shape[0] > 200 and plot.shape[1] > 400
        table = next(v for v in entry["outputs"].values() if "text" in v)["text"][0]
        assert "full model" in table and "dropped:" in table
        if name == "fastlightgen_toy_two_experts_block_importance":  # a chart and a table per expert
            assert plot.shape[0] == 2 * 360 and "high-noise expert, sigma in [0.875, 1.0]" in table
    elif name == "fastlightgen_teacher_mix":
        grids = [f for f in frames if f.shape[:2] == (3 * SIZE * 4, 3 * SIZE * 4)]
        assert len(grids) == 1 and len(frames) == FRAMES + 1
    else:
        assert len(frames) == FRAMES and all(f.shape == (SIZE, SIZE, 3) for f in frames)
    if name == "fastlightgen_student_lora":
        report = next(v for v in entry["outputs"].values() if "text" in v)["text"][0]
        assert "Left out (blocks the student dropped): " in report and "33.3% of the LoRA's parameters" in report
    if name == "fastlightgen_toy_student_4step":
        import av

        (video,) = [item for k, v in entry["outputs"].items() for item in v.get("images", [])
                    if item["filename"].endswith(".mp4")]
        with av.open(str(server.output_path(video))) as container:
            assert sum(1 for _ in container.decode(video=0)) == FRAMES


def test_toy_student_t2v_and_prompts_saved_before_speed_turning_and_mode(server, object_info):
    prompt = _student_prompt(object_info)
    latent_id = next(k for k, v in prompt.items() if v["class_type"] == "FastLightGenToyFirstFrameLatent")
    latent = prompt[latent_id]["inputs"]
    assert (latent["speed"], latent["turning"], latent["mode"]) == ("quickly", "blue", "TI2V")
    prompt["930"] = {"class_type": "PreviewAny", "inputs": {"source": [latent_id, 1]}}  # the caption it made

    # T2V: no first frame, the factors come from the caption alone
    caption = "a green square moving up slowly and turning cyan on a plain background"
    latent.update(mode="T2V", caption=caption)
    entry = server.run_prompt(prompt, timeout=300)
    assert entry["outputs"]["930"]["text"][0] == caption
    frames = _images(server, entry, "SaveImage")
    assert len(frames) == FRAMES and all(f.shape == (SIZE, SIZE, 3) and f.std() > 0 for f in frames)

    # an API prompt saved before speed, turning and mode existed still validates and runs with their defaults
    for name in ("speed", "turning", "mode"):
        del latent[name]
    latent["caption"] = ""
    entry = server.run_prompt(prompt, timeout=300)
    assert entry["outputs"]["930"]["text"][0] == "a red circle moving right quickly on a plain background"
    assert len(_images(server, entry, "SaveImage")) == FRAMES


# ---------------------------------------------------------------- bad inputs


def _student_prompt(object_info: dict) -> dict:
    return _prompt("fastlightgen_toy_student_4step", object_info)


def _execution_error(server, prompt: dict) -> str:
    with pytest.raises(comfyui_harness.PromptError) as err:
        server.run_prompt(prompt, timeout=300)
    return str(err.value)


def _validation_error(server, prompt: dict) -> str:
    """ComfyUI's validation errors for the prompt. Outputs that do not depend on the bad node still run
    (HTTP 200 with node_errors); with none left, /prompt answers HTTP 400."""
    try:
        response = server.post("/prompt", {"prompt": prompt})
    except urllib.error.HTTPError as err:
        return json.dumps(json.loads(err.read()))
    assert response["node_errors"], "the bad input passed validation"
    server.wait_for_prompt(response["prompt_id"], timeout=300)
    return json.dumps(response["node_errors"])


def _node(prompt: dict, class_type: str) -> dict:
    return next(v for v in prompt.values() if v["class_type"] == class_type)


def _shipped(server, name: str) -> Path:
    """The committed toy model file, or its random stand-in."""
    path = comfyui_harness.REPO_DIR / "models" / "fastlightgen" / f"{name}.safetensors"
    return path if path.exists() else server.models_dir / f"{name}.safetensors"


def _teacher_plan_json() -> str:
    """A plan for the toy teacher (12 blocks of width 256), as Stage I writes it."""
    from fastlightgen.adapters import ModelFingerprint
    from fastlightgen.plan import PrunePlan

    return PrunePlan.from_blocks(ModelFingerprint("wan", 12, 256), [3, 5, 6, 7]).to_json()


def _serves_a_good_prompt(server, object_info, seed: int) -> None:
    """The server is up and a good prompt (the 4-step student, a fresh seed so it really runs) succeeds."""
    assert server.is_alive() and server.system_stats()
    prompt = _student_prompt(object_info)
    _node(prompt, "FastLightGenSampler")["inputs"]["seed"] = seed
    assert server.run_prompt(prompt, timeout=300)["status"]["status_str"] == "success"


def test_comfyui_fp8_scaled_file_loads_and_samples(server, object_info):
    """The student as ComfyUI ships Wan 14B (fp8_scaled), with its FastLightGen metadata, in the 4-step graph."""
    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    source = _shipped(server, "toy_student")
    with safe_open(str(source), "pt") as f:
        metadata = f.metadata()
    tensors = load_file(str(source))
    for key in [k for k, v in tensors.items() if k.endswith(".weight") and v.ndim == 2]:
        scale = tensors[key].float().abs().amax() / 448
        tensors[key] = (tensors[key].float() / scale).to(torch.float8_e4m3fn)
        tensors[key[: -len("weight")] + "scale_weight"] = scale.reshape(())
    tensors["scaled_fp8"] = torch.tensor([], dtype=torch.float8_e4m3fn)
    save_file(tensors, str(server.models_dir / "toy_student_fp8_scaled.safetensors"), metadata=metadata)
    for weight_dtype in ("default", "fp8_e4m3fn"):
        prompt = _student_prompt(object_info)
        _node(prompt, "FastLightGenLoadCheckpoint")["inputs"].update(
            ckpt_name="toy_student_fp8_scaled.safetensors", weight_dtype=weight_dtype)
        entry = server.run_prompt(prompt, timeout=300)
        frames = _images(server, entry, "SaveImage")
        assert len(frames) == FRAMES and all(f.std() > 0 for f in frames)


def test_a_plan_made_in_one_graph_is_saved_and_loaded_in_another(server, object_info):
    from fastlightgen.plan import PrunePlan

    prompt = _prompt("fastlightgen_block_importance", object_info)
    importance = next(k for k, v in prompt.items() if v["class_type"] == "FastLightGenBlockImportance")
    prompt["910"] = {"class_type": "FastLightGenSavePrunePlan",
                     "inputs": {"prune_plan": [importance, 1], "filename": "toy_teacher_70", "overwrite": True}}
    entry = server.run_prompt(prompt, timeout=300)
    path = Path(entry["outputs"]["910"]["text"][0].splitlines()[0].removeprefix("saved "))
    assert path == server.models_dir / "plans" / "toy_teacher_70.json"
    saved = PrunePlan.load(path)  # what train.stage2 --set stage2.plan=PATH reads
    assert saved.fingerprint.num_blocks == 12 and len(saved.kept) == 8
    for source in ({"plan_name": "toy_teacher_70.json", "plan_json": ""},
                   {"plan_name": "(pasted JSON below)", "plan_json": path.read_text()}):
        prompt = _prompt("fastlightgen_pruned_ksampler", object_info)
        prompt["911"] = {"class_type": "FastLightGenLoadPrunePlan", "inputs": source}
        _node(prompt, "FastLightGenApplyPrunePlan")["inputs"]["prune_plan"] = ["911", 0]
        del prompt[importance]  # the plan now comes from the file: no Stage I run in this graph
        assert server.run_prompt(prompt, timeout=300)["status"]["status_str"] == "success"


def test_bad_inputs_fail_clearly_and_the_server_keeps_serving(server, object_info):
    from safetensors.torch import load_file, save_file

    from fastlightgen.checkpoint import METADATA_KEY, CheckpointMeta

    # a plan for another model: the teacher's Stage I plan applied to the student
    prompt = _prompt("fastlightgen_pruned_ksampler", object_info)
    _node(prompt, "FastLightGenApplyPrunePlan")["inputs"]["model"] = ["900", 0]
    prompt["900"] = {"class_type": "FastLightGenLoadCheckpoint", "inputs": {"ckpt_name": "toy_student.safetensors"}}
    assert "run Stage I on this model" in _execution_error(server, prompt)

    # checkpoints with a gap in the block numbering, and of another family
    tensors = load_file(str(_shipped(server, "toy_teacher")))
    save_file({k: v for k, v in tensors.items() if not k.startswith("blocks.3.")},
              str(server.models_dir / "bad_gap.safetensors"))
    meta = CheckpointMeta(12, list(range(12)), family="flux")
    save_file(tensors, str(server.models_dir / "bad_family.safetensors"), metadata={METADATA_KEY: meta.to_json()})
    for name, message in (("bad_gap.safetensors", "bad_gap.safetensors"),
                          ("bad_family.safetensors", "unknown model family")):
        prompt = _student_prompt(object_info)
        _node(prompt, "FastLightGenLoadCheckpoint")["inputs"]["ckpt_name"] = name
        assert message in _execution_error(server, prompt)

    # betas and steps out of range: rejected by validation (widget bounds) or by the node
    prompt = _prompt("fastlightgen_teacher_mix", object_info)
    _node(prompt, "FastLightGenWellGuidedTeacher")["inputs"]["beta1"] = 99.0
    assert "bigger than max" in _validation_error(server, prompt)
    prompt = _prompt("fastlightgen_teacher_mix", object_info)
    _node(prompt, "FastLightGenTeacherMixSweep")["inputs"]["beta2_values"] = "0, 45"
    assert "out of range" in _execution_error(server, prompt)
    prompt = _student_prompt(object_info)
    sampler = _node(prompt, "FastLightGenSampler")
    prompt["901"] = {"class_type": "FastLightGenFewStepSigmas",
                     "inputs": {"denoising_step_list": "1000, 750, 1500", "shift": 5.0}}
    sampler["inputs"]["sigmas"] = ["901", 0]
    assert "must hold timesteps in (0, 1000]" in _execution_error(server, prompt)
    prompt = _prompt("fastlightgen_block_importance", object_info)
    _node(prompt, "FastLightGenBlockImportance")["inputs"]["num_timesteps"] = 0
    assert "smaller than min" in _validation_error(server, prompt)

    # an empty latent batch
    save_file({"latent_tensor": torch.zeros(0, 48, FRAMES, 8, 8), "latent_format_version_0": torch.tensor([])},
              str(server.input_dir / "empty.latent"))
    prompt = _student_prompt(object_info)
    prompt["902"] = {"class_type": "LoadLatent", "inputs": {"latent": "empty.latent"}}
    _node(prompt, "FastLightGenSampler")["inputs"]["latent_image"] = ["902", 0]
    assert "LATENT batch is empty" in _execution_error(server, prompt)

    # the stock Load LoRA on a student: the sampler refuses, and says which node to use
    prompt = _student_prompt(object_info)
    prompt["903"] = {"class_type": "LoraLoaderModelOnly", "inputs": {
        "model": _node(prompt, "FastLightGenSampler")["inputs"]["model"],
        "lora_name": "toy_teacher_demo_lora.safetensors", "strength_model": 1.0}}
    _node(prompt, "FastLightGenSampler")["inputs"]["model"] = ["903", 0]
    assert "'FastLightGen LoRA (pruned student)' instead" in _execution_error(server, prompt)

    # ... and the next good prompt still runs
    _serves_a_good_prompt(server, object_info, seed=1)


def test_nan_and_misfits_fail_clearly_and_the_server_keeps_serving(server, object_info):
    """Each bad input gives its error before the expensive part, never a NaN 'success'; a good prompt runs after."""
    from safetensors.torch import load_file, save_file

    checks = []  # (prompt, expected text in the execution error)

    # NaN betas pass ComfyUI's widget bounds (NaN is neither below min nor above max): the node refuses them
    prompt = _prompt("fastlightgen_teacher_mix", object_info)
    _node(prompt, "FastLightGenWellGuidedTeacher")["inputs"]["beta1"] = float("nan")
    checks.append((prompt, "FastLightGen Well-Guided Teacher: beta1 is nan; every number must be finite"))
    prompt = _prompt("fastlightgen_block_importance", object_info)
    _node(prompt, "FastLightGenBlockImportance")["inputs"]["keep_ratio"] = float("nan")
    checks.append((prompt, "FastLightGen Block Importance: keep_ratio is nan"))

    # NaN produced during sampling (a checkpoint with NaN weights): an error, not a success with a NaN video
    tensors = load_file(str(_shipped(server, "toy_student")))
    tensors["head.head.bias"] = torch.full_like(tensors["head.head.bias"], float("nan"))
    save_file(tensors, str(server.models_dir / "nan_student.safetensors"))
    prompt = _student_prompt(object_info)
    _node(prompt, "FastLightGenLoadCheckpoint")["inputs"]["ckpt_name"] = "nan_student.safetensors"
    checks.append((prompt, "FastLightGen Sampler: sampling produced NaN or inf values"))

    # a Wan 2.1 (16-channel) latent into the 48-channel TI2V model
    save_file({"latent_tensor": torch.randn(1, 16, FRAMES, 8, 8), "latent_format_version_0": torch.tensor([])},
              str(server.input_dir / "wan21.latent"))
    prompt = _student_prompt(object_info)
    prompt["920"] = {"class_type": "LoadLatent", "inputs": {"latent": "wan21.latent"}}
    _node(prompt, "FastLightGenSampler")["inputs"]["latent_image"] = ["920", 0]
    checks.append((prompt, "but this model takes Wan 2.2 TI2V latents (48 channels): use Wan22ImageToVideoLatent"))

    # a shared plan with a NaN score, and a pasted text that is not a plan
    plan = json.loads(_teacher_plan_json())
    plan["scores"] = [float("nan")] + [1.0] * 11
    for text, message in ((json.dumps(plan), "the prune plan's scores must be finite"),
                          ("{kept: [0]", "plan_json is not JSON")):
        prompt = _prompt("fastlightgen_pruned_ksampler", object_info)
        prompt["921"] = {"class_type": "FastLightGenLoadPrunePlan",
                         "inputs": {"plan_name": "(pasted JSON below)", "plan_json": text}}
        _node(prompt, "FastLightGenApplyPrunePlan")["inputs"]["prune_plan"] = ["921", 0]
        checks.append((prompt, message))

    # fp8 scales ComfyUI would silently ignore (no scaled_fp8 marker)
    tensors = load_file(str(_shipped(server, "toy_student")))
    key = "blocks.0.ffn.0.weight"
    tensors[key] = tensors[key].to(torch.float8_e4m3fn)
    tensors["blocks.0.ffn.0.scale_weight"] = torch.tensor(1.0)
    save_file(tensors, str(server.models_dir / "no_marker.safetensors"))
    prompt = _student_prompt(object_info)
    _node(prompt, "FastLightGenLoadCheckpoint")["inputs"]["ckpt_name"] = "no_marker.safetensors"
    checks.append((prompt, "but no 'scaled_fp8' marker tensor"))

    for seed, (prompt, message) in enumerate(checks, start=10):
        assert message in _execution_error(server, prompt)
        _serves_a_good_prompt(server, object_info, seed)

