"""The evaluations run during training (train.py's eval_interval): the few-shot probe, validation
losses, FID / IS / precision-recall of samples, and a sample grid. Made once before training
(setup_eval) so that a missing weight file or val split fails at the start, not hours later."""
import os
import sys
import time
from dataclasses import asdict

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F

import fid
import probe
import sample
from corrupt import SCHEMES, T, masked_mse, pixel_mask
from data.common import atomic_write, load_meta, load_split
from data.vae import decode, load_vae, posterior_mean
from infra.cli import gather_samples, read_stats
from infra.inception import load_inception
from infra.pictures import grid_images, save_grid
from model import from_uint8, in_eval_mode


def setup_eval(cfg, run, log):
    """What the periodic eval needs, made once before training so that a missing weight file or
    val split fails now, not hours later: the fixed val batch of the validation losses, and for
    FID the Inception network and the reference statistics (rank 0 computes them once and caches
    them in out_dir/fid_ref.npz, keyed by the val files, so a changed dataset is recomputed)."""
    ev = {"val": None, "inception": None, "ref": None, "vae": None, "to_input": None}
    if not cfg.eval_interval:
        return ev
    if cfg.latent:  # the probe and val losses read the latent data's posterior means; samples are decoded
        ev["to_input"] = lambda rows: posterior_mean(rows, cfg.latent_scale)
        if cfg.eval_fid_samples or cfg.eval_samples and run.master:
                ev["vae"] = load_vae(cfg.vae, run.device)
    if cfg.eval_val_images and run.master:
        try:
            images, labels, _ = load_split(cfg.data_dir, "val")
        except FileNotFoundError:
            log(f"note: {cfg.data_dir} has no val split: no validation losses")
        else:
            idx = np.sort(np.random.default_rng(0).permutation(len(images))[:cfg.eval_val_images])
            ev["val"] = (images[idx], torch.from_numpy(labels[idx]))
    if cfg.eval_fid_samples:
        ev["inception"] = load_inception(cfg.eval_fid_weights or None, run.device, download=False)
        if run.master:
            ev["ref"] = reference_stats(cfg, ev["inception"], log)
        if run.world > 1:
            dist.barrier()  # the long-timeout group: rank 0 may take a while
    return ev


def reference_stats(cfg, inception, log):
    """(mu, sigma, pool or None) of the reference: eval_fid_ref's npz, or the val split's features."""
    if cfg.eval_fid_ref:
        st = read_stats(cfg.eval_fid_ref)
        if st is None:
            raise ValueError(f"eval_fid_ref {cfg.eval_fid_ref} holds images, not statistics: make them with "
                             f"`python fid.py stats SOURCE --features --out {cfg.eval_fid_ref}`")
        return st["mu"], st["sigma"], st.get("pool")
    data_dir = (load_meta(cfg.data_dir).get("latent") or {}).get("source") or cfg.data_dir  # latents: their pixels
    split = "val" if "val" in load_meta(data_dir)["splits"] else "train"
    src = os.path.abspath(os.path.join(data_dir, f"{split}.npy"))
    key = f"{src} {os.path.getsize(src)} {os.stat(src).st_mtime_ns} {inception.source}"
    cache = os.path.join(cfg.out_dir, "fid_ref.npz")
    if os.path.exists(cache):
        with np.load(cache) as d:
            if str(d["key"]) == key:
                return d["mu"], d["sigma"], d["pool"]
    log(f"FID reference: Inception features of {data_dir} {split} -> {cache}")
    pool, _ = fid.features(load_split(data_dir, split)[0], inception, verbose=False)
    mu, sigma = fid.mean_cov(pool)
    atomic_write(cache, lambda f: np.savez(f, key=key, mu=mu, sigma=sigma, pool=pool.astype(np.float32)))
    return mu, sigma, pool


@torch.no_grad()
@in_eval_mode
def validation_losses(model, scheme, val, abar, device, batch_size=64, to_input=from_uint8):
    """The diffusion loss (eps and x0 MSE, no mask; labels when the model has a table) of noised val
    images and the masked-reconstruction loss of the clean ones (mask ratio 0.75), with timesteps,
    noise and masks fixed: the same every eval, so the curves compare."""
    images, labels = val
    g = torch.Generator().manual_seed(0)
    n, L = len(images), model.num_tokens
    t, eps = torch.randint(0, T, (n,), generator=g), torch.randn((n,) + to_input(images[:1]).shape[1:], generator=g)
    keep = torch.rand(n, L, generator=g).argsort(1)[:, :L - int(L * 0.75)]
    masks = torch.ones(n, L, dtype=torch.bool).scatter_(1, keep, False)
    sums = np.zeros(3)
    for i in range(0, n, batch_size):
        x0, b = to_input(images[i:i + batch_size]).to(device), slice(i, i + batch_size)
        x, t_model = scheme.noise_at(x0, t[b].to(device), eps[b].to(device), abar)
        y = labels[b].to(device) if model.config.num_classes else None
        x0_pred, eps_pred, _ = model(x, t_model, y)
        rec, _, mask = model(x0, torch.zeros(len(x0), dtype=torch.long, device=device), None, mask=masks[b].to(device))
        pix = pixel_mask(mask, x0.shape[-1])
        sums += len(x0) * np.array([F.mse_loss(eps_pred, eps[b].to(device)).item(),
                                    F.mse_loss(x0_pred, x0).item(), masked_mse(rec, x0, pix).item()])
    return dict(zip(("val_eps_mse", "val_x0_mse", "val_mae_loss"), (sums / n).tolist()))


def fid_eval(model, cfg, abar, run, ev):
    """FID, IS (weights with an fc layer) and precision/recall of eval_fid_samples samples per
    guidance scale. Every rank samples and featurizes its share (per-image seeds: the same
    images whatever the world size); rank 0 gathers the features and scores them."""
    out, n = {}, cfg.eval_fid_samples
    scales = cfg.eval_fid_cfg_scales if model.config.num_classes else (1.0,)
    for scale in dict.fromkeys(float(s) for s in scales):
        imgs, _ = sample.sample_images(model, abar, n, steps=cfg.eval_fid_steps, cfg_scale=scale, seed=0,
                                       device=run.device, rank=run.rank, world_size=run.world,
                                       sampler=sample.pick_sampler(cfg.loss), clip=not cfg.latent)
        imgs = decode(ev["vae"], imgs, cfg.latent_scale) if cfg.latent else imgs
        pool, logits = fid.features(imgs, ev["inception"], verbose=False)
        if run.world > 1:
            pool = gather_samples(pool, n, run.rank, run.world, run.device)
            logits = None if logits is None else gather_samples(logits, n, run.rank, run.world, run.device)
        if run.master:
            mu, sigma, ref_pool = ev["ref"]
            tag = f"cfg{scale:g}" if model.config.num_classes else "uncond"
            out[f"fid_{tag}"] = float(fid.frechet_distance(*fid.mean_cov(pool), mu, sigma))
            if logits is not None and n >= 10:  # IS: 10 splits
                out[f"is_{tag}"] = float(fid.inception_score(logits)[0])
            if ref_pool is not None and min(len(ref_pool), n) > 3:
                out[f"precision_{tag}"], out[f"recall_{tag}"] = map(float, fid.precision_recall(ref_pool, pool))
    return out


def evaluate(model, cfg, abar, pretrain_knobs, step, run, ev):
    """The periodic eval -> dict for the log (rank 0's; {} elsewhere). FID on every rank; the
    few-shot probe, a sample grid and the validation losses on rank 0, the others waiting."""
    t0 = time.time()
    out = fid_eval(model, cfg, abar, run, ev) if ev["inception"] is not None else {}
    seconds = {"fid": time.time() - t0} if out else {}
    if run.master:
        try:
            t0 = time.time()
            if cfg.eval_shots:
                noise_t = probe.default_noise_t({"pretrain_knobs": asdict(pretrain_knobs)})
                accs = probe.evaluate(model, cfg.data_dir, shots=(cfg.eval_shots,), seeds=(0,), noise_t=noise_t,
                                      abar=abar, max_test=cfg.eval_max_test or None, device=run.device, quiet=True,
                                      scheme=cfg.loss, to_input=ev["to_input"])
                out.update({f"fewshot_{k}": float(v) for k, v in accs.items()})
                seconds["probe"], t0 = time.time() - t0, time.time()
            if ev["val"] is not None:
                out.update(validation_losses(model, SCHEMES[cfg.loss], ev["val"], abar, run.device,
                                             to_input=ev["to_input"] or from_uint8))
                seconds["val_losses"], t0 = time.time() - t0, time.time()
            if cfg.eval_samples:
                scale = cfg.eval_cfg_scale if model.config.num_classes else 1.0
                imgs, ys = sample.sample_images(model, abar, cfg.eval_samples, steps=cfg.eval_steps, cfg_scale=scale,
                                                eta=1.0, seed=0, device=run.device, sampler=sample.pick_sampler(cfg.loss),
                                                clip=not cfg.latent)
                imgs = decode(ev["vae"], imgs, cfg.latent_scale) if cfg.latent else imgs
                path = os.path.join(cfg.out_dir, f"samples_{step:07d}.png")
                ncols = 8 if ys is None else max(1, min(8, -(-len(ys) // model.config.num_classes)))  # row per class
                out["samples"] = str(save_grid(grid_images(imgs, ys, ncols), path, ncols))
                seconds["grid"] = time.time() - t0
        except Exception as e:  # an eval bug or a full disk must not kill a long run
            print(f"eval failed at step {step}: {type(e).__name__}: {e}", file=sys.stderr)
    if run.world > 1:
        dist.barrier()  # the others wait for rank 0 here, under the long timeout
    return {**out, "seconds": {k: round(v, 2) for k, v in seconds.items()}} if out else out
