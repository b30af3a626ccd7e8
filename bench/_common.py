"""Shared set-up for the benchmarks: run under the host's Python with ComfyUI importable on CPU."""
from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

PACK_DIR = Path(__file__).resolve().parent.parent


def ensure_host() -> None:
    """Re-execute this benchmark with the provisioned host's Python when started with another one."""
    if os.environ.get("COMFYUI_ACT_BENCH_HOST") == "1":
        return
    sys.path.insert(0, str(PACK_DIR / "tools"))
    import host as host_tool
    host = host_tool.provision()
    env = host.env() | {"COMFYUI_ACT_BENCH_HOST": "1"}
    os.execve(str(host.python), [str(host.python), sys.argv[0], *sys.argv[1:]], env)


def import_comfy():
    """Import ComfyUI (CPU unless a GPU is present) and this pack; returns the pack module."""
    comfy_dir = os.environ["COMFYUI_PATH"]
    sys.path.insert(0, comfy_dir)
    sys.path.insert(1, str(PACK_DIR / "tests"))
    sys.path.append(str(PACK_DIR))
    import torch
    import comfy.cli_args
    if not torch.cuda.is_available():
        comfy.cli_args.args.cpu = True
    import comfy.model_management  # noqa: F401
    import nodes  # noqa: F401  (ComfyUI's)
    from pack_loader import load_pack
    return load_pack()


def require_cuda(on_a_cpu: str) -> None:
    """Stop a GPU-only measurement on a machine without CUDA, with what to run there instead: on a
    CPU it would run for hours and measure nothing a card does."""
    import torch
    if not torch.cuda.is_available():
        sys.exit(f"{Path(sys.argv[0]).name}: no CUDA device here, and this measurement needs one. {on_a_cpu}")


def peak_rss_bytes() -> int:
    import resource
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


class Timer:
    def __enter__(self):
        self.start = time.perf_counter()
        return self

    def __exit__(self, *exc):
        self.seconds = time.perf_counter() - self.start


def report(figures: dict) -> None:
    print(json.dumps(figures, sort_keys=True))
