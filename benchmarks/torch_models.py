"""PyTorch twins of kd_jax models and of the benchmark's distillation losses.

Used by `benchmarks/distill_step.py` as the eager PyTorch baseline, so each
twin has the layer layout, the parameter count and (with the weights copied
by `load_flax_variables`) the outputs of its kd_jax model:

  UNet          kd_jax/models/unet.py          ("unet")
  SqueezeUNet   kd_jax/models/squeeze_unet.py  ("squeeze_unet")
  TransUNet     kd_jax/models/transunet.py     ("transunet_tiny" preset and
                                                 the full R50-ViT-B/16)
  PSPNet        kd_jax/models/pspnet.py        ("pspnet_resnet101", "_50",
                                                 "_18"; dilated ResNet of
                                                 kd_jax/models/resnet.py)
  ViT           kd_jax/models/vit.py           ("vit_s16", "vit_b16",
                                                 "vit_l16", "vit_tiny";
                                                 DINOv2 style, registers)
  EfficientViT  kd_jax/models/efficientvit.py  ("efficientvit_b0", "_b1")

The losses: the default recipe's CE + Dice + a logit term (`distill_loss`),
and global embedding matching (`embedding_cosine`) through the linear
connector of kd_jax/models/connectors.py (`LinearConnector`).

Tensors are NCHW (PyTorch's native layout); the kd_jax models are NHWC.
Token features (a ViT's "block{i}", "tokens") are NLD on both sides.
Every submodule carries the name of its Flax counterpart (`enc1.Conv_0`,
`block1_unit1.conv2`, `encoder_block0.attn.query`, ...), so copying Flax
variables is a walk over the Flax tree, and a missing or extra layer fails
loudly instead of being skipped.

Padding follows Flax's "SAME" exactly where it is asymmetric (the 3×3
stride-2 transposed conv of the transposed fire module, TransUNet's 3×3/2
max-pool): PyTorch's symmetric padding would shift those outputs by a pixel.
EfficientViT pads k//2 on both sides in kd_jax too, as PyTorch does.
Forward outputs match; BatchNorm's running variance differs in one detail
that only moves the running averages: PyTorch updates it with the unbiased
batch variance, Flax with the biased one.
"""
import math

import torch
import torch.nn.functional as F
from torch import nn

# Flax BatchNorm(momentum=0.9) keeps 0.9 of the old average; PyTorch's
# momentum is the weight of the new batch.
_BN_MOMENTUM = 0.1


def _bn(ch, eps=1e-5):
  return nn.BatchNorm2d(ch, eps=eps, momentum=_BN_MOMENTUM)


# ----------------------------------------------------------------------------
# UNet.


class ConvBlock(nn.Module):
  """Two 3×3 conv (no bias) → BatchNorm → ReLU, Flax names Conv_i/BatchNorm_i."""

  def __init__(self, cin, cout):
    super().__init__()
    self.Conv_0 = nn.Conv2d(cin, cout, 3, padding=1, bias=False)
    self.BatchNorm_0 = _bn(cout)
    self.Conv_1 = nn.Conv2d(cout, cout, 3, padding=1, bias=False)
    self.BatchNorm_1 = _bn(cout)

  def forward(self, x):
    x = F.relu(self.BatchNorm_0(self.Conv_0(x)))
    return F.relu(self.BatchNorm_1(self.Conv_1(x)))


class UNet(nn.Module):
  """kd_jax.models.unet.UNet; forward returns (logits, features) in NCHW."""

  def __init__(self, num_classes, width=32, depth=4, in_channels=1):
    super().__init__()
    self.depth = depth
    cin = in_channels
    for i in range(depth):
      setattr(self, f"enc{i + 1}", ConvBlock(cin, width * 2**i))
      cin = width * 2**i
    self.bottleneck = ConvBlock(cin, width * 2**depth)
    cin = width * 2**depth
    for i in reversed(range(depth)):
      ch = width * 2**i
      setattr(self, f"up{i + 1}", nn.ConvTranspose2d(cin, ch, 2, stride=2))
      setattr(self, f"dec{i + 1}", ConvBlock(2 * ch, ch))
      cin = ch
    self.head = nn.Conv2d(cin, num_classes, 1)

  def forward(self, x):
    features, skips = {}, []
    for i in range(self.depth):
      x = getattr(self, f"enc{i + 1}")(x)
      features[f"enc{i + 1}"] = x
      skips.append(x)
      x = F.max_pool2d(x, 2)
    x = self.bottleneck(x)
    features["bottleneck"] = x
    features["embedding"] = x.mean(dim=(2, 3))
    for i in reversed(range(self.depth)):
      x = getattr(self, f"up{i + 1}")(x)
      x = torch.cat([x, skips[i]], dim=1)
      x = getattr(self, f"dec{i + 1}")(x)
      features[f"dec{i + 1}"] = x
    return self.head(x), features


# ----------------------------------------------------------------------------
# SqueezeU-Net.


class ConvBNReLU(nn.Module):
  """k×k conv (no bias, SAME) → BatchNorm → ReLU; Flax names conv, bn."""

  def __init__(self, cin, cout, kernel=3):
    super().__init__()
    self.conv = nn.Conv2d(cin, cout, kernel, padding=kernel // 2, bias=False)
    self.bn = _bn(cout)

  def forward(self, x):
    return F.relu(self.bn(self.conv(x)))


class Fire(nn.Module):
  """Fire module; with `up`, stride-2 transposed 2×2 and 3×3 expands."""

  def __init__(self, cin, features, squeeze, up=False):
    super().__init__()
    half = features // 2
    self.up = up
    self.squeeze = ConvBNReLU(cin, squeeze, 1)
    if up:
      self.expand1 = nn.ConvTranspose2d(squeeze, half, 2, stride=2, bias=False)
      # Flax pads the dilated input (2, 1) for k=3, s=2, SAME; PyTorch's
      # padding=0 pads (2, 2): crop the extra last row and column.
      self.expand3 = nn.ConvTranspose2d(squeeze, features - half, 3, stride=2,
                                        bias=False)
    else:
      self.expand1 = nn.Conv2d(squeeze, half, 1, bias=False)
      self.expand3 = nn.Conv2d(squeeze, features - half, 3, padding=1,
                               bias=False)
    self.bn1 = _bn(half)
    self.bn3 = _bn(features - half)

  def forward(self, x):
    x = self.squeeze(x)
    a = self.expand1(x)
    b = self.expand3(x)
    if self.up:
      b = b[:, :, :-1, :-1]
    return torch.cat([F.relu(self.bn1(a)), F.relu(self.bn3(b))], dim=1)


class SqueezeUNet(nn.Module):
  """kd_jax.models.squeeze_unet.SqueezeUNet (NCHW)."""

  def __init__(self, num_classes=9, width=24, depth=4, squeeze_ratio=8,
               dropout_rate=0.0, in_channels=1):
    super().__init__()
    self.depth = depth
    self.dropout = nn.Dropout(dropout_rate)

    def fire(name, cin, ch, up=False):
      setattr(self, name, Fire(cin, ch, max(ch // squeeze_ratio, 4), up))

    cin = in_channels
    for i in range(depth):
      ch = width * 2**i
      if i == 0:
        self.stem = ConvBNReLU(cin, ch, 3)
        fire("enc1_fire1", ch, ch)
      else:
        fire(f"enc{i + 1}_fire1", cin, ch)
        fire(f"enc{i + 1}_fire2", ch, ch)
      cin = ch
    ch = width * 2**depth
    fire("bottleneck_fire1", cin, ch)
    fire("bottleneck_fire2", ch, ch)
    cin = ch
    for i in reversed(range(depth)):
      ch = width * 2**i
      fire(f"dec{i + 1}_up", cin, ch, up=True)
      fire(f"dec{i + 1}_fire", 2 * ch, ch)
      cin = ch
    self.head = nn.Conv2d(cin, num_classes, 1)

  def forward(self, x):
    features, skips = {}, []
    for i in range(self.depth):
      if i == 0:
        x = self.enc1_fire1(self.stem(x))
      else:
        x = F.max_pool2d(x, 2)
        x = getattr(self, f"enc{i + 1}_fire1")(x)
        x = getattr(self, f"enc{i + 1}_fire2")(x)
      features[f"enc{i + 1}"] = x
      skips.append(x)
    x = F.max_pool2d(x, 2)
    x = self.bottleneck_fire2(self.bottleneck_fire1(x))
    x = self.dropout(x)
    features["bottleneck"] = x
    features["embedding"] = x.mean(dim=(2, 3))
    for i in reversed(range(self.depth)):
      x = getattr(self, f"dec{i + 1}_up")(x)
      x = torch.cat([x, skips[i]], dim=1)
      x = getattr(self, f"dec{i + 1}_fire")(x)
      features[f"dec{i + 1}"] = x
    return self.head(x), features


# ----------------------------------------------------------------------------
# TransUNet.


class StdConv(nn.Module):
  """Weight-standardised conv (ε = 1e-5), no bias, symmetric padding.

  The weight is the Flax parameter's name, `kernel`, stored OIHW.
  """

  def __init__(self, cin, cout, kernel, stride=1):
    super().__init__()
    self.kernel = nn.Parameter(torch.empty(cout, cin, kernel, kernel))
    nn.init.kaiming_normal_(self.kernel)
    self.stride = stride
    self.padding = (kernel - 1) // 2

  def forward(self, x):
    w = self.kernel
    mean = w.mean(dim=(1, 2, 3), keepdim=True)
    var = w.var(dim=(1, 2, 3), keepdim=True, unbiased=False)
    w = (w - mean) * torch.rsqrt(var + 1e-5)
    return F.conv2d(x, w, stride=self.stride, padding=self.padding)


def _gn(ch, eps=1e-6, groups=32):
  return nn.GroupNorm(min(groups, ch), ch, eps=eps)


class Bottleneck(nn.Module):
  def __init__(self, cin, features, mid, stride=1):
    super().__init__()
    self.has_proj = stride != 1 or cin != features
    if self.has_proj:
      self.proj = StdConv(cin, features, 1, stride)
      self.gn_proj = nn.GroupNorm(features, features, eps=1e-5)
    self.conv1 = StdConv(cin, mid, 1)
    self.gn1 = _gn(mid)
    self.conv2 = StdConv(mid, mid, 3, stride)
    self.gn2 = _gn(mid)
    self.conv3 = StdConv(mid, features, 1)
    self.gn3 = _gn(features)

  def forward(self, x):
    residual = self.gn_proj(self.proj(x)) if self.has_proj else x
    y = F.relu(self.gn1(self.conv1(x)))
    y = F.relu(self.gn2(self.conv2(y)))
    y = self.gn3(self.conv3(y))
    return F.relu(residual + y)


class Attention(nn.Module):
  """Flax MultiHeadDotProductAttention: q, k, v, out projections with bias."""

  def __init__(self, dim, num_heads):
    super().__init__()
    self.num_heads = num_heads
    self.query = nn.Linear(dim, dim)
    self.key = nn.Linear(dim, dim)
    self.value = nn.Linear(dim, dim)
    self.out = nn.Linear(dim, dim)

  def forward(self, x):
    b, n, d = x.shape
    h = self.num_heads

    def heads(t):
      return t.view(b, n, h, d // h).transpose(1, 2)

    y = F.scaled_dot_product_attention(heads(self.query(x)),
                                       heads(self.key(x)),
                                       heads(self.value(x)))
    return self.out(y.transpose(1, 2).reshape(b, n, d))


class MLP(nn.Module):
  def __init__(self, dim, hidden, dropout_rate):
    super().__init__()
    self.fc1 = nn.Linear(dim, hidden)
    self.fc2 = nn.Linear(hidden, dim)
    self.dropout = nn.Dropout(dropout_rate)

  def forward(self, x):
    x = self.dropout(F.gelu(self.fc1(x)))
    return self.dropout(self.fc2(x))


class LayerScale(nn.Module):
  """vit.LayerScale: a learned per-channel scale of a residual branch."""

  def __init__(self, dim, init_value=1e-5):
    super().__init__()
    self.gamma = nn.Parameter(torch.full((dim,), float(init_value)))

  def forward(self, x):
    return x * self.gamma


class Block(nn.Module):
  """Pre-norm transformer block (kd_jax.models.vit.Block): LayerScale ls1,
  ls2 on the residual branches when `layerscale` is given (ViT), none in
  TransUNet's encoder."""

  def __init__(self, dim, num_heads, mlp_dim, dropout_rate, layerscale=None):
    super().__init__()
    self.norm1 = nn.LayerNorm(dim, eps=1e-6)
    self.attn = Attention(dim, num_heads)
    self.norm2 = nn.LayerNorm(dim, eps=1e-6)
    self.mlp = MLP(dim, mlp_dim, dropout_rate)
    self.has_ls = layerscale is not None
    if self.has_ls:
      self.ls1 = LayerScale(dim, layerscale)
      self.ls2 = LayerScale(dim, layerscale)

  def forward(self, x):
    y = self.attn(self.norm1(x))
    x = x + (self.ls1(y) if self.has_ls else y)
    y = self.mlp(self.norm2(x))
    return x + (self.ls2(y) if self.has_ls else y)


class TransUNet(nn.Module):
  """kd_jax.models.transunet.TransUNet (NCHW); see `transunet_tiny`."""

  def __init__(self, num_classes=9, resnet_blocks=(3, 4, 9), resnet_width=64,
               hidden=768, depth=12, num_heads=12, mlp_dim=3072,
               image_size=224, head_channels=512,
               decoder_channels=(256, 128, 64, 16), dropout_rate=0.1):
    super().__init__()
    w = resnet_width
    self.resnet_blocks = tuple(resnet_blocks)
    self.depth = depth
    self.hidden = hidden
    self.root_conv = StdConv(3, w, 7, 2)
    self.root_gn = _gn(w)
    cin = w
    for s, units in enumerate(self.resnet_blocks):
      out, mid = w * 4 * 2**s, w * 2**s
      for u in range(units):
        setattr(self, f"block{s + 1}_unit{u + 1}",
                Bottleneck(cin, out, mid, 2 if (u == 0 and s > 0) else 1))
        cin = out
    self.patch_embed = nn.Conv2d(cin, hidden, 1)
    g0 = image_size // 16
    self.pos_embed = nn.Parameter(torch.randn(1, g0 * g0, hidden) * 0.02)
    self.dropout = nn.Dropout(dropout_rate)
    for i in range(depth):
      setattr(self, f"encoder_block{i}",
              Block(hidden, num_heads, mlp_dim, dropout_rate))
    self.encoder_norm = nn.LayerNorm(hidden, eps=1e-6)
    self.conv_more = ConvBNReLU(hidden, head_channels, 3)
    skip_ch = [w * 8, w * 4, w]
    cin = head_channels
    for i, ch in enumerate(decoder_channels):
      extra = skip_ch[i] if i < len(skip_ch) else 0
      setattr(self, f"decoder{i}_conv1", ConvBNReLU(cin + extra, ch, 3))
      setattr(self, f"decoder{i}_conv2", ConvBNReLU(ch, ch, 3))
      cin = ch
    self.num_decoder = len(decoder_channels)
    self.segmentation_head = nn.Conv2d(cin, num_classes, 3, padding=1)

  def _pos_embed(self, gh, gw):
    pos = self.pos_embed
    side = int(round(math.sqrt(pos.shape[1])))
    if (side, side) == (gh, gw):
      return pos
    # jax.image.resize antialiases when shrinking; so does this.
    grid = pos.reshape(1, side, side, -1).permute(0, 3, 1, 2)
    grid = F.interpolate(grid, size=(gh, gw), mode="bilinear",
                         align_corners=False, antialias=True)
    return grid.permute(0, 2, 3, 1).reshape(1, gh * gw, -1)

  def forward(self, x):
    if x.shape[1] == 1:
      x = x.repeat(1, 3, 1, 1)
    features = {}
    x = F.relu(self.root_gn(self.root_conv(x)))
    features["cnn.root"] = x
    # Flax's SAME 3×3/2 max-pool pads (0, 1) on an even side.
    x = F.max_pool2d(F.pad(x, (0, 1, 0, 1), value=-math.inf), 3, 2)
    for s, units in enumerate(self.resnet_blocks):
      for u in range(units):
        x = getattr(self, f"block{s + 1}_unit{u + 1}")(x)
      features[f"cnn.block{s + 1}"] = x
    skips = [features["cnn.block2"], features["cnn.block1"],
             features["cnn.root"]]
    x = self.patch_embed(x)
    b, d, gh, gw = x.shape
    x = x.flatten(2).transpose(1, 2) + self._pos_embed(gh, gw)
    x = self.dropout(x)
    for i in range(self.depth):
      x = getattr(self, f"encoder_block{i}")(x)
      features[f"encoder.block{i}"] = x
    x = self.encoder_norm(x)
    features["encoder"] = x
    features["embedding"] = x.mean(dim=1)
    x = x.transpose(1, 2).reshape(b, d, gh, gw)
    features["bottleneck"] = x
    x = self.conv_more(x)
    for i in range(self.num_decoder):
      x = F.interpolate(x, scale_factor=2, mode="bilinear",
                        align_corners=False)
      if i < len(skips):
        x = torch.cat([x, skips[i]], dim=1)
      x = getattr(self, f"decoder{i}_conv1")(x)
      x = getattr(self, f"decoder{i}_conv2")(x)
      features[f"decoder.block{i}"] = x
    return self.segmentation_head(x), features


# ----------------------------------------------------------------------------
# ResNet (torchvision layout, dilated) and PSPNet.


def _conv(cin, cout, kernel, stride=1, dilation=1):
  """kd_jax.models.resnet.conv: no bias, symmetric padding d·(k−1)/2."""
  return nn.Conv2d(cin, cout, kernel, stride=stride,
                   padding=dilation * (kernel - 1) // 2, dilation=dilation,
                   bias=False)


class ResBlock(nn.Module):
  """resnet.BasicBlock (two 3×3) or resnet.Bottleneck (1×1, 3×3 strided,
  1×1 × 4); a 1×1 conv + BN shortcut (proj_conv, proj_bn) when the stride
  or the width changes. Every 3×3 conv of the block is dilated."""

  def __init__(self, cin, features, stride, dilation, bottleneck):
    super().__init__()
    self.bottleneck = bottleneck
    out = features * (4 if bottleneck else 1)
    if bottleneck:
      self.conv1 = _conv(cin, features, 1)
      self.bn1 = _bn(features)
      self.conv2 = _conv(features, features, 3, stride, dilation)
      self.bn2 = _bn(features)
      self.conv3 = _conv(features, out, 1)
      self.bn3 = _bn(out)
    else:
      self.conv1 = _conv(cin, features, 3, stride, dilation)
      self.bn1 = _bn(features)
      self.conv2 = _conv(features, features, 3, 1, dilation)
      self.bn2 = _bn(features)
    self.has_proj = stride != 1 or cin != out
    if self.has_proj:
      self.proj_conv = _conv(cin, out, 1, stride)
      self.proj_bn = _bn(out)

  def forward(self, x):
    y = F.relu(self.bn1(self.conv1(x)))
    y = self.bn2(self.conv2(y))
    if self.bottleneck:
      y = self.bn3(self.conv3(F.relu(y)))
    shortcut = self.proj_bn(self.proj_conv(x)) if self.has_proj else x
    return F.relu(y + shortcut)


# kd_jax.models.resnet: (blocks per stage, bottleneck) and, per output
# stride, the (stride, dilation) of stages 1..4.
RESNETS = {"resnet18": ((2, 2, 2, 2), False),
           "resnet34": ((3, 4, 6, 3), False),
           "resnet50": ((3, 4, 6, 3), True),
           "resnet101": ((3, 4, 23, 3), True)}
_STAGE_STRIDES = {32: ((1, 1), (2, 1), (2, 1), (2, 1)),
                  16: ((1, 1), (2, 1), (2, 1), (1, 2)),
                  8: ((1, 1), (2, 1), (1, 2), (1, 4))}


class ResNet(nn.Module):
  """kd_jax.models.resnet.ResNet without the classification head
  (num_classes=None); forward returns its features dict (NCHW)."""

  def __init__(self, arch, output_stride=32, deep_stem=False, width=64,
               in_channels=3):
    super().__init__()
    self.deep_stem = deep_stem
    sizes, bottleneck = RESNETS[arch]
    w = width
    if deep_stem:
      cin = in_channels
      for i, ch in enumerate((w, w, 2 * w)):
        setattr(self, f"stem_conv{i + 1}",
                _conv(cin, ch, 3, 2 if i == 0 else 1))
        setattr(self, f"stem_bn{i + 1}", _bn(ch))
        cin = ch
    else:
      self.stem_conv = _conv(in_channels, w, 7, 2)
      self.stem_bn = _bn(w)
      cin = w
    self.names = []
    for i, (n, (stride, dilation)) in enumerate(
        zip(sizes, _STAGE_STRIDES[output_stride])):
      names = []
      for j in range(n):
        block = ResBlock(cin, w * 2**i, stride if j == 0 else 1, dilation,
                         bottleneck)
        setattr(self, f"layer{i + 1}_{j}", block)
        names.append(f"layer{i + 1}_{j}")
        cin = w * 2**i * (4 if bottleneck else 1)
      self.names.append(names)

  def forward(self, x):
    feats = {}
    if self.deep_stem:
      for i in range(3):
        x = getattr(self, f"stem_conv{i + 1}")(x)
        x = F.relu(getattr(self, f"stem_bn{i + 1}")(x))
    else:
      x = F.relu(self.stem_bn(self.stem_conv(x)))
    feats["stem"] = x
    x = F.max_pool2d(x, 3, 2, 1)  # Pads with −inf, as kd_jax's.
    for i, names in enumerate(self.names):
      for name in names:
        x = getattr(self, name)(x)
      feats[f"layer{i + 1}"] = x
    feats["embedding"] = x.mean(dim=(2, 3))
    return feats


def _resize(x, size):
  # jax.image.resize "bilinear" without antialiasing = align_corners=False
  # (half-pixel centres, edge samples clamped); PSPNet only upsamples here.
  return F.interpolate(x, size=size, mode="bilinear", align_corners=False)


class SegHead(nn.Module):
  """pspnet.SegHead: head_conv/head_bn/ReLU → Dropout2d → classifier."""

  def __init__(self, cin, num_classes, channels, dropout):
    super().__init__()
    self.head_conv = _conv(cin, channels, 3)
    self.head_bn = _bn(channels)
    self.dropout = nn.Dropout2d(dropout)
    self.classifier = nn.Conv2d(channels, num_classes, 1)

  def forward(self, x):
    x = F.relu(self.head_bn(self.head_conv(x)))
    return self.classifier(self.dropout(x)), x


class PyramidPooling(nn.Module):
  """pspnet.PyramidPooling; adaptive average pooling is torch's rule, which
  kd_jax's `adaptive_avg_pool` reproduces (overlapping bins)."""

  def __init__(self, cin, channels, bins):
    super().__init__()
    self.bins = tuple(bins)
    for b in self.bins:
      setattr(self, f"bin{b}_conv", _conv(cin, channels, 1))
      setattr(self, f"bin{b}_bn", _bn(channels))
    self.fuse_conv = _conv(cin + len(self.bins) * channels, channels, 3)
    self.fuse_bn = _bn(channels)

  def forward(self, x):
    size = x.shape[2:]
    pyramid = [x]
    for b in self.bins:
      p = getattr(self, f"bin{b}_conv")(F.adaptive_avg_pool2d(x, b))
      pyramid.append(_resize(F.relu(getattr(self, f"bin{b}_bn")(p)), size))
    x = torch.cat(pyramid, dim=1)
    return F.relu(self.fuse_bn(self.fuse_conv(x)))


class PSPNet(nn.Module):
  """kd_jax.models.pspnet.PSPNet (NCHW): dilated ResNet at output stride 8,
  pyramid pooling, Dropout2d, 1×1 classifier, auxiliary head on layer3.

  The auxiliary head runs when `aux` (default: in training mode only, the
  usual PyTorch PSPNet; kd_jax's jitted step drops it wherever its output
  is unused, e.g. the teacher's eval forward) and gives "aux_logits".
  """

  def __init__(self, num_classes=19, backbone="resnet101", bins=(1, 2, 3, 6),
               head_channels=None, aux=True, aux_channels=None, dropout=0.1,
               deep_stem=True, width=64, in_channels=3):
    super().__init__()
    self.backbone = ResNet(backbone, 8, deep_stem, width, in_channels)
    exp = 4 if RESNETS[backbone][1] else 1
    c3, c4 = width * 4 * exp, width * 8 * exp
    head_channels = head_channels or c4 // 4
    self.ppm = PyramidPooling(c4, head_channels, bins)
    self.dropout = nn.Dropout2d(dropout)
    self.classifier = nn.Conv2d(head_channels, num_classes, 1)
    self.has_aux = aux
    if aux:
      self.aux = SegHead(c3, num_classes, aux_channels or c3 // 2, dropout)

  def forward(self, x, aux=None):
    size = x.shape[2:]
    feats = self.backbone(x)
    y = self.ppm(feats["layer4"])
    feats["head"] = y
    y = self.classifier(self.dropout(y))
    if self.has_aux and (self.training if aux is None else aux):
      a, _ = self.aux(feats["layer3"])
      feats["aux_logits"] = _resize(a, size)
    return _resize(y, size), feats


# ----------------------------------------------------------------------------
# ViT (DINOv2 style).


class ViT(nn.Module):
  """kd_jax.models.vit.ViT; forward returns (logits, features), tokens NLD,
  "patch_map" NCHW. With `num_classes=0` there is no head and the logits
  are the [CLS] embedding, as in kd_jax.

  kd_jax resizes the position embedding bicubically for other input sizes
  with jax.image.resize's cubic (Keys, a = -0.5), which PyTorch's bicubic
  (a = -0.75) does not reproduce: the twin takes only inputs of
  `image_size`, and the benchmark builds both sides for its input.
  """

  def __init__(self, num_classes=0, width=768, depth=12, num_heads=12,
               mlp_ratio=4.0, patch=16, image_size=224, num_registers=0,
               layerscale=1e-5, dropout_rate=0.0, in_channels=3):
    super().__init__()
    self.num_classes = num_classes
    self.depth = depth
    self.num_registers = num_registers
    self.patch_embed = nn.Conv2d(in_channels, width, patch, stride=patch)
    grid = image_size // patch
    self.cls_token = nn.Parameter(torch.randn(1, 1, width) * 0.02)
    self.pos_embed = nn.Parameter(
        torch.randn(1, 1 + grid * grid, width) * 0.02)
    if num_registers:
      self.registers = nn.Parameter(
          torch.randn(1, num_registers, width) * 0.02)
    for i in range(depth):
      setattr(self, f"block{i}", Block(width, num_heads,
                                       int(width * mlp_ratio), dropout_rate,
                                       layerscale))
    self.norm = nn.LayerNorm(width, eps=1e-6)
    if num_classes:
      self.head = nn.Linear(width, num_classes)

  def forward(self, x):
    b = x.shape[0]
    x = self.patch_embed(x)
    _, d, gh, gw = x.shape
    if 1 + gh * gw != self.pos_embed.shape[1]:
      raise ValueError(
          f"the ViT twin's position embedding covers "
          f"{self.pos_embed.shape[1] - 1} patches, the input gives {gh}×{gw}; "
          "build it with image_size = the input side (it does not resize)")
    x = x.flatten(2).transpose(1, 2)
    x = torch.cat([self.cls_token.expand(b, -1, -1), x], dim=1)
    x = x + self.pos_embed
    r = self.num_registers
    if r:  # After [CLS], without position embeddings (DINOv2).
      x = torch.cat([x[:, :1], self.registers.expand(b, -1, -1), x[:, 1:]],
                    dim=1)
    features = {}
    for i in range(self.depth):
      x = getattr(self, f"block{i}")(x)
      features[f"block{i}"] = x
    x = self.norm(x)
    patches = x[:, 1 + r:]
    features["tokens"] = patches
    features["patch_map"] = patches.transpose(1, 2).reshape(b, d, gh, gw)
    if r:
      features["registers"] = x[:, 1:1 + r]
    features["embedding"] = x[:, 0]
    logits = self.head(x[:, 0]) if self.num_classes else x[:, 0]
    return logits, features


# kd_jax's ViT presets (vit.py).
VITS = {"vit_s16": dict(width=384, depth=12, num_heads=6),
        "vit_b16": dict(width=768, depth=12, num_heads=12),
        "vit_l16": dict(width=1024, depth=24, num_heads=16),
        "vit_tiny": dict(width=64, depth=2, num_heads=2, image_size=64)}


# ----------------------------------------------------------------------------
# EfficientViT.


class ConvNormAct(nn.Module):
  """efficientvit.ConvNormAct: k×k conv (k//2 padding on both sides) →
  optional BatchNorm → optional hard-swish; Flax names conv, bn."""

  def __init__(self, cin, cout, kernel=3, stride=1, groups=1, bias=False,
               norm=True, act=False):
    super().__init__()
    self.conv = nn.Conv2d(cin, cout, kernel, stride, kernel // 2,
                          groups=groups, bias=bias)
    self.bn = _bn(cout) if norm else None
    self.act = act

  def forward(self, x):
    x = self.conv(x)
    if self.bn is not None:
      x = self.bn(x)
    return F.hardswish(x) if self.act else x


class DSConv(nn.Module):
  """efficientvit.DSConv: depthwise 3×3 → BN → hswish, pointwise 1×1 → BN."""

  def __init__(self, cin, cout):
    super().__init__()
    self.depth_conv = ConvNormAct(cin, cin, 3, groups=cin, act=True)
    self.point_conv = ConvNormAct(cin, cout, 1)

  def forward(self, x):
    return self.point_conv(self.depth_conv(x))


class MBConv(nn.Module):
  """efficientvit.MBConv; `fewer_norm`: biases instead of the first two
  BatchNorms."""

  def __init__(self, cin, cout, stride=1, expand_ratio=4, fewer_norm=False):
    super().__init__()
    mid = round(cin * expand_ratio)
    fn = fewer_norm
    self.inverted_conv = ConvNormAct(cin, mid, 1, bias=fn, norm=not fn,
                                     act=True)
    self.depth_conv = ConvNormAct(mid, mid, 3, stride, groups=mid, bias=fn,
                                  norm=not fn, act=True)
    self.point_conv = ConvNormAct(mid, cout, 1)

  def forward(self, x):
    return self.point_conv(self.depth_conv(self.inverted_conv(x)))


def relu_linear_attention(q, k, v, eps=1e-15):
  """efficientvit.relu_linear_attention on (B, heads, d, N) tensors:
  relu(q) (relu(k)ᵀ v) over the normaliser relu(q)·Σ relu(k), in float32
  whatever the autocast dtype (the sums run over every token)."""
  dtype = v.dtype
  with torch.autocast(q.device.type, enabled=False):
    q, k, v = F.relu(q.float()), F.relu(k.float()), v.float()
    kv = v @ k.transpose(-1, -2)  # (B, heads, d_v, d_k)
    num = kv @ q  # (B, heads, d_v, N)
    den = k.sum(-1, keepdim=True).transpose(-1, -2) @ q  # (B, heads, 1, N)
    out = num / (den + eps)
  return out.to(dtype)


class LiteMLA(nn.Module):
  """efficientvit.LiteMLA: qkv 1×1, per scale a depthwise s×s + grouped 1×1
  aggregation (one group per q / k / v of each head), ReLU linear attention
  on the doubled heads, proj 1×1 → BN."""

  def __init__(self, cin, cout, head_dim=16, scales=(5,)):
    super().__init__()
    self.head_dim = head_dim
    self.scales = tuple(scales)
    heads = cin // head_dim
    total = 3 * heads * head_dim
    self.qkv = nn.Conv2d(cin, total, 1, bias=False)
    for s in self.scales:
      setattr(self, f"aggreg{s}_dw", nn.Conv2d(total, total, s, padding=s // 2,
                                               groups=total, bias=False))
      setattr(self, f"aggreg{s}_pw", nn.Conv2d(total, total, 1,
                                               groups=3 * heads, bias=False))
    self.proj = ConvNormAct(total // 3 * (1 + len(self.scales)), cout, 1)

  def forward(self, x):
    b, _, h, w = x.shape
    qkv = self.qkv(x)
    branches = [qkv] + [
        getattr(self, f"aggreg{s}_pw")(getattr(self, f"aggreg{s}_dw")(qkv))
        for s in self.scales]
    # Channels are grouped per head as [q | k | v], head_dim each (kd_jax's
    # NHWC reshape of the channel axis, here the NCHW one).
    qkv = torch.cat(branches, dim=1).reshape(b, -1, 3, self.head_dim, h * w)
    out = relu_linear_attention(qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2])
    return self.proj(out.reshape(b, -1, h, w))


class EfficientViTModule(nn.Module):
  """efficientvit.EfficientViTModule: residual LiteMLA (context), then a
  residual MBConv with fewer norms (local)."""

  def __init__(self, ch, head_dim=16, expand_ratio=4):
    super().__init__()
    self.context = LiteMLA(ch, ch, head_dim)
    self.local = MBConv(ch, ch, 1, expand_ratio, fewer_norm=True)

  def forward(self, x):
    x = x + self.context(x)
    return x + self.local(x)


class EfficientViT(nn.Module):
  """kd_jax.models.efficientvit.EfficientViT (NCHW); forward returns
  (logits, features): "stage0".."stage4" maps and the pooled head vector
  "embedding"."""

  def __init__(self, num_classes=1000, widths=(8, 16, 32, 64, 128),
               depths=(1, 2, 2, 2, 2), head_dim=16, head_widths=(1024, 1280),
               expand_ratio=4, dropout_rate=0.0, in_channels=3):
    super().__init__()
    self.depths = tuple(depths)
    w0 = widths[0]
    self.stem = ConvNormAct(in_channels, w0, 3, 2, act=True)
    for i in range(depths[0]):
      setattr(self, f"stage0_ds{i}", DSConv(w0, w0))
    cin = w0
    for s in (1, 2):
      for i in range(depths[s]):
        setattr(self, f"stage{s}_mb{i}",
                MBConv(cin, widths[s], 2 if i == 0 else 1, expand_ratio))
        cin = widths[s]
    for s in (3, 4):
      setattr(self, f"stage{s}_down",
              MBConv(cin, widths[s], 2, expand_ratio, fewer_norm=True))
      cin = widths[s]
      for i in range(depths[s]):
        setattr(self, f"stage{s}_vit{i}",
                EfficientViTModule(cin, head_dim, expand_ratio))
    h0, h1 = head_widths
    self.head_conv = ConvNormAct(cin, h0, 1, act=True)
    self.head_fc = nn.Linear(h0, h1, bias=False)
    self.head_ln = nn.LayerNorm(h1, eps=1e-5)
    self.dropout = nn.Dropout(dropout_rate)
    self.classifier = nn.Linear(h1, num_classes)

  def forward(self, x):
    if x.shape[2] % 32 or x.shape[3] % 32:
      raise ValueError(f"EfficientViT needs a side divisible by 32; got "
                       f"{tuple(x.shape)}")
    features = {}
    x = self.stem(x)
    for i in range(self.depths[0]):
      x = x + getattr(self, f"stage0_ds{i}")(x)
    features["stage0"] = x
    for s in (1, 2):
      for i in range(self.depths[s]):
        y = getattr(self, f"stage{s}_mb{i}")(x)
        x = y if i == 0 else x + y
      features[f"stage{s}"] = x
    for s in (3, 4):
      x = getattr(self, f"stage{s}_down")(x)
      for i in range(self.depths[s]):
        x = getattr(self, f"stage{s}_vit{i}")(x)
      features[f"stage{s}"] = x
    x = self.head_conv(x).mean(dim=(2, 3))
    x = F.hardswish(self.head_ln(self.head_fc(x)))
    features["embedding"] = x
    return self.classifier(self.dropout(x)), features


# kd_jax's EfficientViT presets (efficientvit.py).
EFFICIENTVITS = {"efficientvit_b0": {},
                 "efficientvit_b1": dict(widths=(16, 32, 64, 128, 256),
                                         depths=(1, 2, 3, 3, 4),
                                         head_widths=(1536, 1600))}


# kd_jax's transunet_tiny preset.
TRANSUNET_TINY = dict(resnet_blocks=(1, 1, 1), resnet_width=16, hidden=128,
                      depth=2, num_heads=4, mlp_dim=256, image_size=128,
                      head_channels=64, decoder_channels=(64, 32, 16, 8))


PSPNETS = {"pspnet_resnet101": "resnet101", "pspnet_resnet50": "resnet50",
           "pspnet_resnet18": "resnet18"}


def build(name, num_classes, in_channels=1, **kw):
  """The twin of kd_jax model `name` built with the same keyword arguments."""
  if name == "unet":
    return UNet(num_classes, in_channels=in_channels, **kw)
  if name == "squeeze_unet":
    return SqueezeUNet(num_classes, in_channels=in_channels, **kw)
  if name in ("transunet_tiny", "transunet_b16"):
    preset = TRANSUNET_TINY if name == "transunet_tiny" else {}
    return TransUNet(num_classes, **{**preset, **kw})  # Input repeated to 3.
  if name in PSPNETS:
    return PSPNet(num_classes, backbone=PSPNETS[name],
                  in_channels=in_channels, **kw)
  if name in VITS:
    return ViT(num_classes, in_channels=in_channels, **{**VITS[name], **kw})
  if name in EFFICIENTVITS:
    return EfficientViT(num_classes, in_channels=in_channels,
                        **{**EFFICIENTVITS[name], **kw})
  raise ValueError(f"no PyTorch twin for model {name!r}; twins: unet, "
                   "squeeze_unet, transunet_tiny, transunet_b16, "
                   f"{', '.join([*PSPNETS, *VITS, *EFFICIENTVITS])}")


def count_params(model) -> int:
  """Parameters, frozen or not (BatchNorm running statistics excluded): the
  size of kd_jax's "params" collection."""
  return sum(p.numel() for p in model.parameters())


# ----------------------------------------------------------------------------
# Copying Flax variables into a twin.


def _convert(module, leaf, value):
  """A Flax array (numpy) → (torch attribute name, torch tensor)."""
  t = torch.from_numpy(value.copy())
  if isinstance(module, nn.ConvTranspose2d) and leaf == "kernel":
    # Flax's ConvTranspose (transpose_kernel=False) correlates the dilated
    # input with the kernel; PyTorch's is the conv gradient, i.e. flipped.
    return "weight", t.flip(0, 1).permute(2, 3, 0, 1)
  if isinstance(module, nn.Conv2d) and leaf == "kernel":
    return "weight", t.permute(3, 2, 0, 1)
  if isinstance(module, StdConv) and leaf == "kernel":
    return "kernel", t.permute(3, 2, 0, 1)
  if isinstance(module, nn.Linear) and leaf == "kernel":
    # Dense (in, out), or attention q/k/v (in, heads, head_dim) and out
    # (heads, head_dim, out).
    if t.ndim == 3 and module.in_features == t.shape[0]:
      t = t.reshape(t.shape[0], -1)
    elif t.ndim == 3:
      t = t.reshape(-1, t.shape[-1])
    return "weight", t.T
  if isinstance(module, nn.Linear) and leaf == "bias":
    return "bias", t.reshape(-1)
  if isinstance(module, (nn.BatchNorm2d, nn.GroupNorm, nn.LayerNorm)):
    return {"scale": "weight", "bias": "bias", "mean": "running_mean",
            "var": "running_var"}[leaf], t
  return leaf, t


def _walk(tree, prefix=()):
  for k, v in tree.items():
    if isinstance(v, dict):
      yield from _walk(v, prefix + (k,))
    else:
      yield prefix + (k,), v


def load_flax_variables(model, variables):
  """Copies Flax `variables` ({"params", "batch_stats"}) into the twin.

  Every Flax array must land on a tensor of the same shape, and every twin
  parameter must be written; otherwise ValueError names the culprit.
  """
  import numpy as np  # Local: the converters only need it here.

  written = set()
  with torch.no_grad():
    for collection in ("params", "batch_stats"):
      tree = variables.get(collection, {})
      tree = tree.unfreeze() if hasattr(tree, "unfreeze") else tree
      for path, value in _walk(tree):
        owner = model
        for name in path[:-1]:
          if not hasattr(owner, name):
            raise ValueError(f"twin has no module {'.'.join(path[:-1])!r}")
          owner = getattr(owner, name)
        attr, t = _convert(owner, path[-1], np.asarray(value))
        target = getattr(owner, attr, None)
        if target is None or target.shape != t.shape:
          raise ValueError(
              f"{collection}/{'/'.join(path)} {tuple(t.shape)} does not fit "
              f"twin tensor {'.'.join(path[:-1] + (attr,))} "
              f"{None if target is None else tuple(target.shape)}")
        target.copy_(t)
        written.add(".".join(path[:-1] + (attr,)))
  missing = [n for n, _ in model.named_parameters() if n not in written]
  if missing:
    raise ValueError(f"twin parameters without a Flax counterpart: {missing}")


# ----------------------------------------------------------------------------
# The default recipe's loss: CE + Dice + Hinton KD (kd_jax.losses).


def dice_loss(logits, labels, smooth=1e-5):
  """kd_jax.losses.task.dice_loss (batch-pooled, present classes only), NCHW."""
  c = logits.shape[1]
  p = torch.softmax(logits, dim=1)
  g = F.one_hot(labels, c).permute(0, 3, 1, 2).to(logits.dtype)
  hard = F.one_hot(logits.argmax(dim=1), c).permute(0, 3, 1, 2).to(
      logits.dtype)
  axes = (0, 2, 3)
  inter = (p * g).sum(axes)
  g_sum = g.sum(axes)
  denom = p.sum(axes) + g_sum
  dice = (2.0 * inter + smooth) / torch.clamp(denom + smooth, min=1e-12)
  present = (g_sum + hard.sum(axes)) > 0
  n_present = present.sum().to(logits.dtype)
  mean_dice = torch.where(present, dice, torch.zeros_like(dice)).sum() / (
      torch.clamp(n_present, min=1.0))
  return 1.0 - mean_dice


def kd_kl(student_logits, teacher_logits, temperature):
  """kd_jax.losses.logits.kd_kl: τ² · mean over pixels of KL(p_T || p_S)."""
  s = F.log_softmax(student_logits / temperature, dim=1)
  t = F.log_softmax(teacher_logits / temperature, dim=1)
  kl = F.kl_div(s, t, reduction="none", log_target=True).sum(dim=1)
  return kl.mean() * temperature**2


def cwd(student_logits, teacher_logits, temperature):
  """kd_jax.losses.logits.cwd: per image and channel, KL between the spatial
  softmaxes (over H·W) of teacher and student; mean over N·C; τ² scaling."""
  n, c = student_logits.shape[:2]
  s = F.log_softmax(student_logits.reshape(n, c, -1) / temperature, dim=-1)
  t = F.log_softmax(teacher_logits.reshape(n, c, -1) / temperature, dim=-1)
  kl = F.kl_div(s, t, reduction="none", log_target=True).sum(dim=-1)
  return kl.mean() * temperature**2


LOGIT_TERMS = {"kd_kl": kd_kl, "cwd": cwd}


def distill_loss(student_logits, teacher_logits, labels, temperature=4.0,
                 kd="kd_kl", kd_weight=1.0):
  """A distilled stage of the default recipe: CE + Dice (weights 1) +
  kd_weight · the logit term `kd` ("kd_kl" or "cwd") at `temperature`.

  Returns (total, metrics dict of the unweighted terms).
  """
  ce = F.cross_entropy(student_logits, labels)
  dice = dice_loss(student_logits, labels)
  term = LOGIT_TERMS[kd](student_logits, teacher_logits, temperature)
  total = ce + dice + kd_weight * term
  return total, {"cross_entropy": ce, "dice": dice, kd: term,
                 "total": total}


# ----------------------------------------------------------------------------
# Global embedding matching: a linear connector and the cosine distance.


class LinearConnector(nn.Module):
  """kd_jax.models.connectors.Linear: one Dense ("dense", with bias) on the
  last axis, from the student's width to the teacher's."""

  def __init__(self, cin, cout):
    super().__init__()
    self.dense = nn.Linear(cin, cout)

  def forward(self, x):
    return self.dense(x)


def _l2_normalize(x, eps):
  """kd_jax.losses.features._l2_normalize: x / max(||x||, eps) on the last
  axis, the norm of a zero vector taken as 1 so its gradient stays finite."""
  sq = (x * x).sum(dim=-1, keepdim=True)
  norm = torch.sqrt(torch.where(sq > 0, sq, torch.ones_like(sq)))
  return x / torch.clamp(norm, min=eps)


def embedding_cosine(student, teacher):
  """kd_jax.losses.features.embedding_cosine: mean over examples of
  1 - cos(e_S, e_T), each vector divided by max(||e||, 1e-8). Takes (B, D)
  or channels-last (B, ..., D) arrays, the latter averaged over the middle
  axes as in kd_jax (not NCHW maps)."""
  if student.shape != teacher.shape:
    raise ValueError(f"embedding_cosine: student {tuple(student.shape)} and "
                     f"teacher {tuple(teacher.shape)} differ")
  s, t = student.float(), teacher.float()
  if s.ndim > 2:
    s = s.mean(dim=tuple(range(1, s.ndim - 1)))
    t = t.mean(dim=tuple(range(1, t.ndim - 1)))
  cos = (_l2_normalize(s, 1e-8) * _l2_normalize(t, 1e-8)).sum(dim=-1)
  return (1.0 - cos).mean()
