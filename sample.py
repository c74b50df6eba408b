"""
Sampling from a UMD checkpoint: DDIM with classifier-free guidance, an ADM-style npz for FID,
a PNG grid, and an MAE-style reconstruction picture.

    python sample.py --ckpt out/ckpt.pt --num_samples 50000 --cfg_scale 1.5 --steps 125
    torchrun --nproc_per_node 8 sample.py --ckpt out/ckpt.pt --num_samples 50000 --cfg_scale 1.5
    python sample.py --ckpt out/ckpt.pt --uncond --num_samples 64     # null label / no label table
    python sample.py --ckpt out/ckpt.pt --recon out/recon.png --data data/cifar10 --mask_ratio 0.75

DDIM as the authors' code samples: timesteps arange(T-1, 0, -(T // S)) then 0 (S must divide T,
so that S steps run); for each pair (t, t_next) the model runs at t_model = t + 1,
x0_hat = (x - sqrt(1 - abar_t) eps) / sqrt(abar_t) with eps from the eps head (or derived from
the x0 head), clipped to [-1, 1] for pixels (never for latents) and eps recomputed from it, then
    sigma = eta sqrt((1 - abar_next) / (1 - abar_t)) sqrt(1 - abar_t / abar_next)
    x = sqrt(abar_next) x0_hat + sqrt(1 - abar_next - sigma^2) eps + sigma z
and one last call at t = 0 whose x0_hat is the sample. Image i draws all its noise from its
own generator seeded from (seed, i), so it is the same whatever the batch size or world size.

Latent checkpoints (train_config latent=True) sample latents and decode them with the VAE of their data
(data/vae.py; --vae PATH, default the one the checkpoint recorded) into the uint8 npz; --raw_latents keeps
the float32 latents instead. Their reconstruction pictures show both rows decoded.

Flow checkpoints (ckpt["scheme"] == "flow", corrupt.flow_loss) get flow_sample instead: Heun (the
default), Euler or SiT's SDE from s = 1 to 0 (--sampler; DDIM fits only UMD checkpoints).
"""
import argparse
import contextlib
import math
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from PIL import Image

from corrupt import SCHEMES, flow_t_model, make_schedule, pixel_mask
from data import vae as V
from data.common import atomic_write, load_meta, load_split
from model import from_uint8, in_eval_mode, load_checkpoint
from train import seed_of, setup_distributed


# ---- DDIM ---------------------------------------------------------------------------------
def ddim_timesteps(steps, T=1000):
    """S = 125 -> [999, 991, ..., 7, 0]: S pairs (t, t_next), then the final call at 0."""
    if isinstance(steps, bool) or not isinstance(steps, int) or not 1 <= steps <= T:
        raise ValueError(f"steps must be an integer in [1, {T}] (T = {T}), got {steps!r}")
    ts = list(range(T - 1, 0, -(T // steps))) + [0]
    if len(ts) - 1 != steps:  # the spacing T // S runs more steps than asked when S does not divide T
        divisors = [d for d in (10, 25, 50, 100, 125, 200, 250, 500) if T % d == 0]
        raise ValueError(f"steps {steps}: the reference's spacing T // steps (T = {T}) would run {len(ts) - 1} "
                         f"steps, not {steps}; use a divisor of T below T, such as {divisors}")
    return ts


def ddim_sample(denoise, x, abar, steps, eta=1.0, clip=True, eps_from="eps", noise_fn=None):
    """Run DDIM from x = x_T. denoise(x, t_model) -> (x0_pred, eps_pred); abar float64 (T,).
    noise_fn() -> z like x (called once per pair when eta > 0). Returns the final x0_hat."""
    if eps_from not in ("eps", "x0") or eta < 0:
        raise ValueError(f"need eps_from 'eps' or 'x0' and eta >= 0, got {eps_from!r} and {eta}")
    ab = [float(a) for a in abar]  # float64 schedule -> python floats for the coefficients
    ts = ddim_timesteps(steps, len(ab))
    noise_fn = noise_fn or (lambda: torch.randn_like(x))

    def predict(x, t):
        a = ab[t]
        x0, eps = denoise(x, torch.full((x.shape[0],), t + 1, dtype=torch.long, device=x.device))
        if eps_from == "eps":
            x0 = (x - math.sqrt(1 - a) * eps) / math.sqrt(a)
        if clip:
            x0 = x0.clamp(-1, 1)
        if clip or eps_from == "x0":  # eps derived from x0_hat: the x0 head's output, or the clipped one
            eps = (x - math.sqrt(a) * x0) / math.sqrt(1 - a)
        return x0, eps

    for t, t_next in zip(ts[:-1], ts[1:]):
        x0, eps = predict(x, t)
        a, a_next = ab[t], ab[t_next]
        sigma = eta * math.sqrt((1 - a_next) / (1 - a)) * math.sqrt(1 - a / a_next)
        x = math.sqrt(a_next) * x0 + math.sqrt(max(1 - a_next - sigma ** 2, 0.0)) * eps
        if eta > 0:
            x = x + sigma * noise_fn()
    return predict(x, 0)[0]


# ---- flow matching (corrupt.flow_loss) ------------------------------------------------------
def pick_sampler(scheme, sampler=None):
    """`sampler`, or by default the first of corrupt.Scheme.samplers, for a checkpoint of `scheme` (None: UMD)."""
    fits = SCHEMES[scheme or "umd"].samplers if (scheme or "umd") in SCHEMES else ()
    if not fits or sampler not in (None, *fits):
        raise ValueError(f"sampler {sampler!r} does not fit a checkpoint of scheme {scheme!r}: its samplers are "
                         f"{list(fits)}")
    return sampler or fits[0]


def check_flow(method, steps):
    if method not in SCHEMES["flow"].samplers:
        raise ValueError(f"flow sampler must be one of {SCHEMES['flow'].samplers}, got {method!r}")
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise ValueError(f"steps must be an integer >= 1, got {steps!r}")


def flow_sample(denoise, x, steps, method="heun", noise_fn=None):
    """Integrate from x = x_1 (noise) to s = 0 on s_k = 1 - k / steps; v = eps - x0 from the two heads at
    t_model = flow_t_model(s) (denoise as ddim_sample's). Returns x_0. "euler", "heun": the ODE
    dx/ds = v (Heun: Euler on the last step, whose end s = 0 is the clean image's t_model). "sde": SiT's
    reverse SDE (Ma et al. 2024, their diffusion_form "sigma") dx = [v - w/2 score] ds + sqrt(w) dW,
    w(s) = s, score = -eps / s, by Euler-Maruyama, x <- x - h (v + eps / 2) + sqrt(s h) z, then a
    deterministic last step x - s v (= x0_hat, SiT's Tweedie last step). noise_fn() -> z like x."""
    check_flow(method, steps)
    noise_fn, h = noise_fn or (lambda: torch.randn_like(x)), 1 / steps

    def heads(x, s):  # -> (v, eps)
        x0, eps = denoise(x, flow_t_model(torch.full((x.shape[0],), s, device=x.device)))
        return eps - x0, eps

    for k in range(steps):
        s = 1 - k * h
        v, eps = heads(x, s)
        if method == "euler" or k == steps - 1:
            x = x - h * v
        elif method == "heun":
            x = x - h / 2 * (v + heads(x - h * v, s - h)[0])
        else:
            x = x - h * (v + eps / 2) + math.sqrt(s * h) * noise_fn()
    return x


class SampleNoise:
    """Per-image noise: one CPU generator per image of `indices`, seeded from (seed, i); a call -> (n, *shape)."""

    def __init__(self, indices, seed, shape, device="cpu"):
        self.gens = [torch.Generator().manual_seed(seed_of(seed, i)) for i in indices]
        self.shape, self.device = tuple(shape), device

    def __call__(self):
        return torch.stack([torch.randn(self.shape, generator=g) for g in self.gens]).to(self.device)


def make_denoiser(model, y=None, cfg_scale=1.0, autocast_dtype=None):
    """denoise(x, t_model) -> float32 (x0_pred, eps_pred). y None: unconditional (the null
    label on a model with labels). cfg_scale != 1: cond + uncond in one batched forward."""
    device_type = next(model.parameters()).device.type

    def denoise(x, t_model):
        with torch.autocast(device_type, dtype=autocast_dtype or torch.bfloat16, enabled=autocast_dtype is not None):
            x0, eps = model.forward_with_cfg(x, t_model, y, cfg_scale) if cfg_scale != 1 else model(x, t_model, y)[:2]
        return x0.float(), eps.float()
    return denoise


# ---- many images ----------------------------------------------------------------------------
def to_uint8(x):
    """[-1, 1] NCHW tensor -> uint8 NHWC numpy, (x + 1) * 127.5 rounded."""
    return ((x.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()


def make_labels(n, num_classes, given=None):
    """Label of image i: i % num_classes (balanced), or given[i % len(given)]."""
    if given is None:
        return np.arange(n, dtype=np.int64) % num_classes
    given = np.asarray(given, dtype=np.int64).reshape(-1)
    if len(given) == 0 or given.min() < 0 or given.max() >= num_classes:
        raise ValueError(f"labels must be class ids in [0, {num_classes}), got {given.tolist()[:20]}")
    return given[np.arange(n) % len(given)]


def fmt_time(s):
    s = int(s)
    return f"{s // 3600}h{s % 3600 // 60:02d}m" if s >= 3600 else f"{s // 60}m{s % 60:02d}s"


@torch.inference_mode()
@in_eval_mode
def sample_images(model, abar, n, steps=250, cfg_scale=1.0, eta=1.0, seed=0, labels=None, uncond=False,
                  batch_size=64, device=None, clip=True, eps_from="eps", autocast_dtype=None,
                  rank=0, world_size=1, progress=False, sampler="ddim"):
    """Images rank, rank + world_size, ... < n, in index order, by `sampler` ("ddim": eta, clip and eps_from
    are its; or a flow one) -> (uint8 (m, H, W, C) or, with clip=False, float32 latents; int64 labels (m,) or
    None). labels: None = balanced or class ids (make_labels); uncond (or a model without labels): null label."""
    c, K = model.config, model.config.num_classes
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise ValueError(f"the number of samples must be a positive integer, got {n!r}")
    for name, value, low in (("batch_size", batch_size, 1), ("seed", seed, 0)):
        if value < low:
            raise ValueError(f"{name} must be >= {low}, got {value}")
    ddim_timesteps(steps, len(abar)) if sampler == "ddim" else check_flow(sampler, steps)
    if K == 0 or uncond:
        why = "this model has no labels (trained without them)" if K == 0 else "sampling is unconditional"
        if cfg_scale != 1:
            raise ValueError(f"classifier-free guidance (cfg_scale {cfg_scale}) needs class labels but {why}; "
                             "use cfg_scale 1")
        if labels is not None:
            raise ValueError(f"labels were given but {why}")
    all_labels = None if K == 0 or uncond else make_labels(n, K, labels)
    device = device or next(model.parameters()).device
    indices = np.arange(rank, n, world_size)
    out = np.zeros((len(indices), c.image_size, c.image_size, c.channels), np.uint8 if clip else np.float32)
    t0 = last = time.time()
    for b in range(0, len(indices), batch_size):
        idx = indices[b:b + batch_size]
        noise = SampleNoise(idx, seed, (c.channels, c.image_size, c.image_size), device)
        y = None if all_labels is None else torch.from_numpy(all_labels[idx]).to(device)
        denoise = make_denoiser(model, y, cfg_scale, autocast_dtype)
        x = (ddim_sample(denoise, noise(), abar, steps, eta, clip, eps_from, noise) if sampler == "ddim"
             else flow_sample(denoise, noise(), steps, sampler, noise))
        out[b:b + len(idx)] = to_uint8(x) if clip else x.permute(0, 2, 3, 1).cpu().numpy()
        done, now = b + len(idx), time.time()
        if progress and (now - last > 10 or done == len(indices) or b == 0):
            last, rate = now, done * world_size / (now - t0)  # rank 0 speaks for all ranks
            print(f"sampled {min(done * world_size, n)}/{n}  {rate:.2f} img/s  "
                  f"ETA {fmt_time((n - done * world_size) / rate if done < len(indices) else 0)}",
                  file=sys.stderr, flush=True)
    return out, None if all_labels is None else all_labels[indices]


def gather_samples(local, n, rank, world_size, device):
    """Rank 0 gets all n samples in index order (rank r holds r, r + W, ...); others get None."""
    per = -(-n // world_size)
    buf = torch.zeros((per,) + local.shape[1:], dtype=torch.from_numpy(local).dtype, device=device)
    buf[:len(local)] = torch.from_numpy(local).to(device)
    parts = [torch.empty_like(buf) for _ in range(world_size)] if rank == 0 else None
    dist.gather(buf, parts, dst=0)
    if rank != 0:
        return None
    out = np.empty((n,) + local.shape[1:], local.dtype)
    for r, part in enumerate(parts):  # one rank's share on the host at a time
        out[r::world_size] = part[:len(range(r, n, world_size))].cpu().numpy()
    return out


# ---- pictures -----------------------------------------------------------------------------
def tile(images, ncols=8, pad=2):
    """uint8 (N, H, W, C) -> one (rows, cols, C) uint8 canvas, ncols per row, white padding."""
    n, h, w, c = images.shape
    ncols = min(ncols, n)
    nrows = -(-n // ncols)
    canvas = np.full((nrows * (h + pad) + pad, ncols * (w + pad) + pad, c), 255, np.uint8)
    for i, img in enumerate(images):
        r, col = divmod(i, ncols)
        canvas[pad + r * (h + pad):(r + 1) * (h + pad), pad + col * (w + pad):(col + 1) * (w + pad)] = img
    return canvas


def save_grid(images, path, ncols=8):
    """uint8 (N, H, W, C) with C 1 (saved as 'L') or 3 -> one PNG, ncols per row."""
    images = np.asarray(images)
    if images.dtype != np.uint8 or images.ndim != 4 or images.shape[3] not in (1, 3) or len(images) == 0:
        raise ValueError(f"save_grid needs uint8 images (N, H, W, 1 or 3), got {images.dtype} {images.shape}")
    canvas = tile(images, ncols)
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    atomic_write(path, lambda f: Image.fromarray(canvas[..., 0] if canvas.shape[2] == 1 else canvas).save(f, format="PNG"))
    return path


def grid_images(images, labels=None, ncols=8, max_rows=10):
    """The first samples; with labels one row per class (first max_rows classes, ncols each)."""
    if labels is None:
        return images[:ncols * max_rows]
    rows = []
    for k in list(dict.fromkeys(labels.tolist()))[:max_rows]:
        row = images[labels == k][:ncols]
        rows.append(np.concatenate([row, np.zeros((ncols - len(row),) + images.shape[1:], images.dtype)]))
    return np.concatenate(rows)


@torch.inference_mode()
@in_eval_mode
def reconstruct(model, images, mask_ratio=0.75, seed=0):
    """Clean branch (t_model 0, null label) with a seeded random mask on uint8 NHWC images (or float latents)
    -> (masked input, masked patches 0 = grey; reconstruction with the visible patches pasted back from the
    original as MAE shows it, the raw output when mask_ratio is 0), uint8 NHWC (latents: float)."""
    if not 0 <= mask_ratio < 1:
        raise ValueError(f"mask_ratio must be in [0, 1), got {mask_ratio}")
    c, L = model.config, model.num_tokens
    images = np.asarray(images)
    if images.shape[1:] != (c.image_size, c.image_size, c.channels):
        raise ValueError(f"the model takes {c.image_size}x{c.image_size}x{c.channels} images, got {images.shape[1:]}")
    device = next(model.parameters()).device
    latent = images.dtype != np.uint8
    x = (torch.from_numpy(images).permute(0, 3, 1, 2).float() if latent else from_uint8(images)).to(device)
    keep = int(L * (1 - mask_ratio))
    if keep < 1:
        raise ValueError(f"mask_ratio {mask_ratio} keeps no patch of {L}")
    noise = torch.rand(len(x), L, generator=torch.Generator().manual_seed(seed))
    mask = torch.ones(len(x), L, dtype=torch.bool).scatter_(1, noise.argsort(1)[:, :keep], False).to(device)
    pred, _, _ = model(x, torch.zeros(len(x), dtype=torch.long, device=device), None, mask=mask if keep < L else None)
    pix = pixel_mask(mask.float(), c.image_size).bool()
    masked = torch.where(pix, torch.zeros_like(x), x)
    recon = torch.where(pix, pred.float(), x) if keep < L else pred.float()
    nhwc = (lambda z: z.permute(0, 2, 3, 1).cpu().numpy()) if latent else to_uint8
    return nhwc(masked), nhwc(recon)


def save_reconstructions(model, images, path, mask_ratio=0.75, seed=0, decode=None):
    """PNG with one row per image: original | masked input | reconstruction (each through decode, if given)."""
    columns = [np.asarray(images), *reconstruct(model, images, mask_ratio, seed)]
    columns = [decode(c) for c in columns] if decode else columns
    rows = np.stack(columns, axis=1).reshape(-1, *columns[0].shape[1:])
    return save_grid(rows, path, ncols=3)


# ---- command line -----------------------------------------------------------------------------
def parse_args(argv=None):
    p = argparse.ArgumentParser(description="DDIM samples (ADM npz + PNG grid) or reconstructions from a UMD checkpoint")
    p.add_argument("--ckpt", required=True)
    p.add_argument("--num_samples", type=int, default=64)
    p.add_argument("--steps", type=int, default=250,
                   help="DDIM steps (paper: 125 for training evals, 250); flow samplers: any >= 1")
    p.add_argument("--sampler", choices=["ddim", "euler", "heun", "sde"],
                   help="default: the checkpoint scheme's (umd: ddim, flow: heun); eta and eps_from are DDIM's")
    p.add_argument("--cfg_scale", type=float, default=1.0, help="1: plain conditional; 0: unconditional")
    p.add_argument("--eta", type=float, default=1.0)
    p.add_argument("--eps_from", choices=["eps", "x0"], default="eps", help="which head gives eps")
    p.add_argument("--labels", help="comma-separated class ids, repeated over the images (default: balanced, "
                                    "image i gets class i %% num_classes)")
    p.add_argument("--uncond", action="store_true", help="null label (models without labels always are)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--batch_size", type=int, default=64, help="per process")
    p.add_argument("--no_ema", action="store_true", help="use the raw weights even when EMA is stored")
    p.add_argument("--out", help="npz path (default: next to the ckpt); the grid is .png beside it")
    p.add_argument("--dtype", choices=["auto", "bf16", "fp32"], default="auto", help="auto: bf16 on CUDA, else fp32")
    p.add_argument("--device")
    p.add_argument("--quiet", action="store_true")
    p.add_argument("--vae", help="latent checkpoints: the VAE that decodes (default: the one the checkpoint recorded, "
                                 "else its data's meta.json)")
    p.add_argument("--raw_latents", action="store_true",
                   help="latent checkpoints: keep the float32 latents (at the training scale) in the npz, no decoding")
    p.add_argument("--recon", help="write a reconstruction PNG here instead of sampling")
    p.add_argument("--data", help="data dir with meta.json for --recon")
    p.add_argument("--split", default="train")
    p.add_argument("--mask_ratio", type=float, default=0.75)
    p.add_argument("--num_recon", type=int, default=8)
    return p.parse_args(argv)


def check_output(path):
    """Fail now, not after hours of sampling, if path cannot be written."""
    parent = Path(path).parent
    try:
        parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise ValueError(f"cannot write {path}: {parent} cannot be made ({e.strerror})") from None
    if Path(path).is_dir():  # (mkdir has made sure that parent is a folder)
        raise ValueError(f"cannot write {path}: {path} is not a file path")


def check_args(args):
    for key, low in (("num_samples", 1), ("batch_size", 1), ("num_recon", 1), ("seed", 0)):
        if getattr(args, key) < low:
            raise ValueError(f"--{key} must be >= {low}, got {getattr(args, key)}")
    if args.eta < 0 or args.cfg_scale < 0 or not 0 <= args.mask_ratio < 1:
        raise ValueError(f"need --eta >= 0, --cfg_scale >= 0 and --mask_ratio in [0, 1); got {args.eta}, "
                         f"{args.cfg_scale}, {args.mask_ratio}")
    ddim_timesteps(args.steps) if args.sampler == "ddim" else check_flow("heun", args.steps)  # DDIM's: once known


def latent_vae(args, tc, device, meta=None):
    """(VAE, scale) of a latent checkpoint: --vae, else the one its train_config recorded, else its data's."""
    if meta is None:
        with contextlib.suppress(OSError, ValueError):  # the data need not be on the sampling machine
            meta = load_meta(tc.get("data_dir") or "")
    return V.checkpoint_vae(tc, meta, args.vae, device)


def run(args, run_, log):
    """Sample (or write reconstructions) as args say, on the processes of run_ (train.Launch)."""
    rank, world_size, device = run_.rank, run_.world, torch.device(run_.device)
    model, ckpt = load_checkpoint(args.ckpt, use_ema=not args.no_ema, device=device)
    tc = ckpt.get("train_config") or {}
    latent, schedule = bool(tc.get("latent", False)), tc.get("schedule", "cosine")
    ema = ckpt.get("ema") is not None and not args.no_ema
    log(f"{args.ckpt}: step {ckpt.get('step')}, {'EMA' if ema else 'raw'} weights, {schedule} schedule, "
        f"{'latents' if latent else 'pixels'}, {model.config.num_classes or 'no'} classes")
    if args.raw_latents and not latent:
        raise ValueError("--raw_latents is for latent checkpoints; this one works on pixels")
    if args.recon:
        if not args.data:
            raise ValueError("--recon needs --data DIR (a prepared data dir with meta.json)")
        check_output(args.recon)
        if rank == 0:
            images, _, meta = load_split(args.data, args.split)
            pick = np.sort(np.random.default_rng(args.seed).choice(len(images), min(args.num_recon, len(images)), replace=False))
            images, decode = images[pick], None
            if latent:  # encoded (pixel data) or stored (latent data) posterior means; every column decoded
                vae, scale = latent_vae(args, tc, device, meta)
                images = V.model_input(meta, scale, vae, model.config.image_size)(images).permute(0, 2, 3, 1).numpy()
                decode = lambda l: V.decode(vae, l, scale)
            save_reconstructions(model, images, args.recon, args.mask_ratio, args.seed, decode)
            log(f"wrote {args.recon}: original | masked ({args.mask_ratio:g}) | reconstruction, {len(pick)} rows"
                + (", each decoded by the VAE" if latent else ""))
        return
    try:
        labels = None if args.labels is None else [int(s) for s in args.labels.split(",") if s.strip()]
    except ValueError:
        raise ValueError(f"--labels must be comma-separated class ids like 1,7,9; got {args.labels!r}") from None
    sampler = pick_sampler(ckpt.get("scheme"), args.sampler)
    cond = "uncond" if args.uncond or not model.config.num_classes else f"cfg{args.cfg_scale:g}"
    tag = f"_{sampler}" if sampler != "ddim" else "" if args.eta == 1 else f"_eta{args.eta:g}"
    out = Path(args.out or Path(args.ckpt).parent / f"samples_{args.num_samples}_{cond}_steps{args.steps}{tag}.npz")
    check_output(out)
    dtype = {"bf16": torch.bfloat16, "fp32": None}.get(args.dtype, torch.bfloat16 if device.type == "cuda" else None)
    decode = latent and not args.raw_latents
    if decode:  # loaded before sampling: a missing VAE fails now, not after hours
        vae, scale = latent_vae(args, tc, device)
    samples, y = sample_images(model, make_schedule(schedule), args.num_samples, args.steps, args.cfg_scale,
                               args.eta, args.seed, labels, args.uncond, args.batch_size, device,
                               clip=not latent, eps_from=args.eps_from, autocast_dtype=dtype,
                               rank=rank, world_size=world_size, progress=not args.quiet and rank == 0, sampler=sampler)
    if decode:
        samples = V.decode(vae, samples, scale, args.batch_size)
        log(f"decoded {len(samples)} latents with the VAE (scale {scale:g})")
    if world_size > 1:
        samples = gather_samples(samples, args.num_samples, rank, world_size, device)
        y = None if y is None else make_labels(args.num_samples, model.config.num_classes, labels)
    if rank != 0:
        return
    atomic_write(out, lambda f: np.savez(f, arr_0=samples, **({} if y is None else {"arr_1": y})))
    if args.raw_latents:  # (a pixel checkpoint has failed above)
        log(f"wrote {out}: arr_0 holds RAW LATENTS float32 {samples.shape} (N, H, W, C) at the training scale; "
            "sample without --raw_latents to get decoded images for fid.py (no PNG grid)")
        return
    log(f"wrote {out}: arr_0 uint8 {samples.shape}" + ("" if y is None else ", arr_1 labels")
        + (f"; {args.steps} DDIM steps, eta {args.eta:g}" if sampler == "ddim" else f"; {args.steps} {sampler} steps")
        + f", cfg {args.cfg_scale:g}")
    grid = save_grid(grid_images(samples, y), out.with_suffix(".png"))
    log(f"wrote {grid}" + ("" if y is None else " (one row per class)"))


def main(argv=None):
    args = parse_args(argv)
    launch = None
    try:
        check_args(args)
        launch = setup_distributed(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
        quiet = args.quiet or launch.rank != 0
        run(args, launch, (lambda msg: None) if quiet else (lambda msg: print(msg, file=sys.stderr, flush=True)))
    except (ValueError, OSError) as e:
        raise SystemExit(f"sample.py: error: {e}")
    finally:
        if launch is not None and launch.world > 1:
            dist.destroy_process_group()


if __name__ == "__main__":
    main()
