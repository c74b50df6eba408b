"""
The UMD network: a ViT encoder-decoder (MAE layout) with DiT's AdaLN-Zero conditioning.

    image -> patch tokens + pos_enc -> random masking (keep int(L*(1-r)))
          -> [4 CLS | kept tokens] -> encoder blocks -> LayerNorm -> rep = mean of the 4 CLS
          -> [rep | kept tokens + mask tokens, original order, + pos_dec] -> decoder blocks
          -> LayerNorm -> final modulation -> per-token linear -> unpatchify
          -> (N, 2C, H, W): first C channels predict x0, last C predict eps

Conditioning: `t_model` is an integer in [0, T]; 0 means "clean image", a sample noised at
schedule index t gets t_model = t + 1. Labels are optional (fine-tuning adds them).
The layout and initialisation follow the paper (Sec. 4 and its appendix) and the authors' code;
where those are silent the choice is DiT's or MAE's and is said in a comment.
"""
import math
import functools
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

# name -> (width, encoder depth, decoder depth, heads). S/B/L are the paper's; the small
# ones are for CPU work (tiny is what the quick start trains, micro is for tests).
VARIANTS = {
    "micro": (64, 2, 1, 2),
    "tiny": (192, 6, 2, 3),
    "S": (384, 12, 4, 6),
    "B": (768, 12, 4, 12),
    "L": (1024, 24, 8, 16),
}


@dataclass
class ModelConfig:
    image_size: int = 64
    channels: int = 3
    patch_size: int = 4
    width: int = 768
    depth: int = 12
    dec_depth: int = 4
    heads: int = 12
    mlp_ratio: float = 4.0
    adaln: bool = True           # False: the MAE baseline, cond is an extra token in every block
    num_classes: int = 0         # 0: no label table (pre-training); fine-tuning adds one
    label_dropout: float = 0.1   # share of labels replaced by the null label in training (CFG)
    num_cls_tokens: int = 4

    @classmethod
    def from_name(cls, name, **overrides):
        """'B/4' -> variant B, patch 4. Any other field can be overridden."""
        variant, _, patch = name.partition("/")
        if variant not in VARIANTS or not patch.isdigit():
            raise ValueError(f"model name {name!r} should be <variant>/<patch> with variant in "
                             f"{sorted(VARIANTS)}, e.g. 'B/4'")
        width, depth, dec_depth, heads = VARIANTS[variant]
        fields = dict(width=width, depth=depth, dec_depth=dec_depth, heads=heads, patch_size=int(patch))
        return cls(**{**fields, **overrides})


def modulate(x, shift, scale):
    return x * (1 + scale) + shift


def timestep_embedding(t, dim):
    """Sinusoidal embedding, [sin | cos], freq_i = exp(-i ln(10000) / (half - 1)) (the reference code:
    half - 1, not half)."""
    half = dim // 2
    i = torch.arange(half, dtype=torch.float32, device=t.device)
    freqs = torch.exp(-math.log(10000) * i / (half - 1))
    args = t.float()[:, None] * freqs[None]
    return torch.cat([torch.sin(args), torch.cos(args)], dim=-1)


def random_masking(x, mask_ratio, mask=None):
    """MAE masking by argsort of noise. x: (N, L, D) -> kept tokens (N, keep, D),
    mask (N, L) with 1 = removed, ids_restore (N, L) that undoes the shuffle.
    A given boolean `mask` (same count per row) replaces the random draw."""
    N, L, D = x.shape
    if mask is None:
        keep = int(L * (1 - mask_ratio))
        noise = torch.rand(N, L, device=x.device)
    else:
        mask = mask.to(device=x.device, dtype=torch.bool)
        keep = L - int(mask[0].sum())
        if mask.shape != (N, L) or (mask.sum(1) != L - keep).any():
            raise ValueError(f"a given mask must be (N, L) = ({N}, {L}) with the same number of "
                             f"masked tokens in every row, got {tuple(mask.shape)}")
        noise = mask.float()  # stable sort below: kept tokens first, in their original order
    ids_shuffle = torch.argsort(noise, dim=1, stable=True)
    ids_restore = torch.argsort(ids_shuffle, dim=1)
    ids_keep = ids_shuffle[:, :keep]
    x_kept = torch.gather(x, 1, ids_keep[:, :, None].expand(-1, -1, D))
    out_mask = torch.ones(N, L, device=x.device)
    out_mask[:, :keep] = 0
    out_mask = torch.gather(out_mask, 1, ids_restore)
    return x_kept, out_mask, ids_restore


class Attention(nn.Module):
    def __init__(self, width, heads):
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(width, 3 * width)
        self.proj = nn.Linear(width, width)

    def forward(self, x):
        N, L, D = x.shape
        q, k, v = self.qkv(x).view(N, L, 3, self.heads, D // self.heads).permute(2, 0, 3, 1, 4)
        if x.device.type == "cpu" and q.dtype == torch.bfloat16:  # CPU attention's bf16 backward is ~3x
            with torch.autocast("cpu", enabled=False):             # slower than fp32's: attention in fp32,
                x = F.scaled_dot_product_attention(q.float(), k.float(), v.float())  # the matmuls in bf16
        else:
            x = F.scaled_dot_product_attention(q, k, v)  # scale 1/sqrt(head_dim) by default
        return self.proj(x.transpose(1, 2).reshape(N, L, D))


class MLP(nn.Module):
    def __init__(self, width, hidden):
        super().__init__()
        self.fc1 = nn.Linear(width, hidden)
        self.fc2 = nn.Linear(hidden, width)

    def forward(self, x):
        return self.fc2(F.gelu(self.fc1(x), approximate="tanh"))


class Block(nn.Module):
    """Pre-LN transformer block. With AdaLN-Zero, cond sets shift/scale/gate of both branches;
    without it, cond is prepended as one extra token and removed again at the output."""

    def __init__(self, width, heads, mlp_ratio, adaln):
        super().__init__()
        self.norm1 = nn.LayerNorm(width, eps=1e-6)
        self.attn = Attention(width, heads)
        self.norm2 = nn.LayerNorm(width, eps=1e-6)
        self.mlp = MLP(width, int(width * mlp_ratio))
        self.adaLN_modulation = nn.Linear(width, 6 * width) if adaln else None

    def forward(self, x, cond):
        if self.adaLN_modulation is None:
            x = torch.cat([cond[:, None], x], dim=1)
            x = x + self.attn(self.norm1(x))
            x = x + self.mlp(self.norm2(x))
            return x[:, 1:]
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = \
            self.adaLN_modulation(cond)[:, None].chunk(6, dim=-1)
        x = x + gate_msa * self.attn(modulate(self.norm1(x), shift_msa, scale_msa))
        x = x + gate_mlp * self.mlp(modulate(self.norm2(x), shift_mlp, scale_mlp))
        return x


class EmbedMLP(nn.Module):
    """Linear(D, 2D) -> SiLU -> Linear(2D, D), used for the time and the label embeddings."""

    def __init__(self, width):
        super().__init__()
        self.fc1 = nn.Linear(width, 2 * width)
        self.fc2 = nn.Linear(2 * width, width)

    def forward(self, x):
        return self.fc2(F.silu(self.fc1(x)))


class LabelEmbedder(nn.Module):
    """Table of num_classes + 1 rows; the last row is the null label used for CFG."""

    def __init__(self, num_classes, width):
        super().__init__()
        self.table = nn.Embedding(num_classes + 1, width)
        self.mlp = EmbedMLP(width)
        nn.init.normal_(self.table.weight, std=width ** -0.5)
        for fc in (self.mlp.fc1, self.mlp.fc2):  # DiT's init for embedding MLPs (the paper is silent)
            nn.init.normal_(fc.weight, std=0.02)
            nn.init.zeros_(fc.bias)

    def forward(self, y):
        return self.mlp(self.table(y))


class UMD(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        c = self.config = config
        if c.image_size % c.patch_size:
            raise ValueError(f"image_size {c.image_size} is not divisible by patch_size {c.patch_size}")
        if c.width % c.heads or (c.width // c.heads) % 2:
            raise ValueError(f"width {c.width} must split into {c.heads} heads of even size")
        D, L = c.width, self.num_tokens
        self.patch_embed = nn.Conv2d(c.channels, D, kernel_size=c.patch_size, stride=c.patch_size)
        self.time_mlp = EmbedMLP(D)
        self.label_embed = LabelEmbedder(c.num_classes, D) if c.num_classes else None
        self.pos_enc = nn.Parameter(torch.randn(1, L, D) * L ** -0.5)
        self.pos_dec = nn.Parameter(torch.randn(1, L, D) * L ** -0.5)
        self.cls_tokens = nn.Parameter(torch.zeros(1, c.num_cls_tokens, D))
        self.mask_token = nn.Parameter(torch.randn(1, 1, D) * 0.02)
        self.encoder = nn.ModuleList(Block(D, c.heads, c.mlp_ratio, c.adaln) for _ in range(c.depth))
        self.enc_norm = nn.LayerNorm(D, eps=1e-6)
        self.decoder = nn.ModuleList(Block(D, c.heads, c.mlp_ratio, c.adaln) for _ in range(c.dec_depth))
        self.dec_norm = nn.LayerNorm(D, eps=1e-6)
        self.final_modulation = nn.Linear(D, 2 * D) if c.adaln else None
        self.head = nn.Linear(D, c.patch_size ** 2 * 2 * c.channels)
        self._init_weights()

    def _init_weights(self):
        D = self.config.width
        for block in [*self.encoder, *self.decoder]:
            for w in block.attn.qkv.weight.chunk(3, dim=0):  # q, k, v each xavier as (D, D)
                nn.init.xavier_uniform_(w)
            nn.init.zeros_(block.attn.qkv.bias)
            nn.init.xavier_uniform_(block.attn.proj.weight)
            nn.init.zeros_(block.attn.proj.bias)
            for fc in (block.mlp.fc1, block.mlp.fc2):
                nn.init.xavier_uniform_(fc.weight)
                nn.init.normal_(fc.bias, std=1e-6)
            if block.adaLN_modulation is not None:
                nn.init.zeros_(block.adaLN_modulation.weight)
                nn.init.zeros_(block.adaLN_modulation.bias)
        # Patch embedding like a Linear (MAE/DiT); time MLP normal(0.02) as in DiT: the paper is silent.
        nn.init.xavier_uniform_(self.patch_embed.weight.view(D, -1))
        nn.init.zeros_(self.patch_embed.bias)
        for fc in (self.time_mlp.fc1, self.time_mlp.fc2):
            nn.init.normal_(fc.weight, std=0.02)
            nn.init.zeros_(fc.bias)
        if self.final_modulation is not None:
            nn.init.zeros_(self.final_modulation.weight)
            nn.init.zeros_(self.final_modulation.bias)
        nn.init.normal_(self.head.weight, std=0.02)
        nn.init.zeros_(self.head.bias)

    @property
    def num_tokens(self):
        return (self.config.image_size // self.config.patch_size) ** 2

    def num_params(self):
        return sum(p.numel() for p in self.parameters())

    def forward_flops(self, mask_ratio=0.0):
        """Matmul FLOPs (2 per multiply-add) of one forward of one image. Masked tokens skip
        the encoder, which is where UMD's cost advantage over DiT comes from."""
        c, L = self.config, self.num_tokens
        D, hidden, out = c.width, int(c.width * c.mlp_ratio), c.patch_size ** 2 * 2 * c.channels
        kept = int(L * (1 - mask_ratio))
        extra = 0 if c.adaln else 1  # the cond token of the no-AdaLN variant

        def block(n):  # qkv + out projection, MLP, QK^T and AV, AdaLN modulation
            n += extra
            return 2 * n * D * (4 * D + 2 * hidden) + 4 * n * n * D + (12 * D * D if c.adaln else 0)
        embed = 2 * L * D * c.patch_size ** 2 * c.channels + 8 * D * D  # patches, time MLP
        if self.label_embed is not None:
            embed += 8 * D * D
        head = 2 * L * D * out + (4 * D * D if c.adaln else 0)
        return embed + c.depth * block(kept + c.num_cls_tokens) + c.dec_depth * block(L + 1) + head

    def add_label_embedding(self, num_classes):
        """Fresh label table + MLP on a model pre-trained without labels (fine-tuning)."""
        if num_classes < 1:
            raise ValueError(f"num_classes must be >= 1, got {num_classes}")
        device = self.pos_enc.device
        self.config.num_classes = num_classes
        self.label_embed = LabelEmbedder(num_classes, self.config.width).to(device)

    # ---- inputs -------------------------------------------------------------------------
    def _check(self, x, t_model, y, mask_ratio):
        c = self.config
        if x.ndim != 4 or tuple(x.shape[1:]) != (c.channels, c.image_size, c.image_size):
            raise ValueError(f"expected images of shape (N, {c.channels}, {c.image_size}, {c.image_size}), "
                             f"got {tuple(x.shape)}")
        if t_model.shape != (x.shape[0],):
            raise ValueError(f"t_model must have shape ({x.shape[0]},), got {tuple(t_model.shape)}")
        if not 0 <= mask_ratio < 1:
            raise ValueError(f"mask_ratio must be in [0, 1), got {mask_ratio}")
        if int(self.num_tokens * (1 - mask_ratio)) < 1:
            raise ValueError(f"mask_ratio {mask_ratio} keeps no token of {self.num_tokens}")
        if y is not None:
            if self.label_embed is None:
                raise ValueError("labels given to a model without a label table "
                                 "(pre-trained without labels: fine-tune it with labels first)")
            if y.shape != (x.shape[0],):
                raise ValueError(f"labels must have shape ({x.shape[0]},), got {tuple(y.shape)}")
            # Value checks need a host sync; on CUDA an out-of-range index asserts in the kernel.
            if y.device.type == "cpu" and ((y < 0) | (y > c.num_classes)).any():
                raise ValueError(f"labels must be in [0, {c.num_classes}] ({c.num_classes} = null), "
                                 f"got min {int(y.min())} max {int(y.max())}")

    def null_labels(self, n, device):
        return torch.full((n,), self.config.num_classes, dtype=torch.long, device=device)

    def condition(self, t_model, y):
        """cond vector from time and label. y None -> null label (or no label term at all)."""
        cond = self.time_mlp(timestep_embedding(t_model, self.config.width))
        if self.label_embed is not None:
            if y is None:
                y = self.null_labels(t_model.shape[0], t_model.device)
            elif self.training and self.config.label_dropout > 0:
                drop = torch.rand(y.shape, device=y.device) < self.config.label_dropout
                y = torch.where(drop, self.null_labels(y.shape[0], y.device), y)
            cond = cond + self.label_embed(y)
        return F.silu(cond) if self.config.adaln else cond

    # ---- network ------------------------------------------------------------------------
    def encode(self, x, cond, mask_ratio=0.0, mask=None):
        tokens = self.patch_embed(x).flatten(2).transpose(1, 2) + self.pos_enc
        if mask_ratio > 0 or mask is not None:
            tokens, mask, ids_restore = random_masking(tokens, mask_ratio, mask)
        else:
            mask = ids_restore = None
        tokens = torch.cat([self.cls_tokens.expand(tokens.shape[0], -1, -1), tokens], dim=1)
        for block in self.encoder:
            tokens = block(tokens, cond)
        tokens = self.enc_norm(tokens)
        n_cls = self.config.num_cls_tokens
        return tokens[:, n_cls:], tokens[:, :n_cls].mean(dim=1), mask, ids_restore

    def decode(self, tokens, rep, cond, ids_restore):
        N, L, D = tokens.shape[0], self.num_tokens, self.config.width
        if ids_restore is not None:
            fill = self.mask_token.expand(N, L - tokens.shape[1], -1)
            tokens = torch.cat([tokens, fill], dim=1)
            tokens = torch.gather(tokens, 1, ids_restore[:, :, None].expand(-1, -1, D))
        tokens = torch.cat([rep[:, None], tokens + self.pos_dec], dim=1)
        for block in self.decoder:
            tokens = block(tokens, cond)
        tokens = self.dec_norm(tokens[:, 1:])
        if self.final_modulation is not None:
            shift, scale = self.final_modulation(cond)[:, None].chunk(2, dim=-1)
            tokens = modulate(tokens, shift, scale)
        return self.unpatchify(self.head(tokens))

    def unpatchify(self, x):
        """(N, L, p*p*2C) -> (N, 2C, H, W); each token's outputs are laid out (p, p, 2C)."""
        p, h = self.config.patch_size, self.config.image_size // self.config.patch_size
        x = x.reshape(x.shape[0], h, h, p, p, -1)
        return torch.einsum("nhwpqc->nchpwq", x).reshape(x.shape[0], -1, h * p, h * p)

    def forward(self, x, t_model, y=None, mask_ratio=0.0, mask=None):
        """Training forward. Returns (x0_pred, eps_pred, mask); mask is (N, L) with 1 = token
        removed, or None when nothing was masked. `mask` may be given (fixed-mask evals)."""
        self._check(x, t_model, y, mask_ratio)
        cond = self.condition(t_model, y)
        tokens, rep, mask, ids_restore = self.encode(x, cond, mask_ratio, mask)
        out = self.decode(tokens, rep, cond, ids_restore)
        x0_pred, eps_pred = out.chunk(2, dim=1)
        return x0_pred, eps_pred, mask

    def representation(self, x, t_model=None, y=None):
        """`rep` of (clean, unmasked) images: the probe's feature. t_model defaults to 0."""
        if t_model is None:
            t_model = torch.zeros(x.shape[0], dtype=torch.long, device=x.device)
        self._check(x, t_model, y, 0.0)
        return self.encode(x, self.condition(t_model, y))[1]

    def forward_with_cfg(self, x, t_model, y, cfg_scale):
        """Classifier-free guidance: conditional and unconditional in one batched forward,
        out = uncond + s * (cond - uncond) on all 2C channels. Returns (x0_pred, eps_pred)."""
        if self.label_embed is None:
            raise ValueError("classifier-free guidance needs a model with labels; this one has none")
        n = x.shape[0]
        both = torch.cat([y, self.null_labels(n, y.device)])
        x0, eps, _ = self(torch.cat([x, x]), torch.cat([t_model, t_model]), both)
        out = torch.cat([x0, eps], dim=1)
        out = out[n:] + cfg_scale * (out[:n] - out[n:])
        return out.chunk(2, dim=1)


# ---- helpers -------------------------------------------------------------------------------
def in_eval_mode(fn):
    """Run fn(model, ...) in eval mode (no label dropout), then give the model its mode back."""
    @functools.wraps(fn)
    def wrapper(model, *args, **kwargs):
        was_training = model.training
        model.eval()
        try:
            return fn(model, *args, **kwargs)
        finally:
            model.train(was_training)
    return wrapper


def from_uint8(images):
    """uint8 images (N, H, W, C), numpy or torch -> float tensor (N, C, H, W) in [-1, 1]."""
    if isinstance(images, np.ndarray) or not torch.is_tensor(images):
        images = torch.from_numpy(np.array(images))  # a copy: memmaps are read-only
    return images.permute(0, 3, 1, 2).float() / 127.5 - 1
