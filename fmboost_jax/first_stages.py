"""The first stage: pixels <-> latents.

Images are float32 NHWC in [-1, 1]. A first stage maps images [B, H, W, 3] to latents
[B, H/f, W/f, C] and back; the identity first stage (f=1, C=3) gives pixel-space CFM, and the SD
KL-f8 autoencoder (models/autoencoder.py, weights from weights.py) plugs into the same interface.
"""

import json
from typing import Protocol

import jax
from flax import nnx

from fmboost_jax import sharding, storage, weights
from fmboost_jax.errors import UserError
from fmboost_jax.models import autoencoder, layers


class FirstStage(Protocol):
  """Maps images [B, H, W, 3] in [-1, 1] to latents [B, H/factor, W/factor, channels] and back."""

  channels: int
  factor: int
  scale_factor: float  # Latents are the first stage's raw latents times this.

  def encode(self, images: jax.Array) -> jax.Array:
    ...

  def decode(self, latents: jax.Array) -> jax.Array:
    ...

  def decode_tiled(self, latents: jax.Array) -> jax.Array:
    """`decode` in bounded memory, for large outputs."""
    ...


class IdentityFirstStage(nnx.Module):
  """Pixel space: the 'latent' is the image itself (a module without parameters)."""

  channels = 3
  factor = 1
  scale_factor = 1.0

  def encode(self, images: jax.Array) -> jax.Array:
    return images

  def decode(self, latents: jax.Array) -> jax.Array:
    return latents

  def decode_tiled(self, latents: jax.Array) -> jax.Array:
    return latents


def first_stage_from_config(config, *, weights_loaded: bool = True) -> FirstStage:
  """The first stage named by config.first_stage.name, an nnx.Module with its weights loaded.

  'identity' has no parameters; 'sd_vae' is the SD KL-f8 autoencoder with the weights of
  config.first_stage.weights (built abstractly, so random initialisation never runs). With
  `weights_loaded=False` its parameters stay abstract (shapes and dtypes, no file read): enough to
  compile the programs that take them as inputs.
  """
  c = config.first_stage
  if c.name == 'identity':
    return IdentityFirstStage()
  if c.name != 'sd_vae':
    raise UserError(f"config.first_stage.name={c.name!r} is unknown; use 'sd_vae' or 'identity'.")
  if weights_loaded and not c.weights:
    raise UserError(
        'config.first_stage.weights is not set; point it at the SD v1 autoencoder: sd_ae.ckpt from '
        "the official FMBoost README, an SD v1 checkpoint, or stabilityai/sd-vae-ft-mse's "
        'diffusion_pytorch_model.safetensors (or its folder).')
  abstract = layers.abstract(autoencoder.autoencoder_from_config, c)
  if not weights_loaded:
    return abstract
  return nnx.merge(nnx.graphdef(abstract), weights.load_autoencoder_weights(c.weights, abstract))


def weights_fingerprint(config) -> str | None:
  """The fingerprint of config.first_stage's weights (`weights.fingerprint`: the sha256 of the
  weights file, or the one a converted checkpoint records); None for the identity first stage,
  unset weights, and a checkpoint converted without a fingerprint."""
  c = config.first_stage
  if c.name != 'sd_vae' or not c.weights:
    return None
  return weights.fingerprint(c.weights)


def check_fingerprint(config, made_with: str | None, made_with_weights: str | None,
                      what: str) -> None:
  """Raises UserError when `what` (e.g. the latents in DIR) was made with autoencoder weights whose
  fingerprint `made_with` differs from that of config.first_stage.weights; one line naming both."""
  if not made_with:
    return
  mine = weights_fingerprint(config)
  if mine is not None and mine != made_with:
    raise UserError(
        f'{what} were made with the autoencoder {made_with_weights or "?"} (sha256 '
        f'{made_with[:12]}), but config.first_stage.weights={config.first_stage.weights} is '
        f'another one (sha256 {mine[:12]}); use the autoencoder they were made with.')


# The file of a training workdir that records the autoencoder it was trained with.
RECORD = 'first_stage.json'


def record_fingerprint(config, workdir: str) -> None:
  """Records config.first_stage's weights and their fingerprint in WORKDIR/RECORD (process 0), or,
  when a run there recorded them already, checks that they are the same: a run resumed with
  another autoencoder is one UserError naming both, printed by one process."""
  mine = weights_fingerprint(config)
  if mine is None:
    return
  path = storage.path(workdir) / RECORD
  error = None
  try:
    found = json.loads(path.read_text()) if path.is_file() else None
    if found is not None and found.get('sha256') not in (None, mine):
      raise UserError(
          f'{workdir} was trained with the autoencoder {found.get("weights")} (sha256 '
          f'{found["sha256"][:12]}), but config.first_stage.weights={config.first_stage.weights} '
          f'is another one (sha256 {mine[:12]}); use the autoencoder it was trained with, or a '
          'new --workdir.')
  except UserError as e:
    error = e
  sharding.raise_once(error)
  if found is None and sharding.is_writer():
    path.parent.mkdir(parents=True, exist_ok=True)
    storage.write_text_atomically(path, json.dumps(
        {'weights': config.first_stage.weights, 'sha256': mine}, indent=2))
