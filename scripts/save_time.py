"""How long a checkpoint write takes, to size SLURM's --signal lead (docs/cluster.md): train.py's own
writer (infra.checkpoint.save_checkpoint: fp32 weights, EMA and AdamW's two moments, written to a
temporary file, fsynced, renamed) on a model of the size you train, into a folder of your choice.

    python scripts/save_time.py --model B/4 --image_size 64 --channels 3 --dir /shared/out
    python scripts/save_time.py --model L/2 --image_size 32 --channels 4 --dir /shared/out  # SD latents

--dir should be on the filesystem of out_dir. The model is built on the CPU (no GPU needed; a GPU run
also copies the tensors to the host first) and AdamW's state is filled with tensors of the real sizes.
It needs about 4 x 4 bytes per parameter of memory (L/2: 10 GB) and as much free disk.
"""
import argparse
import copy
import os
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

import train  # noqa: E402
from corrupt import SCHEMES  # noqa: E402
from infra.checkpoint import save_checkpoint  # noqa: E402
from model import UMD, ModelConfig  # noqa: E402


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="B/4", help="<variant>/<patch> of model.VARIANTS (default B/4)")
    p.add_argument("--image_size", type=int, default=64, help="pixels, or latent size (default 64)")
    p.add_argument("--channels", type=int, default=3, help="3 (RGB) or 4 (SD latents) (default 3)")
    p.add_argument("--dir", default=str(ROOT / "out"), help="where to write (the filesystem of out_dir)")
    p.add_argument("--repeat", type=int, default=3, help="writes to time (default 3)")
    args = p.parse_args(argv)
    if args.repeat < 1:
        p.error(f"--repeat must be >= 1, got {args.repeat}")
    os.makedirs(args.dir, exist_ok=True)
    if not os.access(args.dir, os.W_OK):
        p.error(f"--dir {args.dir} is not writable")
    return args


def main(argv=None):
    args = parse_args(argv)
    cfg = train.Config(model=args.model, out_dir=args.dir, loss="umd", preset="umd", device="cpu")
    model = UMD(ModelConfig.from_name(args.model, image_size=args.image_size, channels=args.channels))
    ema = copy.deepcopy(model).requires_grad_(False)
    opt = train.make_optimizer(model, cfg, 1e-4, fused=False)
    for p in model.parameters():  # AdamW's state after a step: two moments of every weight, fp32
        w = p.detach()
        opt.state[p] = {"step": torch.tensor(1.0), "exp_avg": w.clone(), "exp_avg_sq": w.square()}
    knobs = SCHEMES["umd"].make_knobs("umd")
    path, times = Path(args.dir) / f"save_time_{os.getpid()}.pt", []
    print(f"{args.model} at {args.image_size}x{args.image_size}x{args.channels}: "
          f"{model.num_params() / 1e6:.0f}M params; writing {path}", flush=True)
    try:
        for i in range(args.repeat):
            t0 = time.perf_counter()
            save_checkpoint(path, model, ema, opt, 1, cfg, knobs, knobs)
            times.append(time.perf_counter() - t0)
            size = path.stat().st_size
            print(f"write {i + 1}: {size / 1e9:.2f} GB in {times[-1]:.1f} s "
                  f"({size / 1e9 / times[-1]:.2f} GB/s)", flush=True)
    finally:
        path.unlink(missing_ok=True)
    print(f"checkpoint {size / 1e9:.2f} GB: median {statistics.median(times):.1f} s, max {max(times):.1f} s")
    return {"bytes": size, "seconds": times}


if __name__ == "__main__":
    main()
