"""CIFAR-10 from the canonical python batches -> data/cifar10/ (32x32x3, train 50,000, val = test 10,000).

Usage (from the repo root):
    python data/cifar10/prepare.py                               # <out>/raw/cifar-10-python.tar.gz, else download
    python data/cifar10/prepare.py --src cifar-10-python.tar.gz  # the archive, read without extracting it
    python data/cifar10/prepare.py --src DIR                     # the extracted cifar-10-batches-py (or its parent)
    python data/cifar10/prepare.py --out DIR                     # write elsewhere than data/cifar10/

The batches (data_batch_1..5, test_batch, batches.meta) are pickles of {b'data': N x 3072 uint8 channel
planes, b'labels': [...]}; they are unpickled with an allow-list (numpy arrays only), not plain pickle.load.
"""
import argparse
import io
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


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--src", help="cifar-10-python.tar.gz or the extracted cifar-10-batches-py folder")
    p.add_argument("--out", default=str(DATA_ROOT / "cifar10"), help="output folder")
    args = p.parse_args(argv)
    t0, out = time.time(), Path(args.out)
    src = args.src
    if src is None:
        src = out / "raw" / "cifar-10-python.tar.gz"
        if not src.is_file():
            try:
                download(URL, src, MD5, timeout=60)
            except OSError as e:
                raise SystemExit(f"CIFAR-10: nothing found offline (looked for {src}) and {e}\n"
                                 f"Fetch cifar-10-python.tar.gz from {URL} yourself and run\n"
                                 f"  python data/cifar10/prepare.py --src cifar-10-python.tar.gz") from None
    read = open_batches(src)
    classes, counts = class_names(read, src), {}
    with dataset_writer(out) as tmp:
        for split, names in SPLITS.items():
            x, y = read_split(read, names, src)
            write_split(tmp, split, x, y)
            counts[split] = len(x)
        meta = write_meta(tmp, "cifar10", classes, 32, 3, counts)
    print_summary(out, meta, t0)


if __name__ == "__main__":
    cli(main)
