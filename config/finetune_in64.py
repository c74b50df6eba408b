# Class-conditional fine-tuning of a pre-training checkpoint (the paper's Table 5): a fresh label
# table, fresh optimizer and schedule, EMA started from the loaded weights. The corruption is the
# fine-tuning recipe of what the checkpoint was pre-trained with (preset "auto"): umd and mae get
# umd_finetune (r 0.05, masked clean branch), dit and maskdit get dit_finetune (r 0, no masking).
# Run: torchrun --nproc_per_node 8 train.py config/finetune_in64.py --init_from=out/umd_in64/ckpt.pt
out_dir = "out/finetune_in64"
data_dir = "data/imagenet64"
init_from = "out/umd_in64/ckpt.pt"   # the architecture comes from this checkpoint
labels = True
label_dropout = 0.1
batch_size = 256
lr = 1.5e-4                    # peak lr as is: fine-tuning does not scale it with the batch
epochs = 50.0
warmup_epochs = 2.0
weight_decay = 0.0
beta1, beta2 = 0.9, 0.999
crop_area_min = 0.95
ema_decay = 0.9999             # evals sample from the EMA
log_interval = 100
ckpt_interval = 2500
eval_interval = 10000
eval_shots = 10
eval_max_test = 10000
eval_samples = 100             # one row per class for the first 10 classes
eval_cfg_scale = 1.5
