"""Downsampled ImageNet 64x64 -> data/imagenet64/ (64x64x3, 1000 classes, train 1,281,167, val 50,000).

Usage (from the repo root):
    python data/imagenet64/prepare.py --src DIR [--out DIR] [--partial]

DIR (searched recursively, so the unzipped Imagenet64_train_part1/, _part2/ and Imagenet64_val/ folders may
sit under it) holds the official npz files of "Downsampled ImageNet 64x64" (image-net.org, Chrabaszcz et al.
2017): train_data_batch_1.npz .. train_data_batch_10.npz and val_data.npz, each with 'data' N x 12288 uint8
(the R, G and B planes of a 64x64 image) and 'labels' 1..1000. They need an ImageNet login, so they are not
downloaded. --partial converts whichever train batches are present (for a quick subset).
Class names come from a map_clsloc.txt under DIR (lines like "n01440764 449 tench") if there is one,
else they are the official label numbers "1".."1000". train.npy (15.7 GB) is written batch by batch
through a memory map, so only one batch (1.6 GB) is in RAM at a time.
"""
import argparse
import sys
import time
import zipfile
import zlib
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from data.common import (DATA_ROOT, SplitWriter, cli, dataset_writer, planar_to_hwc,  # noqa: E402
                         print_summary, write_meta)

TRAIN = [f"train_data_batch_{i}.npz" for i in range(1, 11)]
VAL = "val_data.npz"
SIZE, NUM_CLASSES = 64, 1000


def load(path, key):
    try:
        with np.load(path) as d:
            return d[key]
    except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile, zlib.error) as e:
        raise ValueError(f"cannot read '{key}' from {path} ({e!r}); is it an official downsampled-ImageNet npz?") \
            from None


def read_labels(path):
    y = load(path, "labels")
    if y.ndim != 1 or not np.issubdtype(y.dtype, np.integer) or y.min(initial=1) < 1 or y.max(initial=1) > 1000:
        raise ValueError(f"{path}: 'labels' should be 1-D integers in 1..1000 (1-based), got {y.dtype} {y.shape}"
                         f" in [{y.min(initial=0)}, {y.max(initial=0)}]")
    return y.astype(np.int64) - 1


def convert(files, out, split):
    """Write one split batch by batch; returns its size."""
    labels = [read_labels(f) for f in files]  # a first, cheap pass gives N and checks every label file
    n = sum(map(len, labels))
    with SplitWriter(out, split, (n, SIZE, SIZE, 3)) as w:
        i = 0
        for f, y in zip(files, labels):
            x = load(f, "data")
            if x.dtype != np.uint8 or x.shape != (len(y), 3 * SIZE * SIZE):
                raise ValueError(f"{f}: 'data' should be uint8 ({len(y)}, {3 * SIZE * SIZE}) to match its "
                                 f"{len(y)} labels, got {x.dtype} {x.shape}")
            w.images[i:i + len(x)] = planar_to_hwc(x, SIZE)
            i += len(x)
            print(f"{split}: {f.name} done, {i}/{n} images")
        w.close(np.concatenate(labels))
    return n


def class_names(found):
    names = [str(i) for i in range(1, NUM_CLASSES + 1)]
    if "map_clsloc.txt" in found:
        for line in found["map_clsloc.txt"].read_text().splitlines():
            parts = line.split()
            if len(parts) == 3 and parts[1].isdigit() and 1 <= int(parts[1]) <= NUM_CLASSES:
                names[int(parts[1]) - 1] = parts[2]
    return names


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--src", required=True, help="folder holding the official npz files (searched recursively)")
    p.add_argument("--out", default=str(DATA_ROOT / "imagenet64"), help="output folder")
    p.add_argument("--partial", action="store_true", help="convert only the train batches present")
    args = p.parse_args(argv)
    t0, out, src = time.time(), Path(args.out), Path(args.src)
    if not src.is_dir():
        raise FileNotFoundError(f"--src {src} is not a folder")
    found = {}
    for f in sorted(src.rglob("*")):
        if f.name in TRAIN + [VAL, "map_clsloc.txt"]:
            if f.name in found:
                raise ValueError(f"{f.name} found twice under {src}: {found[f.name]} and {f}")
            found[f.name] = f
    missing = [n for n in TRAIN + [VAL] if n not in found and not (args.partial and n in TRAIN)]
    if missing or not any(n in found for n in TRAIN):
        raise FileNotFoundError(f"{src} lacks {', '.join(missing or ['every train_data_batch_*.npz'])} "
                                f"(the official downsampled ImageNet 64x64 npz files)")
    with dataset_writer(out) as tmp:
        n_val = convert([found[VAL]], tmp, "val")  # val first: it is small, so bad input shows up early
        n_train = convert([found[n] for n in TRAIN if n in found], tmp, "train")
        meta = write_meta(tmp, "imagenet64", class_names(found), SIZE, 3, {"train": n_train, "val": n_val})
    print_summary(out, meta, t0)


if __name__ == "__main__":
    cli(main)
