"""The real ComfyUI server with this pack, started in its own base directory on a free loopback port."""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

PACK_DIR = Path(__file__).resolve().parent.parent
COMFY_DIR = Path(os.environ.get("COMFYUI_PATH", PACK_DIR / ".host" / "ComfyUI")).resolve()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """The real ComfyUI server with this pack, in its own base directory, on a free loopback port."""

    def __init__(self, base: Path, port: int, process: subprocess.Popen, log_path: Path):
        self.base, self.port, self.process, self.log_path = base, port, process, log_path
        self.url = f"http://127.0.0.1:{port}"

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def get(self, path: str, timeout: float = 30):
        with urllib.request.urlopen(self.url + path, timeout=timeout) as r:
            return json.loads(r.read())

    def post(self, path: str, payload: dict, timeout: float = 30):
        request = urllib.request.Request(self.url + path, data=json.dumps(payload).encode(),
                                         headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(request, timeout=timeout) as r:
            body = r.read()
            return json.loads(body) if body else None

    def output_file(self, image: dict) -> Path:
        """Where the server wrote an image that a history entry lists (SaveImage: the output folder)."""
        return self.base / image.get("type", "output") / image.get("subfolder", "") / image["filename"]

    def run(self, prompt: dict, timeout: float = 300) -> dict:
        """Queue an API-format prompt and wait for its history entry."""
        prompt_id = self.post("/prompt", {"prompt": prompt})["prompt_id"]
        deadline = time.time() + timeout
        while time.time() < deadline:
            history = self.get(f"/history/{prompt_id}")
            if prompt_id in history and history[prompt_id].get("status", {}).get("completed") is not None:
                return history[prompt_id]
            if prompt_id in history and history[prompt_id].get("status", {}).get("status_str") == "error":
                return history[prompt_id]
            time.sleep(0.2)
        raise TimeoutError(f"prompt {prompt_id} did not finish in {timeout} s\n{self.log()[-3000:]}")


def start_server(base: Path, checkpoint: Path | None) -> Server:
    (base / "custom_nodes").mkdir(parents=True, exist_ok=True)
    link = base / "custom_nodes" / "ComfyUI-ACT"
    if not link.exists():
        link.symlink_to(PACK_DIR, target_is_directory=True)
    if checkpoint is not None:
        (base / "models" / "checkpoints").mkdir(parents=True, exist_ok=True)
        target = base / "models" / "checkpoints" / checkpoint.name
        if not target.exists():
            target.symlink_to(checkpoint)
    port = free_port()
    log_path = base / "server.log"
    with open(log_path, "wb") as log:
        process = subprocess.Popen(
            [sys.executable, "main.py", "--cpu", "--listen", "127.0.0.1", "--port", str(port),
             "--disable-auto-launch", "--base-directory", str(base),
             "--database-url", "sqlite:///:memory:"],
            cwd=COMFY_DIR, stdout=log, stderr=subprocess.STDOUT,
            # One thread, as the tests' own process (conftest.py): the browser renders beside it.
            env=dict(os.environ, OMP_NUM_THREADS="1"))
    server = Server(base, port, process, log_path)
    deadline = time.time() + 120
    while time.time() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"ComfyUI exited with {process.returncode}:\n{server.log()[-4000:]}")
        try:
            server.get("/system_stats", timeout=2)
            return server
        except OSError:
            time.sleep(0.3)
    process.kill()
    raise RuntimeError(f"ComfyUI did not start in 120 s:\n{server.log()[-4000:]}")


def stop_server(server: Server) -> None:
    server.process.terminate()
    try:
        server.process.wait(timeout=20)
    except subprocess.TimeoutExpired:
        server.process.kill()
