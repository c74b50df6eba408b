"""
Train UMD (or the MAE / DiT / MaskDiT baselines) on a prepared dataset, nanoGPT style: the
defaults below are the configuration; config files and --key=value flags override them.

    python train.py config/fmnist_umd.py                      # one device (the CPU quick start)
    python train.py config/umd_in64.py --batch_size=512 --compile=True
    torchrun --standalone --nproc_per_node 8 train.py config/umd_in64.py
    torchrun --nnodes 4 --nproc_per_node 8 --rdzv_backend c10d --rdzv_endpoint HOST:29500 \\
        train.py config/umd_in64.py
    python train.py config/finetune_in64.py --init_from=out/umd_in64/ckpt.pt

Arguments are applied in order: `config/x.py` files (plain Python assigning keys below) and
`--key=value` (value parsed as a Python literal, else taken as a string; `--flag` = True).
An unknown key, or a value whose type differs from the default's, is an error.

Output in out_dir: ckpt.pt (one dict, see model.py; written atomically every ckpt_interval
steps, at the end, and on SIGTERM / SIGUSR1 at the next step boundary, which then exits 0),
log.jsonl (the log lines as json, plus events), samples_<step>.png. Running the same command
again resumes from ckpt.pt (resume="auto").

Reproducibility. Every micro-batch is a pure function of (seed, step, chunk): a step's global
batch is the next slice of the epoch's permutation (seeded by (seed, epoch); the last partial
batch of an epoch is dropped), cut into world_size x grad_accum chunks; rank r takes chunks
r*A .. r*A+A-1 (A = grad_accum), and the augmentation and the loss's randomness (t, eps, masks,
label dropout) are seeded from (seed, step, chunk). So a resumed run repeats the uninterrupted
one exactly (CPU), and runs with equal world_size x grad_accum see the same micro-batches with
the same randomness: 2 ranks x 1 step equals 1 rank x 2 accumulation steps up to the order of
float sums. Changing world_size x grad_accum changes the noise draws, not the data order.
"""
import ast
import builtins
import copy
import datetime
import difflib
import json
import math
import os
import random
import signal
import sys
import time
import types
from contextlib import nullcontext
from dataclasses import asdict, replace

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel as DDP

from corrupt import LOSSES, make_schedule, preset as make_knobs, train_flops_per_image
from data.common import check_geometry, load_split
from model import UMD, ModelConfig, load_checkpoint

_before = set(globals())
# ---- config: the defaults are the pre-training column of spec section 4 -----------------------
out_dir = "out"
data_dir = "data/fashion_mnist"
init_from = ""            # pre-training checkpoint -> fine-tune it: its architecture and weights, a fresh
                          # label table (labels=True), fresh optimizer and schedule, EMA = the loaded weights
resume = "auto"           # True: from out_dir/ckpt.pt; False: start afresh (overwrites); "auto": if it exists
model = "tiny/4"          # <variant>/<patch> (model.VARIANTS); with init_from the checkpoint's is used
image_size = None         # None: the data's (meta.json); if set it must match the data
channels = None
loss = "umd"              # corrupt.LOSSES key
preset = "umd"            # umd, mae, dit, maskdit, umd_finetune (corrupt.PRESETS)
no_noise_prob = None      # None: the preset's value, else overrides it (same for the next four)
mask_ratio_clean = None
mask_ratio_noisy = None
noisy_target = None       # "both", "x0", "eps"
adaln = None              # architecture knob carried by the preset (mae: False)
schedule = "cosine"       # "cosine" (pixels) or "linear" (latents)
latent = False            # VAE-latent training (recorded for sample.py; not supported by data/ yet)
labels = False            # train with class labels (a label table of the data's classes, CFG dropout)
label_dropout = 0.1       # share of labels replaced by the null label
batch_size = 1024         # global: over all ranks and accumulation steps
grad_accum = 1            # micro-steps per optimizer step; micro-batch = batch_size // (world * grad_accum)
epochs = 800.0            # run length in epochs of N // batch_size steps...
max_steps = 0             # ...unless max_steps > 0, which wins
base_lr = 1.5e-4          # peak lr = base_lr * batch_size / 256...
lr = 0.0                  # ...unless lr > 0: then the peak lr as is (fine-tuning: 1.5e-4, not scaled)
warmup_frac = 0.05        # linear warmup over this share of the steps...
warmup_epochs = 0.0       # ...unless warmup_epochs > 0, which wins; then cosine to 0
weight_decay = 0.05       # not on CLS tokens, mask token, biases and LayerNorm weights (1-D)
beta1 = 0.9
beta2 = 0.95
grad_clip = 1.0           # max global grad norm; 0: no clipping
ema_decay = 0.0           # 0: no EMA; fine-tuning 0.9999 (the EMA, kept in fp32, is what evals sample)
crop_area_min = 0.8       # random resized crop area in [crop_area_min, 1], aspect in [3/4, 4/3]
hflip = True
device = "cuda" if torch.cuda.is_available() else "cpu"
dtype = "bf16" if torch.cuda.is_available() else "fp32"   # autocast dtype: "bf16" or "fp32"
compile = False           # torch.compile the model
seed = 0
log_interval = 100        # steps between log lines (stdout and out_dir/log.jsonl)
ckpt_interval = 5000      # steps between checkpoints (0: only at the end); always one at the end
eval_interval = 0         # steps between evals (few-shot probe + sample grid), also at the end; 0: none
eval_shots = 10           # shots per class of the few-shot probe; 0: no probe
eval_max_test = 0         # probe test images (a fixed random subset); 0: the whole test split
eval_samples = 64         # images in the sample grid; 0: no grid
eval_steps = 125          # DDIM steps of the eval samples
eval_cfg_scale = 1.0      # guidance of the eval samples (models with labels)
max_nonfinite = 5         # this many non-finite steps in a row stop the run
debug_nan_steps = ()      # test hook: steps (numbered as in the log, from 1) whose loss is made NaN
debug_stop_step = 0       # test hook: act as if preempted (SIGTERM) after this step
# -----------------------------------------------------------------------------------------------
DEFAULTS = {k: v for k, v in globals().items() if k not in _before and k != "_before"}
NONE_TYPES = {"image_size": int, "channels": int, "adaln": bool, "no_noise_prob": float,
              "mask_ratio_clean": float, "mask_ratio_noisy": float, "noisy_target": str}
KNOB_KEYS = ("no_noise_prob", "mask_ratio_clean", "mask_ratio_noisy", "noisy_target", "adaln")
PEAK_FLOPS = {"A100": 312e12, "H100": 989e12, "H200": 989e12}  # dense bf16 per GPU (TF32: half)


def peak_flops(device, dtype):
    """Dense peak FLOP/s of one GPU for MFU (TF32 is half of bf16), or 0 when unknown / not CUDA."""
    if not str(device).startswith("cuda"):
        return 0
    name = torch.cuda.get_device_name(device)
    return next((v for k, v in PEAK_FLOPS.items() if k in name), 0) * (0.5 if dtype == "fp32" else 1)


def parse_config(argv, defaults=None):
    """`defaults` (train.py's) updated by config files and --key=value flags, in order -> dict.
    Also used by bench.py with its own defaults."""
    defaults = DEFAULTS if defaults is None else defaults
    cfg = dict(defaults)

    def put(key, value, where):
        if key not in defaults:
            close = difflib.get_close_matches(key, defaults, 1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise ValueError(f"unknown config key {key!r} in {where}{hint}")
        want = NONE_TYPES.get(key, type(defaults[key]))
        if want is float and type(value) is int or want is tuple and type(value) is list:
            value = want(value)  # 1 -> 1.0, [1, 2] -> (1, 2)
        ok = isinstance(value, want) and (want is bool or not isinstance(value, bool))  # bool is an int
        ok = (isinstance(value, bool) or value == "auto") if key == "resume" else ok or value is defaults[key] is None
        if not ok:
            need = "True, False or 'auto'" if key == "resume" else want.__name__
            raise ValueError(f"config key {key!r} must be {need}, got {value!r} "
                             f"({type(value).__name__}) in {where}")
        cfg[key] = value

    for arg in argv:
        if arg.startswith("--"):
            key, eq, text = arg[2:].partition("=")
            if not eq and not isinstance(defaults.get(key, True), bool):
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
                exec(builtins.compile(f.read(), arg, "exec"), ns)
            for key, value in ns.items():
                if not key.startswith("_") and not isinstance(value, types.ModuleType):
                    put(key, value, arg)
    return cfg


def check_config(cfg):
    """Values that have the right type but make no sense for train.py."""
    if cfg["dtype"] not in ("bf16", "fp32"):
        raise ValueError(f"dtype must be 'bf16' or 'fp32', got {cfg['dtype']!r}")
    for key, lo in (("batch_size", 1), ("grad_accum", 1), ("log_interval", 1), ("max_nonfinite", 1)):
        if cfg[key] < lo:
            raise ValueError(f"{key} must be >= {lo}, got {cfg[key]}")
    if not (0 < cfg["crop_area_min"] <= 1 and 0 <= cfg["ema_decay"] <= 1):
        raise ValueError(f"need 0 < crop_area_min <= 1, 0 <= ema_decay <= 1; got {cfg['crop_area_min']}, {cfg['ema_decay']}")
    if cfg["loss"] not in LOSSES:
        raise ValueError(f"unknown loss {cfg['loss']!r}, expected one of {sorted(LOSSES)}")
    if cfg["latent"]:
        raise ValueError("latent=True: training on VAE latents needs a latent dataset format, which "
                         "data/ does not provide yet")


def seed_of(*keys):
    """A well-mixed 63-bit seed from integers, e.g. (seed, step, chunk)."""
    return int(np.random.SeedSequence([int(k) for k in keys]).generate_state(1, np.uint64)[0] >> np.uint64(1))


def augment(x, area_min, hflip, gen):
    """uint8 NHWC batch on the device -> float NCHW in [-1, 1] after a random resized crop (area in
    [area_min, 1], aspect in [3/4, 4/3], bilinear) and a random horizontal flip, per image.
    The aspect is drawn among those whose box fits the image (what torchvision's rejection
    sampling accepts), so area 1 is the whole image."""
    x = x.permute(0, 3, 1, 2).float() / 127.5 - 1
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


class NonFiniteError(RuntimeError):
    pass


def check_writable(out_dir):
    try:
        os.makedirs(out_dir, exist_ok=True)
        probe_file = os.path.join(out_dir, f".write_test_{os.getpid()}")
        open(probe_file, "w").close()
        os.remove(probe_file)
    except OSError as e:
        raise ValueError(f"out_dir {out_dir} is not writable ({e.strerror}): checkpoints could not be saved") from None


def read_checkpoint(path):
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as e:
        raise ValueError(f"{path} is not a readable checkpoint ({type(e).__name__}: {e})") from None
    if not isinstance(ckpt, dict) or not {"model_config", "model", "optimizer", "step"} <= set(ckpt):
        raise ValueError(f"{path} is not a umd training checkpoint")
    return ckpt


def evaluate(model, cfg, abar, knobs, step, device):
    """Few-shot probe (probe.py) and a sample grid (sample.py) -> dict for the log. Rank 0 only."""
    out = {}
    try:
        import probe
        import sample
    except ImportError as e:
        print(f"eval skipped: {e}")
        return out
    try:
        if cfg.eval_shots:
            noise_t = probe.default_noise_t({"knobs": asdict(knobs), "train_config": {"preset": cfg.preset}})
            accs = probe.evaluate(model, cfg.data_dir, shots=(cfg.eval_shots,), seeds=(0,), noise_t=noise_t,
                                  abar=abar, max_test=cfg.eval_max_test or None, device=device, quiet=True)
            out.update({f"fewshot_{k}": float(v) for k, v in accs.items()})
        if cfg.eval_samples:
            scale = cfg.eval_cfg_scale if model.config.num_classes else 1.0
            imgs, ys = sample.sample_images(model, abar, cfg.eval_samples, steps=cfg.eval_steps, cfg_scale=scale,
                                            eta=1.0, seed=0, device=device)
            path = os.path.join(cfg.out_dir, f"samples_{step:07d}.png")
            ncols = 8 if ys is None else max(1, min(8, -(-len(ys) // model.config.num_classes)))  # a row per class
            out["samples"] = str(sample.save_grid(sample.grid_images(imgs, ys, ncols), path, ncols))
    except Exception as e:  # an eval bug must not kill a long run
        print(f"eval failed at step {step}: {type(e).__name__}: {e}", file=sys.stderr)
    return out


def main(argv=None):
    cfg = parse_config(sys.argv[1:] if argv is None else argv)
    check_config(cfg)
    cfg = types.SimpleNamespace(**cfg)

    # ---- distributed setup (torchrun sets RANK, LOCAL_RANK, WORLD_SIZE) ----
    ddp = int(os.environ.get("RANK", -1)) != -1
    rank, local_rank, world = ((int(os.environ["RANK"]), int(os.environ["LOCAL_RANK"]),
                                int(os.environ["WORLD_SIZE"])) if ddp else (0, 0, 1))
    A = cfg.grad_accum
    if cfg.batch_size % (world * A):
        raise ValueError(f"batch_size {cfg.batch_size} is not divisible by world_size {world} x grad_accum "
                         f"{A} = {world * A}")
    micro_bs = cfg.batch_size // (world * A)
    cuda = cfg.device.startswith("cuda")
    device = f"cuda:{local_rank}" if cuda and ddp else cfg.device
    if cuda:
        if ddp:
            torch.cuda.set_device(device)
        torch.set_float32_matmul_precision("high")  # TF32 matmuls
        torch.backends.cudnn.allow_tf32 = True
    if ddp:
        # rank 0 evaluates alone while the others wait in the next all-reduce: a generous timeout
        dist.init_process_group("nccl" if cuda else "gloo", timeout=datetime.timedelta(minutes=30))
    master = rank == 0
    log = (lambda *a: print(*a, flush=True)) if master else (lambda *a: None)
    old_handlers, stop_signal = {}, []
    for sig in (signal.SIGTERM, signal.SIGUSR1):  # cluster preemption: save at the next step boundary
        old_handlers[sig] = signal.signal(sig, lambda signum, frame: stop_signal.append(signum))
    try:
        if master:  # before any long work: a run that cannot save its checkpoint is lost work
            check_writable(cfg.out_dir)
        # ---- data ----
        images, targets, meta = load_split(cfg.data_dir, "train")
        check_geometry(meta, cfg.image_size, cfg.channels, cfg.data_dir)
        N, B = len(images), cfg.batch_size
        if N < B:
            raise ValueError(f"{cfg.data_dir} holds {N} training images, fewer than batch_size {B}")
        steps_per_epoch = N // B
        total = cfg.max_steps if cfg.max_steps > 0 else max(1, round(cfg.epochs * steps_per_epoch))
        warmup = round(cfg.warmup_epochs * steps_per_epoch if cfg.warmup_epochs > 0 else cfg.warmup_frac * total)
        peak_lr = cfg.lr if cfg.lr > 0 else cfg.base_lr * B / 256

        # ---- model: from scratch, or init_from a pre-training checkpoint (fine-tuning) ----
        knobs = make_knobs(cfg.preset, **{k: getattr(cfg, k) for k in KNOB_KEYS if getattr(cfg, k) is not None})
        num_classes = meta["num_classes"] if cfg.labels else 0
        torch.manual_seed(cfg.seed)
        if cfg.init_from:
            raw, init_ckpt = load_checkpoint(cfg.init_from, device="cpu")
            raw.train()
            mc = raw.config
            if (mc.image_size, mc.channels) != (meta["image_size"], meta["channels"]):
                raise ValueError(f"init_from {cfg.init_from} is a model of {mc.image_size}x{mc.image_size}x"
                                 f"{mc.channels} images but {cfg.data_dir} holds {meta['image_size']}x"
                                 f"{meta['image_size']}x{meta['channels']}")
            if cfg.labels and mc.num_classes == 0:
                raw.add_label_embedding(num_classes)
            elif cfg.labels and mc.num_classes != num_classes:
                raise ValueError(f"init_from {cfg.init_from} has {mc.num_classes} classes, the data {num_classes}")
            named = ModelConfig.from_name(cfg.model, image_size=mc.image_size, channels=mc.channels)
            if (named.width, named.depth, named.patch_size) != (mc.width, mc.depth, mc.patch_size):
                log(f"note: model={cfg.model!r} ignored, the architecture comes from {cfg.init_from}")
            knobs = replace(knobs, adaln=mc.adaln)  # an architecture knob: the checkpoint's
            log(f"fine-tuning {cfg.init_from} (step {init_ckpt.get('step')}): fresh optimizer and schedule"
                + (f", new label table of {num_classes} classes" if cfg.labels else ""))
            del init_ckpt
        else:
            raw = UMD(ModelConfig.from_name(cfg.model, image_size=meta["image_size"], channels=meta["channels"],
                                            adaln=knobs.adaln, num_classes=num_classes))
        raw.config.label_dropout = cfg.label_dropout
        raw.to(device)
        ema = copy.deepcopy(raw).float().eval().requires_grad_(False) if cfg.ema_decay > 0 else None

        # ---- optimizer: no weight decay on CLS tokens, mask token and 1-D params (biases, norms) ----
        # (the learned position tables and the label table are decayed: the spec exempts only the above)
        groups = [[], []]
        for n, p in raw.named_parameters():
            groups[p.ndim >= 2 and n not in ("cls_tokens", "mask_token")].append(p)
        opt = torch.optim.AdamW([{"params": groups[0], "weight_decay": 0.0},
                                 {"params": groups[1], "weight_decay": cfg.weight_decay}],
                                lr=peak_lr, betas=(cfg.beta1, cfg.beta2), fused=cuda)

        # ---- resume: weights, EMA, optimizer, step, random generators ----
        ckpt_path = os.path.join(cfg.out_dir, "ckpt.pt")
        log_path = os.path.join(cfg.out_dir, "log.jsonl")
        if cfg.resume is True and not os.path.exists(ckpt_path):
            raise FileNotFoundError(f"resume=True but {ckpt_path} does not exist")
        step, last_good = 0, None
        if cfg.resume is True or (cfg.resume == "auto" and os.path.exists(ckpt_path)):
            ck = read_checkpoint(ckpt_path)
            ours = {k: v for k, v in raw.config.to_dict().items() if k != "label_dropout"}
            diff = {k: (ck["model_config"].get(k), v) for k, v in ours.items() if ck["model_config"].get(k) != v}
            if diff:
                raise ValueError(f"{ckpt_path} is a checkpoint of another architecture: "
                                 + ", ".join(f"{k} {a} in the checkpoint vs {b} configured" for k, (a, b) in diff.items())
                                 + "; use another out_dir or --resume=False")
            raw.load_state_dict(ck["model"])
            if ema is not None:  # (a checkpoint without EMA: start it from the resumed weights)
                ema.load_state_dict(ck["ema"] if ck["ema"] is not None else ck["model"])
            opt.load_state_dict(ck["optimizer"])
            for g in opt.param_groups:
                g["fused"] = cuda or None
            step, last_good = ck["step"], ckpt_path
            rng = ck["rng"]  # (the loop reseeds per micro-step; restored for code that draws elsewhere)
            random.setstate(rng["python"]), np.random.set_state(rng["numpy"]), torch.set_rng_state(rng["torch"])
            if cuda and rng.get("cuda") is not None and len(rng["cuda"]) == torch.cuda.device_count():
                torch.cuda.set_rng_state_all(rng["cuda"])
            log(f"resumed from {ckpt_path} at step {step}")
            del ck
        if master:
            os.makedirs(cfg.out_dir, exist_ok=True)
            if step == 0 and os.path.exists(log_path):
                os.remove(log_path)  # a fresh run starts a fresh log

        # ---- wrap: compile, DDP (find_unused only when the mask token sits out: no masking at all) ----
        model = torch.compile(raw) if cfg.compile else raw
        if ddp:
            n_clean = int(micro_bs * knobs.no_noise_prob)
            mask_used = n_clean > 0 or (micro_bs > n_clean and knobs.mask_ratio_noisy > 0)
            model = DDP(model, device_ids=[local_rank] if cuda else None,
                        find_unused_parameters=cfg.loss != "umd" or not mask_used)
            model.config, model.null_labels = raw.config, raw.null_labels  # what the loss reads
        loss_fn, abar = LOSSES[cfg.loss], make_schedule(cfg.schedule)
        autocast = torch.autocast(device.split(":")[0], dtype=torch.bfloat16) if cfg.dtype == "bf16" else nullcontext()
        aug_gen = torch.Generator(device=device)
        fpi = train_flops_per_image(raw, knobs)
        peak = peak_flops(device, cfg.dtype)
        log(f"model {cfg.model if not cfg.init_from else 'from ' + cfg.init_from}: {raw.num_params() / 1e6:.2f}M "
            f"params, {raw.num_tokens} tokens, {fpi / 1e9:.2f} GFLOPs/img (train); knobs {asdict(knobs)}")
        log(f"data {cfg.data_dir}: {N} images {meta['image_size']}x{meta['image_size']}x{meta['channels']}; "
            f"{total} steps of {B} ({total / steps_per_epoch:.2f} epochs), micro-batch {micro_bs} x {A} accum x "
            f"{world} ranks; peak lr {peak_lr:.3g}, warmup {warmup}; {device} {cfg.dtype}")

        def lr_at(s):  # linear warmup, then cosine to 0
            if s < warmup:
                return peak_lr * (s + 1) / warmup
            return peak_lr * 0.5 * (1 + math.cos(math.pi * (s - warmup) / max(1, total - warmup)))

        perms = {}

        def get_batch(s, chunk):
            """Micro-batch `chunk` of step s: images from the memmap, augmented on the device."""
            epoch, pos = divmod(s, steps_per_epoch)
            if epoch not in perms:
                perms.clear()
                perms[epoch] = torch.randperm(N, generator=torch.Generator().manual_seed(seed_of(cfg.seed, 0, epoch))).numpy()
            start = pos * B + chunk * micro_bs
            idx = perms[epoch][start:start + micro_bs]
            order, x = np.argsort(idx), np.empty((len(idx),) + images.shape[1:], np.uint8)
            x[order] = images[idx[order]]  # read in file order (faster), keep the random order: the loss
            x, y = torch.from_numpy(x), torch.from_numpy(targets[idx])  # splits batches by position
            if cuda:
                x, y = x.pin_memory().to(device, non_blocking=True), y.pin_memory().to(device, non_blocking=True)
            aug_gen.manual_seed(seed_of(cfg.seed, 1, s, chunk))
            return augment(x, cfg.crop_area_min, cfg.hflip, aug_gen), (y if cfg.labels else None)

        def save(s):
            if not master:
                return
            ckpt = {"model_config": raw.config.to_dict(), "model": raw.state_dict(),
                    "ema": ema.state_dict() if ema is not None else None,
                    "train_config": {**vars(cfg), "image_size": meta["image_size"], "channels": meta["channels"],
                                     "dataset": meta["name"], "num_classes": meta["num_classes"],
                                     "world_size": world, "total_steps": total, "warmup_steps": warmup,
                                     "peak_lr": peak_lr},
                    "knobs": asdict(knobs), "step": s, "epoch": s / steps_per_epoch, "optimizer": opt.state_dict(),
                    "sampler": {"epoch": s // steps_per_epoch, "position": s % steps_per_epoch * B},
                    "rng": {"python": random.getstate(), "numpy": np.random.get_state(),
                            "torch": torch.get_rng_state(), "aug": aug_gen.get_state(),
                            "cuda": torch.cuda.get_rng_state_all() if cuda else None}}
            with open(ckpt_path + ".tmp", "wb") as f:  # atomic: a crash leaves the previous file intact
                torch.save(ckpt, f)
                f.flush()
                os.fsync(f.fileno())
            os.replace(ckpt_path + ".tmp", ckpt_path)

        def write_log(entry):
            if master:
                with open(log_path, "a") as f:
                    f.write(json.dumps(entry) + "\n")

        if step > 0:
            write_log({"step": step, "event": "resume"})

        # ---- the training loop ----
        keys = ("loss", "clean_loss", "noisy_eps_loss", "noisy_x0_loss", "grad_norm")
        sums, good, nonfinite = torch.zeros(len(keys), device=device), 0, 0
        t_last, step_last = time.time(), step
        batch = get_batch(step, rank * A) if step < total else None
        while step < total:
            lr_now = lr_at(step)
            for g in opt.param_groups:
                g["lr"] = lr_now
            vals = torch.zeros(4, device=device)
            for micro in range(A):
                x, y = batch
                if ddp:  # all-reduce the gradients on the last micro-step only
                    model.require_backward_grad_sync = micro == A - 1
                torch.manual_seed(seed_of(cfg.seed, 2, step, rank * A + micro))
                with autocast:
                    loss, parts = loss_fn(model, x, y, abar, knobs)
                if step + 1 in cfg.debug_nan_steps:
                    loss = loss * float("nan")
                s_next, m_next = (step, micro + 1) if micro + 1 < A else (step + 1, 0)
                batch = get_batch(s_next, rank * A + m_next) if s_next < total else None  # overlaps the device
                (loss / A).backward()
                zero = loss.new_zeros(())  # (a forked loss may report fewer parts)
                vals += torch.stack([loss.detach().float()] + [parts.get(k, zero).float() for k in keys[1:4]]) / A
            norm = torch.nn.utils.clip_grad_norm_(raw.parameters(), cfg.grad_clip if cfg.grad_clip > 0 else math.inf)
            flags = torch.stack([~(vals[0].isfinite() & norm.isfinite()),
                                 torch.tensor(bool(stop_signal) or step + 1 == cfg.debug_stop_step, device=device)]).float()
            if ddp:  # every rank must skip, stop and save together
                dist.all_reduce(flags, op=dist.ReduceOp.MAX)
            bad, stop = flags.tolist()  # the one host sync per step
            if bad:
                opt.zero_grad(set_to_none=True)
                nonfinite += 1
                log(f"step {step + 1}: non-finite loss {vals[0].item()} / grad norm {norm.item()}, update skipped "
                    f"({nonfinite} in a row)")
                write_log({"step": step + 1, "event": "nonfinite", "loss": vals[0].item(), "grad_norm": norm.item()})
                if nonfinite >= cfg.max_nonfinite:
                    raise NonFiniteError(f"non-finite loss {nonfinite} steps in a row at step {step + 1}; last good "
                                       f"checkpoint: {last_good or 'none written yet'}")
            else:
                opt.step()
                opt.zero_grad(set_to_none=True)
                if ema is not None:
                    with torch.no_grad():
                        torch._foreach_lerp_(list(ema.parameters()), list(raw.parameters()), 1 - cfg.ema_decay)
                nonfinite, good = 0, good + 1
                sums += torch.cat([vals, norm.detach().float()[None]])
            step += 1

            if (step % cfg.log_interval == 0 or step == total) and good:  # (skipped steps are logged above)
                if ddp:
                    dist.all_reduce(sums)
                    sums /= world
                avg = (sums / max(good, 1)).tolist()
                dt = time.time() - t_last
                ips = (step - step_last) * B / dt
                entry = {"step": step, "epoch": round(step / steps_per_epoch, 4), **dict(zip(keys, avg)),
                         "lr": lr_now, "img_per_s": round(ips, 2), "eta_s": round((total - step) * dt / (step - step_last))}
                if peak:
                    entry["mfu"] = round(fpi * ips / (peak * world), 4)
                log(f"step {step}/{total} | ep {entry['epoch']:.2f} | loss {avg[0]:.4f} (clean {avg[1]:.4f} eps "
                    f"{avg[2]:.4f} x0 {avg[3]:.4f}) | lr {lr_now:.2e} | gnorm {avg[4]:.3f} | {ips:.1f} img/s | "
                    f"eta {entry['eta_s'] // 3600}:{entry['eta_s'] % 3600 // 60:02d}:{entry['eta_s'] % 60:02d}"
                    + (f" | mfu {entry['mfu']:.1%}" if peak else ""))
                write_log(entry)
                sums.zero_()
                good, t_last, step_last = 0, time.time(), step
            if cfg.eval_interval and (step % cfg.eval_interval == 0 or step == total) and master:
                res = evaluate(ema if ema is not None else raw, cfg, abar, knobs, step, device)
                if res:
                    log(f"eval step {step}: {res}")
                    write_log({"step": step, "event": "eval", **res})
                t_last = time.time()  # eval time is not training throughput
            if stop or (cfg.ckpt_interval and step % cfg.ckpt_interval == 0 and step < total):
                save(step)
                last_good = ckpt_path
            if stop:
                why = signal.Signals(int(stop_signal[0])).name if stop_signal else "debug_stop_step"
                log(f"{why}: saved {ckpt_path} at step {step}; exiting (resume with the same command)")
                write_log({"step": step, "event": "preempted", "signal": why})
                return {"step": step, "model": raw, "ema": ema, "stopped": True}
        save(step)
        log(f"done: {step} steps, checkpoint {ckpt_path}")
        return {"step": step, "model": raw, "ema": ema, "stopped": False}
    finally:
        for sig, handler in old_handlers.items():
            signal.signal(sig, handler)
        if ddp:
            dist.destroy_process_group()


if __name__ == "__main__":
    if {"-h", "--help"} & set(sys.argv[1:]):
        sys.exit(print(__doc__ + "\n".join(f"{k} = {v!r}" for k, v in DEFAULTS.items())))
    try:
        main()
    except (ValueError, FileNotFoundError, NonFiniteError) as e:
        sys.exit(f"error: {e}")
    if dist.is_torchelastic_launched():  # torch 2.13 DDP (gloo) runs sometimes abort in C++ teardown
        sys.stdout.flush(), sys.stderr.flush()  # at interpreter exit ("terminate called without an
        os._exit(0)                             # active exception"): skip that teardown
