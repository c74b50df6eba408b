# Class-conditional fine-tuning of the latent UMD-L/2 (config/latent_umd_l2.py), the recipe of
# config/finetune_in64.py: a fresh label table, optimizer and schedule, EMA from the loaded weights;
# preset auto: umd_finetune for umd and mae checkpoints, dit_finetune for dit and maskdit.
# Run: torchrun --nproc_per_node 8 train.py config/latent_finetune.py --init_from=out/latent_umd_l2/ckpt.pt
# Then: torchrun --nproc_per_node 8 sample.py --ckpt out/latent_finetune/ckpt.pt --num_samples 50000 --cfg_scale 1.5
out_dir = "out/latent_finetune"
data_dir = "data/imagenet256_latent"
init_from = "out/latent_umd_l2/ckpt.pt"   # the architecture comes from this checkpoint
latent = True
schedule = "linear"
labels = True
label_dropout = 0.1
batch_size = 256
lr = 1.5e-4                    # peak lr as is: fine-tuning does not scale it with the batch
epochs = 50.0
warmup_epochs = 2.0
weight_decay = 0.0
beta1, beta2 = 0.9, 0.999
ema_decay = 0.9999             # evals sample from the EMA
log_interval = 100
ckpt_interval = 2500
eval_interval = 10000
eval_shots = 10
eval_max_test = 10000
eval_samples = 100             # one row per class for the first 10 classes, decoded by the VAE
eval_cfg_scale = 1.5
