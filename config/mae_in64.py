# MAE baseline: pure MAE (r = 1: the clean branch only), no AdaLN (a cond token in every block),
# batch 4096 as in the paper (the paper's Table 1 and Sec. 5.1). Otherwise UMD's pre-training setup.
# Run:  torchrun --nnodes N --nproc_per_node 8 train.py config/mae_in64.py
exec(open("config/umd_in64.py").read())
out_dir = "out/mae_in64"
preset = "mae"                 # clean branch only, mask 0.75, adaln False
batch_size = 4096              # global; peak lr = 1.5e-4 * 4096 / 256 = 2.4e-3
ckpt_interval = 1000
eval_interval = 6250           # 10-shot probe only
eval_samples = 0               # an MAE does not sample
