# DiT-L/2 with labels from scratch on VAE latents (the latent baseline): the noisy branch only, no
# masking, class labels with 10% dropout for guidance, batch 256, 400 epochs, EMA 0.9999. DiT's
# AdamW at lr 1e-4 without weight decay; here with this project's warmup + cosine lr schedule.
# Data: as config/latent_umd_l2.py.  Run: torchrun --nproc_per_node 8 train.py config/latent_dit_l2.py
out_dir = "out/latent_dit_l2"
data_dir = "data/imagenet256_latent"
latent = True
schedule = "linear"
model = "L/2"
preset = "dit"                 # r 0, no masking
labels = True
label_dropout = 0.1
batch_size = 256
lr = 1e-4                      # peak lr as is
epochs = 400.0
warmup_epochs = 5.0
weight_decay = 0.0
beta1, beta2 = 0.9, 0.999
hflip = True
ema_decay = 0.9999
log_interval = 100
ckpt_interval = 5000
eval_interval = 50000          # probe at t = 50 (no clean training images) + a decoded sample grid
eval_shots = 10
eval_max_test = 10000
eval_samples = 100
eval_cfg_scale = 1.5
