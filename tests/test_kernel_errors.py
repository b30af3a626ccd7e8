"""What a failure inside the Triton kernel path does to sampling. An out-of-memory error is the card
being full, not the kernel being broken: it must reach ComfyUI (which frees models and retries, or
tells the user), and the kernel must stay on for the next call. Run through Triton's interpreter, in a
fresh process, as tests/test_kernels.py runs the kernels."""
from __future__ import annotations

import json

from test_kernels import run_interpreted

OUT_OF_MEMORY_ONCE = r"""
import json, logging, torch
from act_core import fit_layer, kernels
assert kernels.available(), "Triton's interpreter is not active"
warnings = []
handler = logging.Handler()
handler.emit = lambda record: warnings.append(record.getMessage()) if record.levelno >= logging.WARNING else None
logging.getLogger("comfyui_act").addHandler(handler)
launch, launches = kernels._launch, []

def launch_after_one_out_of_memory(*args):
    launches.append(1)
    if len(launches) == 1:
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 MiB")
    return launch(*args)
kernels._launch = launch_after_one_out_of_memory
g = torch.Generator().manual_seed(0)
layer = fit_layer(torch.randn(30, 8, generator=g), torch.randn(30, 8, generator=g) + 1.0, "linear", kind="conv")
x = torch.randn(2, 8, 6, 6, generator=g, dtype=torch.float32).to(torch.float16)
path = kernels.FastPath()
move = kernels.transport(layer, 0.7, path=path)
try:
    move(x)
    raised = None
except torch.OutOfMemoryError as error:
    raised = type(error).__name__
moved = move(x)
reference = layer.apply(x, 0.7)
print(json.dumps({"raised": raised, "switched_off": sorted(map(str, path.failed)), "launches": len(launches),
                  "warnings": warnings, "error": (moved.double() - reference.double()).abs().max().item(),
                  "moved": (reference.double() - x.double()).abs().max().item()}))
"""


def test_out_of_memory_in_the_kernel_reaches_comfyui_and_the_kernel_stays_on():
    result = json.loads(run_interpreted(OUT_OF_MEMORY_ONCE).stdout.strip().splitlines()[-1])
    assert result["raised"] == "OutOfMemoryError", result
    assert result["switched_off"] == [] and result["warnings"] == [], result
    assert result["launches"] == 2, result  # the next call ran the kernel again
    assert result["moved"] > 0.1 and result["error"] <= 2e-3 * (1 + result["moved"]), result
