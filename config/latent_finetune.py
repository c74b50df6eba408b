# Class-conditional fine-tuning of the latent UMD-L/2 (config/latent_umd_l2.py), the recipe of
# config/finetune_in64.py: a fresh label table, optimizer and schedule, EMA from the loaded weights;
# preset auto: umd_finetune for umd and mae checkpoints, dit_finetune for dit and maskdit.
# Run: torchrun --nproc_per_node 8 train.py config/latent_finetune.py --init_from=out/latent_umd_l2/ckpt.pt
# Then: torchrun --nproc_per_node 8 sample.py --ckpt out/latent_finetune/ckpt.pt --num_samples 50000 --cfg_scale 1.5
exec(open("config/finetune_in64.py").read())   # batch 256, lr 1.5e-4, 50 epochs, EMA 0.9999, evals
out_dir = "out/latent_finetune"
data_dir = "data/imagenet256_latent"
init_from = "out/latent_umd_l2/ckpt.pt"   # the architecture comes from this checkpoint
latent = True
schedule = "linear"
