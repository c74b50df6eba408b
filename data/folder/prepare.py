"""Any tree of class subfolders of JPEG/PNG images -> data/folder/ (or --out), centre-cropped and resized.

Usage (from the repo root):
    python data/folder/prepare.py --src DIR [--size 64] [--gray] [--out DIR] [--name NAME]
                                  [--val_src DIR | --val_frac 0.1] [--seed 0] [--skip_bad] [--workers 4]

DIR/<class>/... : one subfolder per class (sorted names give labels 0..K-1), images searched recursively in
it (*.jpg, *.jpeg, *.png, any case; other files are ignored). Each image is cut to its central square and
resized to --size x --size (bicubic, antialiased); RGB unless --gray; 16-bit PNGs are scaled to 8 bits.
The val split is --val_src (same class folder names) or a per-class random --val_frac of DIR (default 0.1;
0 = no val split).
An unreadable image stops the run with its name, or is skipped with a warning under --skip_bad.
"""
import argparse
import os
import sys
import time
from multiprocessing import Pool
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from data.common import DATA_ROOT, SplitWriter, cli, dataset_writer, print_summary, write_meta  # noqa: E402

EXTS = {".jpg", ".jpeg", ".png"}


def list_tree(root):
    """{class name: sorted image paths} for the class subfolders of root."""
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"{root} is not a folder")
    tree = {d.name: sorted(f for f in d.rglob("*") if f.suffix.lower() in EXTS and f.is_file())
            for d in sorted(root.iterdir()) if d.is_dir() and not d.name.startswith(".")}
    if not tree:
        loose = sum(f.suffix.lower() in EXTS for f in root.iterdir())
        raise ValueError(f"{root} has no class subfolders (expected {root}/<class>/*.jpg)"
                         + (f"; it holds {loose} loose images: move them into class folders" if loose else ""))
    empty = [c for c, files in tree.items() if not files]
    if empty:
        raise ValueError(f"class folder(s) {', '.join(empty)} in {root} hold no JPEG/PNG images")
    return tree


def to_8bit(im):
    """16-bit grayscale PNGs open in mode I;16 (or I), which convert() would clip at 255: keep the high byte
    instead, as Pillow does when it opens a 16-bit RGB PNG as 8-bit RGB."""
    if not im.mode.startswith("I"):
        return im
    a = np.asarray(im)
    if a.min() < 0 or a.max() > 65535:
        raise ValueError(f"mode {im.mode} pixel values in [{a.min()}, {a.max()}], expected 16-bit 0..65535")
    return Image.fromarray((a >> 8).astype(np.uint8))


def load_image(job):
    """job = (path, size, PIL mode) -> ((size, size, C) uint8 array, None), or (None, error naming the file)."""
    path, size, mode = job
    try:
        with Image.open(path) as im:
            im = to_8bit(ImageOps.exif_transpose(im)).convert(mode)  # decoding happens here: bad data fails here
        w, h = im.size
        s = min(w, h)
        im = im.crop(((w - s) // 2, (h - s) // 2, (w - s) // 2 + s, (h - s) // 2 + s))
        a = np.asarray(im.resize((size, size), Image.BICUBIC), np.uint8)  # no-op when s == size
        return a.reshape(size, size, -1), None
    except Exception as e:  # PIL raises many kinds (OSError, SyntaxError, ValueError, ...)
        return None, f"cannot read image {path}: {type(e).__name__}: {e}"


def convert(items, out, split, args):
    """items: [(path, label)] -> <out>/<split>.npy; returns the number of images written."""
    mode, c = ("L", 1) if args.gray else ("RGB", 3)
    jobs = [(p, args.size, mode) for p, _ in items]
    pool = Pool(args.workers) if args.workers > 1 else None
    results = pool.imap(load_image, jobs, chunksize=64) if pool else map(load_image, jobs)
    labels = []
    try:
        with SplitWriter(out, split, (len(items), args.size, args.size, c)) as w:
            for (path, label), (img, err) in zip(items, results):
                if err and not args.skip_bad:
                    raise ValueError(err + " (pass --skip_bad to skip such files)")
                if err:
                    print(f"warning: skipping: {err}", file=sys.stderr)
                    continue
                w.images[len(labels)] = img
                labels.append(label)
                if len(labels) % 10000 == 0:
                    print(f"{split}: {len(labels)}/{len(items)} images")
            if not labels:
                raise ValueError(f"no readable image for the {split} split")
            w.close(np.array(labels))
    finally:
        if pool:
            pool.terminate()
    return len(labels)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--src", required=True, help="root of the class subfolders (train images)")
    p.add_argument("--size", type=int, default=64, help="output side length in pixels")
    p.add_argument("--gray", action="store_true", help="store 1-channel grayscale instead of RGB")
    p.add_argument("--val_src", help="root of the val class subfolders (instead of --val_frac)")
    p.add_argument("--val_frac", type=float, help="fraction of each class held out as val (default 0.1)")
    p.add_argument("--seed", type=int, default=0, help="seed of the --val_frac split")
    p.add_argument("--skip_bad", action="store_true", help="skip unreadable images with a warning")
    p.add_argument("--workers", type=int, default=min(8, os.cpu_count() or 1), help="decoding processes")
    p.add_argument("--out", default=str(DATA_ROOT / "folder"), help="output folder")
    p.add_argument("--name", help="dataset name in meta.json (default: the --src folder's name)")
    args = p.parse_args(argv)
    if args.val_src is not None and args.val_frac is not None:
        raise ValueError("give --val_src or --val_frac, not both")
    frac = 0.1 if args.val_frac is None else args.val_frac
    if args.size < 1 or not 0 <= frac < 1:
        raise ValueError(f"need --size >= 1 and 0 <= --val_frac < 1, got {args.size} and {frac}")
    t0, out = time.time(), Path(args.out)
    tree = list_tree(args.src)
    classes = list(tree)
    train, val = [], []
    if args.val_src is not None:
        val_tree = list_tree(args.val_src)
        unknown = sorted(set(val_tree) - set(tree))
        if unknown:
            raise ValueError(f"--val_src {args.val_src} has class folders missing from --src: {', '.join(unknown)}")
        val = [(f, classes.index(c)) for c, files in val_tree.items() for f in files]
        frac = 0
    rng = np.random.default_rng(args.seed)
    for label, files in enumerate(tree.values()):
        k = min(len(files) - 1, max(1, round(frac * len(files)))) if frac > 0 else 0
        held = set(rng.permutation(len(files))[:k].tolist())
        train += [(f, label) for i, f in enumerate(files) if i not in held]
        val += [(f, label) for i, f in enumerate(files) if i in held]
    channels = 1 if args.gray else 3
    name = args.name or Path(args.src).resolve().name
    with dataset_writer(out) as tmp:
        counts = {"train": convert(train, tmp, "train", args)}
        if val:
            counts["val"] = convert(val, tmp, "val", args)
        else:
            print("note: no val split (--val_frac 0 or one image per class)")
        meta = write_meta(tmp, name, classes, args.size, channels, counts)
    print_summary(out, meta, t0)


if __name__ == "__main__":
    cli(main)
