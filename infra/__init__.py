"""The support package: what a training job needs that is not the method.

    config.py      --key=value / config-file parsing, value ranges, help text
    launch.py      torchrun setup, the out_dir lock, signals, stall timeouts, the run's guard
    logs.py        log.jsonl and the periodic log line
    checkpoint.py  the one checkpoint writer and reader, resume, init_from (fine-tuning)
    evals.py       the evaluations run during training (probe, validation losses, FID, sample grid)
    inception.py   the FID Inception network and its weights
    cli.py         argument and output checks of sample.py, probe.py and fid.py
    pictures.py    image grids (samples, reconstructions)
"""
