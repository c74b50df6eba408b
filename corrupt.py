"""
Corruption and loss: how UMD damages a batch and what the model must recover.

    batch of B images x0 (deterministic split by position, n_clean = int(B * no_noise_prob))
    +------------------ noisy branch (first B - n_clean) -----------+-- clean branch (last n_clean) --+
    | t ~ U{0..T-1}, x_t = sqrt(abar_t) x0 + sqrt(1 - abar_t) eps  | x0 as it is, t_model = 0         |
    | mask a share mask_ratio_noisy of the patches, t_model = t + 1 | mask a share mask_ratio_clean    |
    | loss: eps on visible pixels, x0 on masked pixels, 50/50       | loss: x0 on masked pixels (MAE)  |
    +----------------------------------------------------------------+----------------------------------+
    loss = noisy_loss * (B - n_clean) / B + clean_loss * n_clean / B

The presets (umd, mae, dit, maskdit, umd_finetune) are knob settings of this one function
(../shared/spec/UMD_SPEC.md section 2). This is the file to fork for a new corruption scheme:
a scheme is a function `loss_fn(model, x0, y, abar, knobs) -> (loss, parts)` with `parts` a
dict of detached scalars for logging. For example, noise-only with a per-sample mask ratio:

    def random_ratio_loss(model, x0, y, abar, knobs):
        ratio = float(torch.empty(()).uniform_(0.0, knobs.mask_ratio_noisy))
        t = torch.randint(0, len(abar), (x0.shape[0],), device=x0.device)
        eps = torch.randn_like(x0)
        x0_pred, eps_pred, mask = model(q_sample(x0, t, eps, abar), t + 1, y, ratio)
        pix = pixel_mask(mask, model.config.patch_size)
        loss = masked_mse(x0_pred, x0, pix) if pix is not None else F.mse_loss(x0_pred, x0)
        return loss, {"noisy_x0_loss": loss.detach()}

    LOSSES["random_ratio"] = random_ratio_loss      # then train with --loss=random_ratio
"""
import math
from dataclasses import dataclass, asdict, fields

import torch
import torch.nn.functional as F

T = 1000  # diffusion steps


# ---- schedules --------------------------------------------------------------------------
def cosine_alphas_cumprod(T=T):
    """Nichol & Dhariwal cosine schedule, betas clipped at 0.999, float64."""
    f = lambda s: math.cos((s + 0.008) / 1.008 * math.pi / 2) ** 2
    betas = torch.tensor([min(1 - f((i + 1) / T) / f(i / T), 0.999) for i in range(T)], dtype=torch.float64)
    return torch.cumprod(1 - betas, dim=0)


def linear_alphas_cumprod(T=T):
    """DDPM linear schedule (used for latents)."""
    betas = torch.linspace(1e-4, 0.02, T, dtype=torch.float64)
    return torch.cumprod(1 - betas, dim=0)


SCHEDULES = {"cosine": cosine_alphas_cumprod, "linear": linear_alphas_cumprod}


def make_schedule(name, T=T):
    """abar_t for t in [0, T-1] as a float64 tensor."""
    if name not in SCHEDULES:
        raise ValueError(f"unknown schedule {name!r}, expected one of {sorted(SCHEDULES)}")
    return SCHEDULES[name](T)


def q_sample(x0, t, eps, abar):
    """x_t = sqrt(abar_t) x0 + sqrt(1 - abar_t) eps, coefficients computed in float64."""
    a = abar.to(x0.device)[t]
    shape = (-1,) + (1,) * (x0.ndim - 1)
    return a.sqrt().to(x0.dtype).view(shape) * x0 + (1 - a).sqrt().to(x0.dtype).view(shape) * eps


# ---- knobs and presets ------------------------------------------------------------------
@dataclass
class Knobs:
    no_noise_prob: float = 0.5      # share of the batch in the clean branch
    mask_ratio_clean: float = 0.75  # masking of clean samples (MAE branch, must be > 0)
    mask_ratio_noisy: float = 0.375 # masking of noisy samples
    noisy_target: str = "both"      # "both" (the paper), or the ablations "x0" / "eps" only
    adaln: bool = True              # architecture knob carried by the preset (mae: False)

    def __post_init__(self):
        if not 0 <= self.no_noise_prob <= 1:
            raise ValueError(f"no_noise_prob must be in [0, 1], got {self.no_noise_prob}")
        for name in ("mask_ratio_clean", "mask_ratio_noisy"):
            if not 0 <= getattr(self, name) < 1:
                raise ValueError(f"{name} must be in [0, 1), got {getattr(self, name)}")
        if self.no_noise_prob > 0 and self.mask_ratio_clean == 0:
            raise ValueError("the clean branch is an MAE loss on masked pixels: mask_ratio_clean must be > 0")
        if self.noisy_target not in ("both", "x0", "eps"):
            raise ValueError(f"noisy_target must be 'both', 'x0' or 'eps', got {self.noisy_target!r}")


PRESETS = {
    "umd": Knobs(no_noise_prob=0.5, mask_ratio_clean=0.75, mask_ratio_noisy=0.375),
    "mae": Knobs(no_noise_prob=1.0, mask_ratio_clean=0.75, mask_ratio_noisy=0.0, adaln=False),
    "dit": Knobs(no_noise_prob=0.0, mask_ratio_clean=0.75, mask_ratio_noisy=0.0),
    "maskdit": Knobs(no_noise_prob=0.0, mask_ratio_clean=0.75, mask_ratio_noisy=0.5),
    "umd_finetune": Knobs(no_noise_prob=0.05, mask_ratio_clean=0.75, mask_ratio_noisy=0.0),
}


def preset(name, **overrides):
    """Knobs of a preset, with any knob overridden (e.g. the paper's ablations:
    preset('umd', noisy_target='x0'), preset('umd', mask_ratio_noisy=0.0))."""
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}, expected one of {sorted(PRESETS)}")
    unknown = set(overrides) - {f.name for f in fields(Knobs)}
    if unknown:
        raise ValueError(f"unknown corruption knob(s) {sorted(unknown)}")
    return Knobs(**{**asdict(PRESETS[name]), **overrides})


# ---- loss -------------------------------------------------------------------------------
def pixel_mask(mask, patch_size):
    """(N, L) token mask -> (N, 1, H, W) pixel mask, or None when nothing was masked."""
    if mask is None:
        return None
    h = math.isqrt(mask.shape[1])
    m = mask.view(-1, 1, h, 1, h, 1).expand(-1, -1, -1, patch_size, -1, patch_size)
    return m.reshape(mask.shape[0], 1, h * patch_size, h * patch_size)


def masked_mse(pred, target, weight):
    """Sum of squared errors where weight is 1, divided by the number of such values."""
    weight = weight.expand_as(pred)
    return ((pred - target) ** 2 * weight).sum() / weight.sum().clamp(min=1)


def umd_loss(model, x0, y, abar, knobs, t=None, eps=None, masks=(None, None)):
    """The UMD objective on one batch (spec section 2). Returns (loss, parts).
    t, eps and masks=(noisy_mask, clean_mask) may be given to fix the randomness (tests)."""
    B = x0.shape[0]
    n_clean = int(B * knobs.no_noise_prob)
    n_noisy = B - n_clean
    p = model.config.patch_size
    zero = x0.new_zeros(())
    loss = zero
    parts = {"clean_loss": zero, "noisy_eps_loss": zero, "noisy_x0_loss": zero}
    y_noisy = None if y is None else y[:n_noisy]

    if n_noisy > 0:
        x = x0[:n_noisy]
        if t is None:
            t = torch.randint(0, len(abar), (n_noisy,), device=x0.device)
        if eps is None:
            eps = torch.randn_like(x)
        x0_pred, eps_pred, mask = model(q_sample(x, t, eps, abar), t + 1, y_noisy,
                                        knobs.mask_ratio_noisy, masks[0])
        pix = pixel_mask(mask, p)
        if pix is None:  # no masking: both targets on all pixels
            eps_loss, x0_loss = F.mse_loss(eps_pred, eps), F.mse_loss(x0_pred, x)
        else:            # eps is hopeless under a mask: eps on visible pixels, x0 on masked ones
            eps_loss, x0_loss = masked_mse(eps_pred, eps, 1 - pix), masked_mse(x0_pred, x, pix)
        noisy_loss = {"both": (eps_loss + x0_loss) / 2, "x0": x0_loss, "eps": eps_loss}[knobs.noisy_target]
        loss = loss + noisy_loss * (n_noisy / B)
        parts["noisy_eps_loss"], parts["noisy_x0_loss"] = eps_loss.detach(), x0_loss.detach()

    if n_clean > 0:
        x = x0[n_noisy:]
        t_clean = torch.zeros(n_clean, dtype=torch.long, device=x0.device)
        y_null = None if y is None else model.null_labels(n_clean, x0.device)
        x0_pred, _, mask = model(x, t_clean, y_null, knobs.mask_ratio_clean, masks[1])
        clean_loss = masked_mse(x0_pred, x, pixel_mask(mask, p))
        loss = loss + clean_loss * (n_clean / B)
        parts["clean_loss"] = clean_loss.detach()
    return loss, parts


def train_flops_per_image(model, knobs):
    """Analytic training FLOPs per image of umd_loss: forward + backward (3x forward) of each
    branch, weighted by its share of the batch. For MFU and the UMD-vs-DiT cost ratio."""
    r = knobs.no_noise_prob
    noisy = model.forward_flops(knobs.mask_ratio_noisy) if r < 1 else 0
    clean = model.forward_flops(knobs.mask_ratio_clean) if r > 0 else 0
    return 3 * ((1 - r) * noisy + r * clean)


LOSSES = {"umd": umd_loss}  # name -> loss function; add a new corruption scheme here
