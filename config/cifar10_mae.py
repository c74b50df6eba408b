# MAE: the clean branch only (r 1, mask 0.75), no AdaLN (a cond token in every block).
# Everything else is config/cifar10_umd.py (the comparison's shared setup).
#   python train.py config/cifar10_mae.py
exec(open("config/cifar10_umd.py").read())
out_dir = "out/cifar10_mae"
preset = "mae"
