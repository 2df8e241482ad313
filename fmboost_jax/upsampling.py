"""The ways a low-res input reaches the target latent grid, and the low-res input of training.

Images are float32 NHWC in [-1, 1]; latents are those of a first stage (first_stage.py).

Upsampling modes (config.flow.upsampling_mode):
  psu:      pixel-space upsampling E(UP(x_lr)); from a latent alone, E(UP(D(z_lr))).
  bilinear: resize the low-res latent directly (jax.image.resize 'linear', antialias=False, which
            equals torch's bilinear with align_corners=False).
  nearest:  resize the low-res latent directly with nearest neighbours.
Precomputed latents (precompute.py) were brought to the grid with one of these modes, which they
record; training from them uses the stored pair and keeps the mode for sampling and evaluation.
"""

import jax
import jax.numpy as jnp

from fmboost_jax.errors import UserError
from fmboost_jax.first_stages import FirstStage
from fmboost_jax.images import normalize

MODES = ('psu', 'bilinear', 'nearest')


def check_mode(mode: str) -> None:
  """Raises UserError for an unknown `config.flow.upsampling_mode`."""
  if mode not in MODES:
    hint = (' (precomputed latents record the mode they were made with: keep that one)'
            if mode == 'identity' else '')
    raise UserError(f'config.flow.upsampling_mode={mode!r} is unknown; use one of '
                    f'{", ".join(MODES)}{hint}.')


def resize(x: jax.Array, size: tuple[int, int], method: str) -> jax.Array:
  """Resizes [B, H, W, C] to [B, *size, C] ('linear' or 'nearest', no antialiasing)."""
  return jax.image.resize(x, (x.shape[0], *size, x.shape[-1]), method, antialias=False)


def low_res_images(images: jax.Array, low_res_size: int) -> jax.Array:
  """The low-res input of training: the high-res images [B, S, S, 3] bilinearly downsized."""
  return resize(images, (low_res_size, low_res_size), 'linear')


def upsample(first_stage: FirstStage, mode: str, target_size: tuple[int, int], *,
             low_res_images: jax.Array | None = None,
             low_res_latents: jax.Array | None = None) -> jax.Array:
  """Brings a low-res input to the target latent grid.

  Args:
    first_stage: the autoencoder (or identity).
    mode: one of MODES.
    target_size: (H, W) of the target latent grid.
    low_res_images: [B, h, w, 3] low-res pixels, if available (training).
    low_res_latents: [B, h', w', C] low-res latents (inference from a diffusion model).

  Returns:
    [B, *target_size, C] latents.
  """
  if mode not in MODES:
    raise ValueError(f'upsampling mode {mode!r} is unknown; use one of {MODES}.')
  if mode == 'psu':
    if low_res_images is None:
      low_res_images = first_stage.decode(low_res_latents)
    pixel_size = (target_size[0] * first_stage.factor, target_size[1] * first_stage.factor)
    return first_stage.encode(resize(low_res_images, pixel_size, 'linear'))
  if low_res_latents is None:
    low_res_latents = first_stage.encode(low_res_images)
  return resize(low_res_latents, target_size, 'linear' if mode == 'bilinear' else 'nearest')


def training_pair(first_stage: FirstStage, batch: dict[str, jax.Array], low_res_size: int,
                  mode: str) -> tuple[jax.Array, jax.Array]:
  """The (x1, x_up) pair of one training batch, both [B, S/f, S/f, C], without gradients.

  From images {'image': [B, S, S, 3]}, uint8 pixels as the input pipeline sends them (a quarter
  of float32's bytes from host to device; normalised here, on the devices) or float in [-1, 1]:
  x1 = E(images) is the target and x_up is the bilinearly downsized image brought back to the
  target grid with `mode`. A precomputed batch {'x1', 'x_up'} (precompute.py, made with the same
  `mode`) is used as it is.
  """
  if 'x1' in batch:
    return batch['x1'], batch['x_up']
  images = batch['image']
  if images.dtype == jnp.uint8:
    images = normalize(images)
  x1 = jax.lax.stop_gradient(first_stage.encode(images))
  lr = low_res_images(images, low_res_size)
  x_up = upsample(first_stage, mode, x1.shape[1:3], low_res_images=lr)
  return x1, jax.lax.stop_gradient(x_up)
