"""CIFAR-100 (fine labels) -> data/cifar100/, a transfer dataset of the few-shot probe: train = the 50,000
train images, val = the 10,000 test images, 100 classes, stored at 32x32 (native; --size S resizes).

Usage (from the repo root):
    python data/cifar100/prepare.py                               # <out>/raw/cifar-100-python.tar.gz, else download
    python data/cifar100/prepare.py --src cifar-100-python.tar.gz # the archive, read without extracting it
    python data/cifar100/prepare.py --src DIR                     # the extracted cifar-100-python (or its parent)
    python data/cifar100/prepare.py --size 64 --out DIR           # resized (bicubic), written elsewhere

The official python version (md5 from torchvision): pickles train, test, meta of {b'data': N x 3072 uint8
channel planes, b'fine_labels': [...]} and {b'fine_label_names': [...]}, unpickled with CIFAR-10's allow-list
(numpy arrays only).
"""
import io
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from data.cifar10.prepare import SafeUnpickler  # noqa: E402
from data.common import (cli, fetch, iter_tree, need_file, planar_to_hwc, prepare_parser,  # noqa: E402
                         resize_array, write_dataset)

URL = "https://www.cs.toronto.edu/~kriz/cifar-100-python.tar.gz"
FILES = {"cifar-100-python.tar.gz": (URL, "md5", "eb9058c3a382ffc7106e4002c42a8d85")}


def unpickle(files, name, src):
    raw = need_file(files, name, src)
    try:
        d = SafeUnpickler(io.BytesIO(raw), encoding="bytes").load()
    except Exception as e:  # any unpickling failure means a corrupt or foreign file
        raise ValueError(f"{src}: {name} is not a CIFAR-100 python pickle ({e})") from None
    if not isinstance(d, dict):
        raise ValueError(f"{src}: {name} is not a CIFAR-100 python pickle (a {type(d).__name__}, not a dict)")
    return d


def read_split(files, name, src):
    d = unpickle(files, name, src)
    x, y = np.asarray(d.get(b"data")), np.asarray(d.get(b"fine_labels"))
    if (x.dtype != np.uint8 or x.shape[1:] != (3072,) or y.shape != (len(x),) or not np.issubdtype(y.dtype, np.integer)
            or y.min(initial=0) < 0 or y.max(initial=0) > 99):
        raise ValueError(f"{src}: {name} should hold b'data' uint8 (N, 3072) and N b'fine_labels' in [0, 100)")
    return planar_to_hwc(x, 32), y.astype(np.int64)


def want(parts):
    """train, test and meta, at the top of --src or in cifar-100-python/."""
    ok = parts[-1] in ("train", "test", "meta") and (len(parts) == 1 or parts[-2] == "cifar-100-python")
    return parts[-1] if ok else None


def main(argv=None):
    args = prepare_parser(__doc__, "cifar100", size=32).parse_args(argv)
    t0, out = time.time(), Path(args.out)
    src = args.src or fetch(FILES, out / "raw", "cifar100")
    files = dict(iter_tree(src, want))
    names = unpickle(files, "meta", src).get(b"fine_label_names")
    if not isinstance(names, list) or len(names) != 100:
        raise ValueError(f"{src}: meta should hold b'fine_label_names', a list of 100 class names")
    classes = [c.decode() if isinstance(c, bytes) else str(c) for c in names]
    splits = {}
    for split, name in (("train", "train"), ("val", "test")):
        x, y = read_split(files, name, src)
        splits[split] = (resize_array(x, args.size), y)
    write_dataset(out, "cifar100", classes, splits, t0)


if __name__ == "__main__":
    cli(main)
