"""FastLightGen as a ComfyUI custom-node pack (V3 schema).

ComfyUI calls `comfy_entrypoint`; the nodes are imported only then, so this file imports cleanly
without ComfyUI (as the library and training code do). No NODE_CLASS_MAPPINGS here on purpose:
ComfyUI would use it and ignore the entrypoint.
"""
import os
import sys

_PACK_DIR = os.path.dirname(os.path.abspath(__file__))
if _PACK_DIR not in sys.path:
    # appended, not prepended: ComfyUI's own top-level `nodes` module must keep winning over our nodes/
    sys.path.append(_PACK_DIR)

# ComfyUI serves this folder at /extensions/<pack folder>/; the frontend's node help panel reads
# docs/<node id>.md from it (written by scripts/build_node_docs.py)
WEB_DIRECTORY = "./web"


async def comfy_entrypoint():
    from .nodes.extension import FastLightGenExtension

    return FastLightGenExtension()
