# UMD pre-training, B/4 on ImageNet 64x64 (the paper's Table 4).
# Data: python data/imagenet64/prepare.py --src DIR. dit/maskdit/mae_in64.py start from this file.
# Run:  torchrun --nnodes N --nproc_per_node 8 train.py config/umd_in64.py
out_dir = "out/umd_in64"
data_dir = "data/imagenet64"
model = "B/4"
preset = "umd"                 # r 0.5, clean mask 0.75, noisy mask 0.375, AdaLN
batch_size = 1024              # global; peak lr = 1.5e-4 * 1024 / 256 = 6e-4
base_lr = 1.5e-4
epochs = 800.0
warmup_epochs = 40.0           # 5% of 800
weight_decay = 0.05
beta1, beta2 = 0.9, 0.95
crop_area_min = 0.8
ema_decay = 0.0                # no EMA in pre-training
log_interval = 100
ckpt_interval = 2500
eval_interval = 25000          # 10-shot probe + a sample grid
eval_shots = 10
eval_max_test = 10000
