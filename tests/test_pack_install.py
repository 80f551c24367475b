"""The pack in a ComfyUI installed as creators install it (real server, CPU).

ComfyUI Manager installs ComfyUI's requirements and our requirements.txt, nothing else: the server here runs
under tests/manager_install/sitecustomize.py, which hides every other installed distribution (matplotlib,
deepspeed, pytest, ...). The pack must load whole, and the shipped toy workflows that exercise its widest
code paths must run, with the model folders exactly as `scripts/setup.sh` leaves them (no folder added here).
"""
from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
from test_workflows import NODE_IDS
from workflow_to_prompt import workflow_to_prompt

from research import comfyui_harness

REPO = Path(__file__).resolve().parent.parent
RUN = ["fastlightgen_block_importance", "fastlightgen_student_adapter_ksampler"]


@pytest.fixture(scope="module")
def server():
    if not comfyui_harness.comfyui_available():
        pytest.skip(comfyui_harness.INSTALL_HINT)
    requirements = [comfyui_harness.comfyui_dir() / "requirements.txt", REPO / "requirements.txt"]
    env = {"PYTHONPATH": str(REPO / "tests" / "manager_install"),
           "FASTLIGHTGEN_REQUIREMENTS": os.pathsep.join(map(str, requirements))}
    handle = comfyui_harness.start_server(env=env)
    try:
        yield handle
    finally:
        handle.stop()


def test_the_pack_loads_whole_without_dev_packages(server):
    log = server.log_text(tail_chars=None)
    guard = next(line for line in log.splitlines() if line.startswith("FastLightGen install guard: blocked"))
    assert "'matplotlib'" in guard and "'deepspeed'" in guard  # the guard was active
    failed = [line for line in log.splitlines() if "FastLightGen" in line and ("IMPORT FAILED" in line or
                                                                          "Cannot import" in line)]
    assert not failed and "/custom_nodes/FastLightGen" in log, log[-4000:]
    assert NODE_IDS <= set(server.object_info())


@pytest.mark.parametrize("name", RUN)
def test_the_shipped_workflows_run_after_a_manager_install(server, name):
    workflow = json.loads((REPO / "workflows" / f"{name}.json").read_text())
    entry = server.run_prompt(workflow_to_prompt(workflow, server.object_info()), timeout=300)
    assert entry["status"]["status_str"] == "success", entry["status"]
