"""Figures as PNG files: segmentation overlays, explanation panels, training
curves.

Figures are drawn on `matplotlib.figure.Figure` with the Agg canvas directly
(no pyplot, no global backend switch), so they work headless and in
notebooks alike. Every function takes the PNG path first (None: draw only)
and returns the Figure.
"""

from __future__ import annotations

import os
from typing import Mapping, Sequence

import numpy as np
from matplotlib import colormaps
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.patches import Patch

Array = np.ndarray


def class_colors(num_classes: int) -> np.ndarray:
  """(C, 3) RGB in [0, 1]: black background, then tab10/tab20 colours."""
  cmap = colormaps["tab10" if num_classes <= 11 else "tab20"]
  colors = [(0.0, 0.0, 0.0)]
  colors += [cmap(i % cmap.N)[:3] for i in range(num_classes - 1)]
  return np.asarray(colors, np.float32)


def _display_image(image: Array) -> np.ndarray:
  """HWC / HW array → (H, W, 3) float in [0, 1] (min-max scaled if needed)."""
  image = np.asarray(image, np.float32)
  if image.ndim == 3 and image.shape[-1] == 1:
    image = image[..., 0]
  lo, hi = float(image.min()), float(image.max())
  if lo < 0 or hi > 1:
    image = (image - lo) / (hi - lo) if hi > lo else np.zeros_like(image)
  if image.ndim == 2:
    image = np.repeat(image[..., None], 3, axis=-1)
  return image[..., :3]


def overlay(image: Array, label: Array, num_classes: int,
            alpha: float = 0.5) -> np.ndarray:
  """(H, W, 3) image with every non-background pixel tinted by its class
  colour: `(1 - alpha) * image + alpha * colour`."""
  rgb = _display_image(image)
  label = np.asarray(label)
  colors = class_colors(num_classes)
  tinted = (1 - alpha) * rgb + alpha * colors[np.clip(label, 0,
                                                      num_classes - 1)]
  return np.where((label > 0)[..., None], tinted, rgb).astype(np.float32)


def _save(fig: Figure, path: str | os.PathLike | None, dpi: int) -> Figure:
  if path is not None:
    os.makedirs(os.path.dirname(os.fspath(path)) or ".", exist_ok=True)
    fig.savefig(path, dpi=dpi, format="png", bbox_inches="tight")
  return fig


def _new_figure(rows: int, cols: int, size: float = 2.2):
  fig = Figure(figsize=(cols * size, rows * size))
  FigureCanvasAgg(fig)
  axes = np.asarray(fig.subplots(rows, cols, squeeze=False))
  for ax in axes.ravel():
    ax.set_xticks([])
    ax.set_yticks([])
  return fig, axes


def segmentation_grid(path: str | os.PathLike | None, images: Array,
                      labels: Array | None, predictions: Mapping[str, Array],
                      num_classes: int,
                      class_names: Sequence[str] | None = None,
                      alpha: float = 0.5, dpi: int = 100) -> Figure:
  """One row per example: image, ground truth overlay, then one overlay per
  named prediction (e.g. {"teacher": ..., "student": ...}).

  images (N, H, W[, C]); labels and predictions (N, H, W) class ids.
  """
  images = np.asarray(images)
  columns = ([] if labels is None else [("ground truth", labels)])
  columns += list(predictions.items())
  fig, axes = _new_figure(len(images), 1 + len(columns))
  for r, image in enumerate(images):
    axes[r, 0].imshow(_display_image(image))
    for c, (name, maps) in enumerate(columns, start=1):
      axes[r, c].imshow(overlay(image, np.asarray(maps)[r], num_classes,
                                alpha))
      if r == 0:
        axes[r, c].set_title(name)
  axes[0, 0].set_title("image")
  names = class_names or [f"class {i}" for i in range(num_classes)]
  colors = class_colors(num_classes)
  handles = [Patch(color=colors[i], label=names[i])
             for i in range(1, num_classes)]
  if handles:
    fig.legend(handles=handles, loc="lower center", ncol=min(len(handles), 5),
               fontsize="small", frameon=False)
    fig.subplots_adjust(bottom=0.12)
  return _save(fig, path, dpi)


def explanation_grid(path: str | os.PathLike | None, images: Array,
                     maps: Mapping[str, Array], masks: Array | None = None,
                     cmap: str = "jet", alpha: float = 0.5,
                     dpi: int = 100) -> Figure:
  """One row per example: the image, then each named explanation map
  (Grad-CAM, saliency, an explainer mask; (N, H, W)) as a heat map over it,
  with the outline of `masks` (N, H, W), e.g. lesions, when given."""
  images = np.asarray(images)
  fig, axes = _new_figure(len(images), 1 + len(maps))
  for r, image in enumerate(images):
    rgb = _display_image(image)
    axes[r, 0].imshow(rgb)
    for c, (name, m) in enumerate(maps.items(), start=1):
      heat = np.asarray(m[r], np.float32)
      lo, hi = float(heat.min()), float(heat.max())
      heat = (heat - lo) / (hi - lo) if hi > lo else np.zeros_like(heat)
      axes[r, c].imshow(rgb)
      axes[r, c].imshow(heat, cmap=cmap, alpha=alpha, vmin=0, vmax=1)
      if r == 0:
        axes[r, c].set_title(name)
    if masks is not None and np.any(masks[r]):
      for ax in axes[r]:
        ax.contour(np.asarray(masks[r]) > 0, levels=[0.5], colors="white",
                   linewidths=0.8)
  axes[0, 0].set_title("image")
  return _save(fig, path, dpi)


def _series(values) -> tuple[np.ndarray, np.ndarray]:
  """values, (steps, values), or [(step, value), ...] → (steps, values)."""
  if isinstance(values, Mapping):
    return np.asarray(values["step"]), np.asarray(values["value"], float)
  if (isinstance(values, tuple) and len(values) == 2
      and np.ndim(values[0]) == 1 and np.ndim(values[1]) == 1):
    return np.asarray(values[0]), np.asarray(values[1], float)
  arr = np.asarray(values, float)
  if arr.ndim == 2 and arr.shape[1] == 2:
    return arr[:, 0], arr[:, 1]
  return np.arange(len(arr)), arr


def training_curves(path: str | os.PathLike | None,
                    history: Mapping[str, object],
                    log_scale: Sequence[str] = ("loss",),
                    dpi: int = 100) -> Figure:
  """One panel per metric; series sharing the part after the last "/" share
  a panel ("train/loss" and "eval/loss" together).

  Each series is a list of values (x = index), a (steps, values) pair, a
  list of (step, value) pairs, or {"step": ..., "value": ...}. Panels whose
  name contains one of `log_scale` use a log y axis when positive.
  """
  if not history:
    raise ValueError("training_curves got an empty history")
  panels: dict[str, list[tuple[str, np.ndarray, np.ndarray]]] = {}
  for name, values in history.items():
    steps, ys = _series(values)
    panels.setdefault(name.rsplit("/", 1)[-1], []).append((name, steps, ys))
  cols = min(len(panels), 3)
  rows = -(-len(panels) // cols)
  fig = Figure(figsize=(4.2 * cols, 3.0 * rows))
  FigureCanvasAgg(fig)
  axes = np.asarray(fig.subplots(rows, cols, squeeze=False)).ravel()
  for ax, (panel, series) in zip(axes, panels.items()):
    for name, steps, ys in series:
      ax.plot(steps, ys, label=name, marker="o" if len(ys) < 20 else None,
              markersize=3)
    positive = all(np.all(ys[np.isfinite(ys)] > 0) for _, _, ys in series)
    if positive and any(key in panel for key in log_scale):
      ax.set_yscale("log")
    ax.set_title(panel)
    ax.set_xlabel("step")
    ax.grid(alpha=0.3)
    ax.legend(fontsize="small")
  for ax in axes[len(panels):]:
    ax.set_visible(False)
  fig.tight_layout()
  return _save(fig, path, dpi)


def topk_bars(path: str | os.PathLike | None, ks: Sequence[int],
              scores: Mapping[str, Mapping[str, Sequence[float]]],
              dpi: int = 100, errors=None) -> Figure:
  """Top-K overlap with lesions: one panel per form ("jaccard", "dice"),
  grouped bars per k with one bar per method. `scores[method][form]` holds
  one value per k; `errors` (optional, the same structure) error bars."""
  if not scores:
    raise ValueError("topk_bars got no method")
  forms = list(next(iter(scores.values())))
  fig = Figure(figsize=(5.0 * len(forms), 3.2))
  FigureCanvasAgg(fig)
  axes = np.asarray(fig.subplots(1, len(forms), squeeze=False)).ravel()
  x = np.arange(len(ks))
  width = 0.8 / len(scores)
  cmap = colormaps["tab10" if len(scores) <= 10 else "tab20"]
  for ax, form in zip(axes, forms):
    for i, (name, s) in enumerate(scores.items()):
      # A chance reference ("chance/...") in grey, the methods in colour.
      ax.bar(x + (i - (len(scores) - 1) / 2) * width, s[form], width,
             label=name, color="0.6" if name.startswith("chance")
             else cmap(i % cmap.N),
             yerr=None if errors is None else errors[name][form],
             capsize=1.5, error_kw=dict(linewidth=0.6))
    ax.set_xticks(x, [f"{k}" for k in ks])
    ax.set_xlabel("k (K = k·32·32 px at 224²)")
    ax.set_title(f"top-K overlap with lesions ({form})")
    ax.grid(alpha=0.3, axis="y")
  axes[-1].legend(fontsize="small", bbox_to_anchor=(1.02, 1), loc="upper left")
  fig.tight_layout()
  return _save(fig, path, dpi)
