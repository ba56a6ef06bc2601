"""Pictures: image grids, and showing the package's own source in the book.

Images inside the package live in [-1, 1]; `to_uint8` is the one place where they
go back to the 0..255 integers that files and screens use.
"""

from __future__ import annotations

import inspect
import math
import textwrap
from pathlib import Path

import torch
from torch import Tensor


def to_uint8(x: Tensor) -> Tensor:
    """Images in [-1, 1] (any float dtype) -> uint8 in 0..255, the inverse of x / 127.5 - 1.

    Values outside [-1, 1] are clipped. Shape is unchanged.
    """
    return ((x.detach().float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)


def make_grid(x: Tensor, nrow: int | None = None, padding: int = 2) -> Tensor:
    """Tile images [B, C, H, W] in [-1, 1] into one uint8 image [C', H', W'].

    `nrow` images per row (default: the square root of B, rounded up). Single-channel
    images stay single-channel; the gaps between tiles are white.
    """
    x = to_uint8(x.cpu())
    b, c, h, w = x.shape
    nrow = nrow or math.ceil(math.sqrt(b))
    ncol = math.ceil(b / nrow)
    grid = torch.full((c, padding + ncol * (h + padding), padding + nrow * (w + padding)), 255,
                      dtype=torch.uint8)
    for i in range(b):
        row, col = divmod(i, nrow)
        top, left = padding + row * (h + padding), padding + col * (w + padding)
        grid[:, top:top + h, left:left + w] = x[i]
    return grid


def save_grid(x: Tensor, path: str | Path, nrow: int | None = None, padding: int = 2) -> Path:
    """Save images [B, C, H, W] in [-1, 1] as one PNG grid (see `make_grid`); returns the path."""
    from PIL import Image

    grid = make_grid(x, nrow=nrow, padding=padding)
    array = grid.permute(1, 2, 0).numpy()
    image = Image.fromarray(array[:, :, 0] if array.shape[2] == 1 else array)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    image.save(path)
    return path


def show_grid(x: Tensor, nrow: int | None = None, title: str | None = None, ax=None, scale: float = 0.6):
    """Draw images [B, C, H, W] in [-1, 1] as one grid with matplotlib; returns the axes."""
    import matplotlib.pyplot as plt

    grid = make_grid(x, nrow=nrow).permute(1, 2, 0).numpy()
    if ax is None:
        height, width = grid.shape[:2]
        _, ax = plt.subplots(figsize=(max(2.0, width / 28 * scale), max(2.0, height / 28 * scale)))
    if grid.shape[2] == 1:
        ax.imshow(grid[:, :, 0], cmap="gray", vmin=0, vmax=255)
    else:
        ax.imshow(grid)
    ax.set_axis_off()
    if title:
        ax.set_title(title)
    return ax


def show_source(obj) -> None:
    """Show the source code of a function, class or method of the package.

    In a notebook (the book, Colab, Jupyter) it is displayed as a highlighted Python
    block; elsewhere it is printed.
    """
    source = textwrap.dedent(inspect.getsource(obj))
    try:
        from IPython import get_ipython
        from IPython.display import Markdown, display
    except ImportError:  # pragma: no cover - IPython comes with Jupyter
        print(source)
        return
    if get_ipython() is None:
        print(source)
        return
    display(Markdown(f"```python\n{source}```"))
