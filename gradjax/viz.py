"""PNG figures for saliency experiments (matplotlib, Agg canvas; no pyplot, no global backend change).

* :func:`saliency_gallery` — rows = examples, columns = the image and one map per method (thesis Fig. 3.3).
* :func:`perturbation_curves` — pixel perturbation: % pixels removed vs fractional output change (Fig. 3.2a).
* :func:`roar_curves` — ROAR: % pixels removed vs retrained test accuracy (Fig. 3.2b).
* :func:`sanity_check_plot` — rank correlation with the original maps per randomization stage (Adebayo et al.).

Every function writes one PNG to ``path`` (parent folders are created) and returns the path.
"""
from __future__ import annotations

import os
from typing import Mapping, Optional, Sequence

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

__all__ = ["saliency_gallery", "perturbation_curves", "roar_curves", "sanity_check_plot"]


def _save(fig: Figure, path: str, dpi: int) -> str:
    parent = os.path.dirname(os.path.abspath(path))
    os.makedirs(parent, exist_ok=True)
    FigureCanvasAgg(fig)
    fig.savefig(path, dpi=dpi, bbox_inches="tight")
    return path


def _image_for_display(img: np.ndarray) -> tuple[np.ndarray, Optional[str]]:
    img = np.asarray(img, np.float64)
    lo, hi = float(img.min()), float(img.max())
    img = (img - lo) / (hi - lo) if hi > lo else np.zeros_like(img)
    if img.ndim == 3 and img.shape[-1] == 1:
        return img[..., 0], "gray"
    if img.ndim == 3 and img.shape[-1] not in (3, 4):
        return img.mean(axis=-1), "gray"
    return img, (None if img.ndim == 3 else "gray")


def saliency_gallery(images, maps: Mapping[str, np.ndarray], path: str, *, max_rows: int = 8,
                     cmap: str = "inferno", signed: Sequence[str] = (), overlay: bool = False,
                     row_labels: Optional[Sequence[str]] = None, title: Optional[str] = None,
                     dpi: int = 100) -> str:
    """Grid of images and their saliency maps.

    Args:
      images: ``[B, H, W, C]``. maps: ``{method name: [B, H, W]}`` (column order = dict order).
      signed: method names whose maps are signed (drawn with a diverging colormap centred at 0).
      overlay: draw each map semi-transparently over the (grey) image.
      max_rows: at most this many examples.
    """
    images = np.asarray(images)
    if images.ndim != 4:
        raise ValueError(f"images must be [B, H, W, C]; got shape {images.shape}.")
    for name, m in maps.items():
        if np.shape(m)[:1] != images.shape[:1] or np.ndim(m) != 3:
            raise ValueError(f"maps[{name!r}] must be [B, H, W] with B = {images.shape[0]}; got {np.shape(m)}.")
    rows = min(images.shape[0], int(max_rows))
    cols = 1 + len(maps)
    fig = Figure(figsize=(1.6 * cols, 1.6 * rows + (0.4 if title else 0)))
    axes = fig.subplots(rows, cols, squeeze=False)
    for r in range(rows):
        img, img_cmap = _image_for_display(images[r])
        axes[r, 0].imshow(img, cmap=img_cmap)
        if row_labels is not None:
            axes[r, 0].set_ylabel(str(row_labels[r]), fontsize=8)
        for c, (name, m) in enumerate(maps.items(), start=1):
            a = np.asarray(m[r], np.float64)
            ax = axes[r, c]
            if overlay:
                ax.imshow(img if img.ndim == 2 else img.mean(-1), cmap="gray")
            if name in signed:
                v = float(np.abs(a).max()) or 1.0
                ax.imshow(a, cmap="RdBu_r", vmin=-v, vmax=v, alpha=0.6 if overlay else 1.0)
            else:
                ax.imshow(a, cmap=cmap, alpha=0.6 if overlay else 1.0)
            if r == 0:
                ax.set_title(name, fontsize=8)
        if r == 0:
            axes[r, 0].set_title("image", fontsize=8)
    for ax in axes.ravel():
        ax.set_xticks([])
        ax.set_yticks([])
    if title:
        fig.suptitle(title)
    return _save(fig, path, dpi)


def _curves(curves, path, xlabel, ylabel, title, percent, dpi, legend_loc="best"):
    fig = Figure(figsize=(5, 3.6))
    ax = fig.subplots()
    for name, curve in curves.items():
        if len(curve) not in (2, 3):
            raise ValueError(f"curves[{name!r}] must be (x, mean) or (x, mean, std).")
        xs = np.asarray(curve[0], np.float64) * (100.0 if percent else 1.0)
        ys = np.asarray(curve[1], np.float64)
        (line,) = ax.plot(xs, ys, marker="o", ms=3, label=name)
        if len(curve) == 3 and curve[2] is not None:
            sd = np.asarray(curve[2], np.float64)
            ax.fill_between(xs, ys - sd, ys + sd, color=line.get_color(), alpha=0.15)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    if title:
        ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc=legend_loc)
    return _save(fig, path, dpi)


def perturbation_curves(curves: Mapping[str, tuple], path: str, *, title: Optional[str] = None,
                        ylabel: str = "absolute fractional output change", dpi: int = 100) -> str:
    """Pixel-perturbation curves, one line per method: ``{name: (fractions, mean [, std])}`` (e.g. from a
    :class:`gradjax.metrics.PerturbationCurve`: ``(c.fractions, c.mean, c.std)``). x axis in % removed."""
    return _curves(curves, path, "% pixels removed", ylabel, title, True, dpi)


def roar_curves(curves: Mapping[str, tuple], path: str, *, title: Optional[str] = None,
                ylabel: str = "test accuracy after retraining", dpi: int = 100) -> str:
    """ROAR curves ``{name: (fractions, accuracies [, std])}`` (e.g. from a :class:`gradjax.metrics.RoarResult`)."""
    return _curves(curves, path, "% most salient pixels removed", ylabel, title, True, dpi)


def sanity_check_plot(stages: Sequence[str], correlations: Mapping[str, np.ndarray], path: str, *,
                      title: Optional[str] = None, ylabel: str = "Spearman rank correlation",
                      dpi: int = 100) -> str:
    """Cascading-randomization plot: x = stages (``"original"``, then each randomized layer), one line per method
    with the mean (over examples) correlation with the original maps; ``correlations[name]`` is ``[S]`` or
    ``[S, B]`` (e.g. :attr:`gradjax.metrics.SanityCheckResult.spearman`)."""
    stages = list(stages)
    fig = Figure(figsize=(max(4.0, 0.7 * len(stages) + 2), 3.6))
    ax = fig.subplots()
    xs = np.arange(len(stages))
    for name, c in correlations.items():
        c = np.asarray(c, np.float64)
        if c.shape[0] != len(stages):
            raise ValueError(f"correlations[{name!r}] has {c.shape[0]} stages; expected {len(stages)}.")
        mean = c.mean(axis=1) if c.ndim == 2 else c
        (line,) = ax.plot(xs, mean, marker="o", ms=3, label=name)
        if c.ndim == 2:
            sd = c.std(axis=1)
            ax.fill_between(xs, mean - sd, mean + sd, color=line.get_color(), alpha=0.15)
    ax.axhline(0.0, color="k", lw=0.5)
    ax.set_xticks(xs)
    ax.set_xticklabels(stages, rotation=45, ha="right", fontsize=8)
    ax.set_ylim(-1.05, 1.05)
    ax.set_xlabel("randomized down to")
    ax.set_ylabel(ylabel)
    if title:
        ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return _save(fig, path, dpi)
