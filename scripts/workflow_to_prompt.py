"""Convert a ComfyUI workflow in UI format (what the editor saves) into an API prompt (what /prompt takes).

Widget values are matched to input names the way the frontend lays widgets out: the node definition's
inputs in `input_order` (required, then optional), skipping sockets (MODEL, LATENT, ...) and forceInput
widgets; an INT or COMBO with `control_after_generate` (or an INT named seed / noise_seed) stores one extra
value (the control mode) right after its own. A widget input connected by a link takes the link.

    python scripts/workflow_to_prompt.py workflow.json --url http://127.0.0.1:8188 > prompt.json
"""
from __future__ import annotations

import argparse
import json
import sys
import urllib.request
from typing import Any

WIDGET_TYPES = {"INT", "FLOAT", "STRING", "BOOLEAN", "COMBO"}
FRONTEND_ONLY = {"Note", "MarkdownNote", "Reroute", "PrimitiveNode"}  # never reach the server
MUTED, BYPASSED = 2, 4


class WorkflowError(ValueError):
    """A workflow that cannot become a prompt; the message names the node."""


def _is_widget(spec: list) -> bool:
    kind, options = spec[0], (spec[1] if len(spec) > 1 else {}) or {}
    return (isinstance(kind, list) or kind in WIDGET_TYPES) and not options.get("forceInput", False)


def _has_control_value(name: str, spec: list) -> bool:
    kind, options = spec[0], (spec[1] if len(spec) > 1 else {}) or {}
    control = options.get("control_after_generate")
    if kind == "INT":
        return bool(control) if control is not None else name in ("seed", "noise_seed")
    return (isinstance(kind, list) or kind == "COMBO") and bool(control)


def widget_names(node_info: dict) -> list[tuple[str, bool]]:
    """(input name, has a control value after it) for each widget of a node definition, in frontend order."""
    inputs = node_info.get("input", {})
    order = node_info.get("input_order") or {k: list(v) for k, v in inputs.items()}
    out = []
    for section in ("required", "optional"):
        for name in order.get(section, []):
            spec = inputs.get(section, {}).get(name)
            if spec is not None and _is_widget(spec):
                out.append((name, _has_control_value(name, spec)))
    return out


def workflow_to_prompt(workflow: dict, object_info: dict) -> dict[str, dict[str, Any]]:
    links = {link[0]: link for link in workflow.get("links", [])}
    nodes = {n["id"]: n for n in workflow["nodes"]}
    prompt: dict[str, dict[str, Any]] = {}
    for node in workflow["nodes"]:
        kind = node["type"]
        if kind in FRONTEND_ONLY or node.get("mode", 0) == MUTED:
            continue
        if node.get("mode", 0) == BYPASSED:
            raise WorkflowError(f"node {node['id']} ({kind}) is bypassed; un-bypass or delete it first")
        info = object_info.get(kind)
        if info is None:
            raise WorkflowError(f"node {node['id']} has type {kind!r}, which this ComfyUI does not know "
                                "(a custom node pack is missing)")
        inputs: dict[str, Any] = {}
        values = list(node.get("widgets_values") or [])
        position = 0
        for name, control in widget_names(info):
            if position >= len(values):
                raise WorkflowError(f"node {node['id']} ({kind}) has {len(values)} widget values; "
                                    f"its definition needs more (at {name!r})")
            inputs[name] = values[position]
            position += 2 if control else 1
        for slot in node.get("inputs", []):
            link_id = slot.get("link")
            if link_id is None:
                continue
            _, source, source_slot, *_ = links[link_id]
            if nodes[source].get("mode", 0) == MUTED:
                continue
            inputs[slot["name"]] = [str(source), source_slot]
        prompt[str(node["id"])] = {"class_type": kind, "inputs": inputs, "_meta": {"title": node.get("title", kind)}}
    return prompt


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("workflow", help="UI-format workflow .json")
    parser.add_argument("--url", default="http://127.0.0.1:8188", help="a running ComfyUI (for /object_info)")
    args = parser.parse_args(argv)
    with open(args.workflow) as f:
        workflow = json.load(f)
    with urllib.request.urlopen(args.url.rstrip("/") + "/object_info", timeout=120) as resp:
        object_info = json.load(resp)
    json.dump(workflow_to_prompt(workflow, object_info), sys.stdout, indent=2)
    print()
    return 0


if __name__ == "__main__":
    sys.exit(main())
