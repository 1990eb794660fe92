"""Model variables drawn by numpy, for tests that need some values but not
flax's jitted init (whose compile takes tens of seconds to over a minute on
a busy 2-core CPU; the values only have to be the same in every run)."""
import math

import jax
import numpy as np


def draw(abstract, seed=0, bias_std=0.0):
  """Arrays of `abstract`'s shapes and dtypes: weights ~ N(0, 1/fan_in), norm
  scales and running variances 1, vectors (biases, means) ~ N(0, bias_std²)."""
  rng = np.random.default_rng(seed)

  def leaf(path, x):
    name = str(getattr(path[-1], "key", path[-1]))
    if name in ("scale", "var"):
      return np.ones(x.shape, x.dtype)
    if len(x.shape) < 2:
      return (bias_std * rng.standard_normal(x.shape)).astype(x.dtype)
    fan_in = math.prod(x.shape[:-1])
    return (rng.standard_normal(x.shape) / math.sqrt(fan_in)).astype(x.dtype)

  return jax.tree_util.tree_map_with_path(leaf, abstract)
