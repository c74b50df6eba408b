"""
Sampling from a UMD checkpoint: DDIM with classifier-free guidance, an ADM-style npz for FID, a PNG grid,
and an MAE-style reconstruction picture.

    python sample.py --ckpt out/ckpt.pt --num_samples 50000 --cfg_scale 1.5 --steps 125
    torchrun --nproc_per_node 8 sample.py --ckpt out/ckpt.pt --num_samples 50000 --cfg_scale 1.5
    python sample.py --ckpt out/ckpt.pt --uncond --num_samples 64     # null label / no label table
    python sample.py --ckpt out/ckpt.pt --recon out/recon.png --data data/cifar10 --mask_ratio 0.75

DDIM as the authors' code samples: timesteps arange(T-1, 0, -(T // S)) then 0 (S must divide T, so that
S steps run); for each pair (t, t_next) the model runs at t_model = t + 1,
x0_hat = (x - sqrt(1 - abar_t) eps) / sqrt(abar_t) with eps from the eps head (or derived from the x0
head), clipped to [-1, 1] for pixels (never for latents) and eps recomputed from it, then
    sigma = eta sqrt((1 - abar_next) / (1 - abar_t)) sqrt(1 - abar_t / abar_next)
    x = sqrt(abar_next) x0_hat + sqrt(1 - abar_next - sigma^2) eps + sigma z
and one last call at t = 0 whose x0_hat is the sample. Image i draws all its noise from its own
generator seeded from (seed, i), so it is the same whatever the batch size or world size.

Latent checkpoints (train_config latent=True) sample latents and decode them with the VAE of their data
(data/vae.py; --vae PATH, default the one the checkpoint recorded) into the uint8 npz; --raw_latents
keeps the float32 latents instead. Their reconstruction pictures show both rows decoded.

Flow checkpoints (ckpt["scheme"] == "flow", corrupt.flow_loss) get flow_sample instead: Heun (the
default), Euler or SiT's SDE from s = 1 to 0 (--sampler; DDIM fits only UMD checkpoints).

The command line's flags and checks, and the npz and grid it writes: infra/cli.py.
"""
import math
import sys

import numpy as np
import torch
import torch.distributed as dist

from corrupt import SCHEMES, flow_t_model, make_schedule, pixel_mask
from data import vae as V
from infra.checkpoint import load_checkpoint
from infra.cli import (Progress, check_output, check_sample_args, check_sampling, gather_samples, latent_vae,
                       parse_labels, recon_images, sample_parser, samples_path, write_samples)
from infra.launch import CPU_BF16, seed_of, setup_distributed
from infra.pictures import save_rows
from model import from_uint8, in_eval_mode


# ---- DDIM ---------------------------------------------------------------------------------
def ddim_timesteps(steps, T=1000):
    """S = 125 -> [999, 991, ..., 7, 0]: S pairs (t, t_next), then the final call at 0."""
    if isinstance(steps, bool) or not isinstance(steps, int) or not 1 <= steps <= T:
        raise ValueError(f"steps must be an integer in [1, {T}] (T = {T}), got {steps!r}")
    ts = list(range(T - 1, 0, -(T // steps))) + [0]
    if len(ts) - 1 != steps:  # the spacing T // S runs more steps than asked when S does not divide T
        divisors = [d for d in (10, 25, 50, 100, 125, 200, 250, 500) if T % d == 0]
        raise ValueError(f"steps {steps}: the reference's spacing T // steps (T = {T}) would run "
                         f"{len(ts) - 1} steps, not {steps}; use a divisor of T below T, such as {divisors}")
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
    """`sampler`, or by default the first of corrupt.Scheme.samplers, for a checkpoint of `scheme`
    (None: UMD)."""
    fits = SCHEMES[scheme or "umd"].samplers if (scheme or "umd") in SCHEMES else ()
    if not fits or sampler not in (None, *fits):
        raise ValueError(f"sampler {sampler!r} does not fit a checkpoint of scheme {scheme!r}: its samplers "
                         f"are {list(fits)}")
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
    """Per-image noise: one CPU generator per image of `indices`, seeded from (seed, i); a call -> (n,
    *shape)."""

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
        with torch.autocast(device_type, dtype=autocast_dtype or torch.bfloat16,
                            enabled=autocast_dtype is not None):
            x0, eps = (model.forward_with_cfg(x, t_model, y, cfg_scale) if cfg_scale != 1
                       else model(x, t_model, y)[:2])
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


@torch.inference_mode()
@in_eval_mode
def sample_images(model, abar, n, steps=250, cfg_scale=1.0, eta=1.0, seed=0, labels=None, uncond=False,
                  batch_size=64, device=None, clip=True, eps_from="eps", autocast_dtype=None,
                  rank=0, world_size=1, progress=False, sampler="ddim"):
    """Images rank, rank + world_size, ... < n, in index order, by `sampler` ("ddim": eta, clip and
    eps_from are its; or a flow one) -> (uint8 (m, H, W, C) or, with clip=False, float32 latents; int64
    labels (m,) or None). labels: None = balanced or class ids (make_labels); uncond (or a model without
    labels): null label."""
    c, K = model.config, model.config.num_classes
    check_sampling(n, batch_size, seed, K, uncond, cfg_scale, labels)
    ddim_timesteps(steps, len(abar)) if sampler == "ddim" else check_flow(sampler, steps)
    all_labels = None if K == 0 or uncond else make_labels(n, K, labels)
    device = device or next(model.parameters()).device
    indices = np.arange(rank, n, world_size)
    out = np.zeros((len(indices), c.image_size, c.image_size, c.channels), np.uint8 if clip else np.float32)
    report = Progress(n, world_size, len(indices)) if progress else None  # rank 0 speaks for all ranks
    for b in range(0, len(indices), batch_size):
        idx = indices[b:b + batch_size]
        noise = SampleNoise(idx, seed, (c.channels, c.image_size, c.image_size), device)
        y = None if all_labels is None else torch.from_numpy(all_labels[idx]).to(device)
        denoise = make_denoiser(model, y, cfg_scale, autocast_dtype)
        x = (ddim_sample(denoise, noise(), abar, steps, eta, clip, eps_from, noise) if sampler == "ddim"
             else flow_sample(denoise, noise(), steps, sampler, noise))
        out[b:b + len(idx)] = to_uint8(x) if clip else x.permute(0, 2, 3, 1).cpu().numpy()
        if report:
            report(b + len(idx))
    return out, None if all_labels is None else all_labels[indices]


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
        raise ValueError(f"the model takes {c.image_size}x{c.image_size}x{c.channels} images, "
                         f"got {images.shape[1:]}")
    device = next(model.parameters()).device
    latent = images.dtype != np.uint8
    x = (torch.from_numpy(images).permute(0, 3, 1, 2).float() if latent else from_uint8(images)).to(device)
    keep = int(L * (1 - mask_ratio))
    if keep < 1:
        raise ValueError(f"mask_ratio {mask_ratio} keeps no patch of {L}")
    noise = torch.rand(len(x), L, generator=torch.Generator().manual_seed(seed))
    mask = torch.ones(len(x), L, dtype=torch.bool).scatter_(1, noise.argsort(1)[:, :keep], False).to(device)
    t_model = torch.zeros(len(x), dtype=torch.long, device=device)
    pred, _, _ = model(x, t_model, None, mask=mask if keep < L else None)
    pix = pixel_mask(mask.float(), c.image_size).bool()
    masked = torch.where(pix, torch.zeros_like(x), x)
    recon = torch.where(pix, pred.float(), x) if keep < L else pred.float()
    nhwc = (lambda z: z.permute(0, 2, 3, 1).cpu().numpy()) if latent else to_uint8
    return nhwc(masked), nhwc(recon)


# ---- command line -----------------------------------------------------------------------------
def run(args, launch, log):
    """Sample (or write reconstructions) as args say, on the processes of launch (infra.launch.Launch)."""
    rank, world_size, device = launch.rank, launch.world, torch.device(launch.device)
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
        check_output(args.recon, [args.ckpt, args.data])
        if rank == 0:
            images, decode = recon_images(args, tc, model.config.image_size, device)
            save_rows([images, *reconstruct(model, images, args.mask_ratio, args.seed)], args.recon, decode)
            log(f"wrote {args.recon}: original | masked ({args.mask_ratio:g}) | reconstruction, "
                f"{len(images)} rows" + (", each decoded by the VAE" if latent else ""))
        return
    labels = parse_labels(args.labels)
    sampler = pick_sampler(ckpt.get("scheme"), args.sampler)
    out = samples_path(args, sampler, labelled=bool(model.config.num_classes))
    auto = torch.bfloat16 if device.type == "cuda" or (device.type == "cpu" and CPU_BF16) else None
    dtype = {"bf16": torch.bfloat16, "fp32": None}.get(args.dtype, auto)
    decode = latent and not args.raw_latents
    if decode:  # loaded before sampling: a missing VAE fails now, not after hours
        vae, scale = latent_vae(args, tc, device)
    samples, y = sample_images(model, make_schedule(schedule), args.num_samples, args.steps, args.cfg_scale,
                               args.eta, args.seed, labels, args.uncond, args.batch_size, device,
                               clip=not latent, eps_from=args.eps_from, autocast_dtype=dtype, rank=rank,
                               world_size=world_size, progress=not args.quiet and rank == 0, sampler=sampler)
    if decode:
        samples = V.decode(vae, samples, scale, args.batch_size)
        log(f"decoded {len(samples)} latents with the VAE (scale {scale:g})")
    if world_size > 1:
        samples = gather_samples(samples, args.num_samples, rank, world_size, device)
        y = None if y is None else make_labels(args.num_samples, model.config.num_classes, labels)
    if rank == 0:
        write_samples(out, samples, y, args, sampler, log)


def main(argv=None):
    args, launch = sample_parser().parse_args(argv), None
    try:
        check_sample_args(args)
        # steps >= 1; DDIM's rule now for --sampler ddim, else once the checkpoint names the sampler
        ddim_timesteps(args.steps) if args.sampler == "ddim" else check_flow("heun", args.steps)
        launch = setup_distributed(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
        quiet = args.quiet or launch.rank != 0
        run(args, launch, lambda msg: None if quiet else print(msg, file=sys.stderr, flush=True))
    except (ValueError, OSError) as e:
        raise SystemExit(f"sample.py: error: {e}")
    finally:
        if launch is not None and launch.world > 1:
            dist.destroy_process_group()


if __name__ == "__main__":
    main()
