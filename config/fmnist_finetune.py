# Quick start, part 2: class-conditional fine-tuning of config/fmnist_umd.py's checkpoint on a CPU
# (about 8.5 minutes on 2 cores with native bf16, docs/quickstart.md). Fresh label table, optimizer and
# schedule; EMA from the weights.
#   python train.py config/fmnist_finetune.py
out_dir = "out/fmnist_finetune"
data_dir = "data/fashion_mnist"
init_from = "out/fmnist_umd/ckpt.pt"
labels = True
# preset: the fine-tuning recipe of what the checkpoint was pre-trained with (umd_finetune here)
# dtype: the default, bf16 on CPUs with native bf16 (AVX512-BF16, AMX): 1.5x fp32's speed on this recipe
batch_size = 32                # twice the updates of batch 64 at the same img/s: the samples gain most
lr = 1e-3                      # peak lr as is (the paper: 1.5e-4 over 50 epochs); a short run wants more
max_steps = 1440               # 0.77 epoch; batch 32 keeps 1 clean image a step (int(32 * 0.05)), 16 none
warmup_frac = 0.05
weight_decay = 0.0
beta1, beta2 = 0.9, 0.999
crop_area_min = 0.95
ema_decay = 0.9975             # about 400 steps of memory; the paper's 0.9999 needs far more steps
log_interval = 80
ckpt_interval = 720
eval_interval = 0              # the quick start samples with sample.py and probes with probe.py
