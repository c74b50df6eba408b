"""Tests for sample.py (DDIM, guidance, seeds, distributed, outputs, errors). CPU, < 60 s."""
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from corrupt import make_schedule
from model import UMD, ModelConfig
import sample as S

REPO = Path(__file__).resolve().parent
ABAR = make_schedule("cosine")


def micro_model(num_classes=0, size=8, channels=1, seed=0):
    """micro/4 with the zero-init layers perturbed, so that time and labels matter."""
    torch.manual_seed(seed)
    m = UMD(ModelConfig.from_name("micro/4", image_size=size, channels=channels, num_classes=num_classes))
    with torch.no_grad():
        for p in m.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return m.eval()


def write_ckpt(path, model, **train_config):
    torch.save({"model_config": model.config.to_dict(), "model": model.state_dict(), "ema": None,
                "train_config": train_config, "knobs": {}, "step": 0}, path)
    return str(path)


def gaussian_denoiser(abar, m, s):
    """Exact E[x0|x_t] and E[eps|x_t] for x0 ~ N(m, s^2 I)."""
    def denoise(x, t_model):
        a = abar[t_model - 1].view(-1, *[1] * (x.ndim - 1))
        xd, v = x.double(), a * s * s + 1 - a
        eps = (1 - a).sqrt() * (xd - a.sqrt() * m) / v
        x0 = m + a.sqrt() * s * s * (xd - a.sqrt() * m) / v
        return x0.float(), eps.float()
    return denoise


# ---- DDIM ---------------------------------------------------------------------------------
def test_timesteps_match_spec():
    t125 = S.ddim_timesteps(125)
    assert len(t125) == 126 and t125[:3] == [999, 991, 983] and t125[-2:] == [7, 0]
    assert all(a - b == 8 for a, b in zip(t125[:-2], t125[1:-1]))
    t250 = S.ddim_timesteps(250)
    assert len(t250) == 251 and t250[:2] == [999, 995] and t250[-2:] == [3, 0]
    assert S.ddim_timesteps(1) == [999, 0] and S.ddim_timesteps(1000) == list(range(999, -1, -1))
    for bad in (0, 1001, -3, 2.5):
        with pytest.raises(ValueError, match="steps"):
            S.ddim_timesteps(bad)


@pytest.mark.parametrize("eta", [0.0, 1.0])
@pytest.mark.parametrize("clip,eps_from", [(True, "eps"), (False, "eps"), (True, "x0")])
def test_ddim_gaussian_closed_form(eta, clip, eps_from):
    # DDIM's discretisation shrinks the std at few steps (0.176 at S = 50, eta 1): use S = 250.
    m, s = 0.3, 0.2
    torch.manual_seed(0)
    x = S.ddim_sample(gaussian_denoiser(ABAR, m, s), torch.randn(2000, 1, 2, 2), ABAR, 250, eta, clip, eps_from)
    assert abs(x.mean().item() - m) < 0.01, x.mean()
    assert abs(x.std().item() - s) < 0.01, x.std()


def test_ddim_calls_model_at_t_plus_one_and_final_t0():
    seen = []

    def denoise(x, t_model):
        seen.append(int(t_model[0]))
        return torch.zeros_like(x), torch.zeros_like(x)
    S.ddim_sample(denoise, torch.randn(2, 1, 2, 2), ABAR, 125, eta=0.0)
    assert seen == [t + 1 for t in S.ddim_timesteps(125)[:-1]] + [1]


# ---- guidance, seeds, processes ---------------------------------------------------------------
def manual_cfg(model, labels, scale, n, seed, steps=6):
    noise = S.SampleNoise(range(n), seed, (1, 8, 8))
    y = torch.as_tensor(labels)
    with torch.no_grad():
        x = S.ddim_sample(lambda x, t: model.forward_with_cfg(x, t, y, scale), noise(), ABAR, steps, 1.0, True, "eps", noise)
    return S.to_uint8(x)


def test_guidance_scale_one_is_conditional_and_zero_unconditional():
    model = micro_model(num_classes=3)
    cond, y = S.sample_images(model, ABAR, 6, steps=6, seed=1)
    assert y.tolist() == [0, 1, 2, 0, 1, 2]
    assert np.abs(manual_cfg(model, y, 1.0, 6, 1).astype(int) - cond).max() <= 1
    uncond, y0 = S.sample_images(model, ABAR, 6, steps=6, seed=1, uncond=True)
    assert y0 is None
    scale0, _ = S.sample_images(model, ABAR, 6, steps=6, seed=1, cfg_scale=0.0)  # through forward_with_cfg
    assert np.abs(scale0.astype(int) - uncond).max() <= 1
    assert np.abs(manual_cfg(model, y, 0.0, 6, 1).astype(int) - uncond).max() <= 1
    guided, _ = S.sample_images(model, ABAR, 6, steps=6, seed=1, cfg_scale=4.0)
    assert (guided != cond).any() and (cond != uncond).any()  # labels and guidance do something


def test_seed_independent_of_batch_size_and_rank():
    model = micro_model(num_classes=3)
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


def test_two_processes_equal_one(tmp_path):
    ckpt = write_ckpt(tmp_path / "ckpt.pt", micro_model(num_classes=3))
    args = ["--ckpt", ckpt, "--num_samples", "5", "--steps", "4", "--batch_size", "2", "--cfg_scale", "2",
            "--seed", "3", "--quiet"]
    S.main(args + ["--out", str(tmp_path / "one.npz")])
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(k, None)
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                        str(REPO / "sample.py"), *args, "--out", str(tmp_path / "two.npz")],
                       env=env, capture_output=True, text=True, timeout=120, cwd=REPO)
    assert r.returncode == 0, r.stderr[-3000:]
    one, two = np.load(tmp_path / "one.npz"), np.load(tmp_path / "two.npz")
    assert one["arr_0"].shape == (5, 8, 8, 1) and one["arr_0"].dtype == np.uint8
    assert np.array_equal(one["arr_0"], two["arr_0"]) and np.array_equal(one["arr_1"], two["arr_1"])


# ---- outputs ----------------------------------------------------------------------------------
def test_cli_npz_and_grid(tmp_path, capsys):
    ckpt = write_ckpt(tmp_path / "ckpt.pt", micro_model(num_classes=3, channels=3))
    S.main(["--ckpt", ckpt, "--num_samples", "10", "--steps", "3", "--cfg_scale", "1.5"])
    out = tmp_path / "samples_10_cfg1.5_steps3.npz"
    d = np.load(out)
    assert d["arr_0"].shape == (10, 8, 8, 3) and d["arr_0"].dtype == np.uint8
    assert d["arr_1"].dtype == np.int64 and d["arr_1"].tolist() == [i % 3 for i in range(10)]
    grid = Image.open(out.with_suffix(".png"))
    assert grid.mode == "RGB" and grid.size == (8 * 10 + 2, 3 * 10 + 2)  # 3 classes x 8 columns
    err = capsys.readouterr().err
    assert "img/s" in err and "ETA" in err and "wrote" in err


def test_unconditional_grayscale_and_latent(tmp_path, capsys):
    ckpt = write_ckpt(tmp_path / "ckpt.pt", micro_model())
    S.main(["--ckpt", ckpt, "--num_samples", "3", "--steps", "2", "--out", str(tmp_path / "u.npz"), "--quiet"])
    d = np.load(tmp_path / "u.npz")
    assert list(d) == ["arr_0"] and d["arr_0"].shape == (3, 8, 8, 1)
    assert Image.open(tmp_path / "u.png").mode == "L"
    lat = write_ckpt(tmp_path / "lat.pt", micro_model(channels=4), latent=True, schedule="linear")
    S.main(["--ckpt", lat, "--num_samples", "2", "--steps", "2", "--out", str(tmp_path / "lat.npz")])
    z = np.load(tmp_path / "lat.npz")["arr_0"]
    assert z.dtype == np.float32 and z.shape == (2, 8, 8, 4) and not (tmp_path / "lat.png").exists()
    assert "RAW LATENTS" in capsys.readouterr().err


def test_reconstruction(tmp_path):
    model = micro_model(size=16)
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


# ---- errors -------------------------------------------------------------------------------------
def test_bad_input_clear_errors(tmp_path):
    plain = micro_model()
    with pytest.raises(ValueError, match="guidance"):
        S.sample_images(plain, ABAR, 2, steps=2, cfg_scale=1.5)
    with pytest.raises(ValueError, match="labels"):
        S.sample_images(plain, ABAR, 2, steps=2, labels=[0])
    with pytest.raises(ValueError, match="class ids"):
        S.sample_images(micro_model(num_classes=3), ABAR, 2, steps=2, labels=[3])
    with pytest.raises(ValueError, match="positive"):
        S.sample_images(plain, ABAR, 0, steps=2)
    ckpt = write_ckpt(tmp_path / "ckpt.pt", plain)
    for extra, msg in [(["--cfg_scale", "2"], "no labels"), (["--labels", "1"], "labels"),
                       (["--steps", "1001"], "steps"), (["--num_samples", "0"], "positive")]:
        with pytest.raises(SystemExit, match=msg):
            S.main(["--ckpt", ckpt, "--quiet", "--out", str(tmp_path / "x.npz"), *extra])
    junk = tmp_path / "junk.pt"
    junk.write_bytes(b"this is not a checkpoint")
    with pytest.raises(SystemExit, match="not a .*checkpoint"):
        S.main(["--ckpt", str(junk), "--quiet"])
    torch.save({"weights": 1}, tmp_path / "dict.pt")
    with pytest.raises(SystemExit, match="not a umd checkpoint"):
        S.main(["--ckpt", str(tmp_path / "dict.pt"), "--quiet"])
