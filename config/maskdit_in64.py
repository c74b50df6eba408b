# MaskDiT baseline as in the paper: the noisy branch only, 50% masking; the probe noises images
# at t = 50. Everything else is UMD's pre-training setup (B/4, ImageNet 64x64, batch 1024, 800 epochs).
# Run:  torchrun --nnodes N --nproc_per_node 8 train.py config/maskdit_in64.py
exec(open("config/umd_in64.py").read())
out_dir = "out/maskdit_in64"
preset = "maskdit"             # r 0, noisy mask 0.5
