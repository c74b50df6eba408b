# Class-conditional fine-tuning of a CIFAR-10 pre-training checkpoint (config/cifar10_<preset>.py) on a
# CPU: a fresh label table, optimizer and schedule, EMA started from the loaded weights (sampling uses
# the EMA). preset "auto": the fine-tuning recipe of what the checkpoint was pre-trained with (umd, mae
# -> umd_finetune; dit, maskdit -> dit_finetune). scripts/compare.py runs it for every preset with the
# same number of steps.
#   python train.py config/cifar10_finetune.py --init_from=out/cifar10_dit/ckpt.pt --out_dir=out/cifar10_dit_ft
out_dir = "out/cifar10_finetune"
data_dir = "data/cifar10"
init_from = "out/cifar10_umd/ckpt.pt"   # the architecture comes from this checkpoint
labels = True
label_dropout = 0.1
batch_size = 64
lr = 5e-4                      # peak lr as is (the paper: 1.5e-4 over 50 epochs)
max_steps = 120
warmup_frac = 0.05             # 6 steps
weight_decay = 0.0
beta1, beta2 = 0.9, 0.999
crop_area_min = 0.95
ema_decay = 0.98               # the paper's 0.9999 needs far more steps (0.98^120: 9% of the start is left)
seed = 0
log_interval = 10
ckpt_interval = 40
eval_interval = 0              # samples and FID: sample.py and fid.py, or scripts/compare.py
