"""Generate with the shapes model through ComfyUI's real nodes, steer it with this pack's nodes, score it.

    from demo.api import Lab
    lab = Lab()                                            # loads demo/shapes-sd1-tiny.safetensors
    scenes = lab.held_out(32)                              # prompts the model never saw in training
    maps = lab.fit(source=[...], target=[...])             # Collect Activations -> Fit Transport Maps
    model, clip = lab.steer(maps, strength=1.0)            # Apply Transport Maps
    images = lab.generate([s["caption"] for s in scenes], model=model, clip=clip)
    found = lab.score(images)                              # per image: background, count, objects
    lab.rate(found, lambda f: f["background"] == "striped")  # share of images where it holds

Every picture goes CLIPTextEncode -> EmptyLatentImage (64 px) -> KSampler -> VAEDecode, the same nodes
a ComfyUI graph runs; maps come from the pack's Collect Activations, Fit Transport Maps and Apply
Transport Maps nodes, called in-process. Needs ComfyUI importable (COMFYUI_PATH).
"""
from __future__ import annotations

import sys
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch

from . import model as M
from . import shapes
from .models import MODELS

PACK_DIR = Path(__file__).resolve().parent.parent


def load_pack():
    """This pack imported the way ComfyUI imports it, by the loader the tests and benchmarks use."""
    sys.path.insert(0, str(PACK_DIR / "tests"))
    from pack_loader import load_pack as load
    return load()


class Lab:
    """The shapes model, its scorer and the pack's nodes, ready for a few-line evaluation."""

    def __init__(self, weights: str | Path | None = None, steps: int = 12, cfg: float = 3.0,
                 sampler: str = "euler", scheduler: str = "normal", model: str = "sd1"):
        """model: which shapes model (demo/models.py: sd1, sdxl); weights: another file of that model."""
        M.import_comfy()
        import comfy.utils
        import nodes as comfy_nodes  # ComfyUI's nodes.py
        comfy.utils.PROGRESS_BAR_ENABLED = False  # hundreds of samplings: no console bars
        self.nodes = comfy_nodes
        self.kind = model
        self.model, self.clip, self.vae = MODELS[model].load(weights or MODELS[model].WEIGHTS)
        self.pack = load_pack()
        self.steps, self.cfg, self.sampler, self.scheduler = steps, cfg, sampler, scheduler

    # -- prompts -------------------------------------------------------------------------------------
    @staticmethod
    def held_out(n: int, seed: int = 1234, **kw) -> list[dict]:
        """n scenes whose captions were never trained on (see shapes.held_out_scenes for filters)."""
        return shapes.held_out_scenes(n, seed=seed, **kw)

    # -- generation ----------------------------------------------------------------------------------
    def encode(self, text: str, clip=None):
        return self.nodes.CLIPTextEncode().encode(clip or self.clip, text)[0]

    @torch.inference_mode()
    def generate(self, prompts: Sequence[str], seed: int = 0, model=None, clip=None, negative: str = "",
                 conditioning: Callable | None = None, steps: int | None = None,
                 cfg: float | None = None, batch: bool = False, pooled_from=None) -> np.ndarray:
        """(N, 64, 64, 3) images, one per prompt; image i uses seed + i.

        model/clip: steered copies (from `steer`) or None for the model as trained.
        negative: the negative prompt. conditioning: optional function applied to each positive
        CONDITIONING before sampling (e.g. to add a conditioning delta). pooled_from: a CLIP whose
        pooled vector of each prompt replaces the one `clip` gives (what moving the tokens alone does).
        """
        model, clip = model or self.model, clip or self.clip
        neg = self.encode(negative, clip)

        def positive(prompt):
            pos = self.encode(prompt, clip)
            if pooled_from is not None:
                pooled = self.encode(prompt, pooled_from)[0][1]["pooled_output"]
                pos = [[c, dict(extras, pooled_output=pooled)] for c, extras in pos]
            return conditioning(pos) if conditioning is not None else pos
        if batch:
            return self._generate_batch(prompts, seed, model, positive, neg, steps, cfg)
        (latent,) = self.nodes.EmptyLatentImage().generate(M.PIXELS, M.PIXELS, 1)
        out = []
        for i, prompt in enumerate(prompts):
            pos = positive(prompt)
            (samples,) = self.nodes.KSampler().sample(model, seed + i, steps or self.steps, cfg or self.cfg,
                                                      self.sampler, self.scheduler, pos, neg, latent)
            (image,) = self.nodes.VAEDecode().decode(self.vae, samples)
            out.append(image[0].float().cpu().numpy())
        return np.stack(out)

    def _generate_batch(self, prompts, seed, model, positive, neg, steps, cfg) -> np.ndarray:
        rows, pooled = [], []
        for prompt in prompts:
            (cond, extras), = positive(prompt)
            rows.append(cond)
            pooled.append(extras.get("pooled_output"))
        # SDXL's UNet reads each prompt's pooled vector (the SD1 model's ignores it)
        pos = [[torch.cat(rows), {} if any(p is None for p in pooled) else {"pooled_output": torch.cat(pooled)}]]
        (latent,) = self.nodes.EmptyLatentImage().generate(M.PIXELS, M.PIXELS, len(prompts))
        (samples,) = self.nodes.KSampler().sample(model, seed, steps or self.steps, cfg or self.cfg,
                                                  self.sampler, self.scheduler, pos, neg, latent)
        (images,) = self.nodes.VAEDecode().decode(self.vae, samples)
        return images.float().cpu().numpy()

    # -- scoring -------------------------------------------------------------------------------------
    @staticmethod
    def score(images: np.ndarray) -> list[dict]:
        """shapes.score of each 64 px picture (read at the scene's 32 px)."""
        return [shapes.score(M.to_scene(im)) for im in images]

    @staticmethod
    def rate(found: list[dict], test: Callable[[dict], bool]) -> float:
        return float(np.mean([bool(test(f)) for f in found])) if found else float("nan")

    @staticmethod
    def content_kept(found: list[dict], scenes: list[dict]) -> float:
        """Share of pictures showing exactly the prompted objects (count, colours, shapes)."""
        return float(np.mean([shapes.content_matches(f, s) for f, s in zip(found, scenes)]))

    # -- steering with the pack's nodes --------------------------------------------------------------
    def fit(self, source: Sequence[str], target: Sequence[str], where: str = "both",
            method: str = "linear", support: str = "method default", estimation: str = "incremental",
            noise_levels: int = 1, batch_size: int = 64, seed: int = 0, moves: str = "auto (from the pairs)",
            pattern: str = ""):
        """Collect Activations -> Fit Transport Maps on the shapes model; returns the MAPS.
        pattern: Collect's custom layer pattern (default: its normalization layers)."""
        learn = self.pack.nodes.nodes_learn
        activations, _ = learn.CollectActivations.execute(
            self.model, self.clip, "\n".join(source), "\n".join(target), where=where,
            layers="custom pattern" if pattern else "normalization layers", resolution=M.PIXELS,
            noise_levels=noise_levels, batch_size=batch_size, seed=seed, pattern=pattern).args
        return learn.FitTransportMaps.execute(activations, method, support, estimation, moves).args[0]

    def steer(self, maps, strength: float = 1.0, mode: str = "exact", start_percent: float = 0.0,
              end_percent: float = 1.0, branch: str = "conditional and unconditional"):
        """Apply Transport Maps: (steered MODEL, steered CLIP)."""
        return self.pack.nodes.nodes_apply.ApplyTransportMaps.execute(
            self.model, maps, strength, start_percent, end_percent, branch, mode, clip=self.clip).args

    def gated_tokens(self, source: Sequence[str], target: Sequence[str], method: str = "linear"):
        """Gated token transport of the final conditioning (act_core.token_transport), fitted on the
        untouched text encoder's encodings of the prompt pairs. Returns strength -> conditioning function."""
        from act_core.token_transport import fit_gated_tokens
        enc = [torch.cat([self.encode(p)[0][0] for p in side]) for side in (source, target)]
        fitted = fit_gated_tokens(enc[0], enc[1], method)

        def at(strength: float):
            def move(cond):
                return [[fitted.apply(c, strength), dict(extra)] for c, extra in cond]
            return move
        at.map = fitted
        return at

    def nag(self, scale: float, alpha: float = 0.5, tau: float = 1.5, model=None):
        """ComfyUI core's Normalized Attention Guidance on the model (it steers away from the negative
        prompt), or None where this ComfyUI has no NAGuidance node (before 0.33)."""
        try:
            from comfy_extras.nodes_nag import NAGuidance
        except ImportError:
            return None
        return NAGuidance.execute(model or self.model, scale, alpha, tau).args[0]

    def conditioning_delta(self, source: Sequence[str], target: Sequence[str], strength: float = 1.0):
        """A baseline without maps: mean over pairs of encode(target) - encode(source), added to a prompt."""
        pairs = [(self.encode(s)[0], self.encode(t)[0]) for s, t in zip(source, target)]
        delta = torch.stack([t[0] - s[0] for s, t in pairs]).mean(0)
        # The pooled vector too, as ConDelta files keep it: SDXL's UNet reads it (the SD1 one ignores it).
        pooled = (torch.stack([t[1]["pooled_output"] - s[1]["pooled_output"] for s, t in pairs]).mean(0)
                  if all(x[1].get("pooled_output") is not None for pair in pairs for x in pair) else None)

        def add(cond):
            out = []
            for c, extra in cond:
                extra = dict(extra)
                if pooled is not None and extra.get("pooled_output") is not None:
                    extra["pooled_output"] = extra["pooled_output"] + strength * pooled.to(extra["pooled_output"])
                out.append([c + strength * delta.to(c), extra])
            return out
        return add
