"""Compiled memory of a train-mode gradient with and without `remat`.

    python benchmarks/remat_memory.py [--batch=32] [--models=unet,vit_b16]

For each model: `compiled.memory_analysis()` of `jax.grad` of a train-mode
loss (mean square of the outputs) at the model's default input size, with
`remat` False, "dots_saveable" and True; temporary bytes (the activations
and scratch of one step) and the argument bytes. On XLA:CPU the temp size
does not fall (its scheduler recomputes the blocks early, see
docs/usage.md); run it on the GPU or TPU to see what `config.remat` saves
there. Compiles only, nothing runs.
"""
import time

from absl import app, flags
import jax
import jax.numpy as jnp

from kd_jax import models
from kd_jax.models.summary import default_kwargs

FLAGS = flags.FLAGS
flags.DEFINE_integer("batch", 32, "global batch")
flags.DEFINE_list("models", ["unet", "resnet18_seg", "vit_b16",
                             "efficientvit_b1", "transunet_b16"],
                  "registered model names")

SETTINGS = {"off": False, "dots_saveable":
            jax.checkpoint_policies.dots_saveable, "on": True}


def measure(name, remat, batch):
  model = models.build(name, remat=remat,
                       **default_kwargs(name))
  shape = models.default_input(name, batch)
  x = jax.ShapeDtypeStruct(shape, jnp.float32)
  variables = jax.eval_shape(
      lambda x: model.init(jax.random.key(0), x, train=False), x)

  def loss(params, variables, x):
    out, _ = model.apply({**variables, "params": params}, x, train=True,
                         mutable=["batch_stats"],
                         rngs={"dropout": jax.random.key(1)})
    return sum(jnp.mean(jnp.square(a.astype(jnp.float32)))
               for a in jax.tree.leaves(out[0]))

  t = time.perf_counter()
  compiled = jax.jit(jax.grad(loss)).lower(variables["params"], variables,
                                           x).compile()
  m = compiled.memory_analysis()
  return m.temp_size_in_bytes, m.argument_size_in_bytes, (
      time.perf_counter() - t)


def main(_):
  print(f"backend {jax.default_backend()} {jax.devices()[0].device_kind}, "
        f"batch {FLAGS.batch}")
  print("| model | remat | temp MiB | arguments MiB | compile s |")
  print("|---|---|---|---|---|")
  for name in FLAGS.models:
    for label, remat in SETTINGS.items():
      temp, args, seconds = measure(name, remat, FLAGS.batch)
      print(f"| {name} | {label} | {temp / 2**20:.0f} | {args / 2**20:.0f} "
            f"| {seconds:.0f} |", flush=True)


if __name__ == "__main__":
  app.run(main)
