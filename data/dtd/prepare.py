"""DTD, the Describable Textures Dataset -> data/dtd/, a transfer dataset of the few-shot probe: 47 classes,
split --partition (default 1) of the ten official ones: train = train1 + val1 (2 x 1,880 images, 40 + 40 of
each class), val = test1 (1,880). Each image is resized to --size (default 64): the shorter side to S (bicubic,
antialiased), then the centre crop.

Usage (from the repo root):
    python data/dtd/prepare.py                             # <out>/raw/dtd-r1.0.1.tar.gz, else download
    python data/dtd/prepare.py --src dtd-r1.0.1.tar.gz     # the archive, read without extracting it
    python data/dtd/prepare.py --src DIR                   # the extracted dtd folder (or its parent)

The official archive (md5 from torchvision) holds dtd/images/<class>/<name>.jpg and dtd/labels/train<k>.txt,
val<k>.txt, test<k>.txt, lines "<class>/<name>.jpg". Labels: the sorted class names.
"""
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from data.common import cli, collect, fetch, prepare_parser, stack_images, text_lines, write_dataset  # noqa: E402

URL = "https://www.robots.ox.ac.uk/~vgg/data/dtd/download/dtd-r1.0.1.tar.gz"
FILES = {"dtd-r1.0.1.tar.gz": (URL, "md5", "fff73e5086ae6bdbea199a49dfb8a4c1")}


def want(parts):
    """images/<class>/<name>.jpg -> ("image", "<class>/<name>.jpg"); labels/<list>.txt -> ("file", "<list>.txt")."""
    if len(parts) >= 3 and parts[-3] == "images" and parts[-1].lower().endswith(".jpg"):
        return "image", f"{parts[-2]}/{parts[-1]}"
    return ("file", parts[-1]) if len(parts) >= 2 and parts[-2] == "labels" and parts[-1].endswith(".txt") else None


def main(argv=None):
    p = prepare_parser(__doc__, "dtd")
    p.add_argument("--partition", type=int, default=1, choices=range(1, 11), help="official split 1..10 (default 1)")
    args = p.parse_args(argv)
    t0, out = time.time(), Path(args.out)
    src = args.src or fetch(FILES, out / "raw", "dtd")
    images, files = collect(src, want, args.size, args.workers)
    lists = {}
    for name in ("train", "val", "test"):
        fname = f"{name}{args.partition}.txt"
        lists[name] = text_lines(files, fname, src)
        bad = [line for line in lists[name] if line.count("/") != 1]
        if bad:
            raise ValueError(f"{src}: {fname} should list <class>/<name>.jpg, one a line; got {bad[0]!r}")
    classes = sorted({line.split("/")[0] for line in lists["train"] + lists["val"]})
    unknown = sorted({k.split("/")[0] for k in lists["test"]} - set(classes))
    if unknown:
        raise ValueError(f"{src}: test{args.partition}.txt has classes missing from train/val: {', '.join(unknown)}")
    index, splits = {c: i for i, c in enumerate(classes)}, {}
    for split, keys in (("train", lists["train"] + lists["val"]), ("val", lists["test"])):
        labels = [index[k.split("/")[0]] for k in keys]
        splits[split] = (stack_images(images, keys, src, split), labels)
    write_dataset(out, "dtd", classes, splits, t0)


if __name__ == "__main__":
    cli(main)
