# UMD-L/2 on VAE latents (the paper's latent model): ImageNet 256x256 through Stable Diffusion's VAE,
# 32x32x4 latents, patch 2 (256 tokens); UMD's pre-training setup otherwise (batch 1024, 800 epochs).
# Data: python data/folder/prepare.py --src IMAGENET/train --val_src IMAGENET/val --size 256 --out data/imagenet256
#       torchrun --nproc_per_node 8 data/latent/prepare.py --src data/imagenet256 --vae PATH   # -> data/imagenet256_latent
#       (PATH: a diffusers folder of stabilityai/sd-vae-ft-ema; pip install diffusers)
# Run:  torchrun --nnodes N --nproc_per_node 8 train.py config/latent_umd_l2.py
exec(open("config/umd_in64.py").read())   # batch 1024, lr, 800 epochs, warmup, AdamW, evals
out_dir = "out/latent_umd_l2"
data_dir = "data/imagenet256_latent"
latent = True                  # a fresh posterior sample every step, the stored flip copy, no random-resized crop
schedule = "linear"            # the DDPM linear schedule of latent diffusion (no clipping when sampling)
model = "L/2"                  # width 1024, encoder 24 blocks, decoder 8, 16 heads
