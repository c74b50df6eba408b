"""
Few-shot linear probe of the encoder's `rep` (the paper's Sec. 5.1), the big_vision "fewshot_lsr" solver.

    python probe.py --ckpt out/ckpt.pt --data data/fashion_mnist --shots 10,100
    python probe.py --ckpt out/ckpt.pt --data data/fashion_mnist --shots full --max_test 2000
    python probe.py --ckpt out/ckpt.pt --data data/cifar100,data/dtd,data/pets --shots 1,5,10,25

For each k in --shots and each seed: take k train images per class, fit a closed-form ridge regression from
features to 2*onehot-1 targets, report top-1 accuracy on the test split (val, or the last 10% of train when
there is no val split). The same probe also runs on a randomly initialised model of the same config and on
raw pixels, to show what pre-training bought. Prints a table (mean +- std over seeds) and writes json;
train.py calls `evaluate`.

Transfer (the paper's Figure 2): --data takes a comma list of prepared data dirs (data/<name>/prepare.py
makes cifar100, stl10, flowers102, dtd, pets, food101, stanford_dogs). One dir: a row per shots value and
the json's "results" as always. Several: a row per dataset, and the json holds "datasets": {name: {"data",
"test", "n_pool", "n_test", "results"}} ("results" as for one dir; name: the dir's base name, or the dir as
given when two share one). Images of another size than the model's go through the probe preprocessing
(data.common.to_model_input): the shorter side resized to int(size * 256 / 246) (bilinear, antialiased),
then the central size x size crop; the raw-pixel baseline sees the same.

The solver, exactly as big_vision: standardise with the mean/std of the train shots (std + 1e-5, the same
stats for test), append a constant feature 100, ridge with lambda 1024 (the bias column is regularised too),
via an eigendecomposition of X^T X (N >= D) or of X X^T (N < D, dual form), so a sweep over lambdas costs
one decomposition. The command line's flags, tables and json: infra/cli.py.
"""
import sys
import time
import warnings

import numpy as np
import torch

from corrupt import SCHEMES, make_schedule
from data import vae as V
from data.common import Rows, load_probe_data, to_model_input
from infra.checkpoint import load_checkpoint
from infra.cli import data_dirs, parse_shots, print_tables, probe_args, write_report
from model import UMD, ModelConfig, in_eval_mode

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
    """Standardise, add the bias feature, decompose (form: default dual when N < D) -> a fit for any
    lambda."""
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
@torch.no_grad()
def extract_features(model, images, batch_size=256, device=None, noise_t=None, abar=None,
                     quiet=True, what="features", scheme="umd", to_input=None):
    """`rep` of uint8 NHWC images (anything with len and slicing) -> float32 (N, width); to_input(batch):
    the model's float NCHW input (default to_model_input; latent models: latent_input). noise_t None: clean
    (t_model 0); an int t: noised at DDPM step t by the scheme's noise_at, eps from default_rng(0) image by
    image (batch_size-independent)."""
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
    """NOISE_T for models pre-trained without clean samples, also after their fine-tuning (any recipe), else
    None."""
    knobs = ckpt.get("pretrain_knobs") or ckpt.get("knobs") or {}
    return NOISE_T if knobs.get("no_noise_prob", 1) == 0 else None


def latent_input(ckpt, meta, vae=None, device="cpu"):
    """The to_input of a latent checkpoint on a dataset (None for a pixel checkpoint): the stored posterior
    means of a latent dataset, or those of the VAE encoder for pixels, times the scale (data/vae.py)."""
    tc = ckpt.get("train_config") or {}
    if not tc.get("latent"):
        return None
    enc, scale = V.checkpoint_vae(tc, meta, vae, device, load="latent" not in meta)
    return V.model_input(meta, scale, enc, ckpt["model_config"]["image_size"])


# ---- the probe --------------------------------------------------------------------------
def run_probe(featurize, x, y, train_idx, tx, ty, test_idx, num_classes, shots, seeds, lam=1024.0,
              lambdas=None):
    """featurize(images) -> features. Returns {shots: {"accs", "mean", "std", "lambdas"}}. With `lambdas`,
    lambda is chosen per (shots, seed) on held-out train shots: the fit uses the first k of each class's
    permutation, the choice the next max(k, 10) (full: chosen on a seeded 90/10 split of the pool, then
    refit on all of it)."""
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
        print("note: the features are the same for every image, so this probe is at chance level (expected "
              "for a freshly initialised AdaLN-Zero model: its CLS output is constant)", file=sys.stderr)
    F_ = lambda pos: feats[np.searchsorted(need, pos)]  # the features of pool positions (all in `need`)
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
    """{shots: mean accuracy} on data_dir for train.py's periodic eval, in eval mode (the model's mode
    kept)."""
    x, y, train_idx, tx, ty, test_idx, meta, _ = load_probe_data(data_dir, None, max_test)
    featurize = lambda im: extract_features(model, im, device=device, noise_t=noise_t, abar=abar, quiet=quiet,
                                            scheme=scheme, to_input=to_input)
    res = run_probe(featurize, x, y, train_idx, tx, ty, test_idx, meta["num_classes"], parse_shots(shots),
                    seeds)
    return {k: r["mean"] for k, r in res.items()}


def probe_dataset(a, models, ckpt, noise_t, data_dir, data, log):
    """{"data", "test", "n_pool", "n_test", "results": {model: run_probe's}} of the models on one data dir
    (data: load_probe_data's); a model None is the raw-pixel baseline."""
    x, y, train_idx, tx, ty, test_idx, meta, test_name = data
    log(f"{data_dir}: pool {len(train_idx)} train, test {len(test_idx)} ({test_name})")
    abar = make_schedule((ckpt.get("train_config") or {}).get("schedule", "cosine"))
    c, scheme = models["ckpt"].config, ckpt.get("scheme") or "umd"
    results, to_input = {}, latent_input(ckpt, meta, a.vae, a.device)  # None: a pixel model
    for key, m in models.items():
        log(f"[{key}]")
        if m is None:  # raw pixels at the model's size, in [-1, 1] (latent models: the latents)
            raw = to_input or (lambda b: to_model_input(b, c.image_size, c.channels))
            feat = lambda im: np.concatenate([raw(im[i:i + a.batch_size]).flatten(1).numpy()
                                              for i in range(0, len(im), a.batch_size)])
        else:
            feat = lambda im, m=m: extract_features(m, im, a.batch_size, a.device, noise_t, abar,
                                                    quiet=a.quiet, what=key, scheme=scheme, to_input=to_input)
        results[key] = run_probe(feat, x, y, train_idx, tx, ty, test_idx, meta["num_classes"], a.shots,
                                 a.seeds, a.lam, a.lambdas)
    return {"data": data_dir, "test": test_name, "n_pool": len(train_idx), "n_test": len(test_idx),
            "results": results}


def main(argv=None):
    a = probe_args(argv, __doc__.split("\n\n")[0], NOISE_T)
    t0 = time.time()
    model, ckpt = load_checkpoint(a.ckpt, use_ema=a.ema, device=a.device)
    if a.ema and ckpt.get("ema") is None:
        print(f"note: {a.ckpt} has no EMA weights; using the raw weights", file=sys.stderr)
    noise_t = default_noise_t(ckpt) if a.noise_t is None else (None if a.noise_t < 0 else a.noise_t)
    tc = ckpt.get("train_config") or {}
    data = {}  # name -> (dir, load_probe_data(dir)), all loaded (and checked) before any probing
    for n, d in data_dirs(a.data).items():
        data[n] = (d, load_probe_data(d, a.pool, a.max_test))
        c = data[n][1][6]["channels"]  # meta.json's
        if c != model.config.channels and not tc.get("latent"):
            raise ValueError(f"{d} holds {c}-channel images but {a.ckpt} takes {model.config.channels} "
                             "channel(s)")
    name = tc.get("preset") or "ckpt"
    log = (lambda *m: None) if a.quiet else (lambda *m: print(*m, file=sys.stderr))
    log(f"probe: {a.ckpt} (step {ckpt.get('step')}, {name}, {'EMA' if a.ema else 'raw'} weights, "
        f"{'clean' if noise_t is None else f'noised at t={noise_t}'})")
    models = {"ckpt": model}
    if not a.no_baselines:
        torch.manual_seed(0)
        models["random_init"] = UMD(ModelConfig(**ckpt["model_config"])).to(a.device).eval()
        models["raw_pixels"] = None
    per = {n: probe_dataset(a, models, ckpt, noise_t, d, loaded, log) for n, (d, loaded) in data.items()}
    print_tables(per, {"ckpt": name, "random_init": "random init", "raw_pixels": "raw pixels"}, a.lambdas)
    return write_report(a, ckpt.get("step"), name, noise_t, per, t0, log)


if __name__ == "__main__":
    try:
        main()
    except (ValueError, OSError) as e:  # bad input, a missing file or package: one line
        sys.exit(f"error: {e}")
