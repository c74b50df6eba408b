"""
Train UMD (or the MAE / DiT / MaskDiT baselines, or another corruption scheme of corrupt.py) on a
prepared dataset, nanoGPT style: Config below holds the defaults; config files and --key=value
flags override them, in order (`python train.py --help` lists every key).

    python train.py config/fmnist_umd.py                      # one device (the CPU quick start)
    torchrun --standalone --nproc_per_node 8 train.py config/umd_in64.py --compile=True
    torchrun --nnodes 4 --nproc_per_node 8 --rdzv_backend c10d --rdzv_endpoint HOST:29500 \\
        train.py config/umd_in64.py
    python train.py config/finetune_in64.py --init_from=out/umd_in64/ckpt.pt

out_dir gets ckpt.pt (every ckpt_interval steps, at the end, and on SIGTERM / SIGUSR1 / Ctrl-C at
the next step boundary, which then exits), log.jsonl and the eval pictures. The same command again
resumes from ckpt.pt. The guards (lock, signals, resume checks, stalled ranks) live in infra/.

Reproducibility. Every micro-batch is a pure function of (seed, step, chunk): a step's global
batch is the next slice of the epoch's permutation (seeded by (seed, epoch); the last partial
batch of an epoch is dropped), cut into world_size x grad_accum chunks; rank r takes chunks
r*A .. r*A+A-1 (A = grad_accum), and the augmentation and the loss's randomness (t, eps, masks,
label dropout) are seeded from (seed, step, chunk). So a resumed run repeats the uninterrupted
one exactly (CPU, same thread count), and 2 ranks x 1 step equal 1 rank x 2 accumulation steps up
to the order of float sums.
"""
import copy
import math
import os
import signal
import sys
import typing
from contextlib import nullcontext
from dataclasses import dataclass, field, fields

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP

from corrupt import SCHEMES, make_schedule
from data.common import check_geometry, fingerprint, load_split
from data.loader import Batches
from infra import evals
from infra.checkpoint import init_from, resume, save_checkpoint
from infra.config import check_config, check_latent, free_on_resume, help_text, parse_config, plan_run
from infra.launch import (CPU_BF16, CUDA, Guard, NonFiniteError, StalledError, peak_flops, seed_of,
                          setup_distributed)
from infra.logs import JsonLog, Meter, describe_run, step_line
from model import UMD, ModelConfig

@dataclass
class Config:
    """The defaults are the paper's pre-training setup (Table 4) where it has one."""
    out_dir: str = "out"
    data_dir: str = "data/fashion_mnist"
    init_from: str = ""           # pre-training checkpoint to fine-tune: its architecture, weights, scheme;
                                  # a label table (labels=True), fresh optimizer and schedule, EMA = weights
    resume: typing.Union[bool, str] = "auto"  # True: out_dir/ckpt.pt; False: afresh; "auto": if it exists
    allow_config_change: bool = False  # resume although keys that define the run (batch, data...) changed
    model: str = "tiny/4"         # <variant>/<patch> (model.VARIANTS); with init_from the checkpoint's
    image_size: typing.Optional[int] = None  # None: the data's (meta.json); if set it must match the data
    channels: typing.Optional[int] = None
    loss: str = "auto"            # corruption scheme (corrupt.SCHEMES); auto: "umd", or init_from's
    preset: str = "auto"          # the scheme's preset (umd, mae, dit, maskdit, ...); auto: the first one, or
                                  # with init_from the fine-tuning recipe of the checkpoint's pre-training
    knobs: dict = field(default_factory=dict)  # knob overrides, set as --<knob>=value (--mask_ratio_noisy=0)
    schedule: str = "auto"        # "auto": "cosine" for pixels, "linear" for latents (which refuse "cosine")
    latent: bool = False          # train on VAE latents (data/latent/prepare.py; data/vae.py): per step a
                                  # fresh posterior sample, the stored flip copy, no random-resized crop
    vae: str = ""                 # latent: the VAE of the data ("": its meta.json's), recorded for sample.py
    latent_scale: float = 0.0     # latent: the model sees latent_scale * z (0: the data's; SD's VAE: 0.18215)
    labels: bool = False          # train with class labels (a label table of the data's classes, CFG dropout)
    label_dropout: float = 0.1    # share of labels replaced by the null label
    batch_size: int = 1024        # global: over all ranks and accumulation steps
    grad_accum: int = 1           # micro-steps per optimizer step: micro-batch = batch_size // (world * this)
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
    ema_decay: float = 0.0        # 0: no EMA; fine-tuning 0.9999 (the EMA, in fp32, is what evals sample)
    crop_area_min: float = 0.8    # random resized crop area in [crop_area_min, 1], aspect in [3/4, 4/3]
    hflip: bool = True
    device: str = "cuda" if CUDA else "cpu"
    dtype: str = "bf16" if CUDA or CPU_BF16 else "fp32"  # autocast dtype; on a CPU bf16 where it has native
                                  # bf16 (AVX512-BF16, AMX: faster there), else fp32
    compile: bool = False         # torch.compile the model
    seed: int = 0
    log_interval: int = 100       # steps between log lines (stdout and out_dir/log.jsonl)
    ckpt_interval: int = 5000     # steps between checkpoints (0: only at the end); always one at the end
    eval_interval: int = 0        # steps between evals (infra/evals.py), also at the end; 0: none
    eval_shots: int = 10          # shots per class of the few-shot probe; 0: no probe
    eval_max_test: int = 0        # probe test images (a fixed random subset); 0: the whole test split
    eval_samples: int = 64        # images in the sample grid; 0: no grid
    eval_steps: int = 125         # sampler steps of the eval samples (DDIM for umd, Heun for flow)
    eval_cfg_scale: float = 1.0   # guidance of the eval samples (models with labels)
    eval_val_images: int = 256    # validation losses on this many val images (fixed noise, masks); 0: none
    eval_fid_samples: int = 0     # FID / IS / precision-recall of this many samples a guidance scale; 0: none
    eval_fid_cfg_scales: tuple = (1.0, 2.0, 4.0)  # their guidance scales (models with labels; else unguided)
    eval_fid_steps: int = 125     # their sampler steps
    eval_fid_ref: str = ""        # reference stats npz (fid.py stats --features); "": the val split's, cached
    eval_fid_weights: str = ""    # Inception weights file; "": fid.py's search (see fid.py)
    max_nonfinite: int = 5        # this many non-finite steps in a row stop the run
    step_timeout_minutes: float = 10.0  # a training-step collective waiting longer ends the run, naming the
                                  # stuck rank (start-up and evals, which rank 0 runs alone, get 30 minutes)


# ---- model, optimizer, one step ---------------------------------------------------------------
def build_model(cfg, meta, log):
    """The model and its knobs: from scratch, or init_from a pre-training checkpoint (fine-tuning,
    infra.checkpoint.init_from). Resolves cfg.loss and cfg.preset. -> (model, knobs, pretrain_knobs)."""
    torch.manual_seed(cfg.seed)
    if cfg.init_from:
        model, knobs, pretrain_knobs = init_from(cfg, meta, log)
    else:
        cfg.loss = "umd" if cfg.loss == "auto" else cfg.loss
        scheme = SCHEMES[cfg.loss]
        cfg.preset = next(iter(scheme.presets)) if cfg.preset == "auto" else cfg.preset
        knobs = pretrain_knobs = scheme.make_knobs(cfg.preset, **cfg.knobs)
        arch = {f.name: getattr(knobs, f.name) for f in fields(ModelConfig) if hasattr(knobs, f.name)}
        model = UMD(ModelConfig.from_name(cfg.model, image_size=meta["image_size"], channels=meta["channels"],
                                          num_classes=meta["num_classes"] if cfg.labels else 0, **arch))
    model.config.label_dropout = cfg.label_dropout
    return model, knobs, pretrain_knobs


def make_optimizer(model, cfg, lr, fused):
    """AdamW; no weight decay on CLS tokens, mask token and 1-D params (biases, norms). The learned
    position tables and the label table are decayed: the paper exempts only the former."""
    groups = [[], []]
    for n, p in model.named_parameters():
        groups[p.ndim >= 2 and n not in ("cls_tokens", "mask_token")].append(p)
    return torch.optim.AdamW([{"params": groups[0], "weight_decay": 0.0},
                              {"params": groups[1], "weight_decay": cfg.weight_decay}],
                             lr=lr, betas=(cfg.beta1, cfg.beta2), fused=fused)


def train_step(model, scheme, knobs, abar, batch, next_batch, cfg, step, chunks, autocast):
    """Forward and backward of this rank's grad_accum micro-batches of step `step` (`chunks`:
    their indices in the global batch). -> (loss, {part: (sum, count)}, next batch)."""
    A, n_chunks, loss_sum, parts_sum = len(chunks), cfg.batch_size // len(batch[0]), 0.0, {}
    for micro, chunk in enumerate(chunks):
        x, y = batch
        if isinstance(model, DDP):  # all-reduce the gradients on the last micro-step only
            model.require_backward_grad_sync = micro == A - 1
        torch.manual_seed(seed_of(cfg.seed, 2, step, chunk))  # t, eps, masks, label dropout
        with autocast:
            loss, parts = scheme.loss(model, x, y, abar, knobs, (chunk, n_chunks))
        batch = next_batch(micro)  # fetch the next micro-batch while the device works
        (loss / A).backward()
        loss_sum = loss_sum + loss.detach().float() / A
        for k, v in parts.items():
            s, n = parts_sum.get(k, (0.0, 0))
            parts_sum[k] = (s + torch.as_tensor(v, device=x.device).float(), n + 1)
    return loss_sum, parts_sum, batch


# ---- the run ----------------------------------------------------------------------------------
def main(argv=None):
    cfg = parse_config(sys.argv[1:] if argv is None else argv, Config)
    check_config(cfg)
    run = setup_distributed(cfg.device)
    log = (lambda *a: print(*a, flush=True)) if run.master else (lambda *a: None)
    with Guard(run, cfg.out_dir, cfg.step_timeout_minutes) as guard:  # lock, signals, stalled ranks
        images, targets, meta = load_split(cfg.data_dir, "train")
        data = fingerprint(cfg.data_dir, images, targets, meta)  # recorded in checkpoints, checked on resume
        check_geometry(meta, cfg.image_size, cfg.channels, cfg.data_dir)
        check_latent(cfg, meta)
        plan = plan_run(cfg, len(images), run.world)
        raw, knobs, pretrain_knobs = build_model(cfg, meta, log)
        scheme, abar, device = SCHEMES[cfg.loss], make_schedule(cfg.schedule), run.device
        raw.to(device)
        ema = copy.deepcopy(raw).float().eval().requires_grad_(False) if cfg.ema_decay > 0 else None
        opt = make_optimizer(raw, cfg, plan.peak_lr, fused=device.startswith("cuda"))
        ckpt_path = os.path.join(cfg.out_dir, "ckpt.pt")
        step, events, resumed = resume(cfg, ckpt_path, raw, ema, opt, free_on_resume(cfg), data, log)
        guard.same_start(resumed=resumed, data=data["sample_sha256"])  # out_dir, data_dir: seen by every node
        save = lambda: save_checkpoint(ckpt_path, raw, ema, opt, step, cfg, knobs, pretrain_knobs, data)
        jlog, last_good, guard.step = JsonLog(cfg.out_dir, run.master, step, events), None, step
        model = guard.wrap(torch.compile(raw) if cfg.compile else raw, not scheme.every_param_used(knobs))
        bf16 = cfg.dtype == "bf16"
        autocast = torch.autocast(device.split(":")[0], dtype=torch.bfloat16) if bf16 else nullcontext()
        flops = scheme.flops_per_image(raw, knobs) if scheme.flops_per_image else 0
        describe_run(cfg, raw, knobs, flops, meta, len(images), plan, run, log)
        ev = evals.setup_eval(cfg, run, log)
        A, chunks = cfg.grad_accum, list(range(run.rank * cfg.grad_accum, (run.rank + 1) * cfg.grad_accum))
        get_batch = Batches(images, targets, cfg, plan.micro_batch, device)
        next_batch = lambda micro: (get_batch(step, chunks[micro + 1]) if micro + 1 < A else
                                    get_batch(step + 1, chunks[0]) if step + 1 < plan.total else None)
        meter = Meter(("loss", *scheme.log_keys, "grad_norm"), step, flops, peak_flops(device, cfg.dtype),
                      guard)
        nonfinite, batch = 0, get_batch(step, chunks[0]) if step < plan.total else None
        # ---- the training loop ----
        while step < plan.total:
            lr = plan.lr_at(step)
            for g in opt.param_groups:
                g["lr"] = lr
            loss, parts, batch = train_step(model, scheme, knobs, abar, batch, next_batch, cfg, step, chunks,
                                            autocast)
            norm = torch.nn.utils.clip_grad_norm_(raw.parameters(), cfg.grad_clip or math.inf)
            bad, stop = guard.agree(loss, norm, step)  # the same on every rank: skip, stop and save together
            if bad:  # a non-finite loss or gradient on some rank: no update
                opt.zero_grad(set_to_none=True)
                nonfinite += 1
                guard.skip_update(step, loss, norm, nonfinite, cfg.max_nonfinite, last_good, jlog)
            else:
                opt.step()
                opt.zero_grad(set_to_none=True)
                if ema is not None:
                    with torch.no_grad():
                        torch._foreach_lerp_(list(ema.parameters()), list(raw.parameters()),
                                             1 - cfg.ema_decay)
                nonfinite = 0
                meter.add({"loss": (loss, 1), **parts, "grad_norm": (norm.detach().float(), 1)})
            step += 1
            if (step % cfg.log_interval == 0 or step == plan.total) and meter.has_data():
                entry = meter.entry(step, plan, lr)
                log(step_line(entry, plan.total))
                jlog(entry)
            if cfg.eval_interval and (step % cfg.eval_interval == 0 or step == plan.total) and not stop:
                res = evals.evaluate(raw if ema is None else ema, cfg, abar, pretrain_knobs, step, run, ev)
                if res:
                    log(f"eval step {step}: {res}")
                    jlog({"step": step, "event": "eval", **res})
                meter.restart(step)  # eval time is not training throughput
            if stop or (cfg.ckpt_interval and step % cfg.ckpt_interval == 0 and step < plan.total):
                last_good = guard.save(save, ckpt_path)  # rank 0 writes; the others wait (30 min timeout)
            if stop:
                why = signal.Signals(stop).name
                log(f"{why}: saved {ckpt_path} at step {step}; exiting (resume with the same command)")
                jlog({"step": step, "event": "preempted", "signal": why})
                return {"step": step, "model": raw, "ema": ema, "stopped": why}
        guard.save(save, ckpt_path)
        log(f"done: {step} steps, checkpoint {ckpt_path}")
        return {"step": step, "model": raw, "ema": ema, "stopped": None}


if __name__ == "__main__":
    if {"-h", "--help"} & set(sys.argv[1:]):
        sys.exit(print(help_text(Config, __doc__)))
    try:
        result = main()
    except (ValueError, OSError, NonFiniteError, StalledError) as e:
        sys.exit(f"error: {e}")
    if dist.is_torchelastic_launched():  # torch 2.13 DDP (gloo) runs sometimes abort in C++ teardown
        sys.stdout.flush(), sys.stderr.flush()  # at interpreter exit ("terminate called without an
        os._exit(0)                             # active exception"): skip that teardown
    sys.exit(130 if result["stopped"] == "SIGINT" else 0)
