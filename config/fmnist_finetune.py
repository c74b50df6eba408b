# Quick start, part 2: class-conditional fine-tuning of config/fmnist_umd.py's checkpoint on a CPU
# (3-7 minutes on 2 cores). Fresh label table, optimizer and schedule; EMA from the weights.
#   python train.py config/fmnist_finetune.py
out_dir = "out/fmnist_finetune"
data_dir = "data/fashion_mnist"
init_from = "out/fmnist_umd/ckpt.pt"
labels = True
# preset: the fine-tuning recipe of what the checkpoint was pre-trained with (umd_finetune here)
batch_size = 64
lr = 5e-4                      # peak lr as is (the paper: 1.5e-4 over 50 epochs)
max_steps = 240
warmup_frac = 0.05
weight_decay = 0.0
beta1, beta2 = 0.9, 0.999
crop_area_min = 0.95
ema_decay = 0.99               # the paper's 0.9999 needs far more than 240 steps
log_interval = 20
ckpt_interval = 120
eval_interval = 0              # the quick start samples with sample.py and probes with probe.py
