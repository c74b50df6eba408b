# Flow matching in UMD's layout (corrupt.py's fork, --loss=flow): x_s = (1 - s) x0 + s eps, UMD's batch split,
# masks and clean MAE branch. Everything else is config/cifar10_umd.py (the comparison's shared setup).
#   python train.py config/cifar10_flow.py
exec(open("config/cifar10_umd.py").read())
out_dir = "out/cifar10_flow"
loss = "flow"
preset = "flow"
