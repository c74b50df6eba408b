"""Fashion-MNIST, the built-in default dataset -> data/fashion_mnist/ (32x32x1: the 28x28 images zero-padded).

Usage (from the repo root):
    python data/fashion_mnist/prepare.py                 # find the files (see below), else download them
    python data/fashion_mnist/prepare.py --src DIR       # DIR holds the four *-idx?-ubyte[.gz] files
    python data/fashion_mnist/prepare.py --out DIR       # write elsewhere than data/fashion_mnist/

Without --src the idx files are taken from /usr/share/datasets/fashion-mnist/ (Debian/Ubuntu package:
`apt-get install -y dataset-fashion-mnist`), else from <out>/raw/, else downloaded into <out>/raw/ from
the dataset's public URL. train = the 60,000 train-* images, val = the 10,000 t10k-* images.
"""
import argparse
import gzip
import sys
import time
import zlib
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from data.common import (DATA_ROOT, cli, dataset_writer, download, print_summary,  # noqa: E402
                         write_meta, write_split)

URL = "http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/"
SYSTEM_DIR = Path("/usr/share/datasets/fashion-mnist")
FILES = {  # name -> md5 of the upstream .gz (checked on download only; Debian re-gzipped its copies)
    "train-images-idx3-ubyte.gz": "8d4fb7e6c68d591d4c3dfef9ec88bf0d",
    "train-labels-idx1-ubyte.gz": "25c81989df183df01b3e8a0aad5dffbe",
    "t10k-images-idx3-ubyte.gz": "bef4ecab320f06d8554ea6380940ec79",
    "t10k-labels-idx1-ubyte.gz": "bb300cfdad3c16e7a12a480ee83cd310",
}
CLASSES = ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot"]


def find(d, name):
    """d/name, or its uncompressed twin, or None."""
    for p in (Path(d) / name, Path(d) / name.removesuffix(".gz")):
        if p.is_file():
            return p
    return None


def read_idx(path, ndim):
    """An idx file (MNIST format, uint8 data) as an array, with its header checked against its size."""
    try:
        raw = gzip.open(path).read() if path.suffix == ".gz" else path.read_bytes()
    except (OSError, EOFError, zlib.error) as e:
        raise ValueError(f"cannot read {path}: {e}") from None
    if len(raw) < 4 + 4 * ndim or raw[:3] != b"\0\0\x08" or raw[3] != ndim:
        raise ValueError(f"{path} is not a uint8 idx{ndim}-ubyte file (bad header)")
    dims = [int.from_bytes(raw[4 + 4 * i:8 + 4 * i], "big") for i in range(ndim)]
    if len(raw) != 4 + 4 * ndim + int(np.prod(dims)):
        raise ValueError(f"{path} is truncated or corrupt: its header says {dims} but it holds "
                         f"{len(raw) - 4 - 4 * ndim} data bytes")
    return np.frombuffer(raw, np.uint8, offset=4 + 4 * ndim).reshape(dims)


def locate(src, raw_dir):
    """The folder holding all four files: --src, the Debian package, the download cache, or a fresh download."""
    if src is not None:
        missing = [n for n in FILES if find(src, n) is None]
        if missing:
            raise FileNotFoundError(f"--src {src} lacks {', '.join(missing)} (gzipped or not)")
        return Path(src)
    for d in (SYSTEM_DIR, raw_dir):
        if all(find(d, n) for n in FILES):
            return d
    try:
        for name, md5 in FILES.items():
            if find(raw_dir, name) is None:
                download(URL + name, raw_dir / name, md5)
    except OSError as e:
        raise SystemExit(
            f"Fashion-MNIST: nothing found offline (looked in {SYSTEM_DIR} and {raw_dir}) and {e}\n"
            f"Get the files either way, then re-run:\n"
            f"  apt-get install -y dataset-fashion-mnist   (Debian/Ubuntu, as root; installs them in {SYSTEM_DIR})\n"
            f"  or put the four files {', '.join(FILES)} (from {URL}) in a folder DIR and run\n"
            f"  python data/fashion_mnist/prepare.py --src DIR") from None
    return raw_dir


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--src", help="folder holding the four idx files (default: search, then download)")
    p.add_argument("--out", default=str(DATA_ROOT / "fashion_mnist"), help="output folder")
    args = p.parse_args(argv)
    t0, out = time.time(), Path(args.out)
    src = locate(args.src, out / "raw")
    counts = {}
    with dataset_writer(out) as tmp:
        for split, prefix in (("train", "train"), ("val", "t10k")):
            x = read_idx(find(src, f"{prefix}-images-idx3-ubyte.gz"), 3)
            y = read_idx(find(src, f"{prefix}-labels-idx1-ubyte.gz"), 1).astype(np.int64)
            if x.shape[1:] != (28, 28) or len(x) != len(y) or y.max(initial=0) >= len(CLASSES):
                raise ValueError(f"{src}: {prefix}-* files hold images {x.shape} and {len(y)} labels in [0, "
                                 f"{y.max(initial=0)}]; expected N x 28 x 28 images and N labels in [0, 10)")
            write_split(tmp, split, np.pad(x, ((0, 0), (2, 2), (2, 2)))[..., None], y)
            counts[split] = len(x)
        meta = write_meta(tmp, "fashion_mnist", CLASSES, 32, 1, counts)
    print_summary(out, meta, t0)


if __name__ == "__main__":
    cli(main)
