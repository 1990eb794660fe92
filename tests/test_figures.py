"""Tests for kd_jax.evaluate.figures (PNG output, overlay colours)."""

import numpy as np
import pytest
from PIL import Image

from kd_jax.evaluate import figures


def _png_size(path):
  with Image.open(path) as im:
    assert im.format == "PNG"
    return im.size


def test_class_colors_and_overlay():
  colors = figures.class_colors(4)
  assert colors.shape == (4, 3)
  np.testing.assert_array_equal(colors[0], 0)
  assert len({tuple(c) for c in colors}) == 4
  image = np.full((2, 2, 1), 0.5, np.float32)
  label = np.array([[0, 1], [2, 3]])
  out = figures.overlay(image, label, 4, alpha=0.5)
  assert out.shape == (2, 2, 3)
  np.testing.assert_allclose(out[0, 0], 0.5)  # background untouched
  np.testing.assert_allclose(out[1, 1], 0.25 + 0.5 * colors[3], rtol=1e-6)
  # Intensities outside [0, 1] (e.g. z-scored MRI) are min-max scaled.
  assert figures.overlay(np.array([[-3.0, 5.0]]), np.zeros((1, 2), int),
                         2).max() == 1.0


def test_segmentation_grid_png(tmp_path):
  rng = np.random.default_rng(0)
  images = rng.random((2, 16, 16, 1), dtype=np.float32)
  labels = rng.integers(0, 3, (2, 16, 16))
  preds = {"teacher": labels, "student": rng.integers(0, 3, (2, 16, 16)),
           "baseline": np.zeros((2, 16, 16), int)}
  path = tmp_path / "sub" / "grid.png"
  fig = figures.segmentation_grid(path, images, labels, preds, 3,
                                  class_names=["bg", "liver", "spleen"])
  assert path.is_file()
  w, h = _png_size(path)
  assert w > h  # 5 columns, 2 rows
  assert len(fig.axes) == 10


def test_explanation_grid_and_training_curves(tmp_path):
  rng = np.random.default_rng(1)
  images = rng.random((3, 12, 12, 3), dtype=np.float32)
  maps = {"Grad-CAM": rng.random((3, 12, 12)),
          "saliency": np.zeros((3, 12, 12))}
  masks = np.zeros((3, 12, 12), bool)
  masks[0, 3:6, 3:6] = True
  fig = figures.explanation_grid(tmp_path / "cam.png", images, maps,
                                 masks=masks)
  assert (tmp_path / "cam.png").is_file() and len(fig.axes) == 9
  history = {
      "train/loss": [1.0, 0.5, 0.3, 0.2],
      "eval/loss": ([0, 2], [0.9, 0.4]),
      "eval/mean_dice": [(0, 0.1), (2, 0.6)],
      "lr": {"step": [0, 1, 2, 3], "value": [0.1, 0.1, 0.05, 0.0]},
  }
  fig = figures.training_curves(tmp_path / "curves.png", history)
  visible = [ax for ax in fig.axes if ax.get_visible()]
  assert sorted(ax.get_title() for ax in visible) == ["loss", "lr",
                                                      "mean_dice"]
  loss_ax = next(ax for ax in visible if ax.get_title() == "loss")
  assert len(loss_ax.get_lines()) == 2 and loss_ax.get_yscale() == "log"
  assert _png_size(tmp_path / "curves.png")[0] > 0
  with pytest.raises(ValueError, match="empty"):
    figures.training_curves(None, {})
