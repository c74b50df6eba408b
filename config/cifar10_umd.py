# CIFAR-10 32x32x3 pre-training on a CPU: the shared setup of the comparison (scripts/compare.py).
# cifar10_mae.py, cifar10_dit.py and cifar10_maskdit.py run this file and change only the preset (and
# out_dir): same model, data, images seen, optimizer, schedule, augmentation and seed.
#   python data/cifar10/prepare.py --src FILE.npz     (a JPEG-bytes npz; or the canonical archive)
#   python train.py config/cifar10_umd.py
out_dir = "out/cifar10_umd"
data_dir = "data/cifar10"
model = "tiny/4"               # 64 tokens of 4x4 pixels
preset = "umd"                 # r 0.5, clean mask 0.75, noisy mask 0.375, AdaLN
batch_size = 64
base_lr = 4e-3                 # peak lr 4e-3 * 64 / 256 = 1e-3: a short run wants more than 1.5e-4
max_steps = 1000               # 64,000 images: 1.4 epochs of the 45,000 train images of a JPEG-bytes npz
warmup_frac = 0.05
weight_decay = 0.05
beta1, beta2 = 0.9, 0.95
crop_area_min = 0.8
ema_decay = 0.0                # no EMA in pre-training
seed = 0
log_interval = 50
ckpt_interval = 200
eval_interval = 100            # 10 probe points over the run (the probe-vs-cost curve of compare.py)
eval_shots = 100
eval_max_test = 1000           # a fixed random subset of the val split
eval_samples = 0               # no sample grid in pre-training
eval_val_images = 0            # no validation losses: each preset's loss is its own, not comparable
