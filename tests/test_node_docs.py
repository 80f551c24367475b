"""The node help pages (web/docs/<node id>.md, scripts/build_node_docs.py) and the registry metadata (pyproject.toml).

The ComfyUI frontend (comfyui-frontend-package, NodeHelpService) fetches a custom node's help from
/extensions/<pack>/docs/<node id>/<locale>.md, then /extensions/<pack>/docs/<node id>.md, where <pack> is the
second part of the node's python_module ('custom_nodes.<pack>'); ComfyUI serves /extensions/<pack>/ from the
pack's WEB_DIRECTORY.
"""
from __future__ import annotations

import asyncio
import re
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
DOCS = REPO / "web" / "docs"
PYPROJECT = REPO / "pyproject.toml"


@pytest.fixture(scope="module")
def schemas(pack_package):
    extension = asyncio.run(pack_package.comfy_entrypoint())
    return [node.define_schema() for node in asyncio.run(extension.get_node_list())]


def test_every_registered_node_has_a_help_page_naming_its_inputs(schemas):
    assert len(schemas) >= 16
    missing = [s.node_id for s in schemas if not (DOCS / f"{s.node_id}.md").is_file()]
    assert not missing, f"no help page: {missing}; run python scripts/build_node_docs.py"
    for schema in schemas:
        text = (DOCS / f"{schema.node_id}.md").read_text()
        assert text.startswith(f"# {schema.display_name}\n"), schema.node_id
        headings = re.findall(r"^### (\S+)$", text, flags=re.MULTILINE)
        assert headings == [i.id for i in schema.inputs], f"{schema.node_id}: input headings {headings}"
        assert "## Outputs" in text and "## Typical graph" in text, schema.node_id
    extra = {p.stem for p in DOCS.glob("*.md")} - {s.node_id for s in schemas}
    assert not extra, f"help pages of no registered node: {extra}"


def test_the_pack_declares_its_web_directory(pack_package):
    assert (REPO / pack_package.WEB_DIRECTORY / "docs").is_dir()


def test_pyproject_has_the_registry_fields(comfy_in_process):
    tomllib = pytest.importorskip("tomllib")  # Python 3.11+
    data = tomllib.loads(PYPROJECT.read_text())
    project, comfy = data["project"], data["tool"]["comfy"]
    assert re.fullmatch(r"[A-Za-z][A-Za-z0-9._-]{0,98}", project["name"]) and "comfyui" not in project["name"].lower()
    assert re.fullmatch(r"\d+\.\d+\.\d+", project["version"]) and project["description"]
    assert project["license"] == {"file": "LICENSE"} and (REPO / "LICENSE").is_file()
    assert "Operating System :: OS Independent" in project["classifiers"]
    for key in ("Repository", "Documentation", "Bug Tracker"):
        assert project["urls"][key].startswith("https://"), key
    assert comfy["PublisherId"] and comfy["DisplayName"] and comfy["requires-comfyui"]
    # the registry takes the icon as a URL (SVG/PNG/JPG/GIF, at most 800x400); the file is in this repository
    prefix = project["urls"]["Repository"].replace("github.com", "raw.githubusercontent.com") + "/main/"
    assert comfy["Icon"].startswith(prefix) and comfy["Icon"].endswith(".svg")
    icon = REPO / comfy["Icon"].removeprefix(prefix)
    assert icon.is_file() and icon.read_text().lstrip().startswith("<svg")
    # ComfyUI's own reader of pack metadata (comfy_config) parses it
    from comfy_config import config_parser

    config = config_parser.extract_node_configuration(str(REPO))
    assert config.project.name == project["name"] and config.tool_comfy.publisher_id == comfy["PublisherId"]
    assert config.tool_comfy.icon == comfy["Icon"]


def test_the_server_serves_the_help_pages_where_the_frontend_looks(comfyui_server):
    info = comfyui_server.object_info()
    ids = sorted(p.stem for p in DOCS.glob("*.md"))
    assert ids
    for node_id in ids:
        module = info[node_id]["python_module"]  # what the frontend's extractCustomNodeName reads
        assert module.split(".")[0] == "custom_nodes", module
        pack = module.split(".")[1].split("@")[0]
        page = comfyui_server.get(f"/extensions/{pack}/docs/{node_id}.md", raw=True).decode()
        assert page == (DOCS / f"{node_id}.md").read_text()
