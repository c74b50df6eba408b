"""A prepared pixel dataset -> its Stable Diffusion VAE latents, the data of latent=True training (data/vae.py).

Usage (from the repo root):
    python data/latent/prepare.py --src data/imagenet256 --vae PATH [--out data/imagenet256_latent]
    torchrun --nproc_per_node 8 data/latent/prepare.py --src data/imagenet256 --vae PATH   # a shard per rank

Every image of every split of --src (RGB, side a multiple of the VAE's 8x down-sampling) is encoded as it
is and horizontally flipped; the posterior mean and std of both are kept, float16 and unscaled (the layout
is in data/common.py), so training draws a fresh posterior sample every step and keeps flip augmentation.
--vae: a local folder in diffusers' layout (stabilityai/sd-vae-ft-ema or -mse), or that hub name where the
hub is reachable. Needs the optional package diffusers (pip install diffusers).

Resumable: rank r of W encodes images [r N / W, (r + 1) N / W) of each split into <out>/.latent-work/
<split>.<r>of<W>.npy, a memmap of its final shape, and counts the rows done in <split>.<r>of<W>.count
(written atomically after the rows are flushed, every few seconds). A killed run started again with the
same --src, --vae and number of ranks continues from there; anything else starts over. When every rank is
done, rank 0 merges the shards into <out> all at once (data.common.dataset_writer) and deletes the work folder.
"""
import argparse
import datetime
import json
import os
import shutil
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from data.common import atomic_write, dataset_writer, load_meta, load_split, write_meta  # noqa: E402
from data.vae import describe, encode, load_vae  # noqa: E402

COMMIT_SECONDS = 5.0  # the progress counter is written at most this often (and at the end of a shard)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--src", required=True, help="a prepared pixel dataset, e.g. data/imagenet256")
    p.add_argument("--vae", required=True, help="diffusers folder of the VAE (or a hub name, online)")
    p.add_argument("--out", help="output folder (default: <src>_latent)")
    p.add_argument("--batch_size", type=int, default=32, help="images per VAE call (twice that with the flips)")
    p.add_argument("--device", default=None, help="default: cuda:<local rank> where CUDA is available, else cpu")
    args = p.parse_args(argv)
    if args.batch_size < 1:
        raise ValueError(f"--batch_size must be >= 1, got {args.batch_size}")
    args.out = args.out or str(Path(args.src)) + "_latent"
    if Path(args.out).resolve() == Path(args.src).resolve():
        raise ValueError(f"--out {args.out} is --src: the latents go into another folder")
    return args


def shard(n, rank, world):
    return rank * n // world, (rank + 1) * n // world


def encode_shard(vae, images, lo, hi, latent_shape, work, name, batch_size, say):
    """images[lo:hi] and their flips -> work/<name>.npy float16 (hi - lo, 2, 2, h, w, C), resuming after
    the count in work/<name>.count."""
    npy, count = work / f"{name}.npy", work / f"{name}.count"
    shape = (hi - lo, 2, 2) + tuple(latent_shape)
    done = int(count.read_text()) if count.is_file() and npy.is_file() else 0
    if done:
        out = np.load(npy, mmap_mode="r+")
        if out.shape != shape or out.dtype != np.float16:
            done = 0
    if not done:
        need, free = 2 * int(np.prod(shape)), shutil.disk_usage(work).free
        if need > free:  # a memmap write to a full disk would end the process with SIGBUS
            raise OSError(f"{npy} needs {need / 1e9:.1f} GB but {work} has {free / 1e9:.1f} GB free")
        out = np.lib.format.open_memmap(npy, mode="w+", dtype=np.float16, shape=shape)
    elif done < len(out):
        say(f"  {name}: resuming after {done} of {len(out)} images")
    t0, last, start = time.time(), 0.0, done
    for i in range(lo + done, hi, batch_size):
        j = min(i + batch_size, hi)
        x = np.asarray(images[i:j])
        mean, std = encode(vae, np.concatenate([x, x[:, :, ::-1]]), batch_size=2 * len(x))
        n = len(x)
        out[i - lo:j - lo] = np.stack([np.stack([mean[:n], std[:n]], 1), np.stack([mean[n:], std[n:]], 1)], 1)
        if time.time() - last >= COMMIT_SECONDS or j == hi:
            out.flush()
            atomic_write(count, lambda f: f.write(str(j - lo).encode()))
            last, rate = time.time(), (j - lo - start) / max(time.time() - t0, 1e-9)
            say(f"  {name}: {j - lo}/{hi - lo} images, {rate:.1f} img/s, ETA {(hi - j) / max(rate, 1e-9):.0f} s")
    if not count.is_file():  # nothing left to encode (an empty shard)
        atomic_write(count, lambda f: f.write(str(len(out)).encode()))
    del out


def merge(args, meta, splits, vae, world, work, say):
    """Rank 0, once every shard is done: the shards, labels and meta.json into args.out at once."""
    with dataset_writer(args.out) as tmp:
        for split, n in splits.items():
            names = [f"{split}.{r}of{world}" for r in range(world)]
            for r, name in enumerate(names):
                lo, hi = shard(n, r, world)
                f = work / f"{name}.count"
                if not f.is_file() or int(f.read_text()) != hi - lo:
                    raise RuntimeError(f"{work / name}.npy (rank {r} of {world}) is not complete; run again")
            if world == 1:
                os.replace(work / f"{names[0]}.npy", tmp / f"{split}.npy")
            else:
                first = np.load(work / f"{names[0]}.npy", mmap_mode="r")
                full = np.lib.format.open_memmap(tmp / f"{split}.npy", mode="w+", dtype=np.float16,
                                                 shape=(n,) + first.shape[1:])
                for r, name in enumerate(names):
                    part, (lo, _) = np.load(work / f"{name}.npy", mmap_mode="r"), shard(n, r, world)
                    for k in range(0, len(part), 4096):
                        full[lo + k:lo + k + len(part[k:k + 4096])] = part[k:k + 4096]
                full.flush()
                del full
            labels = load_split(args.src, split)[1]
            atomic_write(tmp / f"{split}_labels.npy", lambda f: np.save(f, labels))
            say(f"  {split}: {n} images merged")
        h = meta["image_size"] // describe(vae, args.vae)["downsample"]
        info = {**describe(vae, args.vae), "source": str(args.src), "pixel_size": meta["image_size"]}
        out_meta = write_meta(tmp, f"{meta['name']}_latent", meta["classes"], h, info["channels"], splits, latent=info)
    shutil.rmtree(work, ignore_errors=True)
    return out_meta


def run(args, rank=0, world=1, barrier=lambda: None):
    """Rank `rank` of `world`: its shard of every split, then (rank 0) the merge. -> meta.json's dict (rank 0)."""
    say = (lambda m: print(m, file=sys.stderr, flush=True)) if rank == 0 else (lambda m: None)
    t0 = time.time()
    meta = load_meta(args.src)
    if "latent" in meta:
        raise ValueError(f"--src {args.src} is a latent dataset already; give the pixel dataset it was made from")
    device = args.device or (f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}" if torch.cuda.is_available() else "cpu")
    vae = load_vae(args.vae, device)
    ds, s = describe(vae, args.vae)["downsample"], meta["image_size"]
    if meta["channels"] != 3 or s % ds:
        raise ValueError(f"--src {args.src} holds {s}x{s}x{meta['channels']} images; the VAE takes RGB images whose "
                         f"side is a multiple of {ds}")
    splits = dict(meta["splits"])
    work = Path(args.out) / ".latent-work"
    files = {sp: [os.path.getsize(Path(args.src) / f"{sp}.npy"), os.stat(Path(args.src) / f"{sp}.npy").st_mtime_ns]
             for sp in splits}
    key = {"src": str(Path(args.src).resolve()), "files": files, "vae": str(args.vae), "world": world}
    if rank == 0:
        old = work / "key.json"
        if old.is_file() and json.loads(old.read_text()) != key:
            say(f"{work} holds the work of another run (other --src, --vae or number of ranks): starting over")
            shutil.rmtree(work)
        work.mkdir(parents=True, exist_ok=True)
        atomic_write(work / "key.json", lambda f: f.write(json.dumps(key).encode()))
    barrier()
    work.mkdir(parents=True, exist_ok=True)
    say(f"{args.src} -> {args.out}: {splits} images of {s}x{s} through {args.vae} on {device}, {world} rank(s)")
    for split, n in splits.items():
        images = load_split(args.src, split)[0]
        lo, hi = shard(n, rank, world)
        encode_shard(vae, images, lo, hi, (s // ds, s // ds, describe(vae, args.vae)["channels"]), work,
                     f"{split}.{rank}of{world}", args.batch_size, say)
    barrier()
    if rank != 0:
        return None
    out_meta = merge(args, meta, splits, vae, world, work, say)
    h, c = out_meta["image_size"], out_meta["channels"]
    say(f"{out_meta['name']}: {splits} latents of {h}x{h}x{c} (x2: flips; mean and std) -> {args.out} "
        f"({time.time() - t0:.1f} s)")
    return out_meta


def main(argv=None):
    args = parse_args(argv)
    world, rank = int(os.environ.get("WORLD_SIZE", 1)), int(os.environ.get("RANK", 0))
    if world == 1:
        return run(args)
    dist.init_process_group("gloo", timeout=datetime.timedelta(hours=12))  # ranks wait for the slowest shard
    try:
        return run(args, rank, world, dist.barrier)
    finally:
        dist.destroy_process_group()


if __name__ == "__main__":
    try:
        main()
    except (ValueError, OSError, ImportError, RuntimeError) as e:
        sys.exit(f"error: {e}")
