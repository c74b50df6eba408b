"""The run's log: log.jsonl (one json object a line) and the periodic training line on stdout."""
import json
import math
import os
import sys
import time
from dataclasses import asdict

import torch
import torch.distributed as dist

from data.common import atomic_write
from infra.launch import CPU_BF16


class JsonLog:
    """out_dir/log.jsonl, written by rank 0 only: a fresh run (step 0) starts a fresh file, a resumed
    one appends, first the resume's events; the lines of steps after the resumed one (logged by a run
    killed before its next checkpoint) are dropped first, so no step is logged twice. A full disk must
    not end a long run here (the checkpoint write says it), so a failed write only warns."""

    def __init__(self, out_dir, master, step, events=()):
        self.path, self.master = os.path.join(out_dir, "log.jsonl"), master
        if master and step == 0 and os.path.exists(self.path):
            os.remove(self.path)
        dropped = self.drop_after(step) if master and step > 0 else 0
        for e in events:
            extra = {"dropped_log_lines": dropped} if dropped and e.get("event") == "resume" else {}
            self({"step": step, **e, **extra})

    def drop_after(self, step):
        """Rewrite log.jsonl (atomically) without the lines of steps after `step`. -> lines dropped."""
        try:
            with open(self.path, "rb") as f:
                lines = f.read().splitlines(keepends=True)
        except FileNotFoundError:
            return 0
        keep = [line.rstrip(b"\n") + b"\n" for line in lines if logged_step(line) <= step]
        try:
            if keep != lines:
                atomic_write(self.path, lambda f: f.writelines(keep))
        except OSError as e:
            print(f"warning: could not rewrite {self.path}: {e}", file=sys.stderr)
            return 0
        return len(lines) - len(keep)

    def __call__(self, entry):
        if not self.master:
            return
        try:
            with open(self.path, "a") as f:
                f.write(json.dumps(entry) + "\n")
        except OSError as e:
            print(f"warning: could not write {self.path}: {e}", file=sys.stderr)


def logged_step(line):
    """The step of a log.jsonl line (0 without one); a torn line (a kill mid-write) is dropped: inf."""
    try:
        entry = json.loads(line)
    except ValueError:
        return math.inf
    step = entry.get("step", 0) if isinstance(entry, dict) else 0
    return step if isinstance(step, int) else 0


class Meter:
    """Running means of the loss, its parts and the grad norm over the steps since the last log line,
    summed over ranks at log time only (no host sync on the other steps); img/s, ETA and MFU."""

    def __init__(self, keys, step, flops, peak, guard):
        self.keys, self.flops, self.peak, self.run, self.group = keys, flops, peak, guard.run, guard.group
        self.sums = torch.zeros(len(keys), device=self.run.device)
        self.counts = torch.zeros(len(keys), device=self.run.device)
        self.restart(step)

    def add(self, parts):
        """parts: {key: (sum, count)}, keys among the scheme's log_keys."""
        for k, (s, n) in parts.items():
            if k not in self.keys:
                raise ValueError(f"the loss reported part {k!r}, not in its scheme's log_keys {self.keys[1:-1]}")
            self.sums[self.keys.index(k)] += s
            self.counts[self.keys.index(k)] += n

    def has_data(self):
        return bool(self.counts[0] > 0)

    def restart(self, step):
        """Throughput is measured from here (the start, or the end of an eval)."""
        self.t_last, self.step_last = time.time(), step

    def entry(self, step, plan, lr):
        """The log entry of the steps since the last one (means over ranks); resets."""
        if self.run.world > 1:
            dist.all_reduce(self.sums, group=self.group), dist.all_reduce(self.counts, group=self.group)
        avg = {k: v for k, v, n in zip(self.keys, (self.sums / self.counts.clamp(min=1)).tolist(),
                                       self.counts.tolist()) if n}
        dt = time.time() - self.t_last
        ips = (step - self.step_last) * plan.batch_size / dt
        entry = {"step": step, "epoch": round(step / plan.steps_per_epoch, 4), **avg, "lr": lr,
                 "img_per_s": round(ips, 2), "eta_s": round((plan.total - step) * dt / (step - self.step_last))}
        if self.peak and self.flops:
            entry["mfu"] = round(self.flops * ips / (self.peak * self.run.world), 4)
        self.sums.zero_(), self.counts.zero_()
        self.restart(step)
        return entry


def step_line(entry, total):
    """The human-readable form of a log entry."""
    eta, other = entry["eta_s"], ("step", "epoch", "loss", "grad_norm", "lr", "img_per_s", "eta_s", "mfu")
    parts = [k for k in entry if k not in other]  # the scheme's log_keys, in their order
    return (f"step {entry['step']}/{total} | ep {entry['epoch']:.2f} | loss {entry['loss']:.4f} ("
            + " ".join(f"{k.replace('_loss', '')} {entry[k]:.4f}" for k in parts)
            + f") | lr {entry['lr']:.2e} | gnorm {entry['grad_norm']:.3f} | {entry['img_per_s']:.1f} img/s | "
            f"eta {eta // 3600}:{eta % 3600 // 60:02d}:{eta % 60:02d}"
            + (f" | mfu {entry['mfu']:.1%}" if "mfu" in entry else ""))


def describe_run(cfg, raw, knobs, flops, meta, num_images, plan, run, log):
    """The run's first lines: model, data, schedule."""
    size, B, A = meta["image_size"], cfg.batch_size, cfg.grad_accum
    log(f"model {cfg.model if not cfg.init_from else 'from ' + cfg.init_from}: {raw.num_params() / 1e6:.2f}M "
        f"params, {raw.num_tokens} tokens, {flops / 1e9:.2f} GFLOPs/img (train); {cfg.loss} {cfg.preset} "
        f"{asdict(knobs)}")
    log(f"data {cfg.data_dir}: {num_images} images {size}x{size}x{meta['channels']}; {plan.total} steps of {B} "
        f"({plan.total / plan.steps_per_epoch:.2f} epochs), micro-batch {plan.micro_batch} x {A} accum x "
        f"{run.world} ranks; peak lr {plan.peak_lr:.3g}, warmup {plan.warmup}; {run.device} {cfg.dtype}"
        + ((" (native on this CPU)" if CPU_BF16 else " (emulated on this CPU: slower than fp32)")
           if run.device == "cpu" and cfg.dtype == "bf16" else ""))
    if cfg.latent:
        log(f"latents of {cfg.vae} times {cfg.latent_scale:g}, {cfg.schedule} schedule: a fresh posterior "
            f"sample per step{', the flip copy with probability 0.5' if cfg.hflip else ''}; no random crop")
