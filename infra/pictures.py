"""Pictures of samples: tiled into one canvas, written as PNG (sample.py, train.py's evals,
scripts/compare.py)."""
from pathlib import Path

import numpy as np
from PIL import Image

from data.common import atomic_write


def tile(images, ncols=8, pad=2):
    """uint8 (N, H, W, C) -> one (rows, cols, C) uint8 canvas, ncols per row, white padding."""
    n, h, w, c = images.shape
    ncols = min(ncols, n)
    nrows = -(-n // ncols)
    canvas = np.full((nrows * (h + pad) + pad, ncols * (w + pad) + pad, c), 255, np.uint8)
    for i, img in enumerate(images):
        r, col = divmod(i, ncols)
        canvas[pad + r * (h + pad):(r + 1) * (h + pad), pad + col * (w + pad):(col + 1) * (w + pad)] = img
    return canvas


def save_grid(images, path, ncols=8):
    """uint8 (N, H, W, C) with C 1 (saved as 'L') or 3 -> one PNG, ncols per row."""
    images = np.asarray(images)
    if images.dtype != np.uint8 or images.ndim != 4 or images.shape[3] not in (1, 3) or len(images) == 0:
        raise ValueError(f"save_grid needs uint8 images (N, H, W, 1 or 3), got {images.dtype} {images.shape}")
    canvas = tile(images, ncols)
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    picture = Image.fromarray(canvas[..., 0] if canvas.shape[2] == 1 else canvas)
    atomic_write(path, lambda f: picture.save(f, format="PNG"))
    return path


def grid_images(images, labels=None, ncols=8, max_rows=10):
    """The first samples; with labels one row per class (first max_rows classes, ncols each)."""
    if labels is None:
        return images[:ncols * max_rows]
    rows = []
    for k in list(dict.fromkeys(labels.tolist()))[:max_rows]:
        row = images[labels == k][:ncols]
        rows.append(np.concatenate([row, np.zeros((ncols - len(row),) + images.shape[1:], images.dtype)]))
    return np.concatenate(rows)


def save_rows(columns, path, decode=None):
    """PNG with one row per image: the images of each column side by side (each column through decode, if
    given), e.g. original | masked input | reconstruction."""
    columns = [decode(c) for c in columns] if decode else [np.asarray(c) for c in columns]
    rows = np.stack(columns, axis=1).reshape(-1, *columns[0].shape[1:])
    return save_grid(rows, path, ncols=len(columns))
