# DiT: the noisy branch only (r 0), no masking; the probe noises images at t = 50.
# Everything else is config/cifar10_umd.py (the comparison's shared setup).
#   python train.py config/cifar10_dit.py
exec(open("config/cifar10_umd.py").read())
out_dir = "out/cifar10_dit"
preset = "dit"
