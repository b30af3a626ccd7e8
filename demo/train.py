"""Train a shapes model from scratch: seeded, reproducible, CPU-sized.

    COMFYUI_PATH=/path/to/ComfyUI python demo/train.py            # writes demo/shapes-sd1-tiny.safetensors
    COMFYUI_PATH=/path/to/ComfyUI python demo/train.py --model sdxl   # writes demo/checkpoints/shapes-sdxl-tiny.safetensors
    python demo/train.py --steps 20 --decoder-steps 10 --out /tmp/x.safetensors   # a quick run

Two phases. (1) The VAE decoder learns to draw a 64 px picture from the fixed 8 x 8 latent of a scene
(demo/model.py encode_scene; the VAE's encoder is not trained). (2) The UNet and the CLIP text encoder(s)
learn together, from scratch, to denoise scene latents given the scene's caption (one caption in ten is
dropped to the empty prompt, so classifier-free guidance works; shapes-SDXL also sees its pooled vector
and one of the sizes sampling tells it). Same seed, same thread count -> the same weights.

The phases do not depend on each other, so they can run side by side, one per core:
    python demo/train.py --steps 0 --out decoder.safetensors                 # phase 1 only
    python demo/train.py --decoder-steps 0 --decoder-from decoder.safetensors   # phase 2, then phase 1's VAE

The committed shapes-SDXL file is a chain of such runs (each --resume goes on from the file before it;
TAESD's decoder learns slower at its stable rate, the deeper text encoders need more diffusion steps):
    X="python demo/train.py --model sdxl"
    $X --steps 0 --decoder-steps 2500 --decoder-batch 8 --out d0.safetensors                 # core 1
    $X --resume d0.safetensors --stage 1 --steps 0 --decoder-steps 3000 --decoder-batch 8 --out d1.safetensors
    $X --steps 5000 --decoder-steps 0 --out u0.safetensors                                   # core 2
    $X --resume u0.safetensors --steps 0 --decoder-steps 0 --decoder-from d1.safetensors --out s0.safetensors
    $X --resume s0.safetensors --stage 1 --steps 3000 --decoder-steps 0 --decoder-from s0.safetensors --out s1.safetensors
    $X --resume s1.safetensors --stage 2 --steps 3000 --decoder-steps 0 --decoder-from s0.safetensors
"""
from __future__ import annotations

import argparse
import hashlib
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    from demo import model as M, shapes  # noqa: E402
    from demo.models import MODELS as KINDS  # noqa: E402
else:
    from . import model as M, shapes
    from .models import MODELS as KINDS


def batch(rng: np.random.Generator, n: int, kind=M):
    """n training scenes: (captions, 64 px images in [-1, 1] (n, 3, 64, 64), latents (n, 4, 8, 8))."""
    caps, imgs, lats = [], [], []
    for _ in range(n):
        scene = shapes.training_scene(rng)
        img, _ = shapes.render(scene)
        caps.append(scene["caption"])
        imgs.append(M.to_pixels(img).transpose(2, 0, 1) * 2 - 1)
        lats.append(kind.encode_scene(scene))
    return caps, torch.from_numpy(np.stack(imgs)), torch.from_numpy(np.stack(lats))


def train_vae(vae, steps: int, seed: int, batch_size: int = 8, log=print, kind=M) -> None:
    ae = vae.first_stage_model
    ae.train()
    # Only the decoder learns: the latent is fixed (demo/model.py encode_scene), not encoded.
    lr = kind.DECODER_LR
    opt = torch.optim.AdamW(kind.decoder_parameters(vae), lr=lr, weight_decay=0.0)
    rng = np.random.default_rng(seed)
    t0 = time.time()
    for step in range(steps):
        _, img, lat = batch(rng, batch_size, kind)
        out = ae.decode(lat)
        loss = torch.nn.functional.mse_loss(out, img)
        for g in opt.param_groups:  # linear decay to a tenth: sharper edges at the end
            g["lr"] = lr * (1 - 0.9 * step / max(1, steps))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if step % 50 == 0 or step == steps - 1:
            log(f"vae step {step} decode {loss.item():.4f} {time.time() - t0:.0f}s")
    ae.eval()


def _out_of_place_clip_layer(self, x, mask=None, optimized_attention=None):
    # ComfyUI's CLIPLayer adds in place, which autograd cannot differentiate; same sums, new tensors.
    x = x + self.self_attn(self.layer_norm1(x), mask, optimized_attention)
    return x + self.mlp(self.layer_norm2(x))


def train_diffusion(model, clip, steps: int, seed: int, batch_size: int = 64, lr: float = 1.5e-3,
                    log=print, kind=M) -> None:
    unet = model.model.diffusion_model
    texts = kind.text_encoders(clip)
    # The token tables (49408 x 64) stay as drawn: the captions use a few dozen of their rows, and
    # their dense gradient and optimiser state would cost more than the rest of the text encoder.
    tables = {id(t) for t in kind.token_tables(clip)}
    params = [p for p in list(unet.parameters()) + [q for t in texts for q in t.parameters()] if id(p) not in tables]
    for p in params:
        p.requires_grad_(True)
    unet.train()
    for t in texts:
        t.train()
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.01)
    sigmas = model.model.model_sampling.sigmas.float()  # SD1.5's discrete schedule
    alphas = 1.0 / (1.0 + sigmas ** 2)
    rng = np.random.default_rng(seed)
    gen = torch.Generator().manual_seed(seed)
    token_cache: dict[str, dict] = {}

    def tokens(c: str) -> dict:
        if c not in token_cache:
            token_cache[c] = clip.tokenize(c)
        return token_cache[c]

    def condition(captions):
        return kind.condition(model, clip, captions, tokens, rng)

    import comfy.clip_model
    original_forward = comfy.clip_model.CLIPLayer.forward
    comfy.clip_model.CLIPLayer.forward = _out_of_place_clip_layer
    ema = [p.detach().clone() for p in params]
    try:
        _diffusion_loop(unet, condition, params, ema, opt, alphas, rng, gen, steps, batch_size, lr, log, kind)
    finally:
        comfy.clip_model.CLIPLayer.forward = original_forward
    with torch.no_grad():  # the saved weights are the moving average: cleaner samples than the last step
        for p, e in zip(params, ema):
            p.copy_(e)
    unet.eval()
    for t in texts:
        t.eval()
    for p in params:
        p.requires_grad_(False)


EMA_DECAY = 0.999
MIN_SNR_GAMMA = 5.0  # loss weight min(SNR, 5) / SNR (Hang et al., 2023): noisy steps count as much as clean ones


def _diffusion_loop(unet, condition, params, ema, opt, alphas, rng, gen, steps, batch_size, lr, log, kind):
    snr = alphas / (1 - alphas)
    weights = torch.clamp(snr, max=MIN_SNR_GAMMA) / snr
    t0 = time.time()
    for step in range(steps):
        caps, _, x0 = batch(rng, batch_size, kind)
        caps = ["" if rng.random() < 0.1 else c for c in caps]
        x0 = x0 * kind.LATENT_SCALE
        t = torch.randint(0, len(alphas), (batch_size,), generator=gen)
        noise = torch.randn(x0.shape, generator=gen)
        a = alphas[t].view(-1, 1, 1, 1)
        xt = a.sqrt() * x0 + (1 - a).sqrt() * noise
        pred = unet(xt, timesteps=t.float(), **condition(caps))
        loss = (weights[t] * ((pred - noise) ** 2).mean(dim=(1, 2, 3))).mean()
        if not torch.isfinite(loss):
            raise FloatingPointError(f"diffusion loss is {loss.item()} at step {step}")
        for g in opt.param_groups:  # short warm-up, then linear decay to a tenth
            g["lr"] = lr * min(1.0, (step + 1) / 100) * (1 - 0.9 * step / max(1, steps))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        decay = min(EMA_DECAY, (1 + step) / (10 + step))
        with torch.no_grad():
            torch._foreach_lerp_(ema, [p.detach() for p in params], 1 - decay)
        if step % 50 == 0 or step == steps - 1 or steps < 50:
            log(f"diffusion step {step} loss {loss.item():.4f} {time.time() - t0:.0f}s")


def weights_digest(model, clip, vae, kind=M) -> str:
    h = hashlib.sha256()
    for prefix, module in kind.parts(model, clip, vae).items():
        for k, v in sorted(module.state_dict().items()):
            h.update(f"{prefix}.{k}".encode())
            h.update(v.detach().float().contiguous().numpy().tobytes())
    return h.hexdigest()


def train(steps: int, decoder_steps: int, seed: int = 0, batch_size: int = 64, threads: int = 1,
          log=print, resume: str | None = None, stage: int = 0, unet: dict | None = None,
          decoder_batch: int = 16, kind=M):
    """Train from scratch (or go on from `resume`, a file this script wrote); returns (MODEL, CLIP, VAE).

    stage numbers the runs of a chain: each stage draws its own scenes and noise."""
    torch.set_num_threads(threads)
    torch.manual_seed(seed)
    model, clip, vae = kind.build(seed, text_dtype=torch.float32, **({"unet": unet} if unet else {}))
    if resume:
        kind.load_into(resume, model, clip, vae)
    train_vae(vae, decoder_steps, seed + 100 * stage, batch_size=decoder_batch, log=log, kind=kind)
    train_diffusion(model, clip, steps, seed + 20 + 100 * stage, batch_size=batch_size, log=log, kind=kind)
    return model, clip, vae


def _file_digest(path: str) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", choices=sorted(KINDS), default="sd1",
                    help="sd1: the SD1 shapes model; sdxl: shapes-SDXL (demo/model_sdxl.py)")
    ap.add_argument("--steps", type=int, default=5000, help="UNet + text encoder steps")
    ap.add_argument("--decoder-steps", type=int, default=3000, help="VAE decoder steps")
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--decoder-batch", type=int, default=16)
    ap.add_argument("--channels", type=int, default=M.UNET["model_channels"], help="UNet width (model_channels, sd1 only)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=1, help="1 is fastest on a busy machine; the weights depend on it")
    ap.add_argument("--out", help="default: the model's file in demo/")
    ap.add_argument("--resume", help="go on training from this file (written by this script)")
    ap.add_argument("--decoder-from", help="take the VAE from this file (a --steps 0 run of this script), "
                                           "read when the training ends")
    ap.add_argument("--stage", type=int, default=0, help="number of this run in a chain of --resume runs")
    args = ap.parse_args()
    kind = KINDS[args.model]
    out = args.out or str(kind.WEIGHTS)
    t0 = time.time()
    unet = {"model_channels": args.channels} if kind is M else None
    model, clip, vae = train(args.steps, args.decoder_steps, args.seed, args.batch, args.threads, unet=unet,
                             decoder_batch=args.decoder_batch, kind=kind,
                             log=lambda s: print(s, flush=True), resume=args.resume, stage=args.stage)
    if args.decoder_from:
        from safetensors import safe_open
        with safe_open(args.decoder_from, "pt") as f:
            args.decoder_steps = int(f.metadata()["decoder_steps"])
            args.decoder_batch = int(f.metadata()["decoder_batch"])
        kind.load_into(args.decoder_from, model, clip, vae, only="vae")
    meta = {"made_by": "demo/train.py", "model": args.model, "steps": str(args.steps),
            "decoder_steps": str(args.decoder_steps),
            "batch": str(args.batch), "seed": str(args.seed), "stage": str(args.stage),
            "resumed_from_sha256": _file_digest(args.resume) if args.resume else "",
            "decoder_batch": str(args.decoder_batch), "threads": str(args.threads),
            "config": json.dumps(kind.config(unet))}
    kind.save(out, model, clip, vae, meta)
    print(f"wrote {out} in {time.time() - t0:.0f}s; weights sha256 {weights_digest(model, clip, vae, kind)}")


if __name__ == "__main__":
    main()
