"""Food-101 -> data/food101/, a transfer dataset of the few-shot probe: 101 classes, the official split:
train = meta/train.txt (75,750 images), val = meta/test.txt (25,250). Each image is resized to --size
(default 64): the shorter side to S (bicubic, antialiased), then the centre crop. The 101,000 resized images
are held in memory while the archive is read (about 2.5 GB at 64x64, with the split arrays).

Usage (from the repo root):
    python data/food101/prepare.py                        # <out>/raw/food-101.tar.gz, else download (5 GB)
    python data/food101/prepare.py --src food-101.tar.gz  # the archive, read without extracting it
    python data/food101/prepare.py --src DIR              # the extracted food-101 folder (or its parent)

The official archive (md5 from torchvision) holds food-101/images/<class>/<id>.jpg and food-101/meta/
classes.txt (one class a line; labels follow its order), train.txt and test.txt (lines "<class>/<id>").
"""
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from data.common import cli, collect, fetch, prepare_parser, stack_images, text_lines, write_dataset  # noqa: E402

URL = "http://data.vision.ee.ethz.ch/cvl/food-101.tar.gz"
FILES = {"food-101.tar.gz": (URL, "md5", "85eeb15f3717b99a5da872d97d918f87")}


def want(parts):
    """images/<class>/<id>.jpg -> ("image", "<class>/<id>"); meta/<name>.txt -> ("file", "<name>.txt")."""
    if len(parts) >= 3 and parts[-3] == "images" and parts[-1].endswith(".jpg"):
        return "image", f"{parts[-2]}/{parts[-1].removesuffix('.jpg')}"
    ok = len(parts) >= 2 and parts[-2] == "meta" and parts[-1] in ("classes.txt", "train.txt", "test.txt")
    return ("file", parts[-1]) if ok else None


def main(argv=None):
    args = prepare_parser(__doc__, "food101").parse_args(argv)
    t0, out = time.time(), Path(args.out)
    src = args.src or fetch(FILES, out / "raw", "food101")
    images, files = collect(src, want, args.size, args.workers)
    classes = text_lines(files, "classes.txt", src)
    index, splits = {c: i for i, c in enumerate(classes)}, {}
    for split, name in (("train", "train.txt"), ("val", "test.txt")):
        keys = text_lines(files, name, src)
        bad = [k for k in keys if k.split("/")[0] not in index or k.count("/") != 1]
        if bad:
            raise ValueError(f"{src}: {name} should list <class>/<id> of the classes in classes.txt, got {bad[0]!r}")
        splits[split] = (stack_images(images, keys, src, name), [index[k.split("/")[0]] for k in keys])
    write_dataset(out, "food101", classes, splits, t0)


if __name__ == "__main__":
    cli(main)
