# MAE on VAE latents: the clean branch only (r = 1), no AdaLN, batch 4096 as config/mae_in64.py;
# otherwise the setup of config/latent_umd_l2.py (L/2, 800 epochs, linear schedule).
# Run: torchrun --nnodes N --nproc_per_node 8 train.py config/latent_mae.py
exec(open("config/latent_umd_l2.py").read())
out_dir = "out/latent_mae"
preset = "mae"                 # clean branch only, mask 0.75, adaln False
batch_size = 4096              # global; peak lr = 1.5e-4 * 4096 / 256 = 2.4e-3
ckpt_interval = 1000
eval_interval = 6250           # 10-shot probe only
eval_samples = 0               # an MAE does not sample
