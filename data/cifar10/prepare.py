"""CIFAR-10 -> data/cifar10/ (32x32x3): from the canonical python batches (train 50,000, val = test 10,000),
or from a JPEG-bytes npz of the train split (train 45,000, val 5,000 held out of it).

Usage (from the repo root):
    python data/cifar10/prepare.py                               # <out>/raw/cifar-10-python.tar.gz, else download
    python data/cifar10/prepare.py --src cifar-10-python.tar.gz  # the archive, read without extracting it
    python data/cifar10/prepare.py --src DIR                     # the extracted cifar-10-batches-py (or its parent)
    python data/cifar10/prepare.py --src FILE.npz [--val_frac 0.1] [--seed 0]   # a JPEG-bytes npz
    python data/cifar10/prepare.py --out DIR                     # write elsewhere than data/cifar10/

The batches (data_batch_1..5, test_batch, batches.meta) are pickles of {b'data': N x 3072 uint8 channel
planes, b'labels': [...]}; they are unpickled with an allow-list (numpy arrays only), not plain pickle.load.

A JPEG-bytes npz holds `jpeg` uint8 (every image's JPEG file joined end to end), `offsets` int64 (N + 1,)
(image i is jpeg[offsets[i]:offsets[i + 1]]), `labels` (N,), `classes` str (C,) and `paths` str (N,); the
images are decoded with Pillow (RGB). It holds the train split only, so the val split is held out of it:
class-balanced, round(val_frac * n_c) images of each class c, drawn by default_rng(seed).permutation of the
class's indices (in class order); both splits keep the file's order. --val_frac 0 writes no val split.
"""
import argparse
import io
import zipfile
import pickle
import sys
import tarfile
import time
import zlib
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from data.common import (DATA_ROOT, cli, dataset_writer, download, planar_to_hwc,  # noqa: E402
                         print_summary, write_meta, write_split)

URL = "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz"
MD5 = "c58f30108f718f92721af3b95e74349a"
SPLITS = {"train": [f"data_batch_{i}" for i in range(1, 6)], "val": ["test_batch"]}
CLASSES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]


class SafeUnpickler(pickle.Unpickler):
    ALLOWED = {("numpy", "ndarray"), ("numpy", "dtype"), ("_codecs", "encode"),
               ("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
               ("numpy.core.numeric", "_frombuffer"), ("numpy._core.numeric", "_frombuffer")}

    def find_class(self, module, name):
        if (module, name) not in self.ALLOWED:
            raise pickle.UnpicklingError(f"refusing to load {module}.{name}")
        return super().find_class(module, name)


def open_batches(src):
    """A function name -> bytes of that batch file (or None), reading a tar.gz or a folder."""
    src = Path(src)
    if src.is_file():  # one pass through the archive (seeking back in a .gz would decompress it again)
        wanted = set(sum(SPLITS.values(), ["batches.meta"]))
        try:
            with tarfile.open(src) as tar:
                files = {Path(m.name).name: tar.extractfile(m).read() for m in tar
                         if m.isfile() and Path(m.name).name in wanted}
        except (tarfile.TarError, OSError, EOFError, zlib.error) as e:
            raise ValueError(f"cannot read the archive {src}: {e}") from None
        return files.get
    if not src.is_dir():
        raise FileNotFoundError(f"--src {src} does not exist")
    d = src / "cifar-10-batches-py" if (src / "cifar-10-batches-py").is_dir() else src
    return lambda name: (d / name).read_bytes() if (d / name).is_file() else None


def unpickle(raw, name, src):
    if raw is None:
        raise FileNotFoundError(f"{src} holds no {name} (expected data_batch_1..5 and test_batch)")
    try:
        return SafeUnpickler(io.BytesIO(raw), encoding="bytes").load()
    except Exception as e:  # any unpickling failure means a corrupt or foreign file
        raise ValueError(f"{src}: {name} is not a CIFAR-10 python batch ({e})") from None


def read_split(read, names, src):
    xs, ys = [], []
    for name in names:
        d = unpickle(read(name), name, src)
        x, y = (np.asarray(d.get(k)) for k in (b"data", b"labels")) if isinstance(d, dict) else (None, None)
        if (x is None or x.dtype != np.uint8 or x.shape[1:] != (3072,) or y.shape != (len(x),)
                or not np.issubdtype(y.dtype, np.integer) or y.min(initial=0) < 0 or y.max(initial=0) > 9):
            raise ValueError(f"{src}: {name} should hold b'data' uint8 (N, 3072) and N b'labels' in [0, 10)")
        xs.append(x)
        ys.append(y.astype(np.int64))
    return planar_to_hwc(np.concatenate(xs), 32), np.concatenate(ys)


def class_names(read, src):
    """From batches.meta when present, else the standard names."""
    raw = read("batches.meta")
    if raw is None:
        return CLASSES
    meta = unpickle(raw, "batches.meta", src)
    names = meta.get(b"label_names") if isinstance(meta, dict) else None
    if not isinstance(names, list) or len(names) != 10:
        raise ValueError(f"{src}: batches.meta should hold b'label_names', a list of 10 class names")
    return [c.decode() if isinstance(c, bytes) else str(c) for c in names]


# ---- a JPEG-bytes npz of the train split ----------------------------------------------------------
def read_jpeg_npz(src):
    """-> (images uint8 (N, 32, 32, 3), labels int64 (N,), class names) from a JPEG-bytes npz."""
    from PIL import Image
    try:
        with np.load(src) as d:
            missing = [k for k in ("jpeg", "offsets", "labels", "classes") if k not in d]
            if missing:
                raise ValueError(f"{src}: a JPEG-bytes npz needs jpeg, offsets, labels and classes; it lacks "
                                 f"{', '.join(missing)} (has {sorted(d)})")
            jpeg, offsets, labels, classes = d["jpeg"], d["offsets"], d["labels"], d["classes"]
            paths = d["paths"] if "paths" in d else None
    except (OSError, EOFError, zipfile.BadZipFile, zlib.error) as e:
        raise ValueError(f"cannot read {src} as an npz ({e})") from None
    n = len(labels)
    if jpeg.dtype != np.uint8 or jpeg.ndim != 1:
        raise ValueError(f"{src}: jpeg must be a 1-D uint8 array of JPEG bytes, got {jpeg.dtype} {jpeg.shape}")
    if (offsets.ndim != 1 or not np.issubdtype(offsets.dtype, np.integer) or len(offsets) != n + 1
            or offsets[0] != 0 or offsets[-1] != len(jpeg) or (np.diff(offsets) <= 0).any()):
        raise ValueError(f"{src}: offsets must be N + 1 = {n + 1} increasing integers from 0 to len(jpeg) = "
                         f"{len(jpeg)}; got {offsets.dtype} {offsets.shape}")
    if (labels.ndim != 1 or not np.issubdtype(labels.dtype, np.integer) or n == 0
            or labels.min() < 0 or labels.max() >= len(classes)):
        raise ValueError(f"{src}: labels must be N >= 1 class ids in [0, {len(classes)}) (len(classes)); "
                         f"got {labels.dtype} {labels.shape}" + (f", range [{labels.min()}, {labels.max()}]" if n else ""))
    images = np.empty((n, 32, 32, 3), np.uint8)
    for i in range(n):
        name = f"image {i}" + (f" ({paths[i]})" if paths is not None and len(paths) == n else "")
        try:
            with Image.open(io.BytesIO(jpeg[offsets[i]:offsets[i + 1]].tobytes())) as im:
                a = np.asarray(im.convert("RGB"))
        except Exception as e:  # Pillow raises many kinds for bad data
            raise ValueError(f"{src}: cannot decode {name}: {type(e).__name__}: {e}") from None
        if a.shape != (32, 32, 3):
            raise ValueError(f"{src}: {name} is {a.shape[1]}x{a.shape[0]}, expected CIFAR-10's 32x32")
        images[i] = a
    return images, labels.astype(np.int64), [str(c) for c in classes]


def class_balanced_split(labels, val_frac, seed):
    """(train indices, val indices), both sorted: round(val_frac * n_c) of each class c to val,
    the first ones of default_rng(seed).permutation of the class's indices, classes in order."""
    rng, val = np.random.default_rng(seed), []
    for c in np.unique(labels):
        idx = np.flatnonzero(labels == c)
        val.append(rng.permutation(idx)[:round(val_frac * len(idx))])
    val = np.sort(np.concatenate(val))
    return np.setdiff1d(np.arange(len(labels)), val), val


def is_npz(src):
    return Path(src).suffix == ".npz" or Path(src).is_file() and zipfile.is_zipfile(src)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--src", help="cifar-10-python.tar.gz, the extracted cifar-10-batches-py folder, or a "
                                 "JPEG-bytes npz (train split only)")
    p.add_argument("--out", default=str(DATA_ROOT / "cifar10"), help="output folder")
    p.add_argument("--val_frac", type=float, default=None,
                   help="JPEG-bytes npz: share of each class held out as val (default 0.1; 0: no val split)")
    p.add_argument("--seed", type=int, default=0, help="JPEG-bytes npz: seed of the val split")
    args = p.parse_args(argv)
    t0, out = time.time(), Path(args.out)
    src = args.src
    if src is not None and is_npz(src):
        return prepare_npz(src, out, 0.1 if args.val_frac is None else args.val_frac, args.seed, t0)
    if args.val_frac is not None:
        raise ValueError("--val_frac applies to a JPEG-bytes npz only: the python batches have their own "
                         "test split, written as val")
    if src is None:
        src = out / "raw" / "cifar-10-python.tar.gz"
        if not src.is_file():
            try:
                download(URL, src, MD5, timeout=60)
            except OSError as e:
                raise SystemExit(f"CIFAR-10: nothing found offline (looked for {src}) and {e}\n"
                                 f"Fetch cifar-10-python.tar.gz from {URL} yourself and run\n"
                                 f"  python data/cifar10/prepare.py --src cifar-10-python.tar.gz\n"
                                 f"or, with a JPEG-bytes npz of the train split (val is held out of it):\n"
                                 f"  python data/cifar10/prepare.py --src FILE.npz") from None
    read = open_batches(src)
    classes, counts = class_names(read, src), {}
    with dataset_writer(out) as tmp:
        for split, names in SPLITS.items():
            x, y = read_split(read, names, src)
            write_split(tmp, split, x, y)
            counts[split] = len(x)
        meta = write_meta(tmp, "cifar10", classes, 32, 3, counts)
    print_summary(out, meta, t0)


def prepare_npz(src, out, val_frac, seed, t0):
    if not 0 <= val_frac < 1:
        raise ValueError(f"--val_frac must be in [0, 1), got {val_frac}")
    x, y, classes = read_jpeg_npz(src)
    train, val = class_balanced_split(y, val_frac, seed)
    if len(train) == 0:
        raise ValueError(f"--val_frac {val_frac} leaves no training image of the {len(y)} in {src}")
    with dataset_writer(out) as tmp:
        counts = {}
        for split, idx in (("train", train), ("val", val)):
            if len(idx):
                write_split(tmp, split, x[idx], y[idx])
                counts[split] = len(idx)
        meta = write_meta(tmp, "cifar10", classes, 32, 3, counts)
    print_summary(out, meta, t0)


if __name__ == "__main__":
    cli(main)
