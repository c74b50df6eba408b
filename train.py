"""
Train UMD (or the MAE / DiT / MaskDiT baselines) on a prepared dataset, nanoGPT style: the
Config below holds the defaults; config files and --key=value flags override them.

    python train.py config/fmnist_umd.py                      # one device (the CPU quick start)
    python train.py config/umd_in64.py --batch_size=512 --compile=True
    torchrun --standalone --nproc_per_node 8 train.py config/umd_in64.py
    torchrun --nnodes 4 --nproc_per_node 8 --rdzv_backend c10d --rdzv_endpoint HOST:29500 \\
        train.py config/umd_in64.py
    python train.py config/finetune_in64.py --init_from=out/umd_in64/ckpt.pt

Arguments are applied in order: `config/x.py` files (plain Python assigning keys below) and
`--key=value` (value parsed as a Python literal, else taken as a string; `--flag` = True).
The corruption scheme's knobs (corrupt.py, e.g. --mask_ratio_noisy=0.0) are keys too.
An unknown key, a value whose type differs from the default's, or one out of range is an error.

Output in out_dir: ckpt.pt (one dict, see save_checkpoint; written atomically every
ckpt_interval steps, at the end, and on SIGTERM / SIGUSR1 / Ctrl-C at the next step boundary,
which then exits), log.jsonl (the log lines as json, plus events), samples_<step>.png. Running
the same command again resumes from ckpt.pt (resume="auto"). One run at a time per out_dir.

Reproducibility. Every micro-batch is a pure function of (seed, step, chunk): a step's global
batch is the next slice of the epoch's permutation (seeded by (seed, epoch); the last partial
batch of an epoch is dropped), cut into world_size x grad_accum chunks; rank r takes chunks
r*A .. r*A+A-1 (A = grad_accum), and the augmentation and the loss's randomness (t, eps, masks,
label dropout) are seeded from (seed, step, chunk). So a resumed run repeats the uninterrupted
one exactly (CPU, same thread count), and runs with equal world_size x grad_accum see the same
micro-batches with the same randomness: 2 ranks x 1 step equals 1 rank x 2 accumulation steps up
to the order of float sums. Changing world_size x grad_accum changes the noise draws, not the
data order nor the split of the global batch into clean and noisy images.
"""
import ast
import copy
import datetime
import difflib
import fcntl
import json
import math
import os
import random
import signal
import sys
import time
import types
import typing
from contextlib import nullcontext
from dataclasses import asdict, dataclass, field, fields, replace

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel as DDP

from corrupt import SCHEMES, T, make_schedule, masked_mse, pixel_mask
from data.common import atomic_write, check_geometry, load_meta, load_split
from data.vae import decode, posterior_mean, sample_posterior
from model import UMD, ModelConfig, from_uint8, in_eval_mode, load_checkpoint, load_resized, read_checkpoint

CUDA = torch.cuda.is_available()


@dataclass
class Config:
    """The defaults are the paper's pre-training setup (Table 4) where it has one."""
    out_dir: str = "out"
    data_dir: str = "data/fashion_mnist"
    init_from: str = ""           # pre-training checkpoint -> fine-tune it: its architecture, weights and
                                  # scheme, a fresh label table (labels=True), optimizer and schedule, EMA = weights
    resume: typing.Union[bool, str] = "auto"  # True: from out_dir/ckpt.pt; False: start afresh; "auto": if it exists
    allow_config_change: bool = False  # resume although keys that define the run (batch, data, seed, ...) changed
    model: str = "tiny/4"         # <variant>/<patch> (model.VARIANTS); with init_from the checkpoint's is used
    image_size: typing.Optional[int] = None  # None: the data's (meta.json); if set it must match the data
    channels: typing.Optional[int] = None
    loss: str = "auto"            # corruption scheme (corrupt.SCHEMES); auto: "umd", or init_from's
    preset: str = "auto"          # the scheme's preset (umd, mae, dit, maskdit, ...); auto: the first one, or
                                  # with init_from the fine-tuning recipe of what the checkpoint was trained with
    knobs: dict = field(default_factory=dict)  # knob overrides, set as --<knob>=value (e.g. --mask_ratio_noisy=0.0)
    schedule: str = "auto"        # "auto": "cosine" for pixels, "linear" for latents (latents refuse "cosine")
    latent: bool = False          # train on VAE latents: a latent dataset (data/latent/prepare.py; data/vae.py);
                                  # per step a fresh posterior sample, the stored flip copy, no random-resized crop
    vae: str = ""                 # latent: the VAE of the data ("": its meta.json's), recorded for sample.py
    latent_scale: float = 0.0     # latent: the model sees latent_scale * z (0: the data's, 0.18215 for SD's VAE)
    labels: bool = False          # train with class labels (a label table of the data's classes, CFG dropout)
    label_dropout: float = 0.1    # share of labels replaced by the null label
    batch_size: int = 1024        # global: over all ranks and accumulation steps
    grad_accum: int = 1           # micro-steps per optimizer step; micro-batch = batch_size // (world * grad_accum)
    epochs: float = 800.0         # run length in epochs of N // batch_size steps...
    max_steps: int = 0            # ...unless max_steps > 0, which wins
    base_lr: float = 1.5e-4       # peak lr = base_lr * batch_size / 256...
    lr: float = 0.0               # ...unless lr > 0: then the peak lr as is (fine-tuning: 1.5e-4, not scaled)
    warmup_frac: float = 0.05     # linear warmup over this share of the steps...
    warmup_epochs: float = 0.0    # ...unless warmup_epochs > 0, which wins; then cosine to 0
    weight_decay: float = 0.05    # not on CLS tokens, mask token, biases and LayerNorm weights (1-D)
    beta1: float = 0.9
    beta2: float = 0.95
    grad_clip: float = 1.0        # max global grad norm; 0: no clipping
    ema_decay: float = 0.0        # 0: no EMA; fine-tuning 0.9999 (the EMA, kept in fp32, is what evals sample)
    crop_area_min: float = 0.8    # random resized crop area in [crop_area_min, 1], aspect in [3/4, 4/3]
    hflip: bool = True
    device: str = "cuda" if CUDA else "cpu"
    dtype: str = "bf16" if CUDA else "fp32"  # autocast dtype: "bf16" or "fp32"
    compile: bool = False         # torch.compile the model
    seed: int = 0
    log_interval: int = 100       # steps between log lines (stdout and out_dir/log.jsonl)
    ckpt_interval: int = 5000     # steps between checkpoints (0: only at the end); always one at the end
    eval_interval: int = 0        # steps between evals (few-shot probe + sample grid), also at the end; 0: none
    eval_shots: int = 10          # shots per class of the few-shot probe; 0: no probe
    eval_max_test: int = 0        # probe test images (a fixed random subset); 0: the whole test split
    eval_samples: int = 64        # images in the sample grid; 0: no grid
    eval_steps: int = 125         # sampler steps of the eval samples (DDIM for umd, Heun for flow)
    eval_cfg_scale: float = 1.0   # guidance of the eval samples (models with labels)
    eval_val_images: int = 256    # validation losses on this many fixed val images, fixed noise and masks; 0: none
    eval_fid_samples: int = 0     # FID / IS / precision-recall of this many samples per guidance scale; 0: none
    eval_fid_cfg_scales: tuple = (1.0, 2.0, 4.0)  # their guidance scales (models with labels; else unguided)
    eval_fid_steps: int = 125     # their sampler steps
    eval_fid_ref: str = ""        # reference stats npz (fid.py stats --features); "": the val split's, cached
    eval_fid_weights: str = ""    # Inception weights file; "": fid.py's search (see fid.py)
    max_nonfinite: int = 5        # this many non-finite steps in a row stop the run
    step_timeout_minutes: float = 10.0  # a training-step collective waiting longer ends the run, naming the
                                  # stuck rank (start-up and evals, which rank 0 runs alone, get 30 minutes)
    _test_nan_steps: tuple = ()   # for the tests: steps (numbered as in the log, from 1) whose loss is made NaN
    _test_stop_step: int = 0      # for the tests: act as if preempted after this step
    _test_stall_step: int = 0     # for the tests: rank 1 hangs before this step


# Keys one may change when resuming a run; any other change makes it another run.
FREE_ON_RESUME = {"out_dir", "resume", "allow_config_change", "device", "dtype", "compile", "grad_accum",
                  "log_interval", "ckpt_interval", "max_nonfinite", "step_timeout_minutes", "_test_nan_steps",
                  "_test_stop_step", "_test_stall_step", "vae"} | \
                 {f.name for f in fields(Config) if f.name.startswith("eval_")}
RANGES = [  # (keys, test, what each must be); every number gets one
    ("batch_size grad_accum log_interval max_nonfinite", lambda v: v >= 1, ">= 1"),
    ("image_size channels", lambda v: v is None or v >= 1, ">= 1"),
    ("epochs base_lr step_timeout_minutes", lambda v: v > 0, "> 0"),
    ("max_steps lr warmup_epochs weight_decay grad_clip seed latent_scale ckpt_interval eval_interval eval_shots "
     "eval_max_test eval_samples eval_cfg_scale eval_val_images _test_stop_step _test_stall_step",
     lambda v: v >= 0, ">= 0"),
    ("warmup_frac ema_decay", lambda v: 0 <= v <= 1, "in [0, 1]"),
    ("beta1 beta2 label_dropout", lambda v: 0 <= v < 1, "in [0, 1)"),
    ("crop_area_min", lambda v: 0 < v <= 1, "in (0, 1]"),
    ("eval_steps eval_fid_steps", lambda v: 1 <= v <= T, f"in [1, {T}]"),
    ("eval_fid_samples", lambda v: v == 0 or v >= 2, "0 or >= 2"),
    ("eval_fid_cfg_scales", lambda v: len(v) > 0 and all(isinstance(x, (int, float)) and x >= 0 for x in v),
     "a non-empty tuple of numbers >= 0"),
]
CHOICES = {"dtype": ("bf16", "fp32"), "schedule": ("auto", "cosine", "linear")}
PEAK_FLOPS = {"A100": 312e12, "H100": 989e12, "H200": 989e12}  # dense bf16 per GPU (TF32: half)


# ---- configuration ------------------------------------------------------------------------------
def key_types(cls):
    """field name -> tuple of accepted types, from a dataclass's annotations."""
    union = lambda h: typing.get_origin(h) is typing.Union
    return {n: typing.get_args(h) if union(h) else (h,) for n, h in typing.get_type_hints(cls).items()}


def parse_config(argv, cls=Config):
    """An instance of the dataclass `cls` updated by config files and --key=value flags, in order.
    Also used by bench.py with its own dataclass."""
    cfg, types_ = cls(), key_types(cls)
    knobs = {k: v for s in SCHEMES.values() for k, v in key_types(s.knobs).items()} if "knobs" in types_ else {}

    def put(key, value, where):
        want = types_.get(key) or knobs.get(key)
        if want is None or key == "knobs":
            close = difflib.get_close_matches(key, [*types_, *knobs], 1)
            raise ValueError(f"unknown config key {key!r} in {where}" + (f" (did you mean {close[0]!r}?)" if close else ""))
        if float in want and type(value) is int or tuple in want and type(value) is list:
            value = float(value) if float in want else tuple(value)  # 1 -> 1.0, [1, 2] -> (1, 2)
        ok = isinstance(value, want) and (bool in want or not isinstance(value, bool))  # a bool is an int
        if key == "resume":
            ok = isinstance(value, bool) or value == "auto"
        if not ok:
            need = "True, False or 'auto'" if key == "resume" else " or ".join(t.__name__ for t in want)
            raise ValueError(f"config key {key!r} must be {need}, got {value!r} ({type(value).__name__}) in {where}")
        if key in types_:
            setattr(cfg, key, value)
        else:
            cfg.knobs = {**cfg.knobs, key: value}

    for arg in argv:
        if arg.startswith("--"):
            key, eq, text = arg[2:].partition("=")
            if not eq and bool not in (types_.get(key) or knobs.get(key) or (bool,)):
                raise ValueError(f"{arg}: expected --{key}=value")
            try:
                value = ast.literal_eval(text) if eq else True
            except (ValueError, SyntaxError):
                value = text  # a bare string: --out_dir=out/x, --model=B/4
            put(key, value, arg)
        else:
            if not os.path.isfile(arg):
                raise FileNotFoundError(f"config file {arg} not found")
            ns = {}
            with open(arg) as f:
                exec(compile(f.read(), arg, "exec"), ns)
            for key, value in ns.items():
                if not key.startswith("_") and not isinstance(value, types.ModuleType):
                    put(key, value, arg)
    return cfg


def check_values(cfg, ranges, choices):
    """Values that have the right type but make no sense: ranges [(keys, test, what)], choices {key: allowed}.
    Also used by bench.py with its own tables."""
    for keys, ok, what in ranges:
        for key in keys.split():
            value = getattr(cfg, key)
            if not ok(value) or isinstance(value, float) and not math.isfinite(value):
                raise ValueError(f"config key {key!r} must be {what}, got {value!r}")
    for key, allowed in choices.items():
        if getattr(cfg, key) not in allowed:
            raise ValueError(f"config key {key!r} must be one of {list(allowed)}, got {getattr(cfg, key)!r}")


def check_config(cfg):
    """train.py's values that make no sense, before any work."""
    check_values(cfg, RANGES, {**CHOICES, "loss": ("auto", *SCHEMES)})
    if cfg.latent and cfg.schedule == "cosine":
        raise ValueError("latent=True trains with the linear schedule (the paper's for latents), but schedule="
                         "'cosine' was set: drop it (auto) or set schedule='linear'")


def check_latent(cfg, meta):
    """latent=True needs a latent dataset and latent=False a pixel one. Resolves schedule "auto" (cosine for
    pixels, linear for latents), and for latents vae and latent_scale from the data's meta.json."""
    lat = meta.get("latent")
    if cfg.latent and not lat:
        raise ValueError(f"latent=True but {cfg.data_dir} is a pixel dataset; encode it first: python "
                         f"data/latent/prepare.py --src {cfg.data_dir} --vae PATH --out {cfg.data_dir}_latent")
    if lat and not cfg.latent:
        raise ValueError(f"{cfg.data_dir} holds VAE latents (made by {lat['vae']}): train on it with latent=True "
                         "(e.g. config/latent_umd_l2.py), or on a pixel dataset")
    if cfg.schedule == "auto":
        cfg.schedule = "linear" if cfg.latent else "cosine"
    if cfg.latent:
        cfg.vae, cfg.latent_scale = cfg.vae or lat["vae"], cfg.latent_scale or float(lat["scale"])


def help_text(cls=Config, doc=__doc__):
    """doc, then every key of the dataclass cls with its default (and, for train.py, the schemes' knobs)."""
    lines = [f"{f.name} = {getattr(cls(), f.name)!r}" for f in fields(cls) if not f.name.startswith("_")]
    for name, s in SCHEMES.items() if cls is Config else ():
        first = next(iter(s.presets.values()))
        lines.append(f"\ncorruption knobs of --loss={name} (default: its preset; presets: {', '.join(s.presets)}):")
        lines += [f"{f.name} = {getattr(first, f.name)!r}" for f in fields(s.knobs)]
    return doc + "\n".join(lines)


# ---- launch -------------------------------------------------------------------------------------
@dataclass
class Launch:
    rank: int = 0
    local_rank: int = 0
    world: int = 1
    device: str = "cpu"

    @property
    def master(self):
        return self.rank == 0


def setup_distributed(device, timeout_minutes=30):
    """Rank, world size and device from torchrun's env vars (RANK, LOCAL_RANK, WORLD_SIZE); joins
    the process group when there is more than one process; TF32 matmuls on CUDA. -> Launch."""
    world = int(os.environ.get("WORLD_SIZE", 1))
    rank, local_rank = int(os.environ.get("RANK", 0)), int(os.environ.get("LOCAL_RANK", 0))
    if str(device).startswith("cuda"):
        if not CUDA:
            raise ValueError(f"device {device!r} asked for but CUDA is not available; use device='cpu'")
        device = device if ":" in device else f"cuda:{local_rank}"
        torch.cuda.set_device(device)
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    if world > 1:
        dist.init_process_group("nccl" if device.startswith("cuda") else "gloo",
                                timeout=datetime.timedelta(minutes=timeout_minutes))
    return Launch(rank, local_rank, world, str(device))


def peak_flops(device, dtype):
    """Dense peak FLOP/s of one GPU for MFU (TF32 is half of bf16), or 0 when unknown / not CUDA."""
    if not str(device).startswith("cuda"):
        return 0
    name = torch.cuda.get_device_name(device)
    return next((v for k, v in PEAK_FLOPS.items() if k in name), 0) * (0.5 if dtype == "fp32" else 1)


def seed_of(*keys):
    """A well-mixed 63-bit seed from integers, e.g. (seed, step, chunk)."""
    return int(np.random.SeedSequence([int(k) for k in keys]).generate_state(1, np.uint64)[0] >> np.uint64(1))


def claim_out_dir(out_dir):
    """Make out_dir, check it is writable and lock it for this run (an OS lock: the dead never
    hold it). Returns the open lock file, to keep for the run's lifetime."""
    try:
        os.makedirs(out_dir, exist_ok=True)
        lock = open(os.path.join(out_dir, ".lock"), "a+")
    except OSError as e:
        raise ValueError(f"out_dir {out_dir} is not writable ({e.strerror}): checkpoints could not be saved") from None
    try:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        lock.seek(0)
        holder = lock.read().strip() or "unknown"
        raise ValueError(f"out_dir {out_dir} is in use by another training run (pid {holder}); wait for it to "
                         "end or choose another out_dir") from None
    lock.seek(0), lock.truncate(), lock.write(f"{os.getpid()}\n"), lock.flush()
    return lock


# ---- data ---------------------------------------------------------------------------------------
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
        x[order] = self.images[idx[order]]  # read in file order (faster), keep the random order: the loss
        x, y = torch.from_numpy(x), torch.from_numpy(self.targets[idx])  # splits batches by position
        if self.device.startswith("cuda"):
            x, y = x.pin_memory().to(self.device, non_blocking=True), y.pin_memory().to(self.device, non_blocking=True)
        self.gen.manual_seed(seed_of(self.cfg.seed, 1, s, chunk))
        x = (sample_posterior(x, self.cfg.latent_scale, self.cfg.hflip, self.gen) if self.cfg.latent
             else augment(x, self.cfg.crop_area_min, self.cfg.hflip, self.gen))
        return x, (y if self.cfg.labels else None)


# ---- model, optimizer, checkpoints --------------------------------------------------------------
def build_model(cfg, meta, log):
    """The model and its knobs: from scratch, or init_from a pre-training checkpoint (fine-tuning:
    its architecture, weights and scheme, a new label table, the fine-tuning recipe of what it was
    pre-trained with). Resolves cfg.loss and cfg.preset. -> (model, knobs, pretrain_knobs)."""
    num_classes = meta["num_classes"] if cfg.labels else 0
    torch.manual_seed(cfg.seed)
    init = read_checkpoint(cfg.init_from) if cfg.init_from else {}
    cfg.loss = init.get("scheme", "umd") if cfg.loss == "auto" else cfg.loss
    scheme = SCHEMES[cfg.loss]
    if not cfg.init_from:
        cfg.preset = next(iter(scheme.presets)) if cfg.preset == "auto" else cfg.preset
        knobs = scheme.make_knobs(cfg.preset, **cfg.knobs)
        arch = {f.name: getattr(knobs, f.name) for f in fields(ModelConfig) if hasattr(knobs, f.name)}  # e.g. adaln
        model = UMD(ModelConfig.from_name(cfg.model, image_size=meta["image_size"], channels=meta["channels"],
                                          num_classes=num_classes, **arch))
        model.config.label_dropout = cfg.label_dropout
        return model, knobs, knobs
    model, _ = load_checkpoint(cfg.init_from)
    mc = model.train().config
    if bool((init.get("train_config") or {}).get("latent")) != cfg.latent:
        raise ValueError(f"init_from {cfg.init_from} is a {'latent' if not cfg.latent else 'pixel'} model but this "
                         f"run has latent={cfg.latent}")
    if mc.channels != meta["channels"]:
        raise ValueError(f"init_from {cfg.init_from} is a model of {mc.image_size}x{mc.image_size}x{mc.channels} "
                         f"images but {cfg.data_dir} holds {meta['image_size']}x{meta['image_size']}x{meta['channels']}")
    if mc.image_size != meta["image_size"]:  # transfer across resolutions (USP): position tables resized
        weights, model = model.state_dict(), UMD(replace(mc, image_size=meta["image_size"])).train()
        resized = load_resized(model, weights)
        log(f"init_from {cfg.init_from}: {mc.image_size}x{mc.image_size} -> {meta['image_size']}x{meta['image_size']}"
            f"; resized (bicubic) " + ", ".join(f"{k} {a}x{a} -> {b}x{b} tokens" for k, (a, b) in resized.items()))
        mc = model.config
    if cfg.labels and mc.num_classes == 0:
        model.add_label_embedding(num_classes)
    elif cfg.labels and mc.num_classes != num_classes:
        raise ValueError(f"init_from {cfg.init_from} has {mc.num_classes} classes, the data {num_classes}")
    pretrain = init.get("pretrain_knobs") or init.get("knobs") or asdict(next(iter(scheme.presets.values())))
    if cfg.preset == "auto":
        cfg.preset = scheme.finetune_preset(scheme.knobs(**pretrain))
        if cfg.preset is None:
            raise ValueError(f"scheme {cfg.loss!r} has no fine-tuning recipe: set preset (one of {list(scheme.presets)})")
    knobs = scheme.make_knobs(cfg.preset, **cfg.knobs)
    knobs = replace(knobs, **{f.name: getattr(mc, f.name) for f in fields(ModelConfig) if hasattr(knobs, f.name)})
    named = ModelConfig.from_name(cfg.model, image_size=mc.image_size, channels=mc.channels)
    if (named.width, named.depth, named.patch_size) != (mc.width, mc.depth, mc.patch_size):
        log(f"note: model={cfg.model!r} ignored, the architecture comes from {cfg.init_from}")
    log(f"fine-tuning {cfg.init_from} (step {init.get('step')}) with preset {cfg.preset}: fresh optimizer and "
        "schedule" + (f", new label table of {num_classes} classes" if cfg.labels else ""))
    model.config.label_dropout = cfg.label_dropout
    return model, knobs, scheme.knobs(**pretrain)


def make_optimizer(model, cfg, lr, fused):
    """AdamW; no weight decay on CLS tokens, mask token and 1-D params (biases, norms). The learned
    position tables and the label table are decayed: the paper exempts only the former."""
    groups = [[], []]
    for n, p in model.named_parameters():
        groups[p.ndim >= 2 and n not in ("cls_tokens", "mask_token")].append(p)
    return torch.optim.AdamW([{"params": groups[0], "weight_decay": 0.0},
                              {"params": groups[1], "weight_decay": cfg.weight_decay}],
                             lr=lr, betas=(cfg.beta1, cfg.beta2), fused=fused)


TRAIN_KEYS = ("model_config", "model", "ema", "optimizer", "step", "scheme", "knobs", "train_config", "rng")


def save_checkpoint(path, model, ema, opt, step, cfg, knobs, pretrain_knobs):
    """The one checkpoint writer: the schema of every umd checkpoint (model.read_checkpoint reads it)."""
    ckpt = {"model_config": asdict(model.config), "model": model.state_dict(),
            "ema": ema.state_dict() if ema is not None else None, "optimizer": opt.state_dict(), "step": step,
            "scheme": cfg.loss, "knobs": asdict(knobs), "pretrain_knobs": asdict(pretrain_knobs),
            "train_config": asdict(cfg),
            "rng": {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state(),
                    "cuda": torch.cuda.get_rng_state_all() if CUDA else None}}
    try:
        atomic_write(path, lambda f: torch.save(ckpt, f))
    except OSError as e:
        need = sum(t.numel() * t.element_size() for sd in (ckpt["model"], ckpt["ema"] or {}) for t in sd.values())
        raise OSError(e.errno, f"{e.strerror or e} (the checkpoint needs about {3 * need / 1e6:.0f} MB)") from None


def resume_state(cfg, path, model, ema, opt, log):
    """Load out_dir's checkpoint into model, ema and opt if this run resumes -> (step, events)."""
    exists = os.path.exists(path)
    if cfg.resume is True and not exists:
        raise FileNotFoundError(f"resume=True but {path} does not exist")
    if cfg.init_from and exists and os.path.samefile(cfg.init_from, path):
        raise ValueError(f"init_from {cfg.init_from} is out_dir's own checkpoint: fine-tuning would overwrite "
                         "the pre-trained weights; use another out_dir")
    if cfg.resume is False or not exists:
        return 0, []
    ck = read_checkpoint(path, need=TRAIN_KEYS)
    was = ck["train_config"]
    if cfg.init_from and os.path.abspath(was.get("init_from") or path) != os.path.abspath(cfg.init_from):
        raise ValueError(f"{path} exists and is not a fine-tune of {cfg.init_from} (it was started from "
                         f"{was.get('init_from') or 'scratch'}); this run would overwrite it: use another out_dir, "
                         "or --resume=False to start afresh and overwrite it")
    ours = {k: v for k, v in asdict(model.config).items() if k != "label_dropout"}
    arch = {k: (ck["model_config"].get(k), v) for k, v in ours.items() if ck["model_config"].get(k) != v}
    if arch:
        raise ValueError(f"{path} is a checkpoint of another architecture: "
                         + ", ".join(f"{k} {a} in the checkpoint vs {b} configured" for k, (a, b) in arch.items())
                         + "; use another out_dir or --resume=False")
    changed = {k: (was[k], v) for k, v in asdict(cfg).items() if k not in FREE_ON_RESUME and k in was and was[k] != v}
    events = []
    if changed:
        said = ", ".join(f"{k} {a!r} -> {b!r}" for k, (a, b) in changed.items())
        if not cfg.allow_config_change:
            raise ValueError(f"{path} was trained with another config ({said}): resuming would continue a "
                             "different run; use another out_dir, --resume=False, or --allow_config_change=True")
        log(f"resuming with a changed config ({said}): allow_config_change=True")
        events.append({"event": "config_changed", "changed": {k: list(v) for k, v in changed.items()}})
    model.load_state_dict(ck["model"])
    if ema is not None:  # (a checkpoint without EMA: start it from the resumed weights)
        ema.load_state_dict(ck["ema"] if ck["ema"] is not None else ck["model"])
    opt.load_state_dict(ck["optimizer"])
    for g in opt.param_groups:
        g["fused"] = CUDA and cfg.device.startswith("cuda") or None
    rng = ck["rng"]  # (the loop reseeds per micro-step; restored for code that draws elsewhere)
    random.setstate(rng["python"]), np.random.set_state(rng["numpy"]), torch.set_rng_state(rng["torch"])
    if CUDA and rng.get("cuda") is not None and len(rng["cuda"]) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(rng["cuda"])
    log(f"resumed from {path} at step {ck['step']}")
    return ck["step"], events


# ---- one optimizer step and the evaluation -------------------------------------------------------
def train_step(model, scheme, knobs, abar, batch, next_batch, cfg, step, chunks, autocast, keys):
    """Forward and backward of this rank's grad_accum micro-batches of step `step` (`chunks`:
    their indices in the global batch). -> (loss, {key: (sum, count)} of the parts, next batch)."""
    A, n_chunks, parts_sum = len(chunks), cfg.batch_size // len(batch[0]), {}
    loss_sum = 0.0
    for micro, chunk in enumerate(chunks):
        x, y = batch
        if isinstance(model, DDP):  # all-reduce the gradients on the last micro-step only
            model.require_backward_grad_sync = micro == A - 1
        torch.manual_seed(seed_of(cfg.seed, 2, step, chunk))
        with autocast:
            loss, parts = scheme.loss(model, x, y, abar, knobs, (chunk, n_chunks))
        if step + 1 in cfg._test_nan_steps:
            loss = loss * float("nan")
        batch = next_batch(micro)  # fetch the next micro-batch while the device works
        (loss / A).backward()
        loss_sum = loss_sum + loss.detach().float() / A
        for k, v in parts.items():
            if k not in keys:
                raise ValueError(f"the loss of scheme {cfg.loss!r} reported part {k!r}, not in its log_keys {keys}")
            s, n = parts_sum.get(k, (0.0, 0))
            parts_sum[k] = (s + torch.as_tensor(v, device=x.device).float(), n + 1)
    return loss_sum, parts_sum, batch


def setup_eval(cfg, run, log):
    """What the periodic eval needs, made once before training so that a missing weight file or
    val split fails now, not hours later: the fixed val batch of the validation losses, and for
    FID the Inception network and the reference statistics (rank 0 computes them once and caches
    them in out_dir/fid_ref.npz, keyed by the val files, so a changed dataset is recomputed)."""
    ev = {"val": None, "inception": None, "ref": None, "vae": None, "to_input": None}
    if not cfg.eval_interval:
        return ev
    if cfg.latent:  # the probe and val losses read the latent data's posterior means; samples are decoded
        ev["to_input"] = lambda rows: posterior_mean(rows, cfg.latent_scale)
        if cfg.eval_fid_samples or cfg.eval_samples and run.master:
            from data.vae import load_vae
            ev["vae"] = load_vae(cfg.vae, run.device)
    if cfg.eval_val_images and run.master:
        try:
            images, labels, _ = load_split(cfg.data_dir, "val")
        except FileNotFoundError:
            log(f"note: {cfg.data_dir} has no val split: no validation losses")
        else:
            idx = np.sort(np.random.default_rng(0).permutation(len(images))[:cfg.eval_val_images])
            ev["val"] = (images[idx], torch.from_numpy(labels[idx]))
    if cfg.eval_fid_samples:
        import fid
        ev["inception"] = fid.load_inception(cfg.eval_fid_weights or None, run.device, download=False)
        if run.master:
            ev["ref"] = reference_stats(cfg, ev["inception"], log)
        if run.world > 1:
            dist.barrier()  # the long-timeout group: rank 0 may take a while
    return ev


def reference_stats(cfg, inception, log):
    """(mu, sigma, pool or None) of the reference: eval_fid_ref's npz, or the val split's features."""
    import fid
    if cfg.eval_fid_ref:
        st = fid.read_stats(cfg.eval_fid_ref)
        if st is None:
            raise ValueError(f"eval_fid_ref {cfg.eval_fid_ref} holds images, not statistics: make them with "
                             f"`python fid.py stats SOURCE --features --out {cfg.eval_fid_ref}`")
        return st["mu"], st["sigma"], st.get("pool")
    data_dir = (load_meta(cfg.data_dir).get("latent") or {}).get("source") or cfg.data_dir  # latents: their pixels
    split = "val" if "val" in load_meta(data_dir)["splits"] else "train"
    src = os.path.abspath(os.path.join(data_dir, f"{split}.npy"))
    key = f"{src} {os.path.getsize(src)} {os.stat(src).st_mtime_ns} {inception.source}"
    cache = os.path.join(cfg.out_dir, "fid_ref.npz")
    if os.path.exists(cache):
        with np.load(cache) as d:
            if str(d["key"]) == key:
                return d["mu"], d["sigma"], d["pool"]
    log(f"FID reference: Inception features of {data_dir} {split} -> {cache}")
    pool, _ = fid.features(load_split(data_dir, split)[0], inception, verbose=False)
    mu, sigma = fid.mean_cov(pool)
    atomic_write(cache, lambda f: np.savez(f, key=key, mu=mu, sigma=sigma, pool=pool.astype(np.float32)))
    return mu, sigma, pool


@torch.no_grad()
@in_eval_mode
def validation_losses(model, scheme, val, abar, device, batch_size=64, to_input=from_uint8):
    """The diffusion loss (eps and x0 MSE, no mask; labels when the model has a table) of noised val
    images and the masked-reconstruction loss of the clean ones (mask ratio 0.75), with timesteps,
    noise and masks fixed: the same every eval, so the curves compare."""
    images, labels = val
    g = torch.Generator().manual_seed(0)
    n, L = len(images), model.num_tokens
    t, eps = torch.randint(0, T, (n,), generator=g), torch.randn((n,) + to_input(images[:1]).shape[1:], generator=g)
    keep = torch.rand(n, L, generator=g).argsort(1)[:, :L - int(L * 0.75)]
    masks = torch.ones(n, L, dtype=torch.bool).scatter_(1, keep, False)
    sums = np.zeros(3)
    for i in range(0, n, batch_size):
        x0, b = to_input(images[i:i + batch_size]).to(device), slice(i, i + batch_size)
        x, t_model = scheme.noise_at(x0, t[b].to(device), eps[b].to(device), abar)
        y = labels[b].to(device) if model.config.num_classes else None
        x0_pred, eps_pred, _ = model(x, t_model, y)
        rec, _, mask = model(x0, torch.zeros(len(x0), dtype=torch.long, device=device), None, mask=masks[b].to(device))
        pix = pixel_mask(mask, x0.shape[-1])
        sums += len(x0) * np.array([F.mse_loss(eps_pred, eps[b].to(device)).item(),
                                    F.mse_loss(x0_pred, x0).item(), masked_mse(rec, x0, pix).item()])
    return dict(zip(("val_eps_mse", "val_x0_mse", "val_mae_loss"), (sums / n).tolist()))


def fid_eval(model, cfg, abar, run, ev):
    """FID, IS (weights with an fc layer) and precision/recall of eval_fid_samples samples per
    guidance scale. Every rank samples and featurizes its share (per-image seeds: the same
    images whatever the world size); rank 0 gathers the features and scores them."""
    import fid
    import sample
    out, n = {}, cfg.eval_fid_samples
    scales = cfg.eval_fid_cfg_scales if model.config.num_classes else (1.0,)
    for scale in dict.fromkeys(float(s) for s in scales):
        imgs, _ = sample.sample_images(model, abar, n, steps=cfg.eval_fid_steps, cfg_scale=scale, seed=0,
                                       device=run.device, rank=run.rank, world_size=run.world,
                                       sampler=sample.pick_sampler(cfg.loss), clip=not cfg.latent)
        imgs = decode(ev["vae"], imgs, cfg.latent_scale) if cfg.latent else imgs
        pool, logits = fid.features(imgs, ev["inception"], verbose=False)
        if run.world > 1:
            pool = sample.gather_samples(pool, n, run.rank, run.world, run.device)
            logits = None if logits is None else sample.gather_samples(logits, n, run.rank, run.world, run.device)
        if run.master:
            mu, sigma, ref_pool = ev["ref"]
            tag = f"cfg{scale:g}" if model.config.num_classes else "uncond"
            out[f"fid_{tag}"] = float(fid.frechet_distance(*fid.mean_cov(pool), mu, sigma))
            if logits is not None and n >= 10:  # IS: 10 splits
                out[f"is_{tag}"] = float(fid.inception_score(logits)[0])
            if ref_pool is not None and min(len(ref_pool), n) > 3:
                out[f"precision_{tag}"], out[f"recall_{tag}"] = map(float, fid.precision_recall(ref_pool, pool))
    return out


def evaluate(model, cfg, abar, pretrain_knobs, step, run, ev):
    """The periodic eval -> dict for the log (rank 0's; {} elsewhere). FID on every rank; the
    few-shot probe, a sample grid and the validation losses on rank 0, the others waiting."""
    import probe
    import sample
    t0 = time.time()
    out = fid_eval(model, cfg, abar, run, ev) if ev["inception"] is not None else {}
    seconds = {"fid": time.time() - t0} if out else {}
    if run.master:
        try:
            t0 = time.time()
            if cfg.eval_shots:
                noise_t = probe.default_noise_t({"pretrain_knobs": asdict(pretrain_knobs)})
                accs = probe.evaluate(model, cfg.data_dir, shots=(cfg.eval_shots,), seeds=(0,), noise_t=noise_t,
                                      abar=abar, max_test=cfg.eval_max_test or None, device=run.device, quiet=True,
                                      scheme=cfg.loss, to_input=ev["to_input"])
                out.update({f"fewshot_{k}": float(v) for k, v in accs.items()})
                seconds["probe"], t0 = time.time() - t0, time.time()
            if ev["val"] is not None:
                out.update(validation_losses(model, SCHEMES[cfg.loss], ev["val"], abar, run.device,
                                             to_input=ev["to_input"] or from_uint8))
                seconds["val_losses"], t0 = time.time() - t0, time.time()
            if cfg.eval_samples:
                scale = cfg.eval_cfg_scale if model.config.num_classes else 1.0
                imgs, ys = sample.sample_images(model, abar, cfg.eval_samples, steps=cfg.eval_steps, cfg_scale=scale,
                                                eta=1.0, seed=0, device=run.device, sampler=sample.pick_sampler(cfg.loss),
                                                clip=not cfg.latent)
                imgs = decode(ev["vae"], imgs, cfg.latent_scale) if cfg.latent else imgs
                path = os.path.join(cfg.out_dir, f"samples_{step:07d}.png")
                ncols = 8 if ys is None else max(1, min(8, -(-len(ys) // model.config.num_classes)))  # row per class
                out["samples"] = str(sample.save_grid(sample.grid_images(imgs, ys, ncols), path, ncols))
                seconds["grid"] = time.time() - t0
        except Exception as e:  # an eval bug or a full disk must not kill a long run
            print(f"eval failed at step {step}: {type(e).__name__}: {e}", file=sys.stderr)
    if run.world > 1:
        dist.barrier()  # the others wait for rank 0 here, under the long timeout
    return {**out, "seconds": {k: round(v, 2) for k, v in seconds.items()}} if out else out


class NonFiniteError(RuntimeError):
    pass


class StalledError(RuntimeError):
    pass


def stuck_ranks(monitor, seconds=10):
    """After a failed collective: which ranks do not answer a (gloo) monitored barrier now."""
    try:
        dist.monitored_barrier(group=monitor, timeout=datetime.timedelta(seconds=seconds), wait_all_ranks=True)
        return "every rank answers a barrier now"
    except RuntimeError as e:
        return str(e).strip().split("\n")[0]


# ---- the run ------------------------------------------------------------------------------------
def main(argv=None):
    cfg = parse_config(sys.argv[1:] if argv is None else argv)
    check_config(cfg)
    run = setup_distributed(cfg.device)
    A, B, device = cfg.grad_accum, cfg.batch_size, run.device
    if B % (run.world * A):
        raise ValueError(f"batch_size {B} is not divisible by world_size {run.world} x grad_accum {A} = {run.world * A}")
    micro_bs, chunks = B // (run.world * A), list(range(run.rank * A, run.rank * A + A))
    log = (lambda *a: print(*a, flush=True)) if run.master else (lambda *a: None)
    stop_signal = []

    def on_signal(signum, frame):  # cluster preemption or Ctrl-C: save at the next step boundary
        if signum == signal.SIGINT and stop_signal:
            print("second Ctrl-C: exiting now, without saving", file=sys.stderr, flush=True)
            os._exit(130)
        stop_signal.append(signum)
    old_handlers = {sig: signal.signal(sig, on_signal) for sig in (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT)}
    try:
        lock = claim_out_dir(cfg.out_dir) if run.master else None  # before any long work
        images, targets, meta = load_split(cfg.data_dir, "train")
        check_geometry(meta, cfg.image_size, cfg.channels, cfg.data_dir)
        check_latent(cfg, meta)
        if len(images) < B:
            raise ValueError(f"{cfg.data_dir} holds {len(images)} training images, fewer than batch_size {B}")
        steps_per_epoch = len(images) // B
        total = cfg.max_steps if cfg.max_steps > 0 else max(1, round(cfg.epochs * steps_per_epoch))
        warmup = round(cfg.warmup_epochs * steps_per_epoch if cfg.warmup_epochs > 0 else cfg.warmup_frac * total)
        if warmup > total:
            raise ValueError(f"warmup_epochs {cfg.warmup_epochs} is {warmup} steps, longer than the run ({total})")
        peak_lr = cfg.lr if cfg.lr > 0 else cfg.base_lr * B / 256

        raw, knobs, pretrain_knobs = build_model(cfg, meta, log)
        scheme, abar = SCHEMES[cfg.loss], make_schedule(cfg.schedule)
        raw.to(device)
        ema = copy.deepcopy(raw).float().eval().requires_grad_(False) if cfg.ema_decay > 0 else None
        opt = make_optimizer(raw, cfg, peak_lr, fused=device.startswith("cuda"))
        ckpt_path, log_path = os.path.join(cfg.out_dir, "ckpt.pt"), os.path.join(cfg.out_dir, "log.jsonl")
        step, events = resume_state(cfg, ckpt_path, raw, ema, opt, log)
        last_good = ckpt_path if step else None
        if run.master and step == 0 and os.path.exists(log_path):
            os.remove(log_path)  # a fresh run starts a fresh log

        def write_log(entry):
            if run.master:
                try:
                    with open(log_path, "a") as f:
                        f.write(json.dumps(entry) + "\n")
                except OSError as e:  # a full disk must not end a long run here; the checkpoint write says it
                    print(f"warning: could not write {log_path}: {e}", file=sys.stderr)

        for e in events + ([{"event": "resume"}] if step else []):
            write_log({"step": step, **e})
        model = torch.compile(raw) if cfg.compile else raw
        group = monitor = None
        if run.world > 1:  # steps get a short timeout: a stuck rank must not stall the job for long
            group = dist.new_group(timeout=datetime.timedelta(minutes=cfg.step_timeout_minutes))
            monitor = dist.new_group(backend="gloo", timeout=datetime.timedelta(minutes=cfg.step_timeout_minutes))
            model = DDP(model, device_ids=[run.local_rank] if device.startswith("cuda") else None,
                        find_unused_parameters=not scheme.every_param_used(knobs), process_group=group)
        autocast = torch.autocast(device.split(":")[0], dtype=torch.bfloat16) if cfg.dtype == "bf16" else nullcontext()
        flops = scheme.flops_per_image(raw, knobs) if scheme.flops_per_image else 0
        peak = peak_flops(device, cfg.dtype)
        log(f"model {cfg.model if not cfg.init_from else 'from ' + cfg.init_from}: {raw.num_params() / 1e6:.2f}M "
            f"params, {raw.num_tokens} tokens, {flops / 1e9:.2f} GFLOPs/img (train); {cfg.loss} {cfg.preset} {asdict(knobs)}")
        log(f"data {cfg.data_dir}: {len(images)} images {meta['image_size']}x{meta['image_size']}x{meta['channels']}; "
            f"{total} steps of {B} ({total / steps_per_epoch:.2f} epochs), micro-batch {micro_bs} x {A} accum x "
            f"{run.world} ranks; peak lr {peak_lr:.3g}, warmup {warmup}; {device} {cfg.dtype}")
        if cfg.latent:
            log(f"latents of {cfg.vae} times {cfg.latent_scale:g}, {cfg.schedule} schedule: a fresh posterior sample "
                f"per step{', the flip copy with probability 0.5' if cfg.hflip else ''}; no random-resized crop")

        def lr_at(s):  # linear warmup, then cosine to 0
            if s < warmup:
                return peak_lr * (s + 1) / warmup
            return peak_lr * 0.5 * (1 + math.cos(math.pi * (s - warmup) / max(1, total - warmup)))

        ev = setup_eval(cfg, run, log)
        get_batch = Batches(images, targets, cfg, micro_bs, device)
        next_batch = lambda micro: (get_batch(step, chunks[micro + 1]) if micro + 1 < A else
                                    get_batch(step + 1, chunks[0]) if step + 1 < total else None)
        keys = ("loss", *scheme.log_keys, "grad_norm")
        sums, counts = torch.zeros(len(keys), device=device), torch.zeros(len(keys), device=device)
        nonfinite, t_last, step_last = 0, time.time(), step
        batch = get_batch(step, chunks[0]) if step < total else None
        # ---- the training loop ----
        while step < total:
            lr_now = lr_at(step)
            for g in opt.param_groups:
                g["lr"] = lr_now
            while step + 1 == cfg._test_stall_step and run.rank == 1 and not stop_signal:
                time.sleep(0.05)  # hangs until torchrun stops it
            loss, parts, batch = train_step(model, scheme, knobs, abar, batch, next_batch, cfg, step, chunks,
                                            autocast, keys)
            norm = torch.nn.utils.clip_grad_norm_(raw.parameters(), cfg.grad_clip or math.inf)
            stop = max(stop_signal, default=0) or (255 if step + 1 == cfg._test_stop_step else 0)
            flags = torch.stack([~(loss.isfinite() & norm.isfinite()), torch.tensor(stop, device=device)]).float()
            if run.world > 1:  # every rank must skip, stop and save together
                dist.all_reduce(flags, op=dist.ReduceOp.MAX, group=group)
            bad, stop = (int(v) for v in flags.tolist())  # the one host sync per step
            if bad:
                opt.zero_grad(set_to_none=True)
                nonfinite += 1
                log(f"step {step + 1}: non-finite loss {loss.item()} / grad norm {norm.item()}, update skipped "
                    f"({nonfinite} in a row)")
                write_log({"step": step + 1, "event": "nonfinite", "loss": loss.item(), "grad_norm": norm.item()})
                if nonfinite >= cfg.max_nonfinite:
                    raise NonFiniteError(f"non-finite loss {nonfinite} steps in a row at step {step + 1}; last good "
                                         f"checkpoint: {last_good or 'none written yet'}")
            else:
                opt.step()
                opt.zero_grad(set_to_none=True)
                if ema is not None:
                    with torch.no_grad():
                        torch._foreach_lerp_(list(ema.parameters()), list(raw.parameters()), 1 - cfg.ema_decay)
                nonfinite = 0
                for k, (s, n) in {"loss": (loss, 1), **parts, "grad_norm": (norm.detach().float(), 1)}.items():
                    sums[keys.index(k)] += s
                    counts[keys.index(k)] += n
            step += 1

            if (step % cfg.log_interval == 0 or step == total) and counts[0] > 0:  # (skipped steps: logged above)
                if run.world > 1:
                    dist.all_reduce(sums, group=group), dist.all_reduce(counts, group=group)
                avg = {k: v for k, v, n in zip(keys, (sums / counts.clamp(min=1)).tolist(), counts.tolist()) if n}
                dt = time.time() - t_last
                ips = (step - step_last) * B / dt
                entry = {"step": step, "epoch": round(step / steps_per_epoch, 4), **avg, "lr": lr_now,
                         "img_per_s": round(ips, 2), "eta_s": round((total - step) * dt / (step - step_last))}
                if peak and flops:
                    entry["mfu"] = round(flops * ips / (peak * run.world), 4)
                eta = entry["eta_s"]
                log(f"step {step}/{total} | ep {entry['epoch']:.2f} | loss {avg['loss']:.4f} ("
                    + " ".join(f"{k.replace('_loss', '')} {v:.4f}" for k, v in avg.items() if k not in ("loss", "grad_norm"))
                    + f") | lr {lr_now:.2e} | gnorm {avg['grad_norm']:.3f} | {ips:.1f} img/s | "
                    f"eta {eta // 3600}:{eta % 3600 // 60:02d}:{eta % 60:02d}" + (f" | mfu {entry['mfu']:.1%}" if "mfu" in entry else ""))
                write_log(entry)
                sums.zero_(), counts.zero_()
                t_last, step_last = time.time(), step
            if cfg.eval_interval and (step % cfg.eval_interval == 0 or step == total):
                res = evaluate(ema if ema is not None else raw, cfg, abar, pretrain_knobs, step, run, ev)
                if res:
                    log(f"eval step {step}: {res}")
                    write_log({"step": step, "event": "eval", **res})
                t_last = time.time()  # eval time is not training throughput
            if stop or (cfg.ckpt_interval and step % cfg.ckpt_interval == 0 and step < total):
                if run.master:
                    save_checkpoint(ckpt_path, raw, ema, opt, step, cfg, knobs, pretrain_knobs)
                last_good = ckpt_path
            if stop:
                why = "test stop" if stop == 255 else signal.Signals(stop).name
                log(f"{why}: saved {ckpt_path} at step {step}; exiting (resume with the same command)")
                write_log({"step": step, "event": "preempted", "signal": why})
                return {"step": step, "model": raw, "ema": ema, "stopped": why}
        if run.master:
            save_checkpoint(ckpt_path, raw, ema, opt, step, cfg, knobs, pretrain_knobs)
        log(f"done: {step} steps, checkpoint {ckpt_path}")
        return {"step": step, "model": raw, "ema": ema, "stopped": None}
    except RuntimeError as e:
        if run.world == 1 or isinstance(e, NonFiniteError) or "monitor" not in locals() or monitor is None:
            raise
        raise StalledError(f"rank {run.rank}: a collective failed at step {step + 1} (a rank stalled for "
                           f"step_timeout_minutes {cfg.step_timeout_minutes:g}, or died): {str(e).strip()[:300]}; "
                           f"{stuck_ranks(monitor, min(10.0, 60 * cfg.step_timeout_minutes))}") from None
    finally:
        if run.master and "lock" in locals() and lock is not None:
            lock.close()  # releases the out_dir lock
        for sig, handler in old_handlers.items():
            signal.signal(sig, handler)
        if run.world > 1:
            dist.destroy_process_group()


if __name__ == "__main__":
    if {"-h", "--help"} & set(sys.argv[1:]):
        sys.exit(print(help_text()))
    try:
        result = main()
    except (ValueError, OSError, NonFiniteError, StalledError) as e:
        sys.exit(f"error: {e}")
    if dist.is_torchelastic_launched():  # torch 2.13 DDP (gloo) runs sometimes abort in C++ teardown
        sys.stdout.flush(), sys.stderr.flush()  # at interpreter exit ("terminate called without an
        os._exit(0)                             # active exception"): skip that teardown
    sys.exit(130 if result["stopped"] == "SIGINT" else 0)
