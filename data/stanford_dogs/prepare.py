"""Stanford Dogs -> data/stanford_dogs/, a transfer dataset of the few-shot probe: 120 breeds, the official
split: train = train_list.mat (12,000 images, 100 of each breed), val = test_list.mat (8,580). Each image is
resized to --size (default 64): the shorter side to S (bicubic, antialiased), then the centre crop. Stanford
Dogs was built from ImageNet images: a model pre-trained on ImageNet may have seen some of its test images.

Usage (from the repo root):
    python data/stanford_dogs/prepare.py              # the two archives in <out>/raw/, else downloaded there
    python data/stanford_dogs/prepare.py --src DIR    # DIR holds images.tar and lists.tar (or what they
                                                      # extract to: Images/ and the .mat lists)

The official archives (sha256s from tfds): images.tar holds Images/<wnid>-<breed>/<wnid>_<n>.jpg; lists.tar
holds train_list.mat and test_list.mat (MATLAB v5), whose `file_list` names "<wnid>-<breed>/<file>.jpg".
Labels: the sorted folder names (the lists' own `labels` order, 1..120); class names: the breed part.
"""
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from data.common import cli, collect, fetch, load_mat, prepare_parser, stack_images, write_dataset  # noqa: E402

URL = "http://vision.stanford.edu/aditya86/ImageNetDogs/"
FILES = {"images.tar": (URL + "images.tar", "sha256",
                        "a443fc2f9a851aa1a7b8e4fa4af94b8459fce2c9f5a2f4dd4669cf9673a4ec58"),  # 793,579,520 bytes
         "lists.tar": (URL + "lists.tar", "sha256",
                       "34b47cacd9a98b5d150e084f24d29391c084c55272295ec65c85651bc35f4d6c")}  # 481,280 bytes


def want(parts):
    """Images/<folder>/<file>.jpg -> ("image", "<folder>/<file>.jpg"); the two lists -> ("file", name)."""
    if len(parts) >= 3 and parts[-3] == "Images" and parts[-1].endswith(".jpg"):
        return "image", f"{parts[-2]}/{parts[-1]}"
    return ("file", parts[-1]) if parts[-1] in ("train_list.mat", "test_list.mat") else None


def file_list(files, name, src):
    """The "<folder>/<file>.jpg" names of a list."""
    names = [str(n) for n in load_mat(files, name, ["file_list"], src)["file_list"]]
    bad = [n for n in names if n.count("/") != 1]
    if bad:
        raise ValueError(f"{src}: {name}'s file_list should name <folder>/<file>.jpg, got {bad[0]!r}")
    return names


def main(argv=None):
    args = prepare_parser(__doc__, "stanford_dogs").parse_args(argv)
    t0, out = time.time(), Path(args.out)
    src = args.src or fetch(FILES, out / "raw", "stanford_dogs")
    images, files = collect(src, want, args.size, args.workers)
    lists = {"train": file_list(files, "train_list.mat", src), "val": file_list(files, "test_list.mat", src)}
    folders = sorted({n.split("/")[0] for n in lists["train"]})
    unknown = sorted({n.split("/")[0] for n in lists["val"]} - set(folders))
    if unknown:
        raise ValueError(f"{src}: test_list.mat has classes missing from train_list.mat: {', '.join(unknown[:5])}")
    index = {c: i for i, c in enumerate(folders)}
    splits = {split: (stack_images(images, names, src, f"{split} list"), [index[n.split("/")[0]] for n in names])
              for split, names in lists.items()}
    write_dataset(out, "stanford_dogs", [c.split("-", 1)[-1] for c in folders], splits, t0)


if __name__ == "__main__":
    cli(main)
