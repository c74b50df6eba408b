"""
One PNG of a training run from its log.jsonl: the losses (training, and the validation losses
when the run logged them), the few-shot probe accuracy and FID / IS over the steps.

    python scripts/plot_run.py out/fmnist_umd                 # -> out/fmnist_umd/run.png
    python scripts/plot_run.py out/a out/b --out both.png     # several runs on the same axes

Needs matplotlib (pip install matplotlib); nothing else in the project does. A log's last line that is not
JSON (torn by a killed run) is skipped with a warning; a bad line before it stops the plot, naming the file
and line.
"""
import argparse
import json
import sys
from pathlib import Path


def read_log(run_dir, warn=lambda msg: print(msg, file=sys.stderr)):
    """(training rows, eval rows) of run_dir/log.jsonl. A last line that is not JSON (torn by a killed run;
    train.py drops it on resume) is skipped with a warning; a bad line before it stops, naming file and
    line."""
    path = Path(run_dir) / "log.jsonl"
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist: is {run_dir} a train.py out_dir?")
    lines = [(i, line) for i, line in enumerate(path.read_text().splitlines(), 1) if line.strip()]
    rows = []
    for i, line in lines:
        try:
            rows.append(json.loads(line))
        except ValueError as e:
            if i != lines[-1][0]:
                raise ValueError(f"{path} line {i} is not JSON ({e}): {line[:60]!r}; delete or repair that "
                                 "line") from None
            warn(f"warning: skipped the last line of {path} (line {i}, not JSON: torn by a killed run?): "
                 f"{line[:60]!r}")
    rows = [r for r in rows if isinstance(r, dict)]
    return [r for r in rows if "event" not in r], [r for r in rows if r.get("event") == "eval"]


def series(rows, key):
    pts = [(r["step"], r[key]) for r in rows if isinstance(r.get(key), (int, float))]
    return [p[0] for p in pts], [p[1] for p in pts]


def plot(run_dirs, out):
    logs = {run: read_log(run) for run in run_dirs}  # every log read (and checked) first
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise SystemExit("plot_run.py needs matplotlib: pip install matplotlib") from None
    panels = [("loss", lambda k: k == "loss" or k.startswith("val_")),
              ("few-shot accuracy", lambda k: k.startswith("fewshot_")),
              ("FID / IS", lambda k: k.startswith(("fid_", "is_")))]
    fig, axes = plt.subplots(1, 3, figsize=(15, 4))
    for run in run_dirs:
        train_rows, eval_rows = logs[run]
        name = Path(run).name
        for ax, (title, wanted) in zip(axes, panels):
            for rows in (train_rows, eval_rows):
                for key in sorted({k for r in rows for k in r if wanted(k)}):
                    x, y = series(rows, key)
                    ax.plot(x, y, marker="o" if rows is eval_rows else None, ms=3, label=f"{name} {key}")
            ax.set_title(title)
            ax.set_xlabel("step")
    for ax in axes:
        if ax.lines:
            ax.legend(fontsize=7)
        else:
            ax.text(0.5, 0.5, "not logged", ha="center", va="center", transform=ax.transAxes)
    axes[0].set_yscale("log")
    fig.tight_layout()
    fig.savefig(out, dpi=80)
    return out


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("runs", nargs="+", help="train.py out_dirs")
    p.add_argument("--out", default=None, help="PNG path (default: <first run>/run.png)")
    a = p.parse_args(argv)
    try:
        out = plot(a.runs, a.out or str(Path(a.runs[0]) / "run.png"))
    except (FileNotFoundError, ValueError) as e:
        raise SystemExit(f"error: {e}")
    print(f"wrote {out}")
    return out


if __name__ == "__main__":
    sys.exit(main() and 0)
