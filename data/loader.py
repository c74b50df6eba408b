"""Training batches. Every micro-batch is a pure function of (seed, step, chunk): a step's global batch
is the next slice of the epoch's permutation (seeded by (seed, epoch); the last partial batch of an epoch
is dropped), cut into world_size x grad_accum chunks, and its augmentation is seeded from (seed, step,
chunk). So a resumed run sees the same images as the uninterrupted one, whatever the launch shape."""
import math

import numpy as np
import torch
import torch.nn.functional as F

from data.vae import sample_posterior
from infra.launch import seed_of
from model import from_uint8


def augment(x, area_min, hflip, gen):
    """uint8 NHWC batch on the device -> float NCHW in [-1, 1] after a random resized crop (area in
    [area_min, 1], aspect in [3/4, 4/3], bilinear) and a random horizontal flip, per image.
    The aspect is drawn among those whose box fits the image (what torchvision's rejection
    sampling accepts), so area 1 is the whole image."""
    x = from_uint8(x)
    if area_min >= 1 and not hflip:
        return x
    u = torch.rand(x.shape[0], 5, device=x.device, generator=gen)
    area = area_min + (1 - area_min) * u[:, 0]
    lo, hi = area.log().clamp(min=math.log(3 / 4)), (-area.log()).clamp(max=math.log(4 / 3))
    ratio = (lo + (hi - lo) * u[:, 1]).exp()
    w, h = (area * ratio).sqrt(), (area / ratio).sqrt()    # box size as a share of the side
    flip = torch.where(u[:, 4] < 0.5, -1.0, 1.0) if hflip else torch.ones_like(w)
    theta = torch.zeros(x.shape[0], 2, 3, device=x.device)
    theta[:, 0, 0], theta[:, 0, 2] = w * flip, (2 * u[:, 2] - 1) * (1 - w)   # x_in = w x_out + cx
    theta[:, 1, 1], theta[:, 1, 2] = h, (2 * u[:, 3] - 1) * (1 - h)
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)


class Batches:
    """Micro-batch `chunk` of step s: images from the memmap, augmented on the device (latents: a
    posterior sample of the image or its flip copy, data.vae.sample_posterior)."""

    def __init__(self, images, targets, cfg, micro_bs, device):
        self.images, self.targets, self.cfg, self.micro_bs, self.device = images, targets, cfg, micro_bs, device
        self.steps_per_epoch, self.perm_epoch, self.perm = len(images) // cfg.batch_size, None, None
        self.gen = torch.Generator(device=device)

    def __call__(self, s, chunk):
        epoch, pos = divmod(s, self.steps_per_epoch)
        if epoch != self.perm_epoch:
            g = torch.Generator().manual_seed(seed_of(self.cfg.seed, 0, epoch))
            self.perm_epoch, self.perm = epoch, torch.randperm(len(self.images), generator=g).numpy()
        start = pos * self.cfg.batch_size + chunk * self.micro_bs
        idx = self.perm[start:start + self.micro_bs]
        order, x = np.argsort(idx), np.empty((len(idx),) + self.images.shape[1:], self.images.dtype)
        x[order] = self.images[idx[order]]  # read in file order (faster), keep the random order: the
        x, y = torch.from_numpy(x), torch.from_numpy(self.targets[idx])  # loss splits batches by position
        if self.device.startswith("cuda"):  # pinned: the copy overlaps the previous step's compute
            x, y = (t.pin_memory().to(self.device, non_blocking=True) for t in (x, y))
        self.gen.manual_seed(seed_of(self.cfg.seed, 1, s, chunk))
        x = (sample_posterior(x, self.cfg.latent_scale, self.cfg.hflip, self.gen) if self.cfg.latent
             else augment(x, self.cfg.crop_area_min, self.cfg.hflip, self.gen))
        return x, (y if self.cfg.labels else None)
