"""The repository's shape: dependencies point one way (nodes -> library, train -> library, research -> all),
and the library holds no command-line entry point."""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
PACK = "FastLightGen"  # the name ComfyUI imports the pack under: inside the pack every import is relative
FORBIDDEN = {
    "fastlightgen": {"train", "nodes", "research", "comfy", "comfy_api", "comfy_extras", "folder_paths", PACK},
    "train": {"nodes", "research", "comfy", "comfy_api", "comfy_extras", "folder_paths", PACK},
    "nodes": {"train", "research", PACK},
}


def imported_packages(path: Path, package: str) -> set[str]:
    """Top-level packages a module imports, relative imports resolved against its own package."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            found |= {alias.name.split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            found.add(package if node.level else (node.module or "").split(".")[0])
    return found


def modules(package: str) -> list[Path]:
    return sorted((REPO / package).rglob("*.py"))


@pytest.mark.parametrize("package", sorted(FORBIDDEN))
def test_dependencies_point_one_way(package):
    offenders = {str(p.relative_to(REPO)): sorted(imported_packages(p, package) & FORBIDDEN[package])
                 for p in modules(package)}
    assert not {p: bad for p, bad in offenders.items() if bad}


def test_the_check_sees_a_forbidden_import(tmp_path):
    module = tmp_path / "m.py"
    module.write_text("from train.config import Config\nfrom . import plan\n")
    assert imported_packages(module, "fastlightgen") == {"train", "fastlightgen"}


def test_the_settings_import_no_training_module_back():
    """train/config.py is what every training module imports: it imports none of them, not even inside a function,
    so no import loop starts there (the resume identity, which reads the stage's files, is train/loop/identity.py)."""
    tree = ast.parse((REPO / "train" / "config.py").read_text())
    relative = {node.module for node in ast.walk(tree) if isinstance(node, ast.ImportFrom) and node.level}
    assert relative <= {"ranges"}
    ranges = ast.parse((REPO / "train" / "ranges.py").read_text())
    assert not [node for node in ast.walk(ranges) if isinstance(node, ast.ImportFrom) and node.level]


def test_the_library_has_no_entry_points():
    scripts = [str(p.relative_to(REPO)) for p in modules("fastlightgen") if "__main__" in p.read_text()]
    assert not scripts, "command-line entry points belong in train/ or research/"


def test_the_wheel_holds_the_library_alone(tmp_path):
    """No top-level `nodes` (ComfyUI's own module) or `train` in site-packages: built from a copy of the sources,
    so the checkout gets no build folders."""
    import shutil
    import subprocess
    import sys
    import zipfile

    source = tmp_path / "src"
    for part in ("fastlightgen", "nodes", "train"):
        shutil.copytree(REPO / part, source / part, ignore=shutil.ignore_patterns("__pycache__"))
    for part in ("pyproject.toml", "README.md", "LICENSE"):
        shutil.copy(REPO / part, source / part)
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w",
                    str(tmp_path / "dist"), str(source)], check=True)
    (wheel,) = (tmp_path / "dist").glob("*.whl")
    tops = {name.split("/")[0] for name in zipfile.ZipFile(wheel).namelist()}
    assert {t for t in tops if not t.endswith(".dist-info")} == {"fastlightgen"}
