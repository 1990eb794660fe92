"""Writes a tiny data set in the Synapse / TransUNet layout (for tests).

    <root>/train_npz/case000<k>_slice00<j>.npz   "image" (H, W) in [0, 1],
                                                 "label" (H, W) float32
    <root>/test_vol_h5/case000<k>.npy.h5         "image", "label" (D, H, W)
    <root>/lists_Synapse/train.txt, test_vol.txt

Each slice is noise with a few bright disks, each disk one organ class, so a
model can learn something in a few steps.
"""
import numpy as np

TRAIN_CASES = ("case0005", "case0006", "case0007", "case0008")
TEST_CASES = ("case0001", "case0002")
CLASSES = (1, 3, 6)  # aorta, spleen, liver


def _slice(rng, size):
  yy, xx = np.mgrid[:size, :size]
  image = 0.2 * rng.random((size, size))
  label = np.zeros((size, size), np.float32)
  for c in CLASSES:
    cy, cx = rng.uniform(0.25 * size, 0.75 * size, 2)
    r = rng.uniform(0.08, 0.18) * size
    disk = (yy - cy) ** 2 + (xx - cx) ** 2 < r * r
    label[disk] = c
    image[disk] = 0.3 + 0.1 * c + 0.05 * rng.random(disk.sum())
  return image.astype(np.float32), label


def write(root, *, size=32, slices_per_case=3, test_size=40, test_depth=3,
          seed=0):
  """Creates the layout under `root` (a pathlib.Path); returns root."""
  import h5py
  rng = np.random.default_rng(seed)
  train = root / "train_npz"
  train.mkdir(parents=True)
  names = []
  for case in TRAIN_CASES:
    for j in range(slices_per_case):
      image, label = _slice(rng, size)
      name = f"{case}_slice{j:03d}"
      np.savez(train / f"{name}.npz", image=image, label=label)
      names.append(name)
  vols = root / "test_vol_h5"
  vols.mkdir()
  for case in TEST_CASES:
    pairs = [_slice(rng, test_size) for _ in range(test_depth)]
    with h5py.File(vols / f"{case}.npy.h5", "w") as f:
      f["image"] = np.stack([p[0] for p in pairs])
      f["label"] = np.stack([p[1] for p in pairs])
  lists = root / "lists_Synapse"
  lists.mkdir()
  (lists / "train.txt").write_text("\n".join(names) + "\n")
  (lists / "test_vol.txt").write_text("\n".join(TEST_CASES) + "\n")
  return root
