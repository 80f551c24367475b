"""Smoke tests for the real-ComfyUI test harness (skipped when ComfyUI is not installed)."""
from __future__ import annotations

import pytest

from research import comfyui_harness

STOCK_NODES = ("KSampler", "SamplerCustomAdvanced", "ModelSamplingSD3", "UNETLoader")


def test_server_object_info_has_stock_nodes(comfyui_server):
    info = comfyui_server.object_info()
    missing = [n for n in STOCK_NODES if n not in info]
    assert not missing, f"stock nodes missing from /object_info: {missing}"
    assert "Wan22ImageToVideoLatent" in info
    one = comfyui_server.object_info("UNETLoader")
    assert "unet_name" in one["UNETLoader"]["input"]["required"]


def test_server_runs_a_prompt(comfyui_server):
    # Tiny CPU-only graph: EmptyImage -> SaveImage (no model needed).
    prompt = {
        "1": {"class_type": "EmptyImage",
              "inputs": {"width": 8, "height": 8, "batch_size": 1, "color": 0xFF0000}},
        "2": {"class_type": "SaveImage", "inputs": {"images": ["1", 0], "filename_prefix": "harness"}},
    }
    entry = comfyui_server.run_prompt(prompt, timeout=120)
    assert entry["status"]["status_str"] == "success"
    (img,) = entry["outputs"]["2"]["images"]
    assert comfyui_server.view(img)[:8] == b"\x89PNG\r\n\x1a\n"
    if comfyui_server.output_dir is not None:
        assert comfyui_server.output_path(img).is_file()


def test_server_rejects_invalid_prompt(comfyui_server):
    bad = {"1": {"class_type": "NoSuchNodeXYZ", "inputs": {}}}
    with pytest.raises(comfyui_harness.PromptError) as ei:
        comfyui_server.queue_prompt(bad)
    assert ei.value.payload["error"]["type"] == "invalid_prompt"


def test_in_process_import(comfy_in_process):
    import comfy.model_management as mm
    import comfy.samplers

    assert mm.cpu_state == mm.CPUState.CPU
    assert "euler" in comfy.samplers.KSampler.SAMPLERS
    assert hasattr(comfy.samplers, "CFGGuider")
