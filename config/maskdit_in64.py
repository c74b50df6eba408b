# MaskDiT baseline as in the paper: noisy branch only, 50% masking, B/4 on ImageNet 64x64.
# Data: python data/imagenet64/prepare.py --src DIR
# Run:  torchrun --nnodes N --nproc_per_node 8 train.py config/maskdit_in64.py
out_dir = "out/maskdit_in64"
data_dir = "data/imagenet64"
model = "B/4"
preset = "maskdit"             # r 0, noisy mask 0.5; the probe noises images at t = 50
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
