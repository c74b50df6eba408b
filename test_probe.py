"""Tests for probe.py: the big_vision few-shot solver, shot selection, features, the CLI, errors."""
import json
import os
import warnings

import numpy as np
import pytest
import torch

import probe
from model import UMD, ModelConfig


def _design(x, mean, std):
    """The solver's design matrix, built by hand: standardised features and the bias column 100."""
    return np.concatenate([(x - mean) / std, np.full((len(x), 1), 100.0)], axis=1)


def _direct(train_x, train_y, lam, k):
    mean, std = train_x.mean(0, keepdims=True), train_x.std(0, keepdims=True) + 1e-5
    X = _design(train_x, mean, std)
    Y = 2.0 * np.eye(k)[train_y] - 1.0
    return np.linalg.solve(X.T @ X + lam * np.eye(X.shape[1]), X.T @ Y), mean, std


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


def test_separable_data_is_solved():
    rng = np.random.default_rng(1)
    centres = rng.normal(size=(5, 32)) * 10
    y, ty = np.repeat(np.arange(5), 3), np.repeat(np.arange(5), 20)
    x, tx = centres[y] + rng.normal(size=(15, 32)), centres[ty] + rng.normal(size=(100, 32))
    assert probe.fewshot_accuracy(x, y, tx, ty) == 1.0


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


def _model(**kw):
    """A micro model with every weight perturbed: at init AdaLN-Zero makes every encoder block the
    identity, so the zero-initialised CLS tokens give rep == 0 for every image."""
    torch.manual_seed(0)
    m = UMD(ModelConfig.from_name("micro/4", image_size=16, channels=1, **kw)).eval()
    with torch.no_grad():
        for p in m.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return m


def test_features_shape_and_batch_independence():
    m = _model()
    imgs = np.random.default_rng(0).integers(0, 256, size=(11, 16, 16, 1), dtype=np.uint8)
    for noise_t in (None, 50):
        f3 = probe.extract_features(m, imgs, batch_size=3, noise_t=noise_t)
        f11 = probe.extract_features(m, imgs, batch_size=11, noise_t=noise_t)
        assert f3.shape == (11, 64) and f3.dtype == np.float32
        np.testing.assert_allclose(f3, f11, atol=1e-5)
    assert not np.allclose(f3, probe.extract_features(m, imgs))  # noised differs from clean
    # a label table: the null label is used; different-size data is resized + centre-cropped
    big = np.random.default_rng(1).integers(0, 256, size=(4, 20, 24, 1), dtype=np.uint8)
    assert probe.extract_features(_model(num_classes=3), big).shape == (4, 64)
    with pytest.raises(ValueError, match="channel"):
        probe.extract_features(m, np.zeros((2, 16, 16, 3), np.uint8))


def test_default_noise_rule():
    assert probe.default_noise_t({"train_config": {"preset": "dit"}}) == 50
    assert probe.default_noise_t({"train_config": {"preset": "maskdit"}, "knobs": {}}) == 50
    assert probe.default_noise_t({"train_config": {"preset": "umd"}}) is None
    assert probe.default_noise_t({"train_config": {"preset": "umd"}, "knobs": {"no_noise_prob": 0.0}}) == 50
    assert probe.default_noise_t({"train_config": {"preset": "mae"}, "knobs": {"no_noise_prob": 1.0}}) is None


def _write_data(d, n_train=60, n_val=30, classes=3, size=16, val=True):
    os.makedirs(d, exist_ok=True)
    rng = np.random.default_rng(0)
    splits = {"train": n_train, "val": n_val} if val else {"train": n_train}
    for split, n in splits.items():
        y = np.arange(n) % classes
        x = rng.integers(0, 60, (n, size, size, 1))  # class c: a bright band of rows c*4..c*4+3
        for c in range(classes):
            x[y == c, 4 * c:4 * c + 4] += 150
        np.save(os.path.join(d, f"{split}.npy"), x.astype(np.uint8))
        np.save(os.path.join(d, f"{split}_labels.npy"), y.astype(np.int64))
    meta = {"name": "toy", "image_size": size, "channels": 1, "num_classes": classes,
            "classes": [str(c) for c in range(classes)], "splits": splits}
    with open(os.path.join(d, "meta.json"), "w") as f:
        json.dump(meta, f)
    return d


def _write_ckpt(path, preset="umd"):
    m = _model()
    torch.save({"model_config": m.config.to_dict(), "model": m.state_dict(), "ema": None,
                "train_config": {"preset": preset}, "knobs": {}, "step": 0}, path)
    return path


def test_cli_and_evaluate(tmp_path, capsys):
    data = _write_data(str(tmp_path / "toy"))
    ckpt = _write_ckpt(str(tmp_path / "ckpt.pt"))
    rep = probe.main(["--ckpt", ckpt, "--data", data, "--shots", "2,full", "--seeds", "0,1",
                      "--lambdas", "1,1024", "--quiet"])
    assert set(rep["results"]) == {"ckpt", "random_init", "raw_pixels"}
    saved = json.load(open(tmp_path / "probe.json"))
    assert saved["results"]["raw_pixels"]["full"]["mean"] == 1.0  # each toy class has its own bright band
    assert len(saved["results"]["ckpt"]["2"]["accs"]) == 2 and saved["n_test"] == 30
    assert all(l in (1.0, 1024.0) for l in saved["results"]["ckpt"]["2"]["lambdas"])
    assert "raw pixels" in capsys.readouterr().out
    m = _model().train()
    acc = probe.evaluate(m, data, shots=(2, 5), seeds=(0,), noise_t=50, max_test=10)
    assert m.training and set(acc) == {"2", "5"} and all(0 <= a <= 1 for a in acc.values())
    # no val split: test on the last 10% of train
    d2 = _write_data(str(tmp_path / "noval"), val=False)
    rep = probe.main(["--ckpt", ckpt, "--data", d2, "--shots", "3", "--no_baselines", "--quiet",
                      "--out", str(tmp_path / "p2.json")])
    assert rep["n_test"] == 6 and rep["n_pool"] == 54 and "no val" in rep["test"]


def test_bad_input(tmp_path):
    ckpt = _write_ckpt(str(tmp_path / "ckpt.pt"))
    with pytest.raises(ValueError, match="2 classes"):
        probe.fewshot_accuracy(np.zeros((3, 4)), np.zeros(3, int), np.zeros((1, 4)), np.zeros(1, int))
    one = _write_data(str(tmp_path / "one"), classes=1)
    with pytest.raises(ValueError, match="fewer than 2 classes"):
        probe.main(["--ckpt", ckpt, "--data", one, "--quiet"])
    nolab = _write_data(str(tmp_path / "nolab"))
    os.remove(os.path.join(nolab, "train_labels.npy"))
    with pytest.raises(FileNotFoundError, match="train_labels.npy"):
        probe.main(["--ckpt", ckpt, "--data", nolab, "--quiet"])
    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match="not a readable umd checkpoint"):
        probe.main(["--ckpt", str(bad), "--data", nolab, "--quiet"])
    with pytest.raises(ValueError, match="shots"):
        probe.main(["--ckpt", ckpt, "--data", nolab, "--shots", "0", "--quiet"])
