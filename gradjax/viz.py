"""PNG figures for saliency experiments (matplotlib, Agg canvas; no pyplot, no global backend change).

* :func:`saliency_gallery` — rows = examples, columns = the image and one map per method (thesis Fig. 3.3).
* :func:`perturbation_curves` — pixel perturbation: % pixels removed vs fractional output change (Fig. 3.2a).
* :func:`roar_curves` — ROAR: % pixels removed vs retrained test accuracy (Fig. 3.2b).
* :func:`sanity_check_plot` — rank correlation with the original maps per randomization stage (Adebayo et al.).
* :func:`training_curves` — train / eval metrics against the step, from the JSON-lines records that
  :func:`gradjax.train.fit` writes (``metrics.jsonl``; :func:`read_metrics` reads such a file).

Every function writes one PNG to ``path`` (parent folders are created) and returns the path.
"""
from __future__ import annotations

import json
import os
from typing import Iterable, Mapping, Optional, Sequence, Union

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

__all__ = ["saliency_gallery", "perturbation_curves", "roar_curves", "sanity_check_plot", "training_curves",
           "read_metrics"]


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


# keys of a metrics record that are coordinates or bookkeeping, not metrics
_RECORD_AXES = ("step", "epoch", "elapsed_s")
_BOOKKEEPING = ("count",)  # e.g. ``eval_count`` (examples evaluated): drawn only if asked for by name
# train and eval names of one quantity share a panel ("loss" is the training objective, "cross_entropy" the
# eval one; for the plain classifier they are the same quantity, up to weight decay, which optax adds apart)
_PANEL_OF = {"loss": "loss / cross-entropy", "cross_entropy": "loss / cross-entropy"}


def read_metrics(path: str) -> list[dict]:
    """The records of a JSON-lines metrics log (one JSON object per non-empty line), in file order."""
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def _training_series(records: Union[str, Iterable[Mapping]], metrics: Optional[Sequence[str]] = None
                     ) -> dict[str, dict[str, tuple[list[int], list[float]]]]:
    """``{panel: {line label: (steps, values)}}`` from metric records (see :func:`training_curves`); steps sorted,
    a step logged twice keeps its last value."""
    if isinstance(records, (str, os.PathLike)):
        records = read_metrics(os.fspath(records))
    series: dict[str, dict[str, dict[int, float]]] = {}  # panel -> line label -> {step: value}
    for rec in records:
        if "step" not in rec:
            raise ValueError(f"every metrics record needs a 'step'; got {dict(rec)!r}.")
        for key, value in rec.items():
            if key in _RECORD_AXES or isinstance(value, bool) or not isinstance(value, (int, float)):
                continue
            is_eval = key.startswith("eval_")
            base = key[len("eval_"):] if is_eval else key
            if (metrics is not None and base not in metrics) or (metrics is None and base in _BOOKKEEPING):
                continue
            panel = _PANEL_OF.get(base, base)
            label = f"{'eval' if is_eval else 'train'} {base}"
            series.setdefault(panel, {}).setdefault(label, {})[int(rec["step"])] = float(value)
    if not series:
        raise ValueError("no metric values to plot" + (f" for metrics={list(metrics)}" if metrics is not None else "")
                         + ": the records hold only step/epoch/elapsed_s, or none were given.")
    return {panel: {label: (sorted(pts), [pts[k] for k in sorted(pts)]) for label, pts in lines.items()}
            for panel, lines in series.items()}


def training_curves(records: Union[str, Iterable[Mapping]], path: str, *, metrics: Optional[Sequence[str]] = None,
                    title: Optional[str] = None, dpi: int = 100) -> str:
    """Training curves: one panel per metric, train and eval lines against the training step.

    Args:
      records: metric records ``{"step": int, "epoch": int, <metric>: float, ...}`` as :func:`gradjax.train.fit`
        returns and logs them — train records (``loss``, ``accuracy``, ... averaged over the last steps) and eval
        records (``eval_accuracy``, ``eval_cross_entropy``, ... once per epoch) — or the path of such a JSON-lines
        file. A run resumed from a checkpoint appends to its log, so a step logged twice keeps its last value.
      metrics: base metric names to draw (e.g. ``("loss", "accuracy")``); default: every numeric metric found
        except ``count`` (``loss`` and ``cross_entropy`` share a panel).
    Raises ``ValueError`` if no record has a numeric metric besides ``step``/``epoch``/``elapsed_s``.
    """
    series = _training_series(records, metrics)
    fig = Figure(figsize=(4.2 * len(series), 3.4 + (0.3 if title else 0)))
    axes = fig.subplots(1, len(series), squeeze=False)[0]
    for ax, (panel, lines) in zip(axes, series.items()):
        for label, (steps, values) in lines.items():
            ax.plot(steps, values, marker="o" if label.startswith("eval") else None, ms=3, label=label)
        ax.set_xlabel("step")
        ax.set_ylabel(panel)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    if title:
        fig.suptitle(title)
    return _save(fig, path, dpi)
