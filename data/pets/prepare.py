"""Oxford-IIIT Pets -> data/pets/, a transfer dataset of the few-shot probe: 37 breeds, the official split:
train = trainval (3,680 images), val = test (3,669). Each image is resized to --size (default 64): the shorter
side to S (bicubic, antialiased), then the centre crop.

Usage (from the repo root):
    python data/pets/prepare.py              # the two archives in <out>/raw/, else downloaded there
    python data/pets/prepare.py --src DIR    # DIR holds images.tar.gz and annotations.tar.gz (or what they
                                             # extract to: images/ and annotations/)

The official archives (md5s from torchvision): images.tar.gz holds images/<Breed_name>_<n>.jpg;
annotations.tar.gz holds annotations/trainval.txt and test.txt, lines "<image id> <class 1..37> <species> <breed
id>" (e.g. "Abyssinian_100 1 1 1"; lines starting with # are comments). Class names: the image ids' breed part
("class <k>" for a class in no list).
Images in no list (the archive has a few) are not used, and may be unreadable.
"""
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from data.common import cli, collect, fetch, prepare_parser, stack_images, text_lines, write_dataset  # noqa: E402

URL = "https://www.robots.ox.ac.uk/~vgg/data/pets/data/"
FILES = {"images.tar.gz": (URL + "images.tar.gz", "md5", "5c4f3ee8e5d25df40f4fd59a7f44e54c"),
         "annotations.tar.gz": (URL + "annotations.tar.gz", "md5", "95a8c909bbe2e81eed6a22bccdf3f68f")}


def want(parts):
    """images/<id>.jpg -> ("image", id); annotations/{trainval,test}.txt -> ("file", name)."""
    if len(parts) >= 2 and parts[-2] == "images" and parts[-1].endswith(".jpg"):
        return "image", parts[-1].removesuffix(".jpg")
    ok = len(parts) >= 2 and parts[-2] == "annotations" and parts[-1] in ("trainval.txt", "test.txt")
    return ("file", parts[-1]) if ok else None


def read_list(files, name, src):
    """-> [(image id, class 0..36)] of an annotation list."""
    rows = []
    for line in text_lines(files, name, src):
        f = line.split()
        if f[0].startswith("#"):
            continue
        if len(f) != 4 or not f[1].isdigit() or not 1 <= int(f[1]) <= 37:
            raise ValueError(f"{src}: {name} should have lines '<image id> <class 1..37> <species> <breed id>', "
                             f"got {line!r}")
        rows.append((f[0], int(f[1]) - 1))
    return rows


def main(argv=None):
    args = prepare_parser(__doc__, "pets").parse_args(argv)
    t0, out = time.time(), Path(args.out)
    src = args.src or fetch(FILES, out / "raw", "pets")
    images, files = collect(src, want, args.size, args.workers)
    lists = {"train": read_list(files, "trainval.txt", src), "val": read_list(files, "test.txt", src)}
    names = {c: i.rsplit("_", 1)[0] for i, c in lists["train"] + lists["val"]}
    splits = {split: (stack_images(images, [i for i, _ in rows], src, split), [c for _, c in rows])
              for split, rows in lists.items()}
    write_dataset(out, "pets", [names.get(c, f"class {c + 1}") for c in range(37)], splits, t0)


if __name__ == "__main__":
    cli(main)
