"""STL-10 -> data/stl10/, a transfer dataset of the few-shot probe: train = the 5,000 labelled train images,
val = the 8,000 test images, 10 classes; the 100,000 unlabelled images are not used. The 96x96 images are
resized to --size (default 64; bicubic, antialiased; --size 96 keeps them as they are).

Usage (from the repo root):
    python data/stl10/prepare.py                            # <out>/raw/stl10_binary.tar.gz, else download
    python data/stl10/prepare.py --src stl10_binary.tar.gz  # the archive, read without extracting it
    python data/stl10/prepare.py --src DIR                  # the extracted stl10_binary folder (or its parent)

The binary version (md5 from torchvision): train_X.bin / test_X.bin hold N x 3 x 96 x 96 uint8 with each
channel plane stored column-major, train_y.bin / test_y.bin N uint8 labels 1..10, class_names.txt one name a line.
"""
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from data.common import cli, fetch, iter_tree, need_file, prepare_parser, resize_array, write_dataset  # noqa: E402

URL = "http://ai.stanford.edu/~acoates/stl10/stl10_binary.tar.gz"
FILES = {"stl10_binary.tar.gz": (URL, "md5", "91f7769df0f17e558f3565bffb0c7dfb")}
NAMES = ("train_X.bin", "train_y.bin", "test_X.bin", "test_y.bin", "class_names.txt")
CLASSES = ["airplane", "bird", "car", "cat", "deer", "dog", "horse", "monkey", "ship", "truck"]


def want(parts):
    return parts[-1] if parts[-1] in NAMES else None


def read_split(files, prefix, src):
    x = np.frombuffer(need_file(files, f"{prefix}_X.bin", src), np.uint8)
    y = np.frombuffer(need_file(files, f"{prefix}_y.bin", src), np.uint8)
    if len(x) != len(y) * 3 * 96 * 96 or len(y) == 0 or y.min() < 1 or y.max() > 10:
        got = f" in [{y.min()}, {y.max()}]" if len(y) else ""
        raise ValueError(f"{src}: {prefix}_X.bin holds {len(x)} bytes and {prefix}_y.bin {len(y)} labels{got}; "
                         f"expected N x 27648 bytes and N labels in [1, 10]")
    # (N, C, W, H): each channel column-major -> (N, H, W, C); labels 1..10 -> 0..9
    return x.reshape(-1, 3, 96, 96).transpose(0, 3, 2, 1), y.astype(np.int64) - 1


def main(argv=None):
    args = prepare_parser(__doc__, "stl10").parse_args(argv)
    t0, out = time.time(), Path(args.out)
    src = args.src or fetch(FILES, out / "raw", "stl10")
    files = dict(iter_tree(src, want))
    names = files["class_names.txt"].decode().splitlines() if "class_names.txt" in files else CLASSES
    classes = [c.strip() for c in names if c.strip()]
    if len(classes) != 10:
        raise ValueError(f"{src}: class_names.txt should hold 10 class names, it holds {len(classes)}")
    splits = {}
    for split, prefix in (("train", "train"), ("val", "test")):
        x, y = read_split(files, prefix, src)
        splits[split] = (np.ascontiguousarray(resize_array(x, args.size)), y)
    write_dataset(out, "stl10", classes, splits, t0)


if __name__ == "__main__":
    cli(main)
