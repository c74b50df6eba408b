"""Oxford Flowers-102 -> data/flowers102/, a transfer dataset of the few-shot probe: 102 classes, the standard
split: train = trnid + valid (2 x 1,020 images, 10 + 10 of each class), val = tstid (6,149 images). Each image
is resized to --size (default 64): the shorter side to S (bicubic, antialiased), then the centre crop.

Usage (from the repo root):
    python data/flowers102/prepare.py              # the three files in <out>/raw/, else downloaded there
    python data/flowers102/prepare.py --src DIR    # DIR holds 102flowers.tgz (or its extracted jpg/ folder),
                                                   # imagelabels.mat and setid.mat

The official files (md5s from torchvision): 102flowers.tgz holds jpg/image_00001.jpg .. image_08189.jpg;
imagelabels.mat (MATLAB v5) `labels`, the class 1..102 of image i; setid.mat `trnid`, `valid`, `tstid`, the
1-based ids of the images of each split. The classes are named by their ids ("1" .. "102"): the official files
give no names.
"""
import re
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from data.common import cli, collect, fetch, load_mat, prepare_parser, stack_images, write_dataset  # noqa: E402

URL = "https://www.robots.ox.ac.uk/~vgg/data/flowers/102/"
FILES = {"102flowers.tgz": (URL + "102flowers.tgz", "md5", "52808999861908f626f3c1f4e79d11fa"),
         "imagelabels.mat": (URL + "imagelabels.mat", "md5", "e0620be6f572b9609742df49c70aed4d"),
         "setid.mat": (URL + "setid.mat", "md5", "a5357ecc9cb78c4bef273ce3793fc85c")}


def want(parts):
    """jpg/image_NNNNN.jpg -> ("image", its name); the two .mat files -> ("file", name)."""
    if len(parts) >= 2 and parts[-2] == "jpg" and re.fullmatch(r"image_\d{5}\.jpg", parts[-1]):
        return "image", parts[-1]
    return ("file", parts[-1]) if parts[-1] in ("imagelabels.mat", "setid.mat") else None


def main(argv=None):
    args = prepare_parser(__doc__, "flowers102").parse_args(argv)
    t0, out = time.time(), Path(args.out)
    src = args.src or fetch(FILES, out / "raw", "flowers102")
    images, files = collect(src, want, args.size, args.workers)
    labels = load_mat(files, "imagelabels.mat", ["labels"], src)["labels"].astype(np.int64) - 1
    ids = {k: v.astype(np.int64) for k, v in load_mat(files, "setid.mat", ["trnid", "valid", "tstid"], src).items()}
    if labels.min() < 0 or labels.max() > 101:
        raise ValueError(f"{src}: imagelabels.mat has labels in [{labels.min() + 1}, {labels.max() + 1}], "
                         f"expected 1..102")
    splits = {}
    for split, keys in (("train", np.concatenate([ids["trnid"], ids["valid"]])), ("val", ids["tstid"])):
        if keys.min(initial=1) < 1 or keys.max(initial=1) > len(labels):
            raise ValueError(f"{src}: setid.mat has image ids outside 1..{len(labels)} (imagelabels.mat's count)")
        names = [f"image_{i:05d}.jpg" for i in keys]
        splits[split] = (stack_images(images, names, src, f"setid.mat {split}"), labels[keys - 1])
    write_dataset(out, "flowers102", [str(i) for i in range(1, 103)], splits, t0)


if __name__ == "__main__":
    cli(main)
