"""Pretrained weights in: timm / DINOv2 ViTs and torchvision ResNets.

    python -m kd_jax.convert --weights=dinov2_vits14_reg4.pth \\
        --model=vit_s14 --model_args=num_registers=4,image_size=224 \\
        --out=teachers/dinov2_s14

reads a PyTorch state dict (`.pth`, `.pt`, `.bin`), a `.safetensors` file
or a `.npz` of arrays under the same keys, maps it onto the named kd_jax
model and saves it once as an Orbax checkpoint, `<out>/checkpoints/0`, laid
out as a trained stage's (`params/model`, `batch_stats/model`), so a distill
stage loads it with `teacher=dict(model=<out>/model.json's "model",
checkpoint=<out>)`. `<out>/model.json` holds that model config and the
source file.

Layouts (key names as in the source projects):

- ViT, timm (`VisionTransformer`, class token pooling) and DINOv2
  (`DinoVisionTransformer`): `patch_embed.proj`, `cls_token`, registers
  (`reg_token` / `register_tokens`), `pos_embed`, `blocks.{i}.{norm1,
  attn.qkv, attn.proj, ls1.gamma, norm2, mlp.fc1, mlp.fc2, ls2.gamma}`,
  `norm`, optional `head`. Every way these projects place the position
  embedding ends in kd_jax's (a row for [CLS], none for registers): the
  rows a checkpoint has for [CLS] (none with timm's `no_embed_class`, e.g.
  its DINOv2 models) and for registers (timm with registers and a
  class-token embedding) are added to those tokens, which are constants, and
  kd_jax's [CLS] row is zero. The
  patch grid is resampled to the model's `image_size // patch` grid with
  `vit.resize_pos_embed` (bicubic, antialiased: timm's
  `resample_abs_pos_embed`). A checkpoint without LayerScale loads into a
  LayerScale model with γ = 1 (the same function). DINOv2's `mask_token`
  (a training-time input) is skipped.
- ResNet, torchvision (`conv1`, `bn1`, `layer{1-4}.{j}.conv/bn{k}`,
  `downsample.{0,1}`, `fc`): weights, BatchNorm statistics;
  `num_batches_tracked` is skipped.

Anything else is refused before any array is converted: a shape that does
not fit the named model (naming the key and both shapes), a key the model
lacks, a key the checkpoint lacks.
"""
import fnmatch
import json
import math
import os
import re
import sys

import jax
import numpy as np

from kd_jax import models
from kd_jax.models import resnet, vit

# Keys left out unless the caller gives its own list (`skip`): DINOv2's mask
# token is an input of its masked-image training, and torch counts BatchNorm
# updates, which a frozen model never does.
DEFAULT_SKIP = {"vit": ("mask_token",),
                "resnet": ("*.num_batches_tracked",)}

_CONTAINERS = ("state_dict", "model")


def load_state_dict(path: str) -> dict:
  """{key: numpy array} from a `.safetensors`, `.npz` or PyTorch file;
  floating arrays in float32 whatever they were saved in.

  A PyTorch file holding a training checkpoint ({"state_dict": ...} or
  {"model": ...}) yields that entry. safetensors and torch are imported
  only for their formats (`pip install -e ".[reference]"`).
  """
  if not os.path.isfile(path):
    raise ValueError(f"--weights {path!r} is not a file")
  ext = os.path.splitext(path)[1].lower()
  if ext == ".npz":
    with np.load(path) as f:
      return {k: _float32(f[k]) for k in f.files}
  if ext == ".safetensors":
    # The flax reader: numpy has no bfloat16, jax does.
    from safetensors.flax import (  # pylint: disable=g-import-not-at-top
        load_file)
    return {k: _float32(v) for k, v in load_file(path).items()}
  import torch  # pylint: disable=g-import-not-at-top
  try:
    obj = torch.load(path, map_location="cpu", weights_only=True)
  except Exception as e:  # pylint: disable=broad-except
    raise ValueError(f"{path} is not a PyTorch state dict torch.load can "
                     f"read ({type(e).__name__}: {str(e)[:120]})") from None
  for key in _CONTAINERS:
    if isinstance(obj, dict) and isinstance(obj.get(key), dict):
      obj = obj[key]
      break
  if not isinstance(obj, dict) or not all(
      isinstance(v, torch.Tensor) for v in obj.values()):
    raise ValueError(f"{path} holds no state dict of tensors (a whole "
                     "pickled model?); save model.state_dict() instead")
  return {k: (v.float() if v.is_floating_point() else v).numpy()
          for k, v in obj.items()}


def _float32(a):
  """`a` as a numpy array, in float32 if it is floating (bfloat16 too)."""
  if jax.numpy.issubdtype(a.dtype, jax.numpy.floating):
    return np.asarray(a, np.float32)
  return np.asarray(a)


def _shape_error(what, key, got, want, hint=""):
  return ValueError(
      f"{what}: checkpoint key {key!r} has shape {tuple(got)}, the model "
      f"needs {tuple(want)}{hint}")


def _check_keys(state, expected, optional, what):
  """Checks `state` against `expected` ({key: torch-layout shape or None},
  in model order): the first shape mismatch in the checkpoint's order, then
  the first key the checkpoint lacks, then the first it has in excess."""
  for key, value in state.items():
    want = expected.get(key)
    if want is not None and tuple(value.shape) != tuple(want):
      raise _shape_error(what, key, value.shape, want)
  missing = [k for k in expected if k not in state and k not in optional]
  if missing:
    raise ValueError(
        f"{what}: the checkpoint lacks {missing[0]!r} (and "
        f"{len(missing) - 1} more keys) that the model has; is it another "
        "depth or layout?")
  extra = [k for k in state if k not in expected]
  if extra:
    hint = ("set the model's num_classes to the checkpoint's head size, or "
            "skip it with --skip='head.*'" if extra[0].startswith(("head.",
                                                                  "fc."))
            else "the model has no such part (check depth, num_registers, "
            "layerscale), or leave it out with --skip")
    raise ValueError(f"{what}: checkpoint key {extra[0]!r} (and "
                     f"{len(extra) - 1} more) is not in the model: {hint}")


def _skipped(state, patterns):
  return {k: v for k, v in state.items()
          if not any(fnmatch.fnmatchcase(k, p) for p in patterns)}


def _dense(w):
  """torch Linear weight (out, in) → flax kernel (in, out)."""
  return np.ascontiguousarray(w.T)


def _conv(w):
  """torch Conv2d weight (out, in, kh, kw) → flax kernel (kh, kw, in, out)."""
  return np.ascontiguousarray(w.transpose(2, 3, 1, 0))


def _pos_prefix(rows, registers, what):
  """How many leading rows of a (1, rows, D) position embedding belong to
  prefix tokens: 0 (timm's no_embed_class), 1 ([CLS]) or 1 + registers
  (timm's class-token embedding with registers), the one that leaves a
  square patch grid."""
  fits = [k for k in sorted({0, 1, 1 + registers})
          if rows > k and math.isqrt(rows - k) ** 2 == rows - k]
  if len(fits) != 1:
    raise ValueError(
        f"{what}: checkpoint key 'pos_embed' has {rows} rows, which is not "
        f"a square grid after 0, 1 or 1 + {registers} prefix rows "
        f"({'ambiguous: ' + str(fits) if fits else 'none fits'})")
  return fits[0]


def import_vit(state: dict, model: vit.ViT, *, what: str = "ViT",
               skip=DEFAULT_SKIP["vit"]) -> dict:
  """{"params": ...} of `model` from a timm / DINOv2 ViT state dict.

  Raises ValueError naming the first key whose shape does not fit `model`,
  or the first missing or excess key (after `skip`, fnmatch patterns).
  """
  state = _skipped(state, skip)
  d, h, depth, p = model.width, model.num_heads, model.depth, model.patch
  hidden = int(d * model.mlp_ratio)
  reg_key = "register_tokens" if "register_tokens" in state else "reg_token"
  expected = {"patch_embed.proj.weight": (d, 3, p, p),
              "patch_embed.proj.bias": (d,), "cls_token": (1, 1, d),
              "pos_embed": None}
  if model.num_registers:
    expected[reg_key] = (1, model.num_registers, d)
  for i in range(depth):
    b = f"blocks.{i}."
    expected.update({
        b + "norm1.weight": (d,), b + "norm1.bias": (d,),
        b + "attn.qkv.weight": (3 * d, d), b + "attn.qkv.bias": (3 * d,),
        b + "attn.proj.weight": (d, d), b + "attn.proj.bias": (d,),
        b + "norm2.weight": (d,), b + "norm2.bias": (d,),
        b + "mlp.fc1.weight": (hidden, d), b + "mlp.fc1.bias": (hidden,),
        b + "mlp.fc2.weight": (d, hidden), b + "mlp.fc2.bias": (d,)})
    if model.layerscale is not None:
      expected.update({b + "ls1.gamma": (d,), b + "ls2.gamma": (d,)})
  expected.update({"norm.weight": (d,), "norm.bias": (d,)})
  if model.num_classes:
    expected.update({"head.weight": (model.num_classes, d),
                     "head.bias": (model.num_classes,)})
  # LayerScale is optional: without it a block is the same function as with
  # γ = 1.
  optional = {k for k in expected if ".ls" in k}
  _check_keys(state, expected, optional, what)

  pos = state["pos_embed"]
  if pos.ndim != 3 or pos.shape[0] != 1 or pos.shape[2] != d:
    raise _shape_error(what, "pos_embed", pos.shape, (1, "rows", d))
  r = model.num_registers
  k = _pos_prefix(pos.shape[1], r, what)
  cls = state["cls_token"] + (pos[:, :1] if k else 0)
  patches = pos[:, k:]
  grid = model.image_size // p
  patches = np.asarray(vit.resize_pos_embed(patches, (grid, grid)))
  params = {
      "patch_embed": {"kernel": _conv(state["patch_embed.proj.weight"]),
                      "bias": state["patch_embed.proj.bias"]},
      # [CLS]'s row of the embedding is folded into the token itself.
      "cls_token": cls,
      "pos_embed": np.concatenate([np.zeros((1, 1, d), pos.dtype), patches],
                                  axis=1),
      "norm": {"scale": state["norm.weight"], "bias": state["norm.bias"]},
  }
  if r:
    params["registers"] = state[reg_key] + (pos[:, 1:k] if k > 1 else 0)
  for i in range(depth):
    b = f"blocks.{i}."
    qkv_w = state[b + "attn.qkv.weight"].reshape(3, h, d // h, d)
    qkv_b = state[b + "attn.qkv.bias"].reshape(3, h, d // h)
    attn = {name: {"kernel": np.ascontiguousarray(
        qkv_w[j].transpose(2, 0, 1)), "bias": qkv_b[j]}
            for j, name in enumerate(("query", "key", "value"))}
    attn["out"] = {"kernel": np.ascontiguousarray(
        state[b + "attn.proj.weight"].T.reshape(h, d // h, d)),
                   "bias": state[b + "attn.proj.bias"]}
    block = {
        "norm1": {"scale": state[b + "norm1.weight"],
                  "bias": state[b + "norm1.bias"]},
        "attn": attn,
        "norm2": {"scale": state[b + "norm2.weight"],
                  "bias": state[b + "norm2.bias"]},
        "mlp": {f"fc{j}": {"kernel": _dense(state[f"{b}mlp.fc{j}.weight"]),
                           "bias": state[f"{b}mlp.fc{j}.bias"]}
                for j in (1, 2)},
    }
    if model.layerscale is not None:
      for ls in ("ls1", "ls2"):
        block[ls] = {"gamma": state.get(f"{b}{ls}.gamma",
                                        np.ones((d,), np.float32))}
    params[f"block{i}"] = block
  if model.num_classes:
    params["head"] = {"kernel": _dense(state["head.weight"]),
                      "bias": state["head.bias"]}
  return {"params": jax.tree.map(lambda a: np.asarray(a, np.float32),
                                 params)}


_RESNET_MODULES = {"stem_conv": "conv1", "stem_bn": "bn1", "head": "fc",
                   "proj_conv": "downsample.0", "proj_bn": "downsample.1"}
_RESNET_LEAVES = {"kernel": "weight", "scale": "weight", "bias": "bias",
                  "mean": "running_mean", "var": "running_var"}


def _torch_key(path) -> str:
  """torchvision's key of a kd_jax ResNet variable path (collection first)."""
  names = [str(getattr(p, "key", p)) for p in path[1:]]
  mods = [_RESNET_MODULES.get(m) or re.sub(r"^layer(\d)_(\d+)$", r"layer\1.\2",
                                           m) for m in names[:-1]]
  return ".".join(mods + [_RESNET_LEAVES[names[-1]]])


def _torch_shape(shape) -> tuple:
  if len(shape) == 4:
    return (shape[3], shape[2], shape[0], shape[1])
  return tuple(reversed(shape)) if len(shape) == 2 else tuple(shape)


def import_resnet(state: dict, model: resnet.ResNet, *, what: str = "ResNet",
                  skip=DEFAULT_SKIP["resnet"]) -> dict:
  """{"params", "batch_stats"} of `model` from a torchvision ResNet state
  dict; errors as `import_vit`'s."""
  if model.deep_stem:
    raise ValueError(f"{what}: deep_stem=True has no torchvision layout")
  state = _skipped(state, skip)
  abstract = jax.eval_shape(lambda: model.init(
      jax.random.key(0), np.zeros((1, 32, 32, 3), np.float32), train=False))
  leaves = jax.tree_util.tree_flatten_with_path(abstract)[0]
  keys = {_torch_key(path): (path, leaf.shape) for path, leaf in leaves}
  _check_keys(state, {k: _torch_shape(s) for k, (_, s) in keys.items()},
              set(), what)

  variables = {}
  for key, (path, shape) in keys.items():
    value = state[key]
    value = _conv(value) if len(shape) == 4 else (
        _dense(value) if len(shape) == 2 else value)
    node = variables
    for p in path[:-1]:
      node = node.setdefault(p.key, {})
    node[path[-1].key] = np.asarray(value, np.float32)
  return variables


def import_weights(state: dict, model, *, what: str = "model",
                   skip=None) -> dict:
  """Variables of `model` (a kd_jax ViT or ResNet) from `state`."""
  if isinstance(model, vit.ViT):
    return import_vit(state, model, what=what,
                      skip=DEFAULT_SKIP["vit"] if skip is None else skip)
  if isinstance(model, resnet.ResNet):
    return import_resnet(state, model, what=what,
                         skip=DEFAULT_SKIP["resnet"] if skip is None else skip)
  raise ValueError(f"{what}: kd_jax.convert imports ViTs (vit_*) and ResNets "
                   f"(resnet*), not {type(model).__name__}")


def parse_model_args(text: str) -> dict:
  """`"num_registers=4,image_size=224"` → {"num_registers": 4, ...}; values
  are Python literals (None, numbers, strings, tuples), anything else a
  string."""
  import ast  # pylint: disable=g-import-not-at-top
  out = {}
  # A comma starts a new item only before `name=`: tuples keep theirs.
  items = re.split(r",\s*(?=[A-Za-z_]\w*\s*=)", text)
  for item in filter(None, (s.strip() for s in items)):
    key, sep, value = item.partition("=")
    if not sep:
      raise ValueError(f"--model_args item {item!r} is not key=value")
    try:
      out[key.strip()] = ast.literal_eval(value.strip())
    except (ValueError, SyntaxError):
      out[key.strip()] = value.strip()
  return out


def convert(weights: str, model_config: dict, out: str, *,
            skip=None) -> dict:
  """Converts `weights` into `model_config`'s model (`dict(name=...,
  **fields)`) and saves it under `out` (see the module docstring), which
  must not hold a checkpoint yet. Returns the model config a teacher entry
  names (`num_classes` set)."""
  from kd_jax import checkpoint  # pylint: disable=g-import-not-at-top
  directory = os.path.join(out, "checkpoints")
  if os.path.isdir(directory) and os.listdir(directory):
    raise ValueError(f"--out {out} already holds a checkpoint; choose a new "
                     "folder")
  cfg = dict(model_config)
  name = cfg.pop("name", None)
  model = models.build(name, **cfg)
  # Set, so that the data's class count does not replace it.
  cfg = {"name": name, **cfg, "num_classes": model.num_classes}
  variables = import_weights(load_state_dict(weights), model,
                             what=f"{weights} into {name}", skip=skip)
  state = {"params": {"model": variables["params"]},
           "batch_stats": {"model": variables.get("batch_stats", {})}}
  with checkpoint.manager(directory, save_every=1, max_to_keep=1) as mngr:
    checkpoint.save(mngr, 0, state, force=True)
    mngr.wait_until_finished()
  with open(os.path.join(out, "model.json"), "w") as f:
    json.dump({"model": cfg, "source": os.path.abspath(weights)}, f, indent=2)
  return cfg


def main(argv):
  from absl import app, flags  # pylint: disable=g-import-not-at-top
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  f = flags.FLAGS
  try:
    config = dict(name=f.model, **parse_model_args(f.model_args))
    model = convert(f.weights, config, f.out,
                    skip=None if f.skip is None else tuple(f.skip))
  except (ValueError, ImportError) as e:
    sys.exit(f"error: {e}")
  print(f"saved {f.out}; a distill stage names it as teacher=dict("
        f"model={model!r}, checkpoint={f.out!r})")


if __name__ == "__main__":
  from absl import app, flags
  flags.DEFINE_string("weights", None, "State dict: .pth/.pt/.bin (torch), "
                      ".safetensors or .npz.")
  flags.DEFINE_string("model", None, "Registered kd_jax model, e.g. vit_l16, "
                      "vit_s14, resnet50.")
  flags.DEFINE_string("model_args", "", "The model's fields, e.g. "
                      "num_registers=4,image_size=224,num_classes=0.")
  flags.DEFINE_string("out", None, "Folder for checkpoints/ and model.json.")
  flags.DEFINE_list("skip", None, "Checkpoint keys to leave out (fnmatch "
                    "patterns); default: mask_token for a ViT, "
                    "*.num_batches_tracked for a ResNet.")
  flags.mark_flags_as_required(["weights", "model", "out"])
  app.run(main)
