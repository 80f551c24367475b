"""The shipped workflows in the real ComfyUI editor, driven through headless Chromium (DevTools protocol).

Loads every workflow template of the pack into the served UI, checks that the editor knows every node
type in it, and saves a screenshot of each (in $FLG_SCREENSHOT_DIR, else pytest's tmp dir).
Skipped where Debian's chromium is absent (.ci/run installs it).
"""
from __future__ import annotations

import asyncio
import base64
import itertools
import json
import os
import shutil
import subprocess
import time
import urllib.request
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
WORKFLOWS = sorted(p.stem for p in (REPO / "workflows").glob("*.json"))
CHROMIUM = shutil.which("chromium") or ("/usr/bin/chromium" if Path("/usr/bin/chromium").exists() else None)
FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--no-first-run", "--disable-background-networking",
         "--disable-component-update", "--disable-sync", "--window-size=1600,1000", "--remote-debugging-port=0"]
UI_READY = "Boolean(window.app && window.app.graph && window.LiteGraph && window.app.vueAppReady !== false)"
LOAD_AND_CHECK = """(async () => {
  const url = '/api/workflow_templates/FastLightGen/%s.json';
  const workflow = await (await fetch(url)).json();
  await window.app.loadGraphData(workflow);
  const nodes = window.app.graph._nodes;
  const missing = nodes.filter(n => !window.LiteGraph.registered_node_types[n.type]).map(n => n.type);
  return JSON.stringify({nodes: nodes.length, expected: workflow.nodes.length, missing});
})()"""

# the first-run templates dialog would hide the canvas in the screenshots
CLOSE_DIALOGS = "document.querySelectorAll('[role=dialog] button .pi-times').forEach(i => i.closest('button').click())"

pytestmark = pytest.mark.skipif(CHROMIUM is None, reason="chromium not installed (Debian package 'chromium'; "
                                                           "scripts/install_comfyui.sh --with-chromium)")


class DevTools:
    """A minimal Chrome DevTools Protocol client over aiohttp's websocket."""

    def __init__(self, ws):
        self.ws, self.ids = ws, itertools.count(1)

    async def call(self, method: str, timeout: float = 60.0, **params) -> dict:
        call_id = next(self.ids)
        await self.ws.send_json({"id": call_id, "method": method, "params": params})
        while True:
            message = await asyncio.wait_for(self.ws.receive_json(), timeout)
            if message.get("id") == call_id:
                if "error" in message:
                    raise RuntimeError(f"{method}: {message['error']}")
                return message["result"]

    async def evaluate(self, expression: str, timeout: float = 60.0):
        result = await self.call("Runtime.evaluate", timeout, expression=expression, awaitPromise=True,
                                 returnByValue=True)
        if "exceptionDetails" in result:
            raise RuntimeError(f"page error: {json.dumps(result['exceptionDetails'])[:2000]}")
        return result["result"].get("value")


def _start_chromium(profile: Path) -> tuple[subprocess.Popen, str]:
    proc = subprocess.Popen([CHROMIUM, *FLAGS, f"--user-data-dir={profile}", "about:blank"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    port_file = profile / "DevToolsActivePort"
    deadline = time.monotonic() + 60
    while not port_file.exists() or not port_file.read_text().strip():
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            raise RuntimeError("chromium did not open its DevTools port")
        time.sleep(0.2)
    port = port_file.read_text().split()[0]
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/json/list", timeout=10) as resp:
        page = next(t for t in json.load(resp) if t["type"] == "page")
    return proc, page["webSocketDebuggerUrl"]


async def _open_editor(ws, server_url: str) -> DevTools:
    tools = DevTools(ws)
    await tools.call("Page.enable")
    await tools.call("Page.navigate", url=server_url)
    deadline = time.monotonic() + 180
    while not await tools.evaluate(UI_READY):
        if time.monotonic() > deadline:
            raise RuntimeError("the ComfyUI editor did not start in 180 s")
        await asyncio.sleep(1.0)
    return tools


async def _check_workflows(ws_url: str, server_url: str, shots: Path) -> dict[str, dict]:
    import aiohttp

    results = {}
    async with aiohttp.ClientSession() as session, session.ws_connect(ws_url, max_msg_size=0) as ws:
        tools = await _open_editor(ws, server_url)
        for name in WORKFLOWS:
            results[name] = json.loads(await tools.evaluate(LOAD_AND_CHECK % name, timeout=120))
            await tools.evaluate(CLOSE_DIALOGS)
            await asyncio.sleep(1.0)  # let the canvas draw
            shot = await tools.call("Page.captureScreenshot", format="png")
            (shots / f"{name}.png").write_bytes(base64.b64decode(shot["data"]))
    return results


def test_every_workflow_loads_in_the_editor_without_missing_nodes(comfyui_server, tmp_path):
    shots = Path(os.environ.get("FLG_SCREENSHOT_DIR") or tmp_path / "screenshots")
    shots.mkdir(parents=True, exist_ok=True)
    proc, ws_url = _start_chromium(tmp_path / "profile")
    try:
        results = asyncio.run(_check_workflows(ws_url, comfyui_server.url, shots))
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()
    assert set(results) == set(WORKFLOWS)
    for name, result in results.items():
        assert result["missing"] == [], f"{name}: missing node types {result['missing']}"
        assert result["nodes"] == result["expected"], f"{name}: {result}"
        assert (shots / f"{name}.png").stat().st_size > 10_000, f"{name}: blank screenshot?"


HELP_NODE = "FastLightGenSampler"
# the editor's own help panel state (Pinia store 'nodeHelp'), as the node library's help button opens it
OPEN_HELP = """(async () => {
  const pinia = document.querySelector('#vue-app').__vue_app__.config.globalProperties.$pinia;
  const help = pinia._s.get('nodeHelp'), nodeDef = pinia._s.get('nodeDef').nodeDefsByName['%s'];
  help.openHelp(nodeDef);
  for (let i = 0; i < 300 && (help.isLoading || !help.renderedHelpHtml); i++)
    await new Promise(r => setTimeout(r, 100));
  return JSON.stringify({baseUrl: help.baseUrl, error: help.error, html: help.renderedHelpHtml});
})()"""


async def _open_help(ws_url: str, server_url: str) -> dict:
    import aiohttp

    async with aiohttp.ClientSession() as session, session.ws_connect(ws_url, max_msg_size=0) as ws:
        tools = await _open_editor(ws, server_url)
        return json.loads(await tools.evaluate(OPEN_HELP % HELP_NODE, timeout=60))


def test_the_editor_shows_a_nodes_help_page(comfyui_server, tmp_path):
    """The help panel loads the pack's page (web/docs/<node id>.md), not the fallback of the node's description."""
    proc, ws_url = _start_chromium(tmp_path / "profile")
    try:
        result = asyncio.run(_open_help(ws_url, comfyui_server.url))
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()
    assert result["error"] is None and result["baseUrl"].endswith("/docs/"), result
    assert "Typical graph" in result["html"] and "latent_image" in result["html"], result["html"][:500]
