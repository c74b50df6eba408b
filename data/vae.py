"""
The VAE of latent models: Stable Diffusion's AutoencoderKL (8x down-sampling, 4 channels, latents times
0.18215) from `diffusers`, an optional dependency (`pip install diffusers`) that only this module imports,
and only inside load_vae. Weights: a local folder in diffusers' layout (config.json and
diffusion_pytorch_model.safetensors, e.g. a download of stabilityai/sd-vae-ft-ema or -mse), or that hub
name where the hub is reachable.

A latent dataset (data/latent/prepare.py, layout in data/common.py) stores the posterior's mean and std,
unscaled. A latent model sees scale * z: in training z = mean + std * N(0, 1) drawn afresh every step
(sample_posterior), for the probe and reconstructions z = mean (posterior_mean, model_input).
"""
from pathlib import Path

import numpy as np
import torch

from data.common import to_model_input

INSTALL = "pip install diffusers"


class MissingDependency(ImportError, ValueError):
    """An optional package is not installed. A ValueError too: the entry points' one-line `error: ...` (the
    install hint, no traceback) catches it with bad input."""


def load_vae(path_or_name, device="cpu"):
    """The AutoencoderKL of a local folder or a hub name: fp32, eval mode, no gradients, on device."""
    try:
        from diffusers import AutoencoderKL
    except ImportError:
        raise MissingDependency(f"latent models need the optional package diffusers: {INSTALL}") from None
    if not path_or_name:
        raise ValueError("no VAE given: pass --vae PATH, a local diffusers folder of stabilityai/sd-vae-ft-ema "
                         "(or -mse)")
    name, hint = str(path_or_name), ("give --vae PATH, a folder in diffusers' layout (config.json, "
                                     "diffusion_pytorch_model.safetensors) of stabilityai/sd-vae-ft-ema or -mse")
    if not Path(name).exists() and (name.startswith(("/", ".", "~")) or name.count("/") != 1):
        raise FileNotFoundError(f"the VAE folder {name} does not exist; {hint}")
    try:
        vae = AutoencoderKL.from_pretrained(name, low_cpu_mem_usage=False)
    except Exception as e:  # diffusers and huggingface_hub raise many kinds
        where = "the folder" if Path(name).exists() else "not a folder here, tried as a hub name"
        why = " ".join(str(e).split())[:300]
        raise OSError(f"cannot load the VAE {name} ({where}): {type(e).__name__}: {why}; {hint}") from None
    return vae.to(device).eval().requires_grad_(False)


def describe(vae, path_or_name):
    """The meta.json entry "latent" of latents made by vae (scale: its scaling_factor)."""
    c = vae.config
    return {"vae": str(path_or_name), "scale": float(c.scaling_factor), "channels": int(c.latent_channels),
            "downsample": 2 ** (len(c.block_out_channels) - 1)}


def _device(vae):
    return next(vae.parameters()).device


@torch.no_grad()
def posterior(vae, x):
    """Float NCHW images in [-1, 1] -> (mean, std) of q(z | x), float32 NCHW on the VAE's device, unscaled."""
    d = vae.encode(x.to(_device(vae), torch.float32)).latent_dist
    return d.mean.float(), d.std.float()


def encode(vae, images, batch_size=32):
    """uint8 NHWC images -> (mean, std) of their posteriors, float32 NHWC numpy, unscaled; in batches."""
    means, stds = [], []
    for i in range(0, len(images), batch_size):
        x = torch.from_numpy(np.array(images[i:i + batch_size])).permute(0, 3, 1, 2).float() / 127.5 - 1
        for out, t in zip((means, stds), posterior(vae, x)):
            out.append(t.permute(0, 2, 3, 1).cpu().numpy())
    return np.concatenate(means), np.concatenate(stds)


@torch.no_grad()
def decode(vae, latents, scale, batch_size=32):
    """Latents at the model's scale (scale * z), float NHWC numpy -> uint8 NHWC images; batched, on the
    VAE's device."""
    out = []
    for i in range(0, len(latents), batch_size):
        z = torch.from_numpy(np.asarray(latents[i:i + batch_size], np.float32)).permute(0, 3, 1, 2)
        x = vae.decode(z.to(_device(vae)) / scale).sample
        out.append(((x.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy())
    return np.concatenate(out)


def posterior_mean(rows, scale):
    """Rows of a latent dataset (N, 2, 2, h, w, C) -> scale * the posterior mean of the unflipped images,
    float32 NCHW tensor."""
    return torch.from_numpy(np.array(rows[:, 0, 0], np.float32)).permute(0, 3, 1, 2) * scale


def sample_posterior(rows, scale, hflip, gen):
    """Rows of a latent dataset as a tensor (N, 2, 2, h, w, C) -> scale * z, float32 NCHW on their device:
    per image the flip copy with probability 0.5 (if hflip), z = mean + std * N(0, 1), drawn from gen."""
    n, dev = len(rows), rows.device
    flip = torch.rand(n, device=dev, generator=gen) < 0.5 if hflip else torch.zeros(n, dtype=torch.bool, device=dev)
    mean, std = rows[torch.arange(n, device=dev), flip.long()].float().unbind(1)
    z = mean + std * torch.randn(mean.shape, device=dev, generator=gen)
    return (scale * z).permute(0, 3, 1, 2).contiguous()


def checkpoint_vae(train_config, meta=None, given=None, device="cpu", load=True):
    """(VAE, scale) of a latent checkpoint. The VAE: `given` (--vae), else what its train_config recorded, else
    the latent data's meta.json (load=False: None, for latent data, whose stored means need no encoder). The
    scale: what the train_config or the data recorded, else the VAE's own."""
    lat = (meta or {}).get("latent") or {}
    path = given or train_config.get("vae") or lat.get("vae")
    if not path:
        raise ValueError("this latent checkpoint records no VAE: pass --vae PATH (the diffusers folder of the VAE "
                         "its data was encoded with)")
    vae = load_vae(path, device) if load else None
    return vae, train_config.get("latent_scale") or lat.get("scale") or describe(vae, path)["scale"]


def model_input(meta, scale, vae=None, size=None):
    """A function rows -> float32 NCHW input of a latent model (scale * posterior mean): rows of a latent
    dataset (meta has "latent") give their stored mean; images of a pixel dataset are resized to
    size * downsample pixels as the probe resizes (data.common.to_model_input) and encoded by vae."""
    if "latent" in meta:
        if meta["latent"]["scale"] != scale:
            raise ValueError(f"the latent data was made with scale {meta['latent']['scale']}, the model trained "
                             f"with {scale}")
        return lambda rows: posterior_mean(rows, scale)
    if vae is None:
        raise ValueError("a latent model on a pixel dataset needs the VAE to encode the images")
    pixels = size * describe(vae, "")["downsample"]
    return lambda images: posterior(vae, to_model_input(images, pixels, 3))[0].cpu() * scale
