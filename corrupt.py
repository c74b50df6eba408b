"""
Corruption and loss: how UMD damages a batch and what the model must recover.

    global batch of B images x0, cut into micro-batches; n_clean = int(B * no_noise_prob) in all,
    spread evenly over the micro-batches (clean_count); in each, split by position:
    +------------------ noisy branch (first b - n_clean) -----------+-- clean branch (last n_clean) --+
    | t ~ U{0..T-1}, x_t = sqrt(abar_t) x0 + sqrt(1 - abar_t) eps  | x0 as it is, t_model = 0         |
    | mask a share mask_ratio_noisy of the patches, t_model = t + 1 | mask a share mask_ratio_clean    |
    | loss: eps on visible pixels, x0 on masked pixels, 50/50       | loss: x0 on masked pixels (MAE)  |
    +----------------------------------------------------------------+----------------------------------+
    loss = noisy_loss * (b - n_clean) / b + clean_loss * n_clean / b    (b: micro-batch size)
    so the mean over the micro-batches is the paper's loss on the global batch (Sec. 4, Eq. 4-5).

The presets (umd, mae, dit, maskdit and the fine-tuning recipes) are knob settings of this one
function. This is the file to fork for a new corruption scheme. A scheme is one `Scheme` in
SCHEMES: its knobs (a dataclass) and presets, its loss, the parts it logs and its training FLOPs
per image; train.py, bench.py and sample.py use only these. Its knobs become train.py flags. E.g.
noisy images only, x0 target, one mask ratio drawn per micro-batch:

    @dataclass
    class RatioKnobs:
        max_mask_ratio: float = 0.5

    def random_ratio_loss(model, x0, y, abar, knobs, chunk=(0, 1)):
        ratio = float(torch.rand(())) * knobs.max_mask_ratio          # one ratio for the call
        t = torch.randint(0, len(abar), (len(x0),), device=x0.device)
        x0_pred, _, mask = model(q_sample(x0, t, torch.randn_like(x0), abar), t + 1, y, ratio)
        loss = F.mse_loss(x0_pred, x0)
        return loss, {"x0_loss": loss.detach()}

    SCHEMES["random_ratio"] = Scheme(RatioKnobs, {"random_ratio": RatioKnobs()}, random_ratio_loss,
                                     ("x0_loss",))
    # python train.py --loss=random_ratio --max_mask_ratio=0.3

A scheme that keeps UMD's batch split and changes the noisy branch reuses branch_split_loss: the
flow-matching fork at the end of this file (SCHEMES["flow"], --loss=flow) is written that way, and
sample.py has the samplers it names (Scheme.samplers).
"""
import math
from dataclasses import asdict, dataclass, fields
from typing import Callable, Optional

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
    # fine-tuning recipes (Sec. 5.2, Table 5): UMD and MAE keep a small masked clean branch, DiT and MaskDiT
    # are fine-tuned as plain diffusion models
    "umd_finetune": Knobs(no_noise_prob=0.05, mask_ratio_clean=0.75, mask_ratio_noisy=0.0),
    "dit_finetune": Knobs(no_noise_prob=0.0, mask_ratio_clean=0.75, mask_ratio_noisy=0.0),
}


def umd_finetune_preset(pretrain_knobs):
    """The fine-tuning recipe for a model pre-trained with these knobs."""
    return "umd_finetune" if pretrain_knobs.no_noise_prob > 0 else "dit_finetune"


def clean_count(micro_batch, no_noise_prob, chunk=(0, 1)):
    """Clean images in micro-batch i of n (chunk = (i, n)) of a global batch of n * micro_batch:
    int(B * no_noise_prob) in all, spread evenly, so the split is the same whatever the number
    of ranks and accumulation steps."""
    i, n = chunk
    total = int(micro_batch * n * no_noise_prob)
    return (i + 1) * total // n - i * total // n


# ---- loss -------------------------------------------------------------------------------
def pixel_mask(mask, image_size):
    """(N, L) token mask -> (N, 1, H, W) pixel mask of H = W = image_size, or None when nothing was masked."""
    if mask is None:
        return None
    h = math.isqrt(mask.shape[1])
    p = image_size // h  # patch size
    m = mask.view(-1, 1, h, 1, h, 1).expand(-1, -1, -1, p, -1, p)
    return m.reshape(mask.shape[0], 1, image_size, image_size)


def masked_mse(pred, target, weight):
    """Sum of squared errors where weight is 1, divided by the number of such values."""
    weight = weight.expand_as(pred)
    return ((pred - target) ** 2 * weight).sum() / weight.sum().clamp(min=1)


def target_losses(x0_pred, eps_pred, x0, eps, mask, noisy_target="both"):
    """UMD's two noisy targets -> (the noisy loss of noisy_target, eps loss, x0 loss): without a mask both
    on all pixels; with one, eps on the visible pixels (it is hopeless under a mask) and x0 on the masked."""
    pix = pixel_mask(mask, x0.shape[-1])
    if pix is None:
        eps_loss, x0_loss = F.mse_loss(eps_pred, eps), F.mse_loss(x0_pred, x0)
    else:
        eps_loss, x0_loss = masked_mse(eps_pred, eps, 1 - pix), masked_mse(x0_pred, x0, pix)
    return {"both": (eps_loss + x0_loss) / 2, "x0": x0_loss, "eps": eps_loss}[noisy_target], eps_loss, x0_loss


def branch_split_loss(model, x0, y, knobs, chunk, noisy_loss, clean_mask=None):
    """The batch split of the diagram: noisy_loss(x, y) -> (loss, parts) on the first b - n_clean
    images, MAE's loss on the last n_clean (t_model 0, the null label = y None, masked pixels),
    each weighted by its share of the micro-batch. Returns (loss, parts)."""
    B = x0.shape[0]
    n_clean = clean_count(B, knobs.no_noise_prob, chunk)
    n_noisy = B - n_clean
    loss, parts = x0.new_zeros(()), {"clean_share": torch.tensor(n_clean / B)}
    if n_noisy > 0:
        noisy, noisy_parts = noisy_loss(x0[:n_noisy], None if y is None else y[:n_noisy])
        loss = loss + noisy * (n_noisy / B)
        parts.update(noisy_parts)
    if n_clean > 0:
        x = x0[n_noisy:]
        t_clean = torch.zeros(n_clean, dtype=torch.long, device=x0.device)
        x0_pred, _, mask = model(x, t_clean, None, knobs.mask_ratio_clean, clean_mask)
        clean_loss = masked_mse(x0_pred, x, pixel_mask(mask, x.shape[-1]))
        loss = loss + clean_loss * (n_clean / B)
        parts["clean_loss"] = clean_loss.detach()
    return loss, parts


def umd_loss(model, x0, y, abar, knobs, chunk=(0, 1), t=None, eps=None, masks=(None, None)):
    """The UMD objective on micro-batch chunk = (i, n) of a global batch. Returns (loss, parts).
    model(x, t_model, y, mask_ratio, mask) -> (x0_pred, eps_pred, mask); y None = null label.
    t, eps and masks=(noisy_mask, clean_mask) may be given to fix the randomness (tests)."""
    def noisy_loss(x, y):  # x_t = sqrt(abar_t) x + sqrt(1 - abar_t) eps at t_model = t + 1
        t_ = torch.randint(0, len(abar), (len(x),), device=x.device) if t is None else t
        eps_ = torch.randn_like(x) if eps is None else eps
        x_t = q_sample(x, t_, eps_, abar)
        x0_pred, eps_pred, mask = model(x_t, t_ + 1, y, knobs.mask_ratio_noisy, masks[0])
        noisy, eps_loss, x0_loss = target_losses(x0_pred, eps_pred, x, eps_, mask, knobs.noisy_target)
        return noisy, {"noisy_eps_loss": eps_loss.detach(), "noisy_x0_loss": x0_loss.detach()}
    return branch_split_loss(model, x0, y, knobs, chunk, noisy_loss, masks[1])


def umd_flops_per_image(model, knobs):
    """Analytic training FLOPs per image of umd_loss: forward + backward (3x forward) of each
    branch, weighted by its share of the batch. For MFU and the UMD-vs-DiT cost ratio."""
    r = knobs.no_noise_prob
    noisy = model.forward_flops(knobs.mask_ratio_noisy) if r < 1 else 0
    clean = model.forward_flops(knobs.mask_ratio_clean) if r > 0 else 0
    return 3 * ((1 - r) * noisy + r * clean)


# ---- schemes ------------------------------------------------------------------------------
@dataclass
class Scheme:
    """A corruption scheme: what train.py, bench.py and sample.py need to know about it."""
    knobs: type                     # dataclass of the scheme's knobs
    presets: dict                   # preset name -> knobs; the first is the default
    loss: Callable                  # (model, x0, y, abar, knobs, chunk) -> (loss, {part: detached scalar})
    log_keys: tuple                 # the parts it may report, logged as averages
    flops_per_image: Optional[Callable] = None            # (model, knobs) -> training FLOPs (MFU)
    finetune_preset: Callable = lambda knobs: None        # pre-training knobs -> fine-tuning preset
    every_param_used: Callable = lambda knobs: False      # True: DDP need not look for unused ones
    # images noised as at DDPM step t -> (x, t_model): the probe of dit/maskdit
    noise_at: Callable = lambda x0, t, eps, abar: (q_sample(x0, t, eps, abar), t + 1)
    samplers: tuple = ("ddim",)                           # sample.py's samplers that fit, the default first

    def make_knobs(self, preset, **overrides):
        """Knobs of a preset, with any knob overridden (e.g. the paper's ablations:
        make_knobs('umd', noisy_target='x0'), make_knobs('umd', mask_ratio_noisy=0.0))."""
        if preset not in self.presets:
            raise ValueError(f"unknown preset {preset!r}, expected one of {list(self.presets)}")
        unknown = set(overrides) - {f.name for f in fields(self.knobs)}
        if unknown:
            raise ValueError(f"unknown corruption knob(s) {sorted(unknown)} for this scheme; it has "
                             f"{[f.name for f in fields(self.knobs)]}")
        return self.knobs(**{**asdict(self.presets[preset]), **overrides})


SCHEMES = {  # name -> Scheme; train.py's --loss picks one. Add a new corruption scheme here.
    "umd": Scheme(Knobs, PRESETS, umd_loss, ("clean_share", "clean_loss", "noisy_eps_loss", "noisy_x0_loss"),
                  umd_flops_per_image, umd_finetune_preset,
                  # the mask token sits out of micro-batches with neither masked noisy nor clean images
                  every_param_used=lambda k: k.mask_ratio_noisy > 0 or k.no_noise_prob == 1),
}


def preset(name, **overrides):
    """Knobs of one of UMD's presets (a shorthand for SCHEMES['umd'].make_knobs)."""
    return SCHEMES["umd"].make_knobs(name, **overrides)


# ---- a fork: flow matching (SiT, arXiv 2401.08740, and USP) in UMD's layout --------------------------
@dataclass
class FlowKnobs(Knobs):
    """UMD's knobs (branches, masks, noisy_target of the split) plus the flow-specific ones."""
    time_dist: str = "uniform"  # s ~ U(0, 1), or "logit_normal": s = sigmoid(N(0, 1)) (SD3)
    flow_target: str = "split"  # UMD's split (eps on visible pixels, x0 on masked), or SiT's "velocity"

    def __post_init__(self):
        super().__post_init__()
        if self.time_dist not in ("uniform", "logit_normal") or self.flow_target not in ("split", "velocity"):
            raise ValueError(f"time_dist must be 'uniform' or 'logit_normal' and flow_target 'split' or "
                             f"'velocity', got {self.time_dist!r}, {self.flow_target!r}")
        if self.flow_target == "velocity" and self.noisy_target != "both":
            raise ValueError("noisy_target picks the heads of the split target: keep it 'both' with "
                             "flow_target='velocity'")


FLOW_PRESETS = {  # the first is UMD's ratios; the fine-tuning recipes as UMD's
    "flow": FlowKnobs(no_noise_prob=0.5, mask_ratio_clean=0.75, mask_ratio_noisy=0.375),
    "flow_dit": FlowKnobs(no_noise_prob=0.0, mask_ratio_noisy=0.0),
    "flow_maskdit": FlowKnobs(no_noise_prob=0.0, mask_ratio_noisy=0.5),
    "flow_finetune": FlowKnobs(no_noise_prob=0.05, mask_ratio_clean=0.75, mask_ratio_noisy=0.0),
    "flow_dit_finetune": FlowKnobs(no_noise_prob=0.0, mask_ratio_noisy=0.0),
}


def flow_t_model(s):
    """t_model of a sample at s: the float s * T with s clamped to [1/T, 1], so in [1, T] as DDPM's
    t + 1. 0 stays the clean image (clean branch, probe, fine-tuning unchanged), the sinusoidal
    embedding takes float t, and nothing else reads t_model (only DDIM indexes abar with it)."""
    return s.clamp(1 / T, 1) * T


def flow_loss(model, x0, y, abar, knobs, chunk=(0, 1), s=None, eps=None, masks=(None, None)):
    """umd_loss with x_s = (1 - s) x0 + s eps (s = 1: noise) for q_sample; abar is unused. The heads
    predict x0 and eps, the velocity is v = dx_s/ds = eps - x0. flow_target "split": UMD's noisy loss;
    "velocity": SiT's MSE of eps_pred - x0_pred against v on all pixels, and under a mask on the visible
    ones, plus x0 on the masked ones 50/50 (eps, hence v, is unknowable there). s, eps, masks: tests."""
    def noisy_loss(x, y):
        uniform = knobs.time_dist == "uniform"
        s_ = s if s is not None else torch.rand(len(x), device=x.device) if uniform else \
            torch.randn(len(x), device=x.device).sigmoid()
        s_ = s_.clamp(1 / T, 1)  # t_model 0 is the clean image (flow_t_model)
        eps_ = torch.randn_like(x) if eps is None else eps
        sv = s_.to(x.dtype).view(-1, 1, 1, 1)
        x_s = (1 - sv) * x + sv * eps_
        x0_pred, eps_pred, mask = model(x_s, flow_t_model(s_), y, knobs.mask_ratio_noisy, masks[0])
        noisy, eps_loss, x0_loss = target_losses(x0_pred, eps_pred, x, eps_, mask, knobs.noisy_target)
        pix = pixel_mask(mask, x.shape[-1])
        visible = torch.ones_like(x[:, :1]) if pix is None else 1 - pix
        v_loss = masked_mse(eps_pred - x0_pred, eps_ - x, visible)
        if knobs.flow_target == "velocity":
            noisy = v_loss if pix is None else (v_loss + x0_loss) / 2
        return noisy, {"noisy_eps_loss": eps_loss.detach(), "noisy_x0_loss": x0_loss.detach(),
                       "noisy_v_loss": v_loss.detach()}
    return branch_split_loss(model, x0, y, knobs, chunk, noisy_loss, masks[1])


def flow_noise_at(x0, t, eps, abar):
    """The probe's "noised at DDPM step t" on the flow path: s = (t + 1) / T."""
    s = (t + 1).to(x0.dtype) / T
    return (1 - s.view(-1, 1, 1, 1)) * x0 + s.view(-1, 1, 1, 1) * eps, flow_t_model(s)


# python train.py --loss=flow [--preset=flow_dit]
SCHEMES["flow"] = Scheme(FlowKnobs, FLOW_PRESETS, flow_loss,
                         ("clean_share", "clean_loss", "noisy_eps_loss", "noisy_x0_loss", "noisy_v_loss"),
                         umd_flops_per_image,
                         lambda k: "flow_finetune" if k.no_noise_prob > 0 else "flow_dit_finetune",
                         SCHEMES["umd"].every_param_used, flow_noise_at, samplers=("heun", "euler", "sde"))
