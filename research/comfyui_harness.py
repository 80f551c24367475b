"""Helpers for tests that run against a real ComfyUI (see scripts/install_comfyui.sh).

Two ways to use ComfyUI from tests:

* a real server process (``start_server()`` -> ``ServerHandle``) that the tests
  talk to over HTTP (``/object_info``, ``/prompt``, ``/history/{id}``, ...);
* an in-process import (``import_comfy_in_process()``), after which tests can
  ``import comfy.sd, comfy.samplers, nodes, comfy_extras.nodes_wan`` directly.

Only the standard library is used (urllib), so this module imports fine even
when ComfyUI is not installed; ``comfyui_available()`` tells whether it is.
"""
from __future__ import annotations

import atexit
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.parse
import urllib.request
import uuid
from pathlib import Path
from typing import Any, Iterable

REPO_DIR = Path(__file__).resolve().parent.parent

DEFAULT_START_TIMEOUT = 180.0  # seconds; the CPU is slow (startup is ~7 s here)
DEFAULT_PROMPT_TIMEOUT = 600.0

INSTALL_HINT = "ComfyUI not installed: run scripts/install_comfyui.sh"


# --------------------------------------------------------------------------- location


def comfyui_dir() -> Path:
    """ComfyUI install folder: $COMFYUI_DIR, else <repo>/.comfyui."""
    env = os.environ.get("COMFYUI_DIR")
    return Path(env).expanduser().resolve() if env else REPO_DIR / ".comfyui"


def comfyui_available() -> bool:
    """True when a ComfyUI tree is installed at ``comfyui_dir()``."""
    d = comfyui_dir()
    return (d / "main.py").is_file() and (d / "comfy" / "samplers.py").is_file()


# --------------------------------------------------------------------------- errors


class ComfyUIError(RuntimeError):
    """Server failed to start / died / returned an HTTP error."""


class PromptError(ComfyUIError):
    """A prompt was rejected (validation, HTTP 400) or finished with status 'error'."""

    def __init__(self, message: str, payload: Any = None):
        super().__init__(message)
        self.payload = payload


# --------------------------------------------------------------------------- http


def _free_port(host: str = "127.0.0.1") -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def _request(method: str, url: str, data: Any = None, timeout: float = 30.0,
             raw: bool = False) -> Any:
    body = None
    headers = {}
    if data is not None:
        body = json.dumps(data).encode()
        headers["Content-Type"] = "application/json"
    req = urllib.request.Request(url, data=body, method=method, headers=headers)
    with urllib.request.urlopen(req, timeout=timeout) as resp:
        payload = resp.read()
    if raw:
        return payload
    return json.loads(payload) if payload else None


# --------------------------------------------------------------------------- server


class ServerHandle:
    """A running ``python main.py --cpu ...`` ComfyUI process.

    Attributes: ``proc``, ``pid``, ``host``, ``port``, ``url``, ``log_path``,
    ``work_dir`` (tmp root), ``output_dir``, ``input_dir``, ``temp_dir``,
    ``user_dir``, ``comfy_dir``.
    """

    def __init__(self, proc: subprocess.Popen, host: str, port: int, log_path: Path,
                 work_dir: Path, comfy_dir: Path, owns_work_dir: bool, log_file=None):
        self.proc = proc
        self.pid = proc.pid
        self.host = host
        self.port = port
        self.url = f"http://{host}:{port}"
        self.log_path = log_path
        self.work_dir = work_dir
        self.output_dir = work_dir / "output"
        self.input_dir = work_dir / "input"
        self.temp_dir = work_dir / "temp"  # ComfyUI appends "temp" to --temp-directory
        self.user_dir = work_dir / "user"
        self.comfy_dir = comfy_dir
        self._owns_work_dir = owns_work_dir
        self._log_file = log_file
        self._stopped = False

    # -- lifecycle -----------------------------------------------------------------
    def is_alive(self) -> bool:
        return self.proc.poll() is None

    def log_text(self, tail_chars: int | None = 8000) -> str:
        try:
            txt = self.log_path.read_text(errors="replace")
        except OSError:
            return ""
        return txt if tail_chars is None else txt[-tail_chars:]

    def stop(self, timeout: float = 15.0, keep_work_dir: bool | None = None) -> None:
        """Terminate the server process (by pid), then kill it if it lingers."""
        if self._stopped:
            return
        self._stopped = True
        if self.proc.poll() is None:
            try:
                self.proc.terminate()
                self.proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=timeout)
            except ProcessLookupError:
                pass
        if self._log_file is not None:
            self._log_file.close()
            self._log_file = None
        if keep_work_dir is None:
            keep_work_dir = bool(os.environ.get("COMFYUI_KEEP_TMP"))
        if self._owns_work_dir and not keep_work_dir:
            # keep the log for post-mortem if the caller wants it: it is inside work_dir
            shutil.rmtree(self.work_dir, ignore_errors=True)

    def __enter__(self) -> "ServerHandle":
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    def __repr__(self) -> str:
        return f"<ServerHandle pid={self.pid} url={self.url} alive={self.is_alive()}>"

    # -- http --------------------------------------------------------------------------
    def get(self, path: str, timeout: float = 30.0, raw: bool = False) -> Any:
        return _request("GET", self.url + path, timeout=timeout, raw=raw)

    def post(self, path: str, data: Any = None, timeout: float = 30.0) -> Any:
        return _request("POST", self.url + path, data=data if data is not None else {},
                        timeout=timeout)

    def object_info(self, node_class: str | None = None) -> dict:
        """``/object_info`` (all nodes) or ``/object_info/{node_class}``."""
        if node_class:
            return self.get("/object_info/" + urllib.parse.quote(node_class))
        return self.get("/object_info", timeout=120.0)

    def system_stats(self) -> dict:
        return self.get("/system_stats")

    def queue_prompt(self, prompt: dict, client_id: str | None = None,
                     extra_data: dict | None = None) -> str:
        """POST an API-format prompt to ``/prompt``; returns the prompt_id.

        Raises PromptError (with ``.payload`` = ComfyUI's ``{"error", "node_errors"}``)
        when validation fails. Note a prompt must contain at least one OUTPUT_NODE
        (SaveImage, PreviewImage, PreviewAny, SaveLatent, ...).
        """
        body: dict[str, Any] = {"prompt": prompt, "client_id": client_id or uuid.uuid4().hex}
        if extra_data:
            body["extra_data"] = extra_data
        try:
            resp = self.post("/prompt", body)
        except urllib.error.HTTPError as e:
            try:
                payload = json.loads(e.read() or b"null")
            except ValueError:
                payload = None
            raise PromptError(f"/prompt rejected (HTTP {e.code}): "
                              f"{json.dumps(payload, indent=1)[:4000]}", payload) from None
        return resp["prompt_id"]

    def history(self, prompt_id: str) -> dict | None:
        """The ``/history/{id}`` entry, or None while queued/running."""
        return (self.get(f"/history/{prompt_id}") or {}).get(prompt_id)

    def wait_for_prompt(self, prompt_id: str, timeout: float = DEFAULT_PROMPT_TIMEOUT,
                        poll: float = 0.25, raise_on_error: bool = True) -> dict:
        """Poll ``/history/{id}`` until the prompt finished; returns the history entry
        ``{"prompt", "outputs", "status": {"status_str", "completed", "messages"}, "meta"}``.
        """
        deadline = time.monotonic() + timeout
        while True:
            entry = self.history(prompt_id)  # ComfyUI only adds finished prompts to history
            if entry is not None:
                status = entry.get("status") or {}
                if raise_on_error and status.get("status_str") == "error":
                    msgs = [m for m in status.get("messages", [])
                            if m and m[0] in ("execution_error", "execution_interrupted")]
                    raise PromptError(
                        f"prompt {prompt_id} failed: {json.dumps(msgs, indent=1)[:6000]}\n"
                        f"--- server log tail ---\n{self.log_text(4000)}", entry)
                return entry
            if not self.is_alive():
                raise ComfyUIError(f"ComfyUI died while running {prompt_id}:\n{self.log_text()}")
            if time.monotonic() > deadline:
                try:
                    self.post("/interrupt")
                except Exception:
                    pass
                raise ComfyUIError(f"prompt {prompt_id} not done after {timeout:.0f}s\n"
                                   f"--- server log tail ---\n{self.log_text(4000)}")
            time.sleep(poll)

    def run_prompt(self, prompt: dict, timeout: float = DEFAULT_PROMPT_TIMEOUT,
                   raise_on_error: bool = True) -> dict:
        """queue_prompt + wait_for_prompt. Returns the history entry (see above);
        ``entry["outputs"][node_id]`` holds e.g. ``{"images": [{"filename", "subfolder", "type"}]}``.
        """
        pid = self.queue_prompt(prompt)
        return self.wait_for_prompt(pid, timeout=timeout, raise_on_error=raise_on_error)

    def output_path(self, item: dict) -> Path:
        """Local path of an output entry ``{"filename", "subfolder", "type"}``."""
        base = {"output": self.output_dir, "temp": self.temp_dir, "input": self.input_dir}[
            item.get("type", "output")]
        return base / item.get("subfolder", "") / item["filename"]

    def view(self, item: dict) -> bytes:
        """Download an output file through ``/view`` (as the frontend does)."""
        q = urllib.parse.urlencode({k: item.get(k, "") for k in ("filename", "subfolder", "type")})
        return self.get("/view?" + q, raw=True)

    def free_memory(self) -> None:
        self.post("/free", {"unload_models": True, "free_memory": True})


def start_server(port: int | None = None, host: str = "127.0.0.1",
                 work_dir: str | os.PathLike | None = None,
                 extra_args: Iterable[str] = (),
                 timeout: float = DEFAULT_START_TIMEOUT,
                 env: dict | None = None,
                 disable_api_nodes: bool = True,
                 python: str | None = None) -> ServerHandle:
    """Start ``python main.py --cpu --listen HOST --port N --disable-auto-launch`` in the
    ComfyUI folder and wait until ``/system_stats`` answers.

    Output/input/temp/user folders and the log live under ``work_dir`` (a fresh tmp
    dir by default, removed on ``stop()`` unless $COMFYUI_KEEP_TMP is set), so tests
    do not litter the ComfyUI install. The SQLite DB is in-memory. The stock
    ``input/example.png`` is copied into the input folder. Model folders are the
    install's own (``<comfyui>/models/...``); pass
    ``extra_args=["--extra-model-paths-config", yaml]`` for more.
    """
    cdir = comfyui_dir()
    if not comfyui_available():
        raise ComfyUIError(f"{INSTALL_HINT} (looked in {cdir})")
    port = port or _free_port(host)
    owns = work_dir is None
    wdir = Path(tempfile.mkdtemp(prefix="comfyui-test-")) if owns else Path(work_dir)
    for sub in ("output", "input", "user"):
        (wdir / sub).mkdir(parents=True, exist_ok=True)
    example = cdir / "input" / "example.png"
    if example.is_file() and not (wdir / "input" / "example.png").exists():
        shutil.copy(example, wdir / "input" / "example.png")
    log_path = wdir / "comfyui.log"

    cmd = [python or sys.executable, "main.py", "--cpu",
           "--listen", host, "--port", str(port), "--disable-auto-launch",
           "--output-directory", str(wdir / "output"),
           "--input-directory", str(wdir / "input"),
           "--temp-directory", str(wdir),
           "--user-directory", str(wdir / "user"),
           "--database-url", "sqlite:///:memory:"]
    if disable_api_nodes:
        cmd.append("--disable-api-nodes")
    cmd += list(extra_args)

    penv = dict(os.environ)
    penv.update({"PYTHONUNBUFFERED": "1", "HF_HUB_OFFLINE": "1", "DO_NOT_TRACK": "1"})
    if env:
        penv.update(env)
    log_file = open(log_path, "wb")
    log_file.write(("$ " + " ".join(cmd) + "\n").encode())
    log_file.flush()
    proc = subprocess.Popen(cmd, cwd=str(cdir), stdout=log_file, stderr=subprocess.STDOUT,
                            stdin=subprocess.DEVNULL, env=penv)
    handle = ServerHandle(proc, host, port, log_path, wdir, cdir, owns, log_file)
    atexit.register(handle.stop)

    t0 = time.monotonic()
    while True:
        if not handle.is_alive():
            log = handle.log_text()
            handle.stop(keep_work_dir=True)
            raise ComfyUIError(f"ComfyUI exited with code {proc.returncode} during startup "
                               f"(log: {log_path}):\n{log}")
        try:
            handle.get("/system_stats", timeout=5.0)
            break
        except (urllib.error.URLError, ConnectionError, socket.timeout, OSError):
            pass
        if time.monotonic() - t0 > timeout:
            log = handle.log_text()
            handle.stop(keep_work_dir=True)
            raise ComfyUIError(f"ComfyUI did not answer /system_stats within {timeout:.0f}s "
                               f"(log: {log_path}):\n{log}")
        time.sleep(0.25)
    handle.startup_seconds = time.monotonic() - t0
    return handle


# --------------------------------------------------------------------------- in-process


def import_comfy_in_process() -> None:
    """Make ``comfy.*``, ``nodes``, ``comfy_extras.*``, ``folder_paths`` importable in this
    process, forcing CPU: puts the ComfyUI folder first on sys.path, imports
    ``comfy.cli_args`` (which parses no argv since args parsing is off by default)
    and sets ``args.cpu = True`` before anything imports ``comfy.model_management``.
    Idempotent.
    """
    cdir = comfyui_dir()
    if not comfyui_available():
        raise ComfyUIError(f"{INSTALL_HINT} (looked in {cdir})")
    cstr = str(cdir)
    if cstr in sys.path:
        sys.path.remove(cstr)
    sys.path.insert(0, cstr)
    # A foreign top-level ``nodes``/``utils`` module (e.g. the repo's own ``nodes/``
    # package) imported earlier would shadow ComfyUI's: fail loudly instead of subtly.
    for name in ("nodes", "utils", "folder_paths", "comfy"):
        mod = sys.modules.get(name)
        if mod is None:
            continue
        origin = getattr(mod, "__file__", None) or next(iter(getattr(mod, "__path__", []) or []), "")
        if origin and not str(Path(origin).resolve()).startswith(str(cdir.resolve())):
            raise ComfyUIError(f"module {name!r} already imported from {origin}; it shadows "
                               f"ComfyUI's. Import ComfyUI before it.")
    import comfy.cli_args  # noqa: E402  (must come first)

    comfy.cli_args.args.cpu = True
    mm = sys.modules.get("comfy.model_management")
    if mm is not None and getattr(mm, "cpu_state", None) != getattr(mm, "CPUState").CPU:
        raise ComfyUIError("comfy.model_management was imported before args.cpu was set")
