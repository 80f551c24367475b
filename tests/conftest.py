"""Shared pytest fixtures.

ComfyUI fixtures (need ``scripts/install_comfyui.sh``; skipped otherwise):

* ``comfyui_server`` (session): a real ComfyUI server process started once per
  session (``research.comfyui_harness.ServerHandle``, shared with the node benchmarks). Set $COMFYUI_URL to use an
  already running server instead of starting one.
* ``comfy_in_process`` (session): ComfyUI importable in this process (CPU forced),
  so tests can ``import comfy.sd, comfy.samplers, nodes, comfy_extras.nodes_wan``.

Tests that use either fixture are auto-marked ``comfyui``: deselect them with
``-m "not comfyui"``.
"""
from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

from research import comfyui_harness

COMFYUI_FIXTURES = {"comfyui_server", "comfy_in_process"}
# Files that train, sample the committed toy models at length or start several processes: minutes each (the
# CI run's --durations). `pytest -m "not slow"` leaves them out; `.ci/run` runs everything.
SLOW_FILES = {"test_reproduce.py", "test_demo.py", "test_toy_teacher.py", "test_toy_teacher_training.py",
              "test_train_distributed.py", "test_preprocess_dist.py", "test_train.py", "test_sharded_loading.py",
              "test_sequence_parallel.py", "test_experts_training.py", "test_draws.py"}


def pytest_configure(config):
    config.addinivalue_line(
        "markers",
        "comfyui: needs a real ComfyUI install (scripts/install_comfyui.sh); "
        "auto-applied to tests using the comfyui_server / comfy_in_process fixtures",
    )
    config.addinivalue_line("markers", "slow: a test file that takes minutes (SLOW_FILES); auto-applied")


def pytest_collection_modifyitems(config, items):
    for item in items:
        if COMFYUI_FIXTURES & set(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.comfyui)
        if item.path.name in SLOW_FILES:
            item.add_marker(pytest.mark.slow)


class _ExternalServer(comfyui_harness.ServerHandle):
    """Wraps an already running server given by $COMFYUI_URL (never stopped by us)."""

    def __init__(self, url: str):  # noqa: D401 - no process of ours
        from urllib.parse import urlparse

        u = urlparse(url)
        self.proc = None
        self.pid = None
        self.host, self.port = u.hostname, u.port
        self.url = url.rstrip("/")
        self.log_path = None
        self.work_dir = self.output_dir = self.input_dir = self.temp_dir = self.user_dir = None
        self.comfy_dir = comfyui_harness.comfyui_dir()
        self._stopped = True

    def is_alive(self) -> bool:
        return True

    def log_text(self, tail_chars=8000) -> str:
        return "(external server: log not available)"

    def stop(self, *a, **k) -> None:
        pass


@pytest.fixture(scope="session")
def comfyui_server():
    url = os.environ.get("COMFYUI_URL")
    if url:
        yield _ExternalServer(url)
        return
    if not comfyui_harness.comfyui_available():
        pytest.skip(comfyui_harness.INSTALL_HINT)
    handle = comfyui_harness.start_server()
    try:
        yield handle
    finally:
        handle.stop()


@pytest.fixture(scope="session")
def comfy_in_process():
    if not comfyui_harness.comfyui_available():
        pytest.skip(comfyui_harness.INSTALL_HINT)
    comfyui_harness.import_comfy_in_process()
    return comfyui_harness.comfyui_dir()


@pytest.fixture(scope="session")
def pack_package(comfy_in_process):
    """The pack imported as ComfyUI imports a custom node: a package from the repo's __init__.py (our
    `nodes` must not be importable as the top-level `nodes`, which is ComfyUI's)."""
    import importlib.util

    name = "FastLightGen"
    if name not in sys.modules:
        repo = Path(__file__).resolve().parent.parent
        spec = importlib.util.spec_from_file_location(name, repo / "__init__.py",
                                                      submodule_search_locations=[str(repo)])
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        spec.loader.exec_module(module)
    return sys.modules[name]


@pytest.fixture
def one_thread():
    # Bit-exact comparisons with subprocesses run at OMP_NUM_THREADS=1 need the same reduction order.
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
