"""Checkpoints: the one writer (save), the one reader (read_checkpoint), resume, and init_from.

A checkpoint is one dict: model_config, model (state dict of the unwrapped model), ema (state dict or
None), optimizer, step, scheme, knobs, pretrain_knobs, train_config, rng, data (the training data's
fingerprint: meta.json's name, splits and classes, a content hash) and save_id (unique per write).
"""
import math
import os
import random
import uuid
from dataclasses import asdict, fields, replace

import numpy as np
import torch
import torch.nn.functional as F

from corrupt import SCHEMES
from data.common import atomic_write
from model import UMD, ModelConfig

CUDA = torch.cuda.is_available()
TRAIN_KEYS = ("model_config", "model", "ema", "optimizer", "step", "scheme", "knobs", "train_config", "rng")


def read_checkpoint(path, need=("model_config", "model")):
    """The checkpoint dict at path, with the keys `need` checked; clear errors for anything else."""
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=False)
    except FileNotFoundError:
        raise FileNotFoundError(f"checkpoint {path} does not exist") from None
    except Exception as e:
        raise ValueError(f"{path} is not a readable umd checkpoint ({type(e).__name__}: {e})") from None
    missing = [k for k in need if not isinstance(ckpt, dict) or k not in ckpt]
    if missing:
        raise ValueError(f"{path} is not a umd checkpoint: it lacks {missing}")
    return ckpt


def load_checkpoint(path, use_ema=False, device="cpu"):
    """-> (model in eval mode, checkpoint dict). use_ema picks the EMA weights when present."""
    ckpt = read_checkpoint(path)
    model = UMD(ModelConfig(**ckpt["model_config"]))
    weights = ckpt["ema"] if use_ema and ckpt.get("ema") is not None else ckpt["model"]
    try:
        model.load_state_dict(weights)
    except RuntimeError as e:
        raise ValueError(f"{path}: weights do not match the model config stored with them: {e}") from None
    return model.to(device).eval(), ckpt


def save_checkpoint(path, model, ema, opt, step, cfg, knobs, pretrain_knobs, data=None):
    """The one checkpoint writer (atomic: a kill mid-write keeps the previous file). data: the training
    data's fingerprint (data.common.fingerprint); save_id: this write's identity (resume compares ranks')."""
    ckpt = {"model_config": asdict(model.config), "model": model.state_dict(),
            "ema": ema.state_dict() if ema is not None else None, "optimizer": opt.state_dict(), "step": step,
            "scheme": cfg.loss, "knobs": asdict(knobs), "pretrain_knobs": asdict(pretrain_knobs),
            "train_config": asdict(cfg), "data": data, "save_id": uuid.uuid4().hex,
            "rng": {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state(),
                    "cuda": torch.cuda.get_rng_state_all() if CUDA else None}}
    try:
        atomic_write(path, lambda f: torch.save(ckpt, f))
    except OSError as e:
        need = sum(t.numel() * t.element_size() for sd in (ckpt["model"], ckpt["ema"] or {}) for t in sd.values())
        raise OSError(e.errno, f"{e.strerror or e} (the checkpoint needs about {3 * need / 1e6:.0f} MB)") from None


def brief(value):
    """A value for a one-line message: long lists (class names) shortened."""
    if isinstance(value, list) and len(value) > 4:
        return f"[{len(value)}: {', '.join(map(repr, value[:3]))}, ...]"
    return repr(value)


def check_data(cfg, path, was, now, log):
    """Refuse to resume on other training data than the checkpoint's (fingerprints, data.common.fingerprint;
    a checkpoint without one, written before they were recorded, resumes as before) -> log events."""
    changed = {k: (was.get(k), v) for k, v in now.items() if was and was.get(k) != v}
    if not changed:
        return []
    said = ", ".join(f"{k} {brief(a)} -> {brief(b)}" for k, (a, b) in changed.items())
    if not cfg.allow_config_change:
        raise ValueError(f"{path} was trained on other data than {cfg.data_dir} holds now ({said}): "
                         "the folder was re-prepared or replaced; point data_dir at the data it was trained "
                         "on, use another out_dir or --resume=False, or --allow_config_change=True to go on "
                         "with this data")
    log(f"resuming on changed data ({said}): allow_config_change=True")
    return [{"event": "data_changed", "changed": {k: list(v) for k, v in changed.items()}}]


def check_resume(cfg, path, model, ck, free_keys, log):
    """Refuse to resume a checkpoint of another run (init_from, architecture, config) -> log events."""
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
    changed = {k: (was[k], v) for k, v in asdict(cfg).items() if k not in free_keys and k in was and was[k] != v}
    if not changed:
        return []
    said = ", ".join(f"{k} {a!r} -> {b!r}" for k, (a, b) in changed.items())
    if not cfg.allow_config_change:
        raise ValueError(f"{path} was trained with another config ({said}): resuming would continue a "
                         "different run; use another out_dir, --resume=False, or --allow_config_change=True")
    log(f"resuming with a changed config ({said}): allow_config_change=True")
    return [{"event": "config_changed", "changed": {k: list(v) for k, v in changed.items()}}]


def resume(cfg, path, model, ema, opt, free_keys, data, log):
    """Load out_dir's checkpoint into model, ema and opt if this run resumes (data: the training data's
    fingerprint, checked against the checkpoint's) -> (step, log events, {"step", "checkpoint"}: what
    this rank resumed, for Guard.same_start)."""
    exists = os.path.exists(path)
    if cfg.resume is True and not exists:
        raise FileNotFoundError(f"resume=True but {path} does not exist")
    if cfg.init_from and exists and os.path.samefile(cfg.init_from, path):
        raise ValueError(f"init_from {cfg.init_from} is out_dir's own checkpoint: fine-tuning would overwrite "
                         "the pre-trained weights; use another out_dir")
    if cfg.resume is False or not exists:
        return 0, [], {"step": 0, "checkpoint": None}
    ck = read_checkpoint(path, need=TRAIN_KEYS)
    events = check_resume(cfg, path, model, ck, free_keys, log)
    events += check_data(cfg, path, ck.get("data"), data, log)
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
    ident = ck.get("save_id") or f"{os.path.getsize(path)} bytes"  # (no save_id: written before they were)
    return ck["step"], events + [{"event": "resume"}], {"step": ck["step"], "checkpoint": ident}


# ---- init_from: fine-tuning a pre-trained checkpoint ---------------------------------------------
def resize_pos_tables(state_dict, new_grid):
    """Transfer across resolutions (USP, MAE's interpolate_pos_embed): the position tables pos_enc and
    pos_dec (1, g*g, D) of state_dict resized to (1, new_grid**2, D), bicubic on their g x g grid; every
    other weight is kept as is. -> (new state dict, {name: (g, new_grid)} of the tables resized)."""
    out, resized = dict(state_dict), {}
    for name in ("pos_enc", "pos_dec"):
        table = state_dict[name]
        g = math.isqrt(table.shape[1])
        if table.ndim != 3 or table.shape[0] != 1 or g * g != table.shape[1]:
            raise ValueError(f"{name} has shape {tuple(table.shape)}, not (1, g*g, D) of a square grid")
        if g != new_grid:
            grid = table.reshape(1, g, g, -1).permute(0, 3, 1, 2).float()
            grid = F.interpolate(grid, size=(new_grid, new_grid), mode="bicubic", align_corners=False)
            out[name] = grid.permute(0, 2, 3, 1).reshape(1, new_grid * new_grid, -1).to(table.dtype)
            resized[name] = (g, new_grid)
    return out, resized


def load_resized(model, state_dict):
    """Load the weights of a model trained at another resolution (or number of tokens) into model,
    resizing its position tables (resize_pos_tables). -> {name: (old grid, new grid)} resized."""
    have, want = state_dict["patch_embed.weight"].shape, model.patch_embed.weight.shape  # (D, C, p, p)
    if have != want:
        raise ValueError(f"the weights have patch size {have[2]}, width {have[0]} and {have[1]} channels, the model "
                         f"patch size {want[2]}, width {want[0]} and {want[1]} channels: across resolutions only the "
                         "number of tokens may change (the position tables are resized)")
    weights, resized = resize_pos_tables(state_dict, model.config.image_size // model.config.patch_size)
    model.load_state_dict(weights)
    return resized


def check_init_from(cfg, init, meta):
    """What a fine-tune cannot change, refused before any work: the scheme (loss), pixels vs latents, and a
    class-conditional checkpoint's classes (its label table is kept, so the data must have the same ones)."""
    was, ref = init.get("scheme", "umd"), f"init_from {cfg.init_from}"
    if cfg.loss not in ("auto", was):
        raise ValueError(f"{ref} was trained with loss={was!r}, and a fine-tune keeps its checkpoint's "
                         f"scheme, but loss={cfg.loss!r} was set: drop --loss (auto takes the checkpoint's) "
                         f"or set --loss={was}")
    if was not in SCHEMES:
        raise ValueError(f"{ref} was trained with loss={was!r}, not a scheme of corrupt.SCHEMES "
                         f"{list(SCHEMES)}: register it there (corrupt.py) to fine-tune it")
    if bool((init.get("train_config") or {}).get("latent")) != cfg.latent:
        raise ValueError(f"{ref} is a {'latent' if not cfg.latent else 'pixel'} model but this run has "
                         f"latent={cfg.latent}")
    k, names = init["model_config"].get("num_classes", 0), (init.get("data") or {}).get("classes")
    if k and not cfg.labels:
        raise ValueError(f"{ref} is class-conditional (a label table of {k} classes) but labels=False: the "
                         "fine-tune would leave that table untrained and sample.py would still condition "
                         "on labels; fine-tune it with --labels=True (it keeps the checkpoint's table), or "
                         "start from an unconditional checkpoint")
    if k and (k != meta["num_classes"] or names is not None and names != meta["classes"]):
        raise ValueError(f"{ref} has a label table of {k} classes{' ' + brief(names) if names else ''} but "
                         f"{cfg.data_dir} has {meta['num_classes']} {brief(meta['classes'])}: its rows would "
                         "stand for other classes; fine-tune it on data of the same classes (meta.json's, in "
                         "order), or start from an unconditional checkpoint (it gets a table of the data's)")


def init_from(cfg, meta, log):
    """The model to fine-tune from cfg.init_from: its architecture and weights (position tables resized to
    the data's resolution), a label table when cfg.labels, its scheme and the fine-tuning recipe of what it
    was pre-trained with (resolves cfg.loss and cfg.preset "auto"). -> (model, knobs, pretrain_knobs)."""
    init, num_classes = read_checkpoint(cfg.init_from), meta["num_classes"] if cfg.labels else 0
    check_init_from(cfg, init, meta)
    cfg.loss = init.get("scheme", "umd")
    scheme, had_labels = SCHEMES[cfg.loss], init["model_config"].get("num_classes", 0) > 0
    model, _ = load_checkpoint(cfg.init_from)
    mc = model.train().config
    if mc.channels != meta["channels"]:
        raise ValueError(f"init_from {cfg.init_from} is a model of {mc.image_size}x{mc.image_size}x{mc.channels} "
                         f"images but {cfg.data_dir} holds {meta['image_size']}x{meta['image_size']}x{meta['channels']}")
    if mc.image_size != meta["image_size"]:  # transfer across resolutions (USP): position tables resized
        weights, model = model.state_dict(), UMD(replace(mc, image_size=meta["image_size"])).train()
        resized = load_resized(model, weights)
        log(f"init_from {cfg.init_from}: {mc.image_size}x{mc.image_size} -> {meta['image_size']}x{meta['image_size']}"
            f"; resized (bicubic) " + ", ".join(f"{k} {a}x{a} -> {b}x{b} tokens" for k, (a, b) in resized.items()))
        mc = model.config
    if cfg.labels and not had_labels:
        model.add_label_embedding(num_classes)
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
    table = f"the checkpoint's label table of {num_classes} classes kept" if had_labels else \
        f"a new label table of {num_classes} classes"
    log(f"fine-tuning {cfg.init_from} (step {init.get('step')}) with preset {cfg.preset}: fresh optimizer and "
        "schedule" + (f", {table}" if cfg.labels else ", no labels"))
    return model, knobs, scheme.knobs(**pretrain)
