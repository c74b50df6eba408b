# MaskDiT as the paper's baseline: the noisy branch only (r 0), 50% masking; probed at t = 50.
# Everything else is config/cifar10_umd.py (the comparison's shared setup).
#   python train.py config/cifar10_maskdit.py
exec(open("config/cifar10_umd.py").read())
out_dir = "out/cifar10_maskdit"
preset = "maskdit"
