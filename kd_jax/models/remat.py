"""Per-block rematerialisation: the `remat` field of kd_jax's models.

A model that offers it builds each of its repeated blocks through
`checkpointed(Block, self.remat)`: with `remat` off the block class itself,
with it on `nn.remat(Block)`, so the backward pass keeps only each block's
input and recomputes the block's inside from it. The variables (names,
shapes, values) and the outputs are the same either way.

`remat` is False (off), True (keep nothing inside a block) or a
`jax.checkpoint_policies` policy (keep what it names, e.g.
`dots_saveable`: convolution and matmul outputs). A rematted block's
`__call__` must take `train` as its second positional argument, and its
callers pass it positionally: nn.remat makes that argument static (a
Python bool the block branches on), which a keyword cannot be.
"""
from typing import Any

import flax.linen as nn

ModuleDef = Any


def checkpointed(block: ModuleDef, remat: Any,
                 takes_train: bool = True) -> ModuleDef:
  """`block`, or `nn.remat(block)` when `remat` is True or a policy.
  `takes_train`: whether the block's `__call__` is `(x, train)` (else
  `(x)`)."""
  if remat is False or remat is None:
    return block
  policy = None if remat is True else remat
  # static_argnums counts `self`: (self, x, train).
  return nn.remat(block, static_argnums=(2,) if takes_train else (),
                  policy=policy)
