"""Shared by every lesson's plots: images in any form to an array, show-or-return, widget-or-static."""

from __future__ import annotations

from typing import Callable

import matplotlib.pyplot as plt
import numpy as np
import torch


def in_live_kernel() -> bool:
    """True inside a running Jupyter kernel (where ipywidgets can talk to the front end)."""
    try:
        from IPython import get_ipython
    except ImportError:
        return False
    shell = get_ipython()
    return shell is not None and getattr(shell, "kernel", None) is not None


def to_image_array(image, mean=None, std=None) -> np.ndarray:
    """Any image-like input -> float array (H, W, 3) in [0, 1] for imshow."""
    if isinstance(image, torch.Tensor):
        x = image.detach().float().cpu()
        if x.dim() == 4:
            x = x[0]
        if mean is not None and std is not None:
            x = x * torch.tensor(std).view(-1, 1, 1) + torch.tensor(mean).view(-1, 1, 1)
        array = x.permute(1, 2, 0).numpy()
    elif isinstance(image, np.ndarray):
        array = image.astype(np.float32)
        array = array / 255.0 if array.max() > 1.0 else array
    else:
        from ..processing import open_image, to_rgb

        array = np.asarray(to_rgb(open_image(image)), dtype=np.float32) / 255.0
    if array.ndim == 2:
        array = np.repeat(array[..., None], 3, axis=-1)
    if array.shape[-1] == 1:
        array = np.repeat(array, 3, axis=-1)
    return np.clip(array, 0.0, 1.0)


def _finish(fig, show: bool):
    fig.tight_layout()
    if show:
        plt.show()
        return None
    return fig


def _widget_or_static(make_widget: Callable, draw_static: Callable, static: bool | None) -> None:
    """Show an ipywidgets control in a live kernel; otherwise (or if ipywidgets is missing) a static figure."""
    if static is None:
        static = not in_live_kernel()
    if not static:
        try:
            make_widget()
            return
        except ImportError:
            pass
    draw_static()
