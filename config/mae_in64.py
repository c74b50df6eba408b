# MAE baseline: pure MAE (r = 1: the clean branch only), no AdaLN, batch 4096 (spec sections 2, 4).
# Data: python data/imagenet64/prepare.py --src DIR
# Run:  torchrun --nnodes N --nproc_per_node 8 train.py config/mae_in64.py
out_dir = "out/mae_in64"
data_dir = "data/imagenet64"
model = "B/4"
preset = "mae"                 # clean branch only, mask 0.75, cond token instead of AdaLN
batch_size = 4096              # global; peak lr = 1.5e-4 * 4096 / 256 = 2.4e-3
base_lr = 1.5e-4
epochs = 800.0
warmup_epochs = 40.0           # 5% of 800
weight_decay = 0.05
beta1, beta2 = 0.9, 0.95
crop_area_min = 0.8
ema_decay = 0.0
log_interval = 100
ckpt_interval = 1000
eval_interval = 6250           # 10-shot probe + a sample grid (MAE samples are not meant to be good)
eval_shots = 10
eval_max_test = 10000
eval_samples = 0              # an MAE does not sample
