"""The on-disk dataset format, shared by the prepare scripts and by train.py, probe.py and fid.py.

A prepared dataset is a folder, by default data/<name>/, holding
    train.npy         uint8 (N, H, W, C) with H == W and C in {1, 3}, read memory-mapped
    train_labels.npy  int64 (N,), values in [0, num_classes)
    val.npy, val_labels.npy   the same for the held-out split
    meta.json         {"name", "image_size", "channels", "num_classes", "classes", "splits": {split: N}}
A latent dataset (data/latent/prepare.py: a pixel dataset through Stable Diffusion's VAE, data/vae.py) has
the same files; its <split>.npy is float16 (N, 2, 2, h, w, C): [:, 0] the image, [:, 1] its horizontal flip,
each [mean, std] of the VAE posterior (unscaled); image_size is h, channels C, and meta.json also holds
    "latent": {"vae", "scale", "channels", "downsample", "source", "pixel_size"}  (the VAE, its scale, the pixels)
Every file is written to a temporary name first and then renamed, so a crash leaves no half-written file.

A prepare script changes a dataset folder all at once or not at all (`dataset_writer`): it writes every
file into a fresh folder <out>/.tmp-prepare-<pid>/ and only when all of them are written moves them into
<out>: first the old meta.json is deleted, then the split files are renamed in, then meta.json. A run that
fails (a bad input, a full disk, Ctrl-C) leaves the old dataset whole; a crash during the few renames
leaves a folder without meta.json, which load_split refuses (naming the prepare command), never a mix of
old and new splits. Only the files of the dataset are replaced: <out> may also hold raw/ downloads or the
prepare script itself. A temporary folder left by a killed run is deleted by the next run into <out>.
"""
import argparse
import contextlib
import errno
import hashlib
import http.client
import io
import json
import os
import shutil
import sys
import tarfile
import time
import urllib.request
import uuid
import zlib
from multiprocessing import Pool
from pathlib import Path, PurePosixPath

import numpy as np

REPO_ROOT = Path(__file__).resolve().parents[1]
DATA_ROOT = REPO_ROOT / "data"
SCRIPTS = {"fashion_mnist": "", "cifar10": "", "imagenet64": " --src DIR", "folder": " --src DIR",
           "cifar100": "", "stl10": "", "flowers102": "", "dtd": "", "pets": "", "food101": "",
           "stanford_dogs": ""}  # the last seven: transfer datasets of the few-shot probe


def prepare_hint(data_dir):
    """The command that (re)makes data_dir, for error messages."""
    d = Path(data_dir)
    if d.name in SCRIPTS:
        cmd = f"python data/{d.name}/prepare.py{SCRIPTS[d.name]}"
        return cmd if d.resolve() == (DATA_ROOT / d.name).resolve() else cmd + f" --out {d}"
    if d.name.endswith("_latent"):  # data/latent/prepare.py's default --out
        return f"python data/latent/prepare.py --src {d.with_name(d.name.removesuffix('_latent'))} --vae PATH"
    return f"python data/<name>/prepare.py --out {d}  (<name>: {', '.join(SCRIPTS)})"


# ----------------------------------------------------------------------------- writing

def _tmp(path):
    """A temporary name beside path, unique per writer (two processes never share one)."""
    path = Path(path)
    return path.with_name(f".{path.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp")


def remove_stale_temps(folder, owned=(), min_age_s=600):
    """Delete the temporary files (_tmp's names) in folder that writers killed mid-write left: those of the
    files in `owned`, which only the caller writes (it holds a lock on folder), and the others whose writer
    pid is dead and that were not written to for min_age_s (a pid on a shared filesystem may be another
    node's). Another live process's temporary file is left alone. -> names deleted."""
    gone = []
    for tmp in Path(folder).glob(".*.tmp"):
        target, _, rest = tmp.name[1:-len(".tmp")].rpartition(".")  # .<name>.<pid>.<hex8>.tmp
        target, _, pid = target.rpartition(".")
        if not (pid.isdigit() and len(rest) == 8):
            continue
        with contextlib.suppress(OSError):  # (deleted meanwhile)
            if target in owned or not _alive(int(pid)) and time.time() - tmp.stat().st_mtime >= min_age_s:
                tmp.unlink()
                gone.append(tmp.name)
    return gone


def atomic_write(path, write):
    """write(f) into a temporary file beside path, fsync, then rename over path: a reader sees
    the old file or the new one, never half of one. On any failure the temporary file is removed
    and path is left as it was; a full disk is reported as such."""
    path = Path(path)
    tmp = _tmp(path)
    try:
        with open(tmp, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as e:
        size = tmp.stat().st_size if tmp.exists() else 0
        tmp.unlink(missing_ok=True)
        if _disk_full(e, path.parent, size):
            kept = f"the previous {path.name} is kept" if path.exists() else f"no {path.name} was written"
            raise OSError(getattr(e, "errno", None) or errno.ENOSPC,
                          f"could not write {path}: the disk is full (or a quota or file size limit was hit) "
                          f"after {size / 1e6:.1f} MB had been written ({e}); {kept}") from None
        raise
    return path


def _disk_full(e, folder, written, margin=16 << 20):
    """Whether a failed write of `written` bytes into folder hit a full disk. torch.save reports one as
    RuntimeError('... unexpected pos ...'), not as ENOSPC, so any error counts when, with the partial file
    deleted again, the folder has hardly more free space than those bytes."""
    if isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG):
        return True
    try:
        return isinstance(e, Exception) and shutil.disk_usage(folder).free < written + margin
    except OSError:
        return False


def _save_atomic(path, arr):
    atomic_write(path, lambda f: np.save(f, arr))


def _check_shape(shape, what):
    if len(shape) != 4 or shape[1] != shape[2] or shape[3] not in (1, 3) or min(shape[1:]) < 1:
        raise ValueError(f"{what}: expected images of shape (N, S, S, C) with C 1 or 3, got {tuple(shape)}")


def _check_labels(labels, n, what):
    labels = np.asarray(labels)
    if n == 0:
        raise ValueError(f"{what}: the split is empty (0 images)")
    if labels.ndim != 1 or not np.issubdtype(labels.dtype, np.integer):
        raise ValueError(f"{what}: labels must be a 1-D integer array, got {labels.dtype} {labels.shape}")
    if len(labels) != n:
        raise ValueError(f"{what}: {n} images but {len(labels)} labels")
    if labels.min() < 0:
        raise ValueError(f"{what}: negative label {labels.min()}")
    return labels.astype(np.int64)


def write_split(out_dir, split, images, labels):
    """Write <split>.npy (uint8 N,H,W,C) and <split>_labels.npy (int64) into out_dir."""
    what = f"{split} split for {out_dir}"
    if not isinstance(images, np.ndarray) or images.dtype != np.uint8:
        raise ValueError(f"{what}: images must be a uint8 numpy array, got {getattr(images, 'dtype', type(images))}")
    _check_shape(images.shape, what)
    labels = _check_labels(labels, len(images), what)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    _save_atomic(out / f"{split}_labels.npy", labels)
    _save_atomic(out / f"{split}.npy", images)


class SplitWriter:
    """Write a split too big for RAM row by row into a memory-mapped temporary .npy:
        with SplitWriter(out, "train", (N, S, S, C)) as w:
            w.images[i:j] = ...
            w.close(labels)      # keeps the first len(labels) rows (fewer when inputs were skipped)
    Leaving the block without close() deletes the temporary file."""

    def __init__(self, out_dir, split, shape):
        self.what, self.out, self.split = f"{split} split for {out_dir}", Path(out_dir), split
        _check_shape(shape, self.what)
        if shape[0] < 1:
            raise ValueError(f"{self.what}: the split is empty (0 images)")
        self.out.mkdir(parents=True, exist_ok=True)
        need, free = int(np.prod(shape)), shutil.disk_usage(self.out).free
        if need > free:  # a memmap write to a full disk would kill the process with SIGBUS
            raise OSError(f"{self.what}: needs {need / 1e9:.1f} GB but {self.out} has {free / 1e9:.1f} GB free")
        self.tmp = _tmp(self.out / f"{split}.npy")
        self.images = np.lib.format.open_memmap(self.tmp, mode="w+", dtype=np.uint8, shape=tuple(shape))

    def close(self, labels):
        n = len(labels)
        labels = _check_labels(labels, n, self.what)
        if n > len(self.images):
            raise ValueError(f"{self.what}: {n} labels for {len(self.images)} images")
        if n < len(self.images):  # copy the rows kept into a smaller file, in chunks
            tmp2 = self.tmp.with_name(self.tmp.stem + "b.npy")
            small = np.lib.format.open_memmap(tmp2, mode="w+", dtype=np.uint8, shape=(n,) + self.images.shape[1:])
            for i in range(0, n, 4096):
                small[i:i + 4096] = self.images[i:min(i + 4096, n)]
            self.abort()
            self.tmp, self.images = tmp2, small
        self.images.flush()
        self.images = None
        _save_atomic(self.out / f"{self.split}_labels.npy", labels)
        os.replace(self.tmp, self.out / f"{self.split}.npy")
        self.tmp = None

    def abort(self):
        self.images = None
        if self.tmp is not None:
            self.tmp.unlink(missing_ok=True)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.abort()


def write_meta(out_dir, name, classes, image_size, channels, splits, **extra):
    """Write meta.json (extra keys too, e.g. latent={...}); returns the dict written."""
    meta = {"name": name, "image_size": int(image_size), "channels": int(channels),
            "num_classes": len(classes), "classes": [str(c) for c in classes],
            "splits": {k: int(v) for k, v in splits.items()}, **extra}
    atomic_write(Path(out_dir) / "meta.json", lambda f: f.write((json.dumps(meta, indent=1) + "\n").encode()))
    return meta


def _split_files(d):
    """The split files that d/meta.json lists ([] without a readable one)."""
    try:
        return [f"{s}{x}.npy" for s in json.loads((d / "meta.json").read_text())["splits"] for x in ("", "_labels")]
    except (OSError, ValueError, KeyError, TypeError):
        return []


def _alive(pid):
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        pass
    return True


@contextlib.contextmanager
def dataset_writer(out_dir):
    """with dataset_writer(out) as tmp: write_split(tmp, ...) ...; write_meta(tmp, ...)
    The files go into a fresh temporary folder inside out and replace out's dataset files only when the
    block ends without an error (see the module docstring); the temporary folder is always removed."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    for old in out.glob(".tmp-prepare-*"):  # left by a killed run
        pid = old.name.removeprefix(".tmp-prepare-")
        if pid.isdigit() and not _alive(int(pid)):
            shutil.rmtree(old, ignore_errors=True)
    tmp = out / f".tmp-prepare-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        yield tmp
        new = _split_files(tmp)
        missing = [n for n in new + ["meta.json"] if not (tmp / n).is_file()]
        if missing or not new:
            raise RuntimeError(f"dataset_writer: {tmp} lacks {', '.join(missing or ['meta.json'])}; "
                               f"{out} was left as it was")
        old = _split_files(out)
        (out / "meta.json").unlink(missing_ok=True)  # from here on load_split refuses out until the end
        for name in new:
            os.replace(tmp / name, out / name)
        for name in set(old) - set(new):
            (out / name).unlink(missing_ok=True)
        os.replace(tmp / "meta.json", out / "meta.json")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


# ----------------------------------------------------------------------------- reading

def load_meta(data_dir):
    """Read and check data_dir/meta.json."""
    d = Path(data_dir)
    path = d / "meta.json"
    if not d.is_dir():
        raise FileNotFoundError(f"data dir {d} does not exist; make it with `{prepare_hint(d)}`")
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing; (re)make the dataset with `{prepare_hint(d)}`")
    try:
        meta = json.loads(path.read_text())
        ok = (isinstance(meta["image_size"], int) and meta["image_size"] > 0
              and (meta["channels"] in (1, 3) or isinstance(meta.get("latent"), dict)
                   and meta["channels"] == meta["latent"].get("channels"))
              and meta["num_classes"] == len(meta["classes"]) > 0 and isinstance(meta["splits"], dict))
    except (ValueError, KeyError, TypeError) as e:
        raise ValueError(f"{path} is not a valid meta.json ({e!r}); re-make it with `{prepare_hint(d)}`") from None
    if not ok:
        raise ValueError(f"{path} is not a valid meta.json: need image_size > 0, channels 1 or 3 (latents: "
                         f"latent.channels), num_classes == len(classes) > 0 and a splits dict; got {meta}")
    return meta


def _np_load(path, hint, **kw):
    try:
        return np.load(path, **kw)
    except (ValueError, OSError, EOFError) as e:
        raise ValueError(f"{path} is corrupt or truncated ({e}); re-make it with `{hint}`") from None


def load_split(data_dir, split="train"):
    """Return (images, labels, meta): images a read-only memmap uint8 (N, H, W, C) (latent data: float16
    (N, 2, 2, h, w, C), see the module docstring), labels int64 (N,)."""
    d = Path(data_dir)
    meta = load_meta(d)
    hint = prepare_hint(d)
    if split not in meta["splits"]:
        raise FileNotFoundError(f"{d} has no '{split}' split (meta.json lists {sorted(meta['splits'])}); "
                                f"make it with `{hint}`")
    ipath, lpath = d / f"{split}.npy", d / f"{split}_labels.npy"
    for p in (ipath, lpath):
        if not p.is_file():
            raise FileNotFoundError(f"{p} is missing; re-make the dataset with `{hint}`")
    x = _np_load(ipath, hint, mmap_mode="r")
    y = _np_load(lpath, hint)
    want = (np.float16, 6, (2, 2)) if "latent" in meta else (np.uint8, 4, x.shape[1:3])
    if (x.dtype, x.ndim, x.shape[1:3]) != want:
        raise ValueError(f"{ipath} holds {x.dtype} {x.shape}, expected "
                         + ("float16 (N, 2, 2, h, w, C) latents" if "latent" in meta else "uint8 (N, H, W, C)"))
    if y.dtype != np.int64 or y.ndim != 1:
        raise ValueError(f"{lpath} holds {y.dtype} {y.shape}, expected int64 (N,)")
    if len(x) == 0:
        raise ValueError(f"{ipath} is empty (0 images); re-make it with `{hint}`")
    if len(x) != len(y):
        raise ValueError(f"{ipath} holds {len(x)} images but {lpath} holds {len(y)} labels")
    s, c, k = meta["image_size"], meta["channels"], meta["num_classes"]
    if x.shape[-3:] != (s, s, c):
        raise ValueError(f"{ipath} holds {'x'.join(map(str, x.shape[-3:]))} images "
                         f"but {d / 'meta.json'} says {s}x{s}x{c}")
    if meta["splits"][split] != len(x):
        raise ValueError(f"{ipath} holds {len(x)} images but {d / 'meta.json'} says {meta['splits'][split]}")
    if y.min() < 0 or y.max() >= k:
        raise ValueError(f"{lpath} has labels in [{y.min()}, {y.max()}] but meta.json has {k} classes "
                         f"(labels must lie in [0, {k}))")
    return x, y, meta


def fingerprint(data_dir, images, labels, meta, split="train", rows=256):
    """A cheap identity of a prepared split, recorded in checkpoints: meta.json's name, split counts and
    class names, the size of <split>.npy and a hash of `rows` fixed rows (evenly spaced) and their labels.
    It tells a folder re-prepared with other images (same counts) apart in milliseconds, at any size."""
    idx = np.unique(np.linspace(0, len(images) - 1, rows).round().astype(np.int64))
    h = hashlib.sha256(np.ascontiguousarray(images[idx]).tobytes())
    h.update(np.asarray(labels)[idx].tobytes())
    return {"name": meta["name"], "splits": dict(meta["splits"]), "classes": list(meta["classes"]),
            "bytes": os.path.getsize(Path(data_dir) / f"{split}.npy"), "sample_sha256": h.hexdigest()[:16]}


def check_geometry(meta, image_size, channels, where):
    """Raise a clear error when the data (meta) and the config disagree; None means 'take the data's'."""
    s, c = meta["image_size"], meta["channels"]
    want_s = s if image_size is None else image_size
    want_c = c if channels is None else channels
    if (want_s, want_c) != (s, c):
        raise ValueError(f"data dir {where} holds {s}x{s}x{c} images but the config asks for "
                         f"{want_s}x{want_s}x{want_c}")


# ----------------------------------------------------------------------------- the models' input

def to_model_input(images, size, channels):
    """uint8 (N, H, W, C) -> float (N, C, size, size) in [-1, 1]; other sizes: the probe preprocessing, the
    shorter side resized to int(size * 256 / 246) (bilinear, antialiased), then the central crop."""
    import torch.nn.functional as F  # lazy: the prepare scripts need no torch
    from model import from_uint8
    x = from_uint8(images)
    if x.shape[1] != channels:
        raise ValueError(f"the data has {x.shape[1]} channel(s) but the model expects {channels}")
    h, w = x.shape[2:]
    if (h, w) != (size, size):
        short = int(size * 256 / 246)
        nh, nw = max(short, round(h * short / min(h, w))), max(short, round(w * short / min(h, w)))
        x = F.interpolate(x, size=(nh, nw), mode="bilinear", antialias=True, align_corners=False)
        top, left = (nh - size) // 2, (nw - size) // 2
        x = x[:, :, top:top + size, left:left + size].clamp(-1, 1)
    return x


def load_probe_data(data_dir, pool=None, max_test=None):
    """-> (x, y, train_idx, tx, ty, test_idx, meta, test description) for probe.py: train and test images
    and labels, the indices of the train pool and the test set (val, else the last 10% of train) into them.
    pool / max_test keep a fixed random subset (default_rng(0), sorted), so a class-sorted file still has
    all classes."""
    x, y, meta = load_split(data_dir, "train")
    if "val" in meta["splits"]:
        tx, ty, _ = load_split(data_dir, "val")
        test_name, train_idx, test_idx = "val", np.arange(len(x)), np.arange(len(ty))
    else:  # hold out the last 10% of train
        n_test = max(1, len(x) // 10)
        test_name, tx, ty = f"last {n_test} of train (no val split)", x, y
        train_idx, test_idx = np.arange(len(x) - n_test), np.arange(len(x) - n_test, len(x))

    def subset(idx, n):
        keep = n is None or n >= len(idx)
        return idx if keep else np.sort(np.random.default_rng(0).choice(idx, n, replace=False))
    train_idx, test_idx = subset(train_idx, pool), subset(test_idx, max_test)
    if len(np.unique(y[train_idx])) < 2:
        raise ValueError(f"{data_dir}: the train pool holds fewer than 2 classes; a probe needs 2 or more")
    return x, y, train_idx, tx, ty, test_idx, meta, test_name


class Rows:
    """Lazy rows idx of a (memory-mapped) array: feature extraction reads one batch at a time."""

    def __init__(self, array, idx):
        self.array, self.idx = array, idx

    def __len__(self):
        return len(self.idx)

    def __getitem__(self, s):
        return self.array[self.idx[s]]


# ----------------------------------------------------------------------------- prepare-script helpers

def planar_to_hwc(data, size, channels=3):
    """(N, C*S*S) rows of channel planes (CIFAR, downsampled ImageNet) -> (N, S, S, C) view."""
    return data.reshape(len(data), channels, size, size).transpose(0, 2, 3, 1)


def file_digest(path, algo):
    """Hex digest of a file by a hashlib algorithm ("md5", "sha256"), read in 1 MB blocks."""
    h = hashlib.new(algo)
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def download(url, dest, md5=None, timeout=30, sha256=None):
    """Fetch url to dest (through a .part file), checking the length the server announced and md5 or sha256
    if given; any failure raises OSError naming url and dest, and leaves no file behind."""
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    part = dest.with_name(dest.name + ".part")
    print(f"downloading {url} -> {dest}")
    try:
        with urllib.request.urlopen(url, timeout=timeout) as r, open(part, "wb") as f:
            while block := r.read(1 << 20):
                f.write(block)
            length = r.headers.get("Content-Length")
        if length is not None and part.stat().st_size != int(length):
            raise OSError(f"truncated: {part.stat().st_size} of the {length} bytes announced")
        for algo, want in (("md5", md5), ("sha256", sha256)):
            if want is not None and (got := file_digest(part, algo)) != want:
                raise OSError(f"checksum mismatch ({algo} {got}, expected {want})")
        os.replace(part, dest)
    except (OSError, ValueError, http.client.HTTPException) as e:  # URLError, timeouts, bad URLs, short reads
        part.unlink(missing_ok=True)
        raise OSError(f"download of {url} to {dest} failed: {e}") from None


def print_summary(out_dir, meta, t0):
    s, c = meta["image_size"], meta["channels"]
    counts = ", ".join(f"{k} {v}" for k, v in meta["splits"].items())
    print(f"{meta['name']}: {counts} images of {s}x{s}x{c}, {meta['num_classes']} classes "
          f"-> {out_dir} ({time.time() - t0:.1f} s)")


def cli(main):
    """Run a prepare script's main(): bad input ends with a one-line error instead of a traceback."""
    try:
        main()
    except (ValueError, OSError) as e:  # FileNotFoundError is an OSError
        sys.exit(f"error: {e}")


# ----------------------------------------------------------------------------- transfer-dataset helpers
# The transfer prepare scripts (cifar100, stl10, flowers102, dtd, pets, food101, stanford_dogs) read the
# official archives in one pass, never extracting them, and keep each image resized to S x S.

def _positive(s):
    if not s.isdigit() or int(s) < 1:
        raise argparse.ArgumentTypeError(f"must be an integer >= 1, got {s!r}")
    return int(s)


def prepare_parser(doc, name, size=64):
    """The arguments every transfer prepare script takes: --src, --size, --out, --workers."""
    p = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--src", help="the downloaded archive, or a folder holding the archives or their extracted "
                                 "files (default: <out>/raw/, downloading what is missing)")
    p.add_argument("--size", type=_positive, default=size, help=f"output side S: the shorter side resized to S, then "
                                                          f"the centre crop (default {size})")
    p.add_argument("--out", default=str(DATA_ROOT / name), help="output folder")
    p.add_argument("--workers", type=_positive, default=min(8, os.cpu_count() or 1), help="image-decoding processes")
    return p


def fetch(files, raw_dir, name):
    """files: {file name: (url, algo, hex digest)}. Downloads the ones missing from raw_dir into it, each
    checked (download); returns raw_dir. A failure names the file, its URL and how to go on without."""
    raw_dir = Path(raw_dir)
    for fname, (url, algo, digest) in files.items():
        if not (raw_dir / fname).is_file():
            try:
                download(url, raw_dir / fname, timeout=60, **{algo: digest})
            except OSError as e:
                raise OSError(f"{name}: {e}\nFetch {' and '.join(files)} yourself into {raw_dir} and re-run, or "
                              f"into a folder DIR and run `python data/{name}/prepare.py --src DIR`") from None
    return raw_dir


def iter_tree(src, want):
    """Yield (key, bytes) for each file of src that want(path parts) maps to a key (None: skip it). src is a
    tar archive, read in one pass, or a folder walked recursively where tar archives are read the same way.
    Hidden files and folders (., e.g. macOS ._ files) are skipped."""
    src = Path(src)
    if not src.exists():
        raise FileNotFoundError(f"--src {src} does not exist")
    if src.is_dir():
        for p in sorted(src.rglob("*")):
            parts = p.relative_to(src).parts
            if not p.is_file() or _hidden(parts):
                continue
            if p.name.endswith((".tar", ".tar.gz", ".tgz")):
                yield from iter_tree(p, want)
            elif (key := want(parts)) is not None:
                yield key, p.read_bytes()
        return
    try:
        with tarfile.open(src) as tar:
            for m in tar:
                parts = PurePosixPath(m.name).parts
                if m.isfile() and not _hidden(parts) and (key := want(parts)) is not None:
                    yield key, tar.extractfile(m).read()
    except (tarfile.TarError, OSError, EOFError, zlib.error) as e:
        raise ValueError(f"cannot read the archive {src} (truncated, or not a tar archive): {e}") from None


def _hidden(parts):
    return any(s.startswith(".") for s in parts)


def resize_crop(im, size):
    """PIL image -> (size, size, C) uint8: the shorter side resized to size (bicubic, antialiased), then the
    central crop."""
    from PIL import Image
    w, h = im.size
    nw, nh = max(size, round(w * size / min(w, h))), max(size, round(h * size / min(w, h)))
    if (nw, nh) != (w, h):
        im = im.resize((nw, nh), Image.BICUBIC)
    left, top = (nw - size) // 2, (nh - size) // 2
    return np.asarray(im.crop((left, top, left + size, top + size)), np.uint8)


def resize_array(x, size):
    """uint8 (N, H, W, 3) -> (N, size, size, 3) by resize_crop; x itself when it already has that size."""
    from PIL import Image
    if x.shape[1:3] == (size, size):
        return x
    return np.stack([resize_crop(Image.fromarray(a), size) for a in x])


def decode_image(job):
    """(encoded bytes, size, name) -> RGB (size, size, 3) uint8 by resize_crop (EXIF orientation ignored, as
    torchvision and tfds do), or the error message naming the image (a str)."""
    from PIL import Image
    data, size, name = job
    try:
        with Image.open(io.BytesIO(data)) as im:
            return resize_crop(im.convert("RGB"), size)
    except Exception as e:  # Pillow raises many kinds for bad data
        return f"cannot decode {name}: {type(e).__name__}: {e}"


def collect(src, want, size, workers=1):
    """One pass over src (iter_tree): want(path parts) -> ("image", key), ("file", key) or None. Returns
    ({key: decode_image result}, {key: bytes}); an image that fails to decode holds its error message, raised
    only if a split uses it (stack_images). Holds N x size x size x 3 bytes of images in memory."""
    images, files, batch = {}, {}, []
    pool = Pool(workers) if workers > 1 else None

    def flush():
        jobs = [(data, size, f"{src}: {key}") for key, data in batch]
        images.update(zip([k for k, _ in batch], pool.map(decode_image, jobs) if pool else map(decode_image, jobs)))
        batch.clear()
        print(f"  {len(images)} images decoded", file=sys.stderr)

    try:
        for (kind, key), data in iter_tree(src, want):
            if kind == "file":
                files[key] = data
            else:
                batch.append((key, data))
                if len(batch) >= 512 * workers:
                    flush()
        flush()
    finally:
        if pool:
            pool.terminate()
    return images, files


def need_file(files, name, src):
    if name not in files:
        raise FileNotFoundError(f"{src} holds no {name}")
    return files[name]


def load_mat(files, name, keys, src):
    """{key: 1-D array} of the variables keys of a MATLAB v5 .mat file of files (scipy.io.loadmat)."""
    import scipy.io
    try:
        mat = scipy.io.loadmat(io.BytesIO(need_file(files, name, src)), squeeze_me=True)
    except (ValueError, TypeError, OSError, NotImplementedError) as e:  # scipy's errors for a bad .mat
        raise ValueError(f"{src}: {name} is not a readable MATLAB .mat file ({type(e).__name__}: {e})") from None
    missing = [k for k in keys if k not in mat]
    if missing:
        raise ValueError(f"{src}: {name} lacks {', '.join(missing)} (it holds {sorted(k for k in mat if k[0] != '_')})")
    return {k: np.atleast_1d(mat[k]) for k in keys}


def text_lines(files, name, src):
    """The non-blank lines of a text file of files, stripped."""
    return [line.strip() for line in need_file(files, name, src).decode().splitlines() if line.strip()]


def stack_images(images, keys, src, what):
    """The images of keys as one (N, S, S, 3) array; an error names the missing or undecodable ones."""
    if not keys:
        raise ValueError(f"{src}: the {what} list is empty")
    missing = [k for k in keys if k not in images]
    if missing:
        raise FileNotFoundError(f"{src}: {len(missing)} image(s) of the {what} list are missing, e.g. "
                                f"{', '.join(map(str, missing[:3]))}")
    bad = [images[k] for k in keys if isinstance(images[k], str)]
    if bad:
        raise ValueError(f"{src}: {len(bad)} image(s) of the {what} list cannot be read, e.g. {bad[0]}")
    x = np.empty((len(keys),) + images[keys[0]].shape, np.uint8)
    for i, k in enumerate(keys):
        x[i] = images[k]
    return x


def write_dataset(out, name, classes, splits, t0):
    """splits: {split: (uint8 images, labels)} -> the dataset folder out (dataset_writer), with a summary."""
    with dataset_writer(out) as tmp:
        for split, (x, y) in splits.items():
            write_split(tmp, split, x, y)
        meta = write_meta(tmp, name, classes, x.shape[1], x.shape[3], {k: len(v[1]) for k, v in splits.items()})
    print_summary(out, meta, t0)
    return meta
