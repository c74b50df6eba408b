"""
Few-shot linear probe of the encoder's `rep` (the paper's Sec. 5.1), the big_vision "fewshot_lsr" solver.

    python probe.py --ckpt out/ckpt.pt --data data/fashion_mnist --shots 10,100
    python probe.py --ckpt out/ckpt.pt --data data/fashion_mnist --shots full --max_test 2000
    python probe.py --ckpt out/ckpt.pt --data data/cifar100,data/dtd,data/pets --shots 1,5,10,25

For each k in --shots and each seed: take k train images per class, fit a closed-form ridge regression from
features to 2*onehot-1 targets, report top-1 accuracy on the test split (val, or the last 10% of train when there
is no val split). The same probe also runs on a randomly initialised model of the same config and on raw pixels,
to show what pre-training bought. Prints a table (mean +- std over seeds) and writes json; train.py calls `evaluate`.

Transfer (the paper's Figure 2): --data takes a comma list of prepared data dirs (data/<name>/prepare.py makes
cifar100, stl10, flowers102, dtd, pets, food101, stanford_dogs). One dir: a row per shots value and the json's
"results" as always. Several: a row per dataset, and the json holds "datasets": {name: {"data", "test", "n_pool",
"n_test", "results"}} ("results" as for one dir; name: the dir's base name, or the dir as given when two share one).
Images of another size than the model's go through the probe preprocessing: the shorter side resized to
int(size * 256 / 246) (bilinear, antialiased), then the central size x size crop; the raw-pixel baseline sees the same.

The solver, exactly as big_vision: standardise with the mean/std of the train shots (std + 1e-5, the same stats for
test), append a constant feature 100, ridge with lambda 1024 (the bias column is regularised too), via an
eigendecomposition of X^T X (N >= D) or of X X^T (N < D, dual form), so a sweep over lambdas costs one decomposition.
"""
import argparse
import json
import os
import sys
import time
import warnings

import numpy as np
import torch
import torch.nn.functional as F

from corrupt import SCHEMES, T, make_schedule
from data.common import atomic_write
from model import UMD, ModelConfig, from_uint8, in_eval_mode, load_checkpoint

NOISE_T = 50  # models pre-trained without clean samples (dit, maskdit) are probed at t = 50
BIAS = 100.0


# ---- shots ------------------------------------------------------------------------------
def class_permutations(labels, seed):
    """{c: permuted indices of class c}, classes in sorted order, all drawn from one default_rng(seed)."""
    labels = np.asarray(labels)
    rng = np.random.default_rng(seed)
    return {int(c): rng.permutation(np.flatnonzero(labels == c)) for c in np.unique(labels)}


def select_shots(labels, k, seed):
    """The first k of each class's permutation (fewer, with a warning, for a class with fewer examples)."""
    if k < 1:
        raise ValueError(f"shots must be >= 1, got {k}")
    perms = class_permutations(labels, seed)
    short = {c: len(p) for c, p in perms.items() if len(p) < k}
    if short:
        warnings.warn(f"{len(short)} class(es) have fewer than {k} examples, all of them are used: "
                      + ", ".join(f"class {c}: {n}" for c, n in list(short.items())[:10]), stacklevel=2)
    return np.concatenate([p[:k] for p in perms.values()])


# ---- solver -----------------------------------------------------------------------------
def fit_lsr(train_x, train_y, num_classes=None, form=None):
    """Standardise, add the bias feature, decompose (form: default dual when N < D) -> a fit for any lambda."""
    x = np.asarray(train_x, dtype=np.float64)
    y = np.asarray(train_y)
    if x.ndim != 2 or len(x) != len(y):
        raise ValueError(f"features must be (N, D) with N labels, got {x.shape} and {y.shape}")
    if len(np.unique(y)) < 2:
        raise ValueError(f"a linear probe needs at least 2 classes, the train shots hold {len(np.unique(y))}")
    num_classes = int(y.max()) + 1 if num_classes is None else num_classes
    mean, std = x.mean(0, keepdims=True), x.std(0, keepdims=True) + 1e-5
    x = np.concatenate([(x - mean) / std, np.full((len(x), 1), BIAS)], axis=1)
    targets = 2.0 * np.eye(num_classes)[y] - 1.0
    n, d = x.shape
    form = form or ("dual" if n < d else "primal")
    if form == "primal":   # W = Q diag(1/(e + lam)) Q^T X^T Y
        eigs, q = np.linalg.eigh(x.T @ x)
        lhs, rhs = q, q.T @ (x.T @ targets)
    elif form == "dual":   # W = X^T (X X^T + lam I)^-1 Y = X^T Q diag(1/(e + lam)) Q^T Y
        eigs, q = np.linalg.eigh(x @ x.T)
        lhs, rhs = x.T @ q, q.T @ targets
    else:
        raise ValueError(f"form must be 'primal' or 'dual', got {form!r}")
    return {"mean": mean, "std": std, "eigs": eigs, "lhs": lhs, "rhs": rhs, "form": form}


def lsr_weights(fit, lam):
    return (fit["lhs"] / (fit["eigs"] + lam)[None]) @ fit["rhs"]


def lsr_predict(fit, x, lam=1024.0):
    x = (np.asarray(x, dtype=np.float64) - fit["mean"]) / fit["std"]
    x = np.concatenate([x, np.full((len(x), 1), BIAS)], axis=1)
    return np.argmax(x @ lsr_weights(fit, lam), axis=1)


def fewshot_accuracy(train_x, train_y, test_x, test_y, lam=1024.0):
    """Top-1 accuracy of the big_vision closed-form probe."""
    return float(np.mean(lsr_predict(fit_lsr(train_x, train_y), test_x, lam) == np.asarray(test_y)))


# ---- features ---------------------------------------------------------------------------
def to_model_input(images, size, channels):
    """uint8 (N, H, W, C) -> float (N, C, size, size) in [-1, 1]; other sizes: the probe preprocessing."""
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


@torch.no_grad()
def extract_features(model, images, batch_size=256, device=None, noise_t=None, abar=None,
                     quiet=True, what="features", scheme="umd", to_input=None):
    """`rep` of uint8 NHWC images (anything with len and slicing) -> float32 (N, width); to_input(batch): the model's
    float NCHW input (default to_model_input; latent models: latent_input). noise_t None: clean (t_model 0); an int t:
    noised at DDPM step t by the scheme's noise_at, eps from default_rng(0) image by image (batch_size-independent)."""
    c = model.config
    device = device or next(model.parameters()).device
    rng = np.random.default_rng(0)
    abar = make_schedule("cosine") if noise_t is not None and abar is None else abar
    out, t0, last = [], time.time(), time.time()
    for i in range(0, len(images), batch_size):
        batch = images[i:i + batch_size]
        x = (to_input(batch) if to_input else to_model_input(batch, c.image_size, c.channels)).to(device)
        t_model = torch.zeros(len(x), dtype=torch.long, device=device)
        if noise_t is not None:
            eps = torch.from_numpy(rng.standard_normal(x.shape, dtype=np.float32)).to(device)
            t = torch.full((len(x),), noise_t, dtype=torch.long, device=device)
            x, t_model = SCHEMES.get(scheme, SCHEMES["umd"]).noise_at(x, t, eps, abar)
        out.append(model.representation(x, t_model).float().cpu().numpy())
        done = min(i + batch_size, len(images))
        if not quiet and (time.time() - last > 5 or done == len(images)):
            last = time.time()
            print(f"  {what}: {done}/{len(images)} images, {done / (last - t0):.0f} img/s", file=sys.stderr)
    return np.concatenate(out).astype(np.float32)


def default_noise_t(ckpt):
    """NOISE_T for models pre-trained without clean samples, also after their fine-tuning (any recipe), else None."""
    knobs = ckpt.get("pretrain_knobs") or ckpt.get("knobs") or {}
    return NOISE_T if knobs.get("no_noise_prob", 1) == 0 else None


def latent_input(ckpt, meta, vae=None, device="cpu"):
    """The to_input of a latent checkpoint on a dataset (None for a pixel checkpoint): the stored posterior
    means of a latent dataset, or those of the VAE encoder for pixels, times the scale (data/vae.py)."""
    tc = ckpt.get("train_config") or {}
    if not tc.get("latent"):
        return None
    from data import vae as V
    enc, scale = V.checkpoint_vae(tc, meta, vae, device, load="latent" not in meta)
    return V.model_input(meta, scale, enc, ckpt["model_config"]["image_size"])


# ---- the probe --------------------------------------------------------------------------
def load_probe_data(data_dir, pool=None, max_test=None):
    """-> (x, y, train_idx, tx, ty, test_idx, meta, test description): train and test images and labels,
    the indices of the train pool and the test set into them. pool / max_test keep a fixed random subset
    (default_rng(0), sorted), so a class-sorted file still has all classes."""
    from data.common import load_split  # lazy: only the probe on a data dir needs it
    x, y, meta = load_split(data_dir, "train")
    if "val" in meta["splits"]:
        tx, ty, _ = load_split(data_dir, "val")
        test_name, train_idx, test_idx = "val", np.arange(len(x)), np.arange(len(ty))
    else:  # hold out the last 10% of train
        n_test = max(1, len(x) // 10)
        test_name, tx, ty = f"last {n_test} of train (no val split)", x, y
        train_idx, test_idx = np.arange(len(x) - n_test), np.arange(len(x) - n_test, len(x))
    def subset(idx, n):
        return idx if n is None or n >= len(idx) else np.sort(np.random.default_rng(0).choice(idx, n, replace=False))
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


def run_probe(featurize, x, y, train_idx, tx, ty, test_idx, num_classes, shots, seeds, lam=1024.0, lambdas=None):
    """featurize(images) -> features. Returns {shots: {"accs", "mean", "std", "lambdas"}}. With `lambdas`, lambda is
    chosen per (shots, seed) on held-out train shots: the fit uses the first k of each class's permutation, the
    choice the next max(k, 10) (full: chosen on a seeded 90/10 split of the pool, then refit on all of it)."""
    pool_y = y[train_idx]
    test_f, test_y = featurize(Rows(tx, test_idx)), ty[test_idx]
    plans = {}  # (shots, seed) -> (fit pool positions, held-out pool positions)
    for k in shots:
        if k == "full":  # one seed
            perm = np.random.default_rng(0).permutation(len(pool_y))
            plans[k, 0] = (np.arange(len(pool_y)), perm[: len(perm) // 10])
            continue
        for seed in seeds:
            held_out = [p[k:k + max(k, 10)] for p in class_permutations(pool_y, seed).values()]
            plans[k, seed] = (select_shots(pool_y, k, seed), np.concatenate(held_out))
    need = np.unique(np.concatenate([p for plan in plans.values() for p in plan[:2 if lambdas else 1]]))
    feats = featurize(Rows(x, train_idx[need]))  # only the train images used
    if len(feats) > 1 and np.ptp(feats, axis=0).max() == 0:
        warnings.warn("the features are the same for every image: the probe is at chance level "
                      "(e.g. a freshly initialised AdaLN-Zero model, whose CLS output is constant)")
    F_ = lambda pos: feats[np.searchsorted(need, pos)]  # the features of pool positions (all in the sorted need)
    res = {}
    for (k, seed), (fit_pos, val_pos) in plans.items():
        fit, chosen = fit_lsr(F_(fit_pos), pool_y[fit_pos], num_classes), lam
        if lambdas and len(val_pos):  # full: chosen with a fit on the rest of the pool
            rest = np.setdiff1d(fit_pos, val_pos)
            sel = fit_lsr(F_(rest), pool_y[rest], num_classes) if k == "full" else fit
            scores = [np.mean(lsr_predict(sel, F_(val_pos), l) == pool_y[val_pos]) for l in lambdas]
            chosen = float(lambdas[int(np.argmax(scores))])  # ties: the first in the list
        r = res.setdefault(str(k), {"accs": [], "lambdas": []})
        r["accs"].append(float(np.mean(lsr_predict(fit, test_f, chosen) == test_y)))
        r["lambdas"].append(chosen)
    for r in res.values():
        r["mean"], r["std"] = float(np.mean(r["accs"])), float(np.std(r["accs"]))
    return res


@in_eval_mode
def evaluate(model, data_dir, shots=(10,), seeds=(0,), noise_t=None, abar=None, max_test=None, device=None,
             quiet=True, scheme="umd", to_input=None):
    """{shots: mean accuracy} on data_dir for train.py's periodic eval, in eval mode (the model's mode kept)."""
    x, y, train_idx, tx, ty, test_idx, meta, _ = load_probe_data(data_dir, None, max_test)
    featurize = lambda im: extract_features(model, im, device=device, noise_t=noise_t, abar=abar, quiet=quiet,
                                            scheme=scheme, to_input=to_input)
    res = run_probe(featurize, x, y, train_idx, tx, ty, test_idx, meta["num_classes"], parse_shots(shots), seeds)
    return {k: r["mean"] for k, r in res.items()}


def parse_shots(shots):
    """Shots from "1,5,full" or a sequence -> [1, 5, "full"]."""
    out = [str(s).strip() for s in (shots.split(",") if isinstance(shots, str) else shots)]
    for s in out:
        if s != "full" and (not s.lstrip("-").isdigit() or int(s) < 1):
            raise ValueError(f"shots must be integers >= 1 or 'full', got {s!r}")
    return [s if s == "full" else int(s) for s in out]


def print_transfer_table(per, cols):
    """One row per dataset: mean +- std (%) of each model at each shots value."""
    first = next(iter(per.values()))["results"]
    heads = [(k, m) for k in first["ckpt"] for m in first]
    labels = [f"{cols[m]} {k}" + ("" if k == "full" else "-shot") for k, m in heads]
    widths = [max(15, len(label)) for label in labels]
    wd = max(7, *(len(n) for n in per))
    print(f"{'dataset':<{wd}} | " + " | ".join(f"{label:>{w}}" for label, w in zip(labels, widths)))
    for n, r in per.items():
        cells = [f"{100 * r['results'][m][k]['mean']:6.2f} +- {100 * r['results'][m][k]['std']:5.2f}" for k, m in heads]
        print(f"{n:<{wd}} | " + " | ".join(f"{c:>{w}}" for c, w in zip(cells, widths)))


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ckpt", required=True)
    p.add_argument("--data", required=True, help="prepared data dir(s), comma-separated, e.g. data/fashion_mnist "
                                                 "or data/cifar100,data/dtd (one table row per dir)")
    p.add_argument("--shots", default="10", help="comma list of shots per class, or 'full' (e.g. 1,5,10,25,100,full)")
    p.add_argument("--seeds", default="0,1,2", help="shot-selection seeds (mean and std over them)")
    p.add_argument("--lam", type=float, default=1024.0, help="ridge lambda (big_vision: 1024)")
    p.add_argument("--lambdas", default=None, help="comma list: choose lambda on held-out train shots")
    p.add_argument("--ema", action="store_true", help="use the EMA weights")
    p.add_argument("--vae", default=None, help="latent checkpoints: the VAE that encodes pixel --data "
                                               "(default: the one the checkpoint or the data recorded)")
    p.add_argument("--noise_t", type=int, default=None,
                   help=f"probe on images noised at t (-1: clean); default {NOISE_T} for dit/maskdit, else clean")
    p.add_argument("--pool", type=int, default=None, help="cap the train pool (fixed random subset)")
    p.add_argument("--max_test", type=int, default=None, help="cap the test set (fixed random subset)")
    p.add_argument("--batch_size", type=int, default=256)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--no_baselines", action="store_true", help="skip the random-init and raw-pixel probes")
    p.add_argument("--out", default=None, help="json output (default <ckpt dir>/probe.json)")
    p.add_argument("--quiet", action="store_true")
    a = p.parse_args(argv)
    shots = parse_shots(a.shots)
    try:
        seeds = [int(s) for s in a.seeds.split(",")]
        lambdas = [float(l) for l in a.lambdas.split(",")] if a.lambdas else None
    except ValueError:
        raise ValueError(f"--seeds must be comma-separated integers and --lambdas numbers; got {a.seeds!r}, "
                         f"{a.lambdas!r}") from None
    for key in ("batch_size", "pool", "max_test"):
        if getattr(a, key) is not None and getattr(a, key) < 1:
            raise ValueError(f"--{key} must be >= 1, got {getattr(a, key)}")
    if a.noise_t is not None and a.noise_t >= T:
        raise ValueError(f"--noise_t must be < T = {T} (or -1: clean), got {a.noise_t}")
    t0 = time.time()
    model, ckpt = load_checkpoint(a.ckpt, use_ema=a.ema, device=a.device)
    if a.ema and ckpt.get("ema") is None:
        warnings.warn(f"{a.ckpt} has no EMA weights; using the raw weights")
    noise_t = default_noise_t(ckpt) if a.noise_t is None else (None if a.noise_t < 0 else a.noise_t)
    tc = ckpt.get("train_config") or {}
    abar = make_schedule(tc.get("schedule", "cosine"))
    scheme = ckpt.get("scheme") or "umd"
    dirs = [d.strip() for d in a.data.split(",") if d.strip()]
    if not dirs:
        raise ValueError(f"--data needs a data dir (or a comma list of them), got {a.data!r}")
    names = [os.path.basename(os.path.normpath(d)) for d in dirs]
    names = names if len(set(names)) == len(names) else dirs
    data = {}  # name -> (dir, load_probe_data(dir)), all loaded (and checked) before any probing
    for n, d in zip(names, dirs):
        data[n] = (d, load_probe_data(d, a.pool, a.max_test))
        c = data[n][1][6]["channels"]  # meta.json's
        if c != model.config.channels and not tc.get("latent"):
            raise ValueError(f"{d} holds {c}-channel images but {a.ckpt} takes {model.config.channels} channel(s)")
    name = tc.get("preset") or "ckpt"
    log = (lambda *m: None) if a.quiet else (lambda *m: print(*m, file=sys.stderr))
    log(f"probe: {a.ckpt} (step {ckpt.get('step')}, {name}, {'EMA' if a.ema else 'raw'} weights, "
        f"{'clean' if noise_t is None else f'noised at t={noise_t}'})")
    models = {"ckpt": model}
    if not a.no_baselines:
        torch.manual_seed(0)
        models["random_init"] = UMD(ModelConfig(**ckpt["model_config"])).to(a.device).eval()
        models["raw_pixels"] = None
    per = {}
    for n, (d, (x, y, train_idx, tx, ty, test_idx, meta, test_name)) in data.items():
        log(f"{d}: pool {len(train_idx)} train, test {len(test_idx)} ({test_name})")
        results, to_input = {}, latent_input(ckpt, meta, a.vae, a.device)  # None: a pixel model
        for key, m in models.items():
            log(f"[{key}]")
            if m is None:  # raw pixels at the model's size, in [-1, 1] (latent models: the latents)
                raw = to_input or (lambda b: to_model_input(b, model.config.image_size, model.config.channels))
                feat = lambda im: np.concatenate([raw(im[i:i + a.batch_size]).flatten(1).numpy()
                                                  for i in range(0, len(im), a.batch_size)])
            else:
                feat = lambda im, m=m: extract_features(m, im, a.batch_size, a.device, noise_t, abar, quiet=a.quiet,
                                                        what=key, scheme=scheme, to_input=to_input)
            results[key] = run_probe(feat, x, y, train_idx, tx, ty, test_idx, meta["num_classes"],
                                     shots, seeds, a.lam, lambdas)
        per[n] = {"data": d, "test": test_name, "n_pool": len(train_idx), "n_test": len(test_idx), "results": results}
    cols = {"ckpt": name, "random_init": "random init", "raw_pixels": "raw pixels"}
    one = len(per) == 1  # one dataset: a row per shots value, and the json format of before transfer
    if one:
        print(f"{'shots':>6} | " + " | ".join(f"{cols[k]:>15}" for k in results))
        for k in results["ckpt"]:
            row = [f"{100 * results[m][k]['mean']:6.2f} +- {100 * results[m][k]['std']:5.2f}" for m in results]
            print(f"{k:>6} | " + " | ".join(f"{r:>15}" for r in row))
    else:
        print_transfer_table(per, cols)
    if lambdas:
        for n, r in per.items():
            for m, res in r["results"].items():
                print(f"lambda chosen ({n}, {cols[m]}, per seed): "
                      + ", ".join(f"{k} shots {v['lambdas']}" for k, v in res.items()))
    out = a.out or os.path.join(os.path.dirname(os.path.abspath(a.ckpt)), "probe.json")
    report = {"ckpt": a.ckpt, "step": ckpt.get("step"), "preset": name, "data": a.data if one else dirs,
              "ema": a.ema, "noise_t": noise_t, "lam": a.lam, "lambdas": lambdas, "seeds": seeds}
    report.update({k: v for k, v in per[names[0]].items() if k != "data"} if one else {"datasets": per})
    report["seconds"] = round(time.time() - t0, 1)
    atomic_write(out, lambda f: f.write(json.dumps(report, indent=1).encode()))
    log(f"wrote {out} ({report['seconds']} s)")
    return report


if __name__ == "__main__":
    try:
        main()
    except (ValueError, FileNotFoundError) as e:
        sys.exit(f"error: {e}")
