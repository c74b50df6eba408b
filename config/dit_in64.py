# DiT baseline: the noisy branch only, no masking (the paper's Table 1); the probe noises images at
# t = 50. Everything else is UMD's pre-training setup (B/4, ImageNet 64x64, batch 1024, 800 epochs).
# Run:  torchrun --nnodes N --nproc_per_node 8 train.py config/dit_in64.py
exec(open("config/umd_in64.py").read())
out_dir = "out/dit_in64"
preset = "dit"                 # r 0, no masking
