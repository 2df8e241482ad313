"""The FID Inception-v3 (`pt_inception-2015-12-05`) in Flax NNX (NHWC, float32), up to 'pool3'.

This is the network of pytorch-fid, torch-fidelity and clean-fid: TensorFlow's 2015-12-05 Inception
graph ported to PyTorch, i.e. torchvision's Inception-v3 with the FID patches: the 3x3 average pools
of Mixed_5b-d, Mixed_6b-e and Mixed_7b exclude the zero padding from the mean (TensorFlow's
behaviour, `count_include_pad=False`), and the pool branch of Mixed_7c is a 3x3 *max* pool. Every
conv is bias-free and followed by BatchNorm (eps 1e-3, inference mode: running statistics) and ReLU.

`InceptionV3(images)` does what torch-fidelity's `FeatureExtractorInceptionV3` does for the '2048'
feature (the FID / KID / precision-recall feature):
  1. cast the `[B, H, W, 3]` images, values in [0, 255] (uint8 or float), to float32;
  2. resize to 299x299 with TensorFlow 1.x's bilinear `tf.image.resize_bilinear(align_corners=
     False)`: output pixel i samples input coordinate i * (in_size / 299), with no half-pixel
     offset, and interpolates linearly between the two neighbouring pixels (the last pixel is
     repeated at the border), first along W, then along H; this is torch-fidelity's
     `interpolate_bilinear_2d_like_tensorflow1x` and differs from `jax.image.resize` (half-pixel
     centres); a 299x299 input is left as it is (the resize would be the identity);
  3. normalise to (x - 128) / 128;
  4. run the network and average the final 8x8x2048 map over space: `[B, 2048]` float32.
pytorch-fid runs the same network after PyTorch's half-pixel bilinear resize and 2 * x / 255 - 1,
so its features differ slightly from these.

Attribute names mirror the PyTorch state-dict keys (`Mixed_6b.branch7x7dbl_3.conv.weight`,
`Conv2d_1a_3x3.bn.running_mean`, ...), so `fmboost_jax.weights.load_inception_weights` maps the
`pt_inception-2015-12-05-6726825d.pth` file onto this module name by name; the classifier `fc` is
not part of the module. Build it abstractly and load real weights with
`weights.inception_from_weights(path)`.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from fmboost_jax.errors import UserError

Array = jax.Array

INPUT_SIZE = 299  # The network's input resolution.
FEATURES = 2048  # Width of the 'pool3' feature.
BN_EPS = 1e-3  # TensorFlow's BatchNorm epsilon in this graph.

_Pair = tuple[int, int]


def _pair(v: int | _Pair) -> _Pair:
  return (v, v) if isinstance(v, int) else tuple(v)


def _tf1_sample_points(in_size: int, out_size: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """Where TF1 bilinear resizing (align_corners=False) samples along one axis.

  Output index i reads input coordinate `c = float32(i) * float32(in_size / out_size)` (float32
  arithmetic, as torch-fidelity does), between pixels `floor(c)` and `min(floor(c) + 1, in - 1)`.

  Returns:
    `(lo, hi, frac)`: int32 `[out_size]` neighbour indices and float32 `[out_size]` weights of `hi`.
  """
  coords = np.arange(out_size, dtype=np.float32) * np.float32(in_size / out_size)
  lo = coords.astype(np.int32)  # Truncation = floor, as coords >= 0.
  hi = np.minimum(lo + 1, in_size - 1).astype(np.int32)
  frac = coords - lo.astype(np.float32)
  return lo, hi, frac


def resize_bilinear_tf1(images: Array, size: _Pair) -> Array:
  """Resizes like TensorFlow 1.x `resize_bilinear(align_corners=False)` (torch-fidelity's copy).

  Interpolates along W first (`a + (b - a) * dx` for the top and bottom rows), then along H, in
  float32: the same operations in the same order as torch-fidelity's 'slow' (default) method, so
  without jit the result is bit-identical to it on CPU; under jit XLA fuses each multiply-add into
  an FMA, which moves results by a few float32 ulps (< 1e-4 for values in [0, 255]). Sample
  positions are static (computed from the shapes).

  Args:
    images: `[B, H, W, C]` float.
    size: `(out_H, out_W)`.

  Returns:
    `[B, out_H, out_W, C]` of the input's dtype.
  """
  _, h, w, _ = images.shape
  y_lo, y_hi, dy = _tf1_sample_points(h, size[0])
  x_lo, x_hi, dx = _tf1_sample_points(w, size[1])
  dx = jnp.asarray(dx, images.dtype)[None, None, :, None]
  dy = jnp.asarray(dy, images.dtype)[None, :, None, None]

  def along_w(rows: Array) -> Array:
    left, right = jnp.take(rows, x_lo, axis=2), jnp.take(rows, x_hi, axis=2)
    return left + (right - left) * dx

  top = along_w(jnp.take(images, y_lo, axis=1))
  bottom = along_w(jnp.take(images, y_hi, axis=1))
  return top + (bottom - top) * dy


def preprocess(images: Array) -> Array:
  """`[B, H, W, 3]` in [0, 255] (any size, uint8 or float) -> `[B, 299, 299, 3]` float32 in
  [-1, 1): float32 cast, TF1 bilinear resize to 299x299, then (x - 128) / 128."""
  x = images.astype(jnp.float32)
  if x.shape[1:3] != (INPUT_SIZE, INPUT_SIZE):  # At the same size the resize is the identity.
    x = resize_bilinear_tf1(x, (INPUT_SIZE, INPUT_SIZE))
  return (x - 128.0) / 128.0


def _avg_pool_3x3(x: Array) -> Array:
  """3x3 stride-1 average pool over the valid (unpadded) pixels only: `[B, H, W, C]` -> same."""
  return nnx.avg_pool(x, (3, 3), strides=(1, 1), padding=((1, 1), (1, 1)), count_include_pad=False)


def _max_pool_3x3(x: Array, stride: int) -> Array:
  """3x3 max pool; stride 2 without padding (halves H, W rounding down), stride 1 padded by one
  (shape-preserving)."""
  padding = 'VALID' if stride == 2 else ((1, 1), (1, 1))
  return nnx.max_pool(x, (3, 3), strides=(stride, stride), padding=padding)


class BasicConv(nnx.Module):
  """Bias-free conv -> BatchNorm (eps 1e-3, running statistics) -> ReLU.

  `[B, H, W, in] -> [B, H', W', out]` with H' = (H + 2 * pad - kh) // stride + 1 (same for W).
  Submodules `conv` and `bn` are named like the PyTorch keys.
  """

  def __init__(self, in_channels: int, out_channels: int, kernel_size: int | _Pair, *,
               stride: int = 1, padding: int | _Pair = 0, rngs: nnx.Rngs):
    pad = _pair(padding)
    self.conv = nnx.Conv(in_channels, out_channels, _pair(kernel_size), strides=(stride, stride),
                         padding=((pad[0], pad[0]), (pad[1], pad[1])), use_bias=False,
                         param_dtype=jnp.float32, rngs=rngs)
    self.bn = nnx.BatchNorm(out_channels, use_running_average=True, epsilon=BN_EPS,
                            param_dtype=jnp.float32, rngs=rngs)

  def __call__(self, x: Array) -> Array:
    return nnx.relu(self.bn(self.conv(x)))


class InceptionA(nnx.Module):
  """Mixed_5b-d (35x35): 1x1 | 1x1 -> 5x5 | 1x1 -> 3x3 -> 3x3 | avg pool -> 1x1.

  `[B, 35, 35, in] -> [B, 35, 35, 224 + pool_features]`.
  """

  def __init__(self, in_channels: int, pool_features: int, *, rngs: nnx.Rngs):
    self.branch1x1 = BasicConv(in_channels, 64, 1, rngs=rngs)
    self.branch5x5_1 = BasicConv(in_channels, 48, 1, rngs=rngs)
    self.branch5x5_2 = BasicConv(48, 64, 5, padding=2, rngs=rngs)
    self.branch3x3dbl_1 = BasicConv(in_channels, 64, 1, rngs=rngs)
    self.branch3x3dbl_2 = BasicConv(64, 96, 3, padding=1, rngs=rngs)
    self.branch3x3dbl_3 = BasicConv(96, 96, 3, padding=1, rngs=rngs)
    self.branch_pool = BasicConv(in_channels, pool_features, 1, rngs=rngs)

  def __call__(self, x: Array) -> Array:
    return jnp.concatenate([
        self.branch1x1(x),
        self.branch5x5_2(self.branch5x5_1(x)),
        self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x))),
        self.branch_pool(_avg_pool_3x3(x)),
    ], axis=-1)


class InceptionB(nnx.Module):
  """Mixed_6a, the 35 -> 17 reduction: 3x3/2 | 1x1 -> 3x3 -> 3x3/2 | max pool 3x3/2.

  `[B, 35, 35, in] -> [B, 17, 17, 480 + in]`.
  """

  def __init__(self, in_channels: int, *, rngs: nnx.Rngs):
    self.branch3x3 = BasicConv(in_channels, 384, 3, stride=2, rngs=rngs)
    self.branch3x3dbl_1 = BasicConv(in_channels, 64, 1, rngs=rngs)
    self.branch3x3dbl_2 = BasicConv(64, 96, 3, padding=1, rngs=rngs)
    self.branch3x3dbl_3 = BasicConv(96, 96, 3, stride=2, rngs=rngs)

  def __call__(self, x: Array) -> Array:
    return jnp.concatenate([
        self.branch3x3(x),
        self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x))),
        _max_pool_3x3(x, stride=2),
    ], axis=-1)


class InceptionC(nnx.Module):
  """Mixed_6b-e (17x17), factorised 7x7 convs: 1x1 | 1x1 -> 1x7 -> 7x1 |
  1x1 -> 7x1 -> 1x7 -> 7x1 -> 1x7 | avg pool -> 1x1.

  `[B, 17, 17, in] -> [B, 17, 17, 768]`; `channels_7x7` is the width inside the 7x7 branches.
  """

  def __init__(self, in_channels: int, channels_7x7: int, *, rngs: nnx.Rngs):
    c7 = channels_7x7
    self.branch1x1 = BasicConv(in_channels, 192, 1, rngs=rngs)
    self.branch7x7_1 = BasicConv(in_channels, c7, 1, rngs=rngs)
    self.branch7x7_2 = BasicConv(c7, c7, (1, 7), padding=(0, 3), rngs=rngs)
    self.branch7x7_3 = BasicConv(c7, 192, (7, 1), padding=(3, 0), rngs=rngs)
    self.branch7x7dbl_1 = BasicConv(in_channels, c7, 1, rngs=rngs)
    self.branch7x7dbl_2 = BasicConv(c7, c7, (7, 1), padding=(3, 0), rngs=rngs)
    self.branch7x7dbl_3 = BasicConv(c7, c7, (1, 7), padding=(0, 3), rngs=rngs)
    self.branch7x7dbl_4 = BasicConv(c7, c7, (7, 1), padding=(3, 0), rngs=rngs)
    self.branch7x7dbl_5 = BasicConv(c7, 192, (1, 7), padding=(0, 3), rngs=rngs)
    self.branch_pool = BasicConv(in_channels, 192, 1, rngs=rngs)

  def __call__(self, x: Array) -> Array:
    dbl = self.branch7x7dbl_3(self.branch7x7dbl_2(self.branch7x7dbl_1(x)))
    return jnp.concatenate([
        self.branch1x1(x),
        self.branch7x7_3(self.branch7x7_2(self.branch7x7_1(x))),
        self.branch7x7dbl_5(self.branch7x7dbl_4(dbl)),
        self.branch_pool(_avg_pool_3x3(x)),
    ], axis=-1)


class InceptionD(nnx.Module):
  """Mixed_7a, the 17 -> 8 reduction: 1x1 -> 3x3/2 | 1x1 -> 1x7 -> 7x1 -> 3x3/2 | max pool 3x3/2.

  `[B, 17, 17, in] -> [B, 8, 8, 512 + in]`.
  """

  def __init__(self, in_channels: int, *, rngs: nnx.Rngs):
    self.branch3x3_1 = BasicConv(in_channels, 192, 1, rngs=rngs)
    self.branch3x3_2 = BasicConv(192, 320, 3, stride=2, rngs=rngs)
    self.branch7x7x3_1 = BasicConv(in_channels, 192, 1, rngs=rngs)
    self.branch7x7x3_2 = BasicConv(192, 192, (1, 7), padding=(0, 3), rngs=rngs)
    self.branch7x7x3_3 = BasicConv(192, 192, (7, 1), padding=(3, 0), rngs=rngs)
    self.branch7x7x3_4 = BasicConv(192, 192, 3, stride=2, rngs=rngs)

  def __call__(self, x: Array) -> Array:
    b7 = self.branch7x7x3_2(self.branch7x7x3_1(x))
    return jnp.concatenate([
        self.branch3x3_2(self.branch3x3_1(x)),
        self.branch7x7x3_4(self.branch7x7x3_3(b7)),
        _max_pool_3x3(x, stride=2),
    ], axis=-1)


class InceptionE(nnx.Module):
  """Mixed_7b/7c (8x8), expanded 3x3s: 1x1 | 1x1 -> (1x3, 3x1) | 1x1 -> 3x3 -> (1x3, 3x1) |
  pool -> 1x1.

  The pool is the padding-excluding 3x3 average in Mixed_7b (`pool='avg'`) and a 3x3 max pool in
  Mixed_7c (`pool='max'`), as in the TensorFlow graph. `[B, 8, 8, in] -> [B, 8, 8, 2048]`.
  """

  def __init__(self, in_channels: int, *, pool: str, rngs: nnx.Rngs):
    if pool not in ('avg', 'max'):
      raise ValueError(f"pool must be 'avg' or 'max', not {pool!r}.")
    self.pool = pool
    self.branch1x1 = BasicConv(in_channels, 320, 1, rngs=rngs)
    self.branch3x3_1 = BasicConv(in_channels, 384, 1, rngs=rngs)
    self.branch3x3_2a = BasicConv(384, 384, (1, 3), padding=(0, 1), rngs=rngs)
    self.branch3x3_2b = BasicConv(384, 384, (3, 1), padding=(1, 0), rngs=rngs)
    self.branch3x3dbl_1 = BasicConv(in_channels, 448, 1, rngs=rngs)
    self.branch3x3dbl_2 = BasicConv(448, 384, 3, padding=1, rngs=rngs)
    self.branch3x3dbl_3a = BasicConv(384, 384, (1, 3), padding=(0, 1), rngs=rngs)
    self.branch3x3dbl_3b = BasicConv(384, 384, (3, 1), padding=(1, 0), rngs=rngs)
    self.branch_pool = BasicConv(in_channels, 192, 1, rngs=rngs)

  def __call__(self, x: Array) -> Array:
    b3 = self.branch3x3_1(x)
    dbl = self.branch3x3dbl_2(self.branch3x3dbl_1(x))
    pooled = _avg_pool_3x3(x) if self.pool == 'avg' else _max_pool_3x3(x, stride=1)
    return jnp.concatenate([
        self.branch1x1(x),
        self.branch3x3_2a(b3), self.branch3x3_2b(b3),
        self.branch3x3dbl_3a(dbl), self.branch3x3dbl_3b(dbl),
        self.branch_pool(pooled),
    ], axis=-1)


class InceptionV3(nnx.Module):
  """The FID Inception-v3 up to the 2048-d global average pool ('pool3'); see the module docstring.

  Random initialisation is only for tests; real use loads `pt_inception-2015-12-05` weights.
  """

  def __init__(self, *, rngs: nnx.Rngs):
    self.Conv2d_1a_3x3 = BasicConv(3, 32, 3, stride=2, rngs=rngs)
    self.Conv2d_2a_3x3 = BasicConv(32, 32, 3, rngs=rngs)
    self.Conv2d_2b_3x3 = BasicConv(32, 64, 3, padding=1, rngs=rngs)
    self.Conv2d_3b_1x1 = BasicConv(64, 80, 1, rngs=rngs)
    self.Conv2d_4a_3x3 = BasicConv(80, 192, 3, rngs=rngs)
    self.Mixed_5b = InceptionA(192, pool_features=32, rngs=rngs)
    self.Mixed_5c = InceptionA(256, pool_features=64, rngs=rngs)
    self.Mixed_5d = InceptionA(288, pool_features=64, rngs=rngs)
    self.Mixed_6a = InceptionB(288, rngs=rngs)
    self.Mixed_6b = InceptionC(768, channels_7x7=128, rngs=rngs)
    self.Mixed_6c = InceptionC(768, channels_7x7=160, rngs=rngs)
    self.Mixed_6d = InceptionC(768, channels_7x7=160, rngs=rngs)
    self.Mixed_6e = InceptionC(768, channels_7x7=192, rngs=rngs)
    self.Mixed_7a = InceptionD(768, rngs=rngs)
    self.Mixed_7b = InceptionE(1280, pool='avg', rngs=rngs)
    self.Mixed_7c = InceptionE(2048, pool='max', rngs=rngs)

  def features(self, x: Array) -> Array:
    """The network on preprocessed input: `[B, 299, 299, 3]` in [-1, 1] -> `[B, 2048]` float32."""
    x = self.Conv2d_2b_3x3(self.Conv2d_2a_3x3(self.Conv2d_1a_3x3(x)))  # [B, 147, 147, 64]
    x = _max_pool_3x3(x, stride=2)  # [B, 73, 73, 64]
    x = self.Conv2d_4a_3x3(self.Conv2d_3b_1x1(x))  # [B, 71, 71, 192]
    x = _max_pool_3x3(x, stride=2)  # [B, 35, 35, 192]
    x = self.Mixed_5d(self.Mixed_5c(self.Mixed_5b(x)))  # [B, 35, 35, 288]
    x = self.Mixed_6a(x)  # [B, 17, 17, 768]
    x = self.Mixed_6e(self.Mixed_6d(self.Mixed_6c(self.Mixed_6b(x))))  # [B, 17, 17, 768]
    x = self.Mixed_7c(self.Mixed_7b(self.Mixed_7a(x)))  # [B, 8, 8, 2048]
    return jnp.mean(x, axis=(1, 2))

  def __call__(self, images: Array) -> Array:
    """FID features: `[B, H, W, 3]` in [0, 255] (uint8 or float, any H, W) -> `[B, 2048]`."""
    if images.ndim != 4 or images.shape[-1] != 3:
      raise UserError(f'the FID Inception network takes RGB images [B, H, W, 3], got shape '
                      f'{list(images.shape)}; pass NHWC RGB images with values in [0, 255].')
    return self.features(preprocess(images))
