"""Between what users hold and the arrays the model layer takes and returns.

The model layer (`trained_model.Cascade`) takes float32 NHWC batches: images in [-1, 1], or
first-stage latents already multiplied by the scale factor; it returns the same. Users hold PIL
images, uint8 arrays, float arrays in [0, 1], and latents in NCHW as diffusers returns them. This
module converts inputs (`images_in`, `latents_in`) and outputs (`output`), and nothing else does.
"""

from typing import Any

import numpy as np
from PIL import Image

from fmboost_jax import images, metrics
from fmboost_jax.errors import UserError

OUTPUT_TYPES = ('pil', 'np', 'latent')


def image_array(image: Any, where: str) -> np.ndarray:
  """A PIL image, uint8 [h, w, 3] or float [h, w, 3] in [0, 1] -> float32 [h, w, 3] in [-1, 1]."""
  if isinstance(image, Image.Image):
    return images.normalize(images.pil_to_rgb_uint8(image))
  image = np.asarray(image)
  if image.ndim != 3 or image.shape[-1] != 3:
    raise UserError(f'{where} has shape {image.shape}; pass RGB images [h, w, 3] (or PIL images).')
  if image.dtype == np.uint8:
    return images.normalize(image)
  if np.issubdtype(image.dtype, np.floating):
    return np.asarray(image, np.float32) * 2 - 1
  raise UserError(f'{where} is a {image.dtype} array; pass uint8 in [0, 255] or float in [0, 1].')


def latent_array(array: Any, channels: int, scale_factor: float, scaled: bool,
                 where: str) -> np.ndarray:
  """First-stage latents [N,] C, h, w (NCHW, as diffusers returns them) or [N,] h, w, C with
  C = `channels` -> float32 [N, h, w, C] times `scale_factor` (unless `scaled`: already
  multiplied). An array whose both ends have C entries is taken as NHWC."""
  array = np.asarray(array)
  if not np.issubdtype(array.dtype, np.number) or array.ndim not in (3, 4):
    raise UserError(f'{where} holds a {array.dtype} array of shape {array.shape}; expected '
                    f'latents of shape [N,] {channels}, h, w or [N,] h, w, {channels}.')
  array = array[None] if array.ndim == 3 else array
  if array.shape[1] == channels and array.shape[-1] != channels:
    array = array.transpose(0, 2, 3, 1)
  elif array.shape[-1] != channels:
    raise UserError(f'{where} holds latents of shape {array.shape} without the {channels} '
                    "channels of this model's first stage; expected "
                    f'[N,] {channels}, h, w or [N,] h, w, {channels}.')
  return array.astype(np.float32) * np.float32(1.0 if scaled else scale_factor)


def _as_list(x) -> list:
  """One input or a list / batch of them -> a list."""
  if isinstance(x, (list, tuple)):
    return list(x)
  if isinstance(x, Image.Image):
    return [x]
  x = np.asarray(x)
  return list(x) if x.ndim == 4 else [x]


def images_in(image) -> list[np.ndarray]:
  """A PIL image, an RGB array [h, w, 3] (uint8, or float in [0, 1]) or a list / batch
  [N, h, w, 3] of them (sizes may differ) -> float32 [h, w, 3] arrays in [-1, 1]."""
  return [image_array(x, f'image {i}') for i, x in enumerate(_as_list(image))]


def latents_in(latents, channels: int, scale_factor: float, scaled: bool) -> list[np.ndarray]:
  """Latents [N,] C, h, w or [N,] h, w, C, or a list of them -> scaled float32 [h, w, C] arrays."""
  return [z for i, x in enumerate(_as_list(latents))
          for z in latent_array(x, channels, scale_factor, scaled, f'latent {i}')]


def check_output_type(output_type: str) -> None:
  if output_type not in OUTPUT_TYPES:
    raise UserError(f'output_type={output_type!r} is unknown; use one of {OUTPUT_TYPES}.')


def output(image: np.ndarray, latent: np.ndarray, output_type: str):
  """One result (the image [H, W, 3] in [-1, 1] and its scaled latent [h, w, C]) as `output_type`
  gives it: a PIL image, float32 [H, W, 3] in [0, 1] ('np') or the latent as CHW ('latent')."""
  if output_type == 'latent':
    return latent.transpose(2, 0, 1)
  if output_type == 'np':
    return np.clip((image + 1) / 2, 0.0, 1.0)
  return Image.fromarray(np.asarray(metrics.to_uint8(image)))


def outputs(results: list, output_type: str):
  """The results of `output`, as diffusers pipelines return them: a list of PIL images, or one
  stacked array when every shape agrees (a list otherwise)."""
  if output_type == 'pil' or len({x.shape for x in results}) != 1:
    return results
  return np.stack(results)
