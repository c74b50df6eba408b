"""Tests of the dataset format (data/common.py) and the prepare scripts, on tiny inputs in the real formats."""
import gzip
import hashlib
import importlib.util
import io
import json
import pickle
import sys
import tarfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from data.common import check_geometry, load_split, write_meta, write_split

ROOT = Path(__file__).resolve().parent


def script(name):
    """Import data/<name>/prepare.py as a module."""
    spec = importlib.util.spec_from_file_location(f"prepare_{name}", ROOT / "data" / name / "prepare.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod  # so that worker processes can find its functions
    spec.loader.exec_module(mod)
    return mod


# ----------------------------------------------------------------------------- load_split / write_split

def make_ds(d, n=4, size=8, c=3, k=3):
    x = np.random.default_rng(0).integers(0, 256, (n, size, size, c), dtype=np.uint8)
    y = np.arange(n) % k
    write_split(d, "train", x, y)
    write_meta(d, "toy", [f"c{i}" for i in range(k)], size, c, {"train": n})
    return x, y


def test_roundtrip(tmp_path):
    x, y = make_ds(tmp_path)
    xi, yi, meta = load_split(tmp_path)
    assert isinstance(xi, np.memmap) and xi.dtype == np.uint8 and yi.dtype == np.int64
    assert (xi == x).all() and (yi == y).all()
    assert meta == {"name": "toy", "image_size": 8, "channels": 3, "num_classes": 3,
                    "classes": ["c0", "c1", "c2"], "splits": {"train": 4}}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["meta.json", "train.npy", "train_labels.npy"]


@pytest.mark.parametrize("images, labels, msg", [
    (np.zeros((2, 8, 8, 3), np.float32), [0, 1], "uint8"),
    (np.zeros((2, 8, 8), np.uint8), [0, 1], "shape"),
    (np.zeros((2, 8, 6, 3), np.uint8), [0, 1], "shape"),
    (np.zeros((2, 8, 8, 3), np.uint8), [0], "2 images but 1 labels"),
    (np.zeros((2, 8, 8, 3), np.uint8), [0.0, 1.0], "integer"),
    (np.zeros((0, 8, 8, 3), np.uint8), [], "empty"),
])
def test_write_split_rejects(tmp_path, images, labels, msg):
    with pytest.raises(ValueError, match=msg):
        write_split(tmp_path, "train", images, labels)


def test_load_split_missing(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist.*python data/<name>/prepare.py"):
        load_split(tmp_path / "nope")
    with pytest.raises(FileNotFoundError, match="python data/fashion_mnist/prepare.py --out"):
        load_split(tmp_path / "fashion_mnist")
    (tmp_path / "fashion_mnist").mkdir()
    with pytest.raises(FileNotFoundError, match="meta.json is missing"):
        load_split(tmp_path / "fashion_mnist")
    make_ds(tmp_path)
    with pytest.raises(FileNotFoundError, match="no 'val' split"):
        load_split(tmp_path, "val")
    (tmp_path / "train_labels.npy").unlink()
    with pytest.raises(FileNotFoundError, match="train_labels.npy is missing"):
        load_split(tmp_path)


def test_load_split_corrupt(tmp_path):
    make_ds(tmp_path)
    p = tmp_path / "train.npy"
    p.write_bytes(p.read_bytes()[:-10])
    with pytest.raises(ValueError, match="train.npy is corrupt or truncated"):
        load_split(tmp_path)
    p.write_bytes(b"")
    with pytest.raises(ValueError, match="train.npy is corrupt or truncated"):
        load_split(tmp_path)
    (tmp_path / "meta.json").write_text("{not json")
    with pytest.raises(ValueError, match="not a valid meta.json"):
        load_split(tmp_path)


def test_load_split_bad_contents(tmp_path):
    make_ds(tmp_path)
    np.save(tmp_path / "train.npy", np.zeros((4, 8, 8, 3), np.float32))
    with pytest.raises(ValueError, match="float32.*expected uint8"):
        load_split(tmp_path)
    np.save(tmp_path / "train.npy", np.zeros((4, 8, 8, 1), np.uint8))
    with pytest.raises(ValueError, match="holds 8x8x1 images but .*meta.json says 8x8x3"):
        load_split(tmp_path)
    np.save(tmp_path / "train.npy", np.zeros((4, 16, 16, 3), np.uint8))
    with pytest.raises(ValueError, match="16x16x3 images but .* says 8x8x3"):
        load_split(tmp_path)
    np.save(tmp_path / "train.npy", np.zeros((5, 8, 8, 3), np.uint8))
    with pytest.raises(ValueError, match="5 images but .* 4 labels"):
        load_split(tmp_path)
    np.save(tmp_path / "train.npy", np.zeros((4, 8, 8, 3), np.uint8))
    np.save(tmp_path / "train_labels.npy", np.array([0, 1, 2, 3]))
    with pytest.raises(ValueError, match=r"labels in \[0, 3\] but meta.json has 3 classes"):
        load_split(tmp_path)
    np.save(tmp_path / "train_labels.npy", np.array([0, 1, 2, 0], np.int32))
    with pytest.raises(ValueError, match="int32.*expected int64"):
        load_split(tmp_path)
    np.save(tmp_path / "train.npy", np.zeros((0, 8, 8, 3), np.uint8))
    np.save(tmp_path / "train_labels.npy", np.zeros(0, np.int64))
    with pytest.raises(ValueError, match="empty"):
        load_split(tmp_path)


def test_check_geometry():
    meta = {"image_size": 32, "channels": 1}
    check_geometry(meta, 32, 1, "d")
    check_geometry(meta, None, None, "d")
    with pytest.raises(ValueError, match="data dir d holds 32x32x1 images but the config asks for 64x64x3"):
        check_geometry(meta, 64, 3, "d")


# ----------------------------------------------------------------------------- fashion_mnist

def idx_bytes(a):
    return bytes([0, 0, 8, a.ndim]) + b"".join(n.to_bytes(4, "big") for n in a.shape) + a.astype(np.uint8).tobytes()


def write_fashion(d, n_train=5, n_val=3):
    rng = np.random.default_rng(1)
    d.mkdir(parents=True, exist_ok=True)
    arrays = {}
    for prefix, n in (("train", n_train), ("t10k", n_val)):
        arrays[prefix] = (rng.integers(1, 256, (n, 28, 28), dtype=np.uint8), np.arange(n) % 10)
        for kind, a in zip(("images-idx3", "labels-idx1"), arrays[prefix]):
            (d / f"{prefix}-{kind}-ubyte.gz").write_bytes(gzip.compress(idx_bytes(a)))
    return arrays


def test_fashion_mnist(tmp_path):
    fm = script("fashion_mnist")
    arrays = write_fashion(tmp_path / "src")
    fm.main(["--src", str(tmp_path / "src"), "--out", str(tmp_path / "out")])
    for split, prefix in (("train", "train"), ("val", "t10k")):
        x, y, meta = load_split(tmp_path / "out", split)
        assert x.shape == (len(arrays[prefix][0]), 32, 32, 1)
        assert (x[:, 2:30, 2:30, 0] == arrays[prefix][0]).all()
        assert x.sum() == arrays[prefix][0].astype(np.int64).sum()  # the 2-pixel border is zero
        assert (y == arrays[prefix][1]).all()
    assert meta["classes"][0] == "T-shirt/top" and meta["splits"] == {"train": 5, "val": 3}


def test_fashion_mnist_bad_input(tmp_path):
    fm = script("fashion_mnist")
    src = tmp_path / "src"
    write_fashion(src)
    (src / "t10k-labels-idx1-ubyte.gz").unlink()
    with pytest.raises(FileNotFoundError, match="lacks t10k-labels-idx1-ubyte.gz"):
        fm.main(["--src", str(src), "--out", str(tmp_path / "out")])
    (src / "t10k-labels-idx1-ubyte").write_bytes(idx_bytes(np.arange(4)))  # uncompressed is accepted, 4 != 3
    with pytest.raises(ValueError, match="t10k-\\* files hold images \\(3, 28, 28\\) and 4 labels"):
        fm.main(["--src", str(src), "--out", str(tmp_path / "out")])
    p = src / "train-images-idx3-ubyte.gz"
    p.write_bytes(gzip.compress(gzip.decompress(p.read_bytes())[:-5]))
    with pytest.raises(ValueError, match="train-images-idx3-ubyte.gz is truncated or corrupt"):
        fm.main(["--src", str(src), "--out", str(tmp_path / "out")])
    p.write_bytes(p.read_bytes()[:50])
    with pytest.raises(ValueError, match="cannot read .*train-images-idx3-ubyte.gz"):
        fm.main(["--src", str(src), "--out", str(tmp_path / "out")])


def test_fashion_mnist_download(tmp_path, monkeypatch):
    fm = script("fashion_mnist")
    write_fashion(tmp_path / "mirror")
    monkeypatch.setattr(fm, "SYSTEM_DIR", tmp_path / "no_system_copy")
    monkeypatch.setattr(fm, "URL", (tmp_path / "mirror").as_uri() + "/")
    md5 = {n: hashlib.md5((tmp_path / "mirror" / n).read_bytes()).hexdigest() for n in fm.FILES}
    monkeypatch.setattr(fm, "FILES", md5)
    fm.main(["--out", str(tmp_path / "out")])
    assert sorted(p.name for p in (tmp_path / "out" / "raw").iterdir()) == sorted(md5)
    assert load_split(tmp_path / "out", "val")[0].shape == (3, 32, 32, 1)
    # offline, or a bad download: the message names both ways to get the files
    monkeypatch.setattr(fm, "FILES", {n: "0" * 32 for n in md5})
    with pytest.raises(SystemExit, match="(?s)nothing found offline.*checksum mismatch.*"
                                         "apt-get install -y dataset-fashion-mnist.*--src DIR"):
        fm.main(["--out", str(tmp_path / "out2")])
    assert not any((tmp_path / "out2" / "raw").iterdir())  # no half-downloaded file is left behind
    monkeypatch.setattr(fm, "URL", "http://unreachable.invalid/")
    with pytest.raises(SystemExit, match="(?s)nothing found offline.*apt-get install.*--src DIR"):
        fm.main(["--out", str(tmp_path / "out2")])


# ----------------------------------------------------------------------------- cifar10

def write_cifar(d):
    """cifar-10-batches-py with 2 images per train batch and 3 in test_batch; image 0 of batch 1 has
    R=10, G=20, B=30 at row 1, column 2."""
    d.mkdir(parents=True)
    rng = np.random.default_rng(2)
    for i, name in enumerate([f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]):
        n = 3 if name == "test_batch" else 2
        data = rng.integers(0, 256, (n, 3072), dtype=np.uint8)
        if name == "data_batch_1":
            data[0, [0 * 1024 + 1 * 32 + 2, 1 * 1024 + 1 * 32 + 2, 2 * 1024 + 1 * 32 + 2]] = [10, 20, 30]
        batch = {b"batch_label": name.encode(), b"labels": [(i + j) % 10 for j in range(n)], b"data": data}
        (d / name).write_bytes(pickle.dumps(batch, protocol=2))
    names = [b"airplane", b"automobile", b"bird", b"cat", b"deer", b"dog", b"frog", b"horse", b"ship", b"truck"]
    (d / "batches.meta").write_bytes(pickle.dumps({b"label_names": names, b"num_vis": 3072}, protocol=2))


def test_cifar10(tmp_path):
    cf = script("cifar10")
    write_cifar(tmp_path / "cifar-10-batches-py")
    with tarfile.open(tmp_path / "cifar-10-python.tar.gz", "w:gz") as tar:
        tar.add(tmp_path / "cifar-10-batches-py", arcname="cifar-10-batches-py")
    results = []
    for src in ("cifar-10-batches-py", ".", "cifar-10-python.tar.gz"):  # the folder, its parent, the archive
        out = tmp_path / f"out{len(results)}"
        cf.main(["--src", str(tmp_path / src), "--out", str(out)])
        results.append((load_split(out, "train"), load_split(out, "val")))
    (x, y, meta), (xv, yv, _) = results[0]
    assert x.shape == (10, 32, 32, 3) and xv.shape == (3, 32, 32, 3)
    assert tuple(x[0, 1, 2]) == (10, 20, 30)
    assert list(y) == [0, 1, 1, 2, 2, 3, 3, 4, 4, 5] and list(yv) == [5, 6, 7]
    assert meta["classes"][9] == "truck" and meta["splits"] == {"train": 10, "val": 3}
    for (a, b, _), (c, d, _) in results[1:]:
        assert (a == x).all() and (b == y).all() and (c == xv).all() and (d == yv).all()


def test_cifar10_bad_input(tmp_path, monkeypatch):
    cf = script("cifar10")
    d = tmp_path / "cifar-10-batches-py"
    write_cifar(d)
    (d / "test_batch").unlink()
    with pytest.raises(FileNotFoundError, match="holds no test_batch"):
        cf.main(["--src", str(d), "--out", str(tmp_path / "out")])
    (d / "test_batch").write_bytes(b"\x80\x02garbage")
    with pytest.raises(ValueError, match="test_batch is not a CIFAR-10 python batch"):
        cf.main(["--src", str(d), "--out", str(tmp_path / "out")])

    class Evil:
        def __reduce__(self):
            return (print, ("pwned",))
    (d / "test_batch").write_bytes(pickle.dumps({b"data": Evil()}, protocol=2))
    with pytest.raises(ValueError, match="refusing to load .*print"):
        cf.main(["--src", str(d), "--out", str(tmp_path / "out")])
    (d / "test_batch").write_bytes(pickle.dumps({b"data": np.zeros((2, 1024), np.uint8), b"labels": [0, 1]}))
    with pytest.raises(ValueError, match=r"test_batch should hold b'data' uint8 \(N, 3072\)"):
        cf.main(["--src", str(d), "--out", str(tmp_path / "out")])
    (tmp_path / "bad.tar.gz").write_bytes(b"not a tar")
    with pytest.raises(ValueError, match="cannot read the archive"):
        cf.main(["--src", str(tmp_path / "bad.tar.gz"), "--out", str(tmp_path / "out")])
    monkeypatch.setattr(cf, "URL", "http://unreachable.invalid/cifar-10-python.tar.gz")
    with pytest.raises(SystemExit, match="(?s)nothing found offline.*--src cifar-10-python.tar.gz"):
        cf.main(["--out", str(tmp_path / "out")])


# ----------------------------------------------------------------------------- imagenet64

def write_imagenet64(d):
    """Official-layout npz files, in the part folders of the zips; pixel (5, 7) of the first val image is
    (1, 2, 3); labels are 1-based and use both ends of 1..1000."""
    rng = np.random.default_rng(3)
    for i in range(1, 11):
        sub = d / ("Imagenet64_train_part1" if i <= 5 else "Imagenet64_train_part2")
        sub.mkdir(parents=True, exist_ok=True)
        data = rng.integers(0, 256, (2, 12288), dtype=np.uint8)
        np.savez(sub / f"train_data_batch_{i}.npz", data=data, labels=[i, 1000 - i], mean=np.zeros(12288))
    data = rng.integers(0, 256, (3, 12288), dtype=np.uint8)
    data[0, [5 * 64 + 7, 4096 + 5 * 64 + 7, 8192 + 5 * 64 + 7]] = [1, 2, 3]
    (d / "Imagenet64_val").mkdir()
    np.savez(d / "Imagenet64_val" / "val_data.npz", data=data, labels=[1, 1000, 500])
    return data


def test_imagenet64(tmp_path):
    im = script("imagenet64")
    val = write_imagenet64(tmp_path / "src")
    (tmp_path / "src" / "map_clsloc.txt").write_text("n02119789 1 kit_fox\nn02100735 2 English_setter\n")
    im.main(["--src", str(tmp_path / "src"), "--out", str(tmp_path / "out")])
    xv, yv, meta = load_split(tmp_path / "out", "val")
    assert tuple(xv[0, 5, 7]) == (1, 2, 3) and list(yv) == [0, 999, 499]
    assert (xv == val.reshape(3, 3, 64, 64).transpose(0, 2, 3, 1)).all()
    x, y, _ = load_split(tmp_path / "out", "train")
    assert x.shape == (20, 64, 64, 3) and list(y[:4]) == [0, 998, 1, 997]
    assert meta["num_classes"] == 1000 and meta["classes"][:3] == ["kit_fox", "English_setter", "3"]
    assert not list((tmp_path / "out").glob("*tmp*"))


def test_imagenet64_bad_input(tmp_path):
    im = script("imagenet64")
    src, out = tmp_path / "src", str(tmp_path / "out")
    write_imagenet64(src)
    (src / "Imagenet64_train_part2" / "train_data_batch_7.npz").unlink()
    with pytest.raises(FileNotFoundError, match="lacks train_data_batch_7.npz"):
        im.main(["--src", str(src), "--out", out])
    im.main(["--src", str(src), "--out", out, "--partial"])
    assert load_split(out)[0].shape == (18, 64, 64, 3)
    np.savez(src / "Imagenet64_val" / "val_data.npz", data=np.zeros((2, 12288), np.uint8), labels=[0, 1])
    with pytest.raises(ValueError, match="1..1000 \\(1-based\\)"):
        im.main(["--src", str(src), "--out", out, "--partial"])
    np.savez(src / "Imagenet64_val" / "val_data.npz", data=np.zeros((2, 3072), np.uint8), labels=[1, 2])
    with pytest.raises(ValueError, match="'data' should be uint8 \\(2, 12288\\)"):
        im.main(["--src", str(src), "--out", out, "--partial"])
    (src / "Imagenet64_val" / "val_data.npz").write_bytes(b"PK\x03\x04 broken")
    with pytest.raises(ValueError, match="cannot read 'labels' from .*val_data.npz"):
        im.main(["--src", str(src), "--out", out, "--partial"])
    assert not list((tmp_path / "out").glob("*tmp*"))  # failed runs leave no temporary files


# ----------------------------------------------------------------------------- folder

def write_folder(d, corrupt=True):
    """3 classes of 5, 4 and 4 images, PNG and JPEG, non-square; cat/crop.png is red in its central square and blue
    at the sides; dog/bad.jpg is corrupt."""
    rng = np.random.default_rng(4)
    for c in ("cat", "dog", "fox"):
        (d / c / "sub").mkdir(parents=True)
        for i in range(4):
            a = rng.integers(0, 256, (30 + 5 * i, 40, 3), dtype=np.uint8)
            Image.fromarray(a).save(d / c / ("sub" if i == 3 else "") / f"{i}.{'png' if i % 2 else 'JPG'}")
        (d / c / "notes.txt").write_text("ignored")
    a = np.zeros((20, 40, 3), np.uint8)
    a[:, :10, 2] = a[:, 30:, 2] = 255
    a[:, 10:30, 0] = 255
    Image.fromarray(a).save(d / "cat" / "crop.png")
    if corrupt:
        buf = io.BytesIO()
        Image.fromarray(a).save(buf, "JPEG")
        (d / "dog" / "bad.jpg").write_bytes(buf.getvalue()[:200])


def test_folder(tmp_path, capsys):
    fo = script("folder")
    write_folder(tmp_path / "src")
    args = ["--src", str(tmp_path / "src"), "--size", "8", "--val_frac", "0.25", "--workers", "1"]
    with pytest.raises(ValueError, match="cannot read image .*dog/bad.jpg.*--skip_bad"):
        fo.main(args + ["--out", str(tmp_path / "out")])
    fo.main(args + ["--out", str(tmp_path / "out"), "--skip_bad"])
    assert "skipping: cannot read image" in capsys.readouterr().err
    x, y, meta = load_split(tmp_path / "out")
    xv, yv, _ = load_split(tmp_path / "out", "val")
    assert x.shape == (10, 8, 8, 3) and xv.shape == (3, 8, 8, 3)  # one of each class held out
    assert sorted(np.concatenate([y, yv]).tolist()) == [0] * 5 + [1] * 4 + [2] * 4  # bad.jpg skipped
    assert meta["classes"] == ["cat", "dog", "fox"] and meta["name"] == "src"
    red = np.array([255, 0, 0])
    assert any((np.abs(img.astype(int) - red) <= 2).all() for img in np.concatenate([x, xv]))  # the crop of crop.png
    # two worker processes give the same bytes; --gray gives one channel
    fo.main(args + ["--out", str(tmp_path / "out2"), "--skip_bad", "--workers", "2", "--gray"])
    g, gy, meta2 = load_split(tmp_path / "out2")
    assert g.shape == (10, 8, 8, 1) and (gy == y).all() and meta2["channels"] == 1


def test_folder_val_src_and_errors(tmp_path):
    fo = script("folder")
    write_folder(tmp_path / "train", corrupt=False)
    write_folder(tmp_path / "val", corrupt=False)
    out = str(tmp_path / "out")
    fo.main(["--src", str(tmp_path / "train"), "--val_src", str(tmp_path / "val"), "--size", "16",
             "--out", out, "--workers", "1", "--name", "toy"])
    assert load_split(out)[0].shape == (13, 16, 16, 3) and load_split(out, "val")[0].shape == (13, 16, 16, 3)
    assert json.loads((tmp_path / "out" / "meta.json").read_text())["name"] == "toy"
    fo.main(["--src", str(tmp_path / "train"), "--val_frac", "0", "--size", "16", "--out", out, "--workers", "1"])
    assert list(load_split(out)[2]["splits"]) == ["train"]
    (tmp_path / "val" / "wolf").mkdir()
    with pytest.raises(ValueError, match="class folder\\(s\\) wolf .* hold no JPEG/PNG"):
        fo.main(["--src", str(tmp_path / "val"), "--out", out])
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="has no class subfolders"):
        fo.main(["--src", str(tmp_path / "empty"), "--out", out])
    with pytest.raises(FileNotFoundError, match="is not a folder"):
        fo.main(["--src", str(tmp_path / "missing"), "--out", out])


def test_split_writer(tmp_path):
    from data.common import SplitWriter
    with pytest.raises(ValueError, match="empty"):
        SplitWriter(tmp_path, "train", (0, 4, 4, 3))
    with SplitWriter(tmp_path, "train", (5, 4, 4, 3)) as w:  # rows 3 and 4 stay unused, as after skipped inputs
        w.images[:3] = np.arange(3, dtype=np.uint8)[:, None, None, None]
        w.close([2, 1, 0])
    write_meta(tmp_path, "toy", ["a", "b", "c"], 4, 3, {"train": 3})
    x, y, _ = load_split(tmp_path)
    assert x.shape == (3, 4, 4, 3) and (x[:, 0, 0, 0] == [0, 1, 2]).all() and list(y) == [2, 1, 0]
    with SplitWriter(tmp_path, "val", (2, 4, 4, 3)):
        pass  # left without close(): nothing is written
    assert sorted(p.name for p in tmp_path.iterdir()) == ["meta.json", "train.npy", "train_labels.npy"]
