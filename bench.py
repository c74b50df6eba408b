"""
Throughput of UMD and the baselines: full training steps (forward, backward, AdamW) of each
preset on the same model geometry and batch, timed interleaved after warm-up, and DDIM
network evaluations per second with and without classifier-free guidance.

    python bench.py                                   # B/4 at 64x64; width 192 on CPU
    python bench.py --width=0 --batch_size=256 --compile=True --dtype=bf16    # a GPU, full B/4
    python bench.py --presets=umd,dit --steps=20

Config keys work like train.py's (`--key=value`, config files). The paper's claim to check:
UMD pre-training costs 0.57 of DiT's (60 vs 105 TPU hours) because masked tokens skip the
encoder; the FLOP count (the scheme's flops_per_image) predicts 0.576 for B/4 at 64x64.
Presets are those of --loss's scheme (corrupt.SCHEMES); the time ratio is to its first one
named "dit" when there is one.
"""
import statistics
import sys
import time
from dataclasses import dataclass, fields

import torch

from corrupt import SCHEMES, make_schedule
from model import UMD, ModelConfig
from infra.config import check_values, help_text, parse_config
from infra.launch import CUDA, peak_flops


@dataclass
class BenchConfig:
    model: str = "B/4"
    image_size: int = 64
    channels: int = 3
    width: int = 0 if CUDA else 192  # 0: the variant's width; heads keep head_dim 64 when it is reduced
    batch_size: int = 256 if CUDA else 32
    loss: str = "umd"                # the corruption scheme
    presets: str = "umd,dit,maskdit,mae"
    steps: int = 10                  # timed rounds after `warmup` untimed ones; a round runs every preset once
    warmup: int = 3
    sample_batch: int = 64 if CUDA else 16
    sample_evals: int = 10           # DDIM network evaluations timed
    dtype: str = "bf16" if CUDA else "fp32"
    compile: bool = False
    device: str = "cuda" if CUDA else "cpu"
    seed: int = 0


def build(cfg, knobs=None, num_classes=0):
    """The model (architecture knobs such as adaln from the preset) and its maybe compiled forward."""
    arch = {f.name: getattr(knobs, f.name) for f in fields(ModelConfig) if hasattr(knobs, f.name)}
    overrides = dict(image_size=cfg.image_size, channels=cfg.channels, num_classes=num_classes, **arch)
    if cfg.width:
        overrides.update(width=cfg.width, heads=max(1, cfg.width // 64))
    model = UMD(ModelConfig.from_name(cfg.model, **overrides)).to(cfg.device)
    return model, (torch.compile(model) if cfg.compile else model)


def sync(device):
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def bench_training(cfg):
    device, B, scheme = cfg.device, cfg.batch_size, SCHEMES[cfg.loss]
    autocast = torch.autocast(device.split(":")[0], dtype=torch.bfloat16, enabled=cfg.dtype == "bf16")
    abar = make_schedule("cosine").to(device)
    g = torch.Generator(device=device).manual_seed(cfg.seed)
    x = torch.rand(B, cfg.channels, cfg.image_size, cfg.image_size, device=device, generator=g) * 2 - 1
    runs = {}
    for name in cfg.presets.split(","):
        knobs = scheme.make_knobs(name)
        torch.manual_seed(cfg.seed)
        model, fwd = build(cfg, knobs)
        opt = torch.optim.AdamW(model.parameters(), lr=1e-4, betas=(0.9, 0.95), fused=device.startswith("cuda"))
        runs[name] = dict(model=model, fwd=fwd, opt=opt, knobs=knobs, times=[],
                          flops=scheme.flops_per_image(model, knobs) if scheme.flops_per_image else 0)

    def step(r):
        with autocast:
            loss, _ = scheme.loss(r["fwd"], x, None, abar, r["knobs"])
        loss.backward()
        r["opt"].step()
        r["opt"].zero_grad(set_to_none=True)

    for i in range(cfg.warmup + cfg.steps):
        for r in runs.values():  # interleaved, so drifts in machine speed hit every preset alike
            sync(device)
            t0 = time.perf_counter()
            step(r)
            sync(device)
            if i >= cfg.warmup:
                r["times"].append(time.perf_counter() - t0)
    peak = peak_flops(device, cfg.dtype)
    base = statistics.median(runs["dit"]["times"]) if "dit" in runs else None
    print(f"training: {cfg.model} width {runs[next(iter(runs))]['model'].config.width} at "
          f"{cfg.image_size}x{cfg.image_size}x{cfg.channels}, batch {B}, {cfg.dtype}, "
          f"compile {cfg.compile}, {cfg.device}, {cfg.steps} timed steps after {cfg.warmup}")
    print(f"{'preset':8} {'ms/step med':>11} {'min':>8} {'img/s':>8} {'GFLOP/img':>10} {'TFLOP/s':>8} "
          f"{'MFU':>6} {'time/dit':>8} {'FLOPs/dit':>9}")
    results = {}
    for name, r in runs.items():
        med, low = statistics.median(r["times"]), min(r["times"])
        tflops = r["flops"] * B / med / 1e12
        results[name] = s = dict(ms_median=med * 1e3, ms_min=low * 1e3, images_per_s=B / med,
                                 gflop_per_image=r["flops"] / 1e9, tflops=tflops,
                                 mfu=tflops * 1e12 / peak if peak else None,
                                 time_ratio_to_dit=med / base if base else None,
                                 flop_ratio_to_dit=r["flops"] / runs["dit"]["flops"] if base else None)
        print(f"{name:8} {s['ms_median']:11.1f} {s['ms_min']:8.1f} {s['images_per_s']:8.1f} "
              f"{s['gflop_per_image']:10.2f} {tflops:8.3f} {fmt(s['mfu'], '.1%'):>6} "
              f"{fmt(s['time_ratio_to_dit'], '.3f'):>8} {fmt(s['flop_ratio_to_dit'], '.3f'):>9}")
    return results


def fmt(value, spec):
    return "-" if value is None else format(value, spec)


@torch.inference_mode()
def bench_sampling(cfg):
    """One DDIM step = one network evaluation of the batch (two with guidance, batched)."""
    device, n = cfg.device, cfg.sample_batch
    torch.manual_seed(cfg.seed)
    model, fwd = build(cfg, num_classes=1000)
    model.eval()
    autocast = torch.autocast(device.split(":")[0], dtype=torch.bfloat16, enabled=cfg.dtype == "bf16")
    x = torch.randn(n, cfg.channels, cfg.image_size, cfg.image_size, device=device)
    t = torch.full((n,), 500, device=device)
    y = torch.arange(n, device=device) % 1000
    calls = {"unguided": lambda: fwd(x, t, y), "guided": lambda: model.forward_with_cfg(x, t, y, 1.5)}
    times = {k: [] for k in calls}
    for i in range(2 + cfg.sample_evals):
        for name, call in calls.items():
            sync(device)
            t0 = time.perf_counter()
            with autocast:
                call()
            sync(device)
            if i >= 2:
                times[name].append(time.perf_counter() - t0)
    med = {k: statistics.median(v) for k, v in times.items()}
    print(f"sampling: batch {n}, {cfg.sample_evals} evaluations after 2 warm-up")
    for name in calls:
        print(f"{name:9} {med[name] * 1e3:9.1f} ms/step  {n / med[name]:9.1f} images x steps / s")
    ratio = med["guided"] / med["unguided"]
    print(f"guided / unguided step time: {ratio:.3f} (2.0 = the cost of the second half of the batch)")
    return {"ms_unguided": med["unguided"] * 1e3, "ms_guided": med["guided"] * 1e3, "guided_ratio": ratio}


def main(argv=None):
    cfg = parse_config(sys.argv[1:] if argv is None else argv, BenchConfig)
    check_values(cfg, [("batch_size steps sample_batch sample_evals", lambda v: v >= 1, ">= 1"),
                       ("warmup width", lambda v: v >= 0, ">= 0")],
                 {"loss": tuple(SCHEMES), "dtype": ("bf16", "fp32")})
    for name in cfg.presets.split(","):
        SCHEMES[cfg.loss].make_knobs(name)  # an unknown preset fails now, before any model is built
    if cfg.device.startswith("cuda"):
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    return {"training": bench_training(cfg), "sampling": bench_sampling(cfg)}


if __name__ == "__main__":
    if {"-h", "--help"} & set(sys.argv[1:]):
        sys.exit(print(help_text(BenchConfig, __doc__)))
    try:
        main()
    except ValueError as e:  # a bad key or value: one line, no traceback
        sys.exit(f"error: {e}")
