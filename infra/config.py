"""Configuration: config files and --key=value flags into a dataclass (train.py's Config, bench.py's
BenchConfig), the value checks, the keys free to change on resume, the run length, and --help."""
import ast
import difflib
import math
import os
import types
import typing
from dataclasses import dataclass, fields

from corrupt import SCHEMES, T

# Keys one may change when resuming a run (and every eval_* key); any other change makes it another run.
FREE_ON_RESUME = {"out_dir", "resume", "allow_config_change", "device", "dtype", "compile", "grad_accum",
                  "log_interval", "ckpt_interval", "max_nonfinite", "step_timeout_minutes", "vae"}
RANGES = [  # train.py's (keys, test, what each must be); every number gets one
    ("batch_size grad_accum log_interval max_nonfinite", lambda v: v >= 1, ">= 1"),
    ("image_size channels", lambda v: v is None or v >= 1, ">= 1"),
    ("epochs base_lr step_timeout_minutes", lambda v: v > 0, "> 0"),
    ("max_steps lr warmup_epochs weight_decay grad_clip seed latent_scale ckpt_interval eval_interval eval_shots "
     "eval_max_test eval_samples eval_cfg_scale eval_val_images", lambda v: v >= 0, ">= 0"),
    ("warmup_frac ema_decay", lambda v: 0 <= v <= 1, "in [0, 1]"),
    ("beta1 beta2 label_dropout", lambda v: 0 <= v < 1, "in [0, 1)"),
    ("crop_area_min", lambda v: 0 < v <= 1, "in (0, 1]"),
    ("eval_steps eval_fid_steps", lambda v: 1 <= v <= T, f"in [1, {T}]"),
    ("eval_fid_samples", lambda v: v == 0 or v >= 2, "0 or >= 2"),
    ("eval_fid_cfg_scales", lambda v: len(v) > 0 and all(isinstance(x, (int, float)) and x >= 0 for x in v),
     "a non-empty tuple of numbers >= 0"),
]
CHOICES = {"dtype": ("bf16", "fp32"), "schedule": ("auto", "cosine", "linear")}


def key_types(cls):
    """field name -> tuple of accepted types, from a dataclass's annotations."""
    union = lambda h: typing.get_origin(h) is typing.Union
    return {n: typing.get_args(h) if union(h) else (h,) for n, h in typing.get_type_hints(cls).items()}


def parse_config(argv, cls):
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


def help_text(cls, doc):
    """doc, then every key of the dataclass cls with its default (and, for train.py, the schemes' knobs)."""
    lines = [f"{f.name} = {getattr(cls(), f.name)!r}" for f in fields(cls) if not f.name.startswith("_")]
    for name, s in SCHEMES.items() if "knobs" in {f.name for f in fields(cls)} else ():
        first = next(iter(s.presets.values()))
        lines.append(f"\ncorruption knobs of --loss={name} (default: its preset; presets: {', '.join(s.presets)}):")
        lines += [f"{f.name} = {getattr(first, f.name)!r}" for f in fields(s.knobs)]
    return doc + "\n".join(lines)


def free_on_resume(cfg):
    """The keys of cfg one may change when resuming."""
    return FREE_ON_RESUME | {k for k in vars(cfg) if k.startswith("eval_")}


@dataclass
class Plan:
    """The run's length and learning rate, from the config and the data."""
    steps_per_epoch: int
    total: int            # optimizer steps
    warmup: int
    peak_lr: float
    batch_size: int       # global
    micro_batch: int      # images per rank per micro-step

    def lr_at(self, step):
        """Linear warmup, then cosine to 0."""
        if step < self.warmup:
            return self.peak_lr * (step + 1) / self.warmup
        return self.peak_lr * 0.5 * (1 + math.cos(math.pi * (step - self.warmup) / max(1, self.total - self.warmup)))


def plan_run(cfg, num_images, world):
    """-> Plan; refuses a batch that does not split over the ranks, or is larger than the data."""
    B, A = cfg.batch_size, cfg.grad_accum
    if B % (world * A):
        raise ValueError(f"batch_size {B} is not divisible by world_size {world} x grad_accum {A} = {world * A}")
    if num_images < B:
        raise ValueError(f"{cfg.data_dir} holds {num_images} training images, fewer than batch_size {B}")
    steps_per_epoch = num_images // B
    total = cfg.max_steps if cfg.max_steps > 0 else max(1, round(cfg.epochs * steps_per_epoch))
    warmup = round(cfg.warmup_epochs * steps_per_epoch if cfg.warmup_epochs > 0 else cfg.warmup_frac * total)
    if warmup > total:
        raise ValueError(f"warmup_epochs {cfg.warmup_epochs} is {warmup} steps, longer than the run ({total})")
    peak_lr = cfg.lr if cfg.lr > 0 else cfg.base_lr * B / 256
    return Plan(steps_per_epoch, total, warmup, peak_lr, B, B // (world * A))
