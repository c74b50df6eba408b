# Quick start: pre-train a tiny UMD on Fashion-MNIST 32x32x1 on a CPU (3-6 minutes on 2 cores).
#   python data/fashion_mnist/prepare.py
#   python train.py config/fmnist_umd.py
#   python scripts/plot_run.py out/fmnist_umd          # loss and the 10-shot probe over the run -> run.png
# The 10-shot probe rises to ~50% in the first 100 steps and then only slowly (raw pixels: ~68%): a third of
# an epoch is too short to beat them. With --max_steps=700 --eval_interval=100 --eval_max_test=2000 it read
# 52, 50, 56, 55, 55, 55, 56% at steps 100-700: more steps of this size buy little.
out_dir = "out/fmnist_umd"
data_dir = "data/fashion_mnist"
model = "tiny/4"               # 5.6M parameters, 64 tokens of 4x4 pixels
preset = "umd"
batch_size = 64                # 70-130 img/s on 2 CPU cores, by machine: 0.5-0.9 s a step
base_lr = 4e-3                 # peak lr 4e-3 * 64 / 256 = 1e-3: a short run wants more than 1.5e-4
max_steps = 320                # a third of an epoch: the probe gains little after step ~240 (see above)
warmup_frac = 0.05
log_interval = 20
ckpt_interval = 100
eval_interval = 80             # 4 points of the probe curve: 10-shot on 1000 val images (~8 s each)
eval_shots = 10
eval_max_test = 1000
eval_samples = 0               # an unconditional grid of so short a run shows little: sample the fine-tune
eval_val_images = 0
dtype = "fp32"                 # bf16 (the default on CPUs with native bf16) gains little here (153 vs 127 img/s)
                               # and its run probed lower (10-shot 55.0 vs 57.8% at step 320; one run each)
