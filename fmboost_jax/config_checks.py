"""Every rule a config must satisfy, in one place: `check(config, mode)` runs the checks of the
sections a mode uses, first thing when the mode starts, and raises `UserError` with one sentence.

The rules of a part of the method stay beside it and are called from here: `flow.check_config`,
`sampling.check_config`, `unet.check_arguments`, `backends.check_backend` (which also logs what
`auto` chose), `input_pipeline.check_config` (data) and `upsampling.check_mode`; the rules of
the modes' own sections (train, sample, eval, precompute) are written here.
"""


import ml_collections
from absl import logging

from fmboost_jax import flow, input_pipeline, sampling, storage, upsampling
from fmboost_jax.errors import UserError
from fmboost_jax.models import backends, unet

# What --mode=compile compiles (config.compile.programs), the train step first.
COMPILE_PROGRAMS = ('train', 'evaluate', 'sample', 'precompute')
MODES = ('train', 'sample', 'evaluate', 'precompute', 'convert', 'export', 'compile')
PLATFORMS = ('any', 'cpu', 'gpu', 'tpu')


def check_platform(platform: str, backend: str, device_kind: str) -> None:
  """Raises UserError when JAX's backend is not the one config.train.platform asks for."""
  if platform not in PLATFORMS:
    raise UserError(f'config.train.platform={platform!r} is unknown; use one of '
                    f'{", ".join(PLATFORMS)}.')
  if platform not in ('any', backend):
    raise UserError(
        f'config.train.platform={platform} but JAX sees {backend} devices ({device_kind}); install '
        f'JAX for {platform} on this host (README, "Installs"), run where the {platform}s are, or '
        'set --config.train.platform=any to run here anyway.')


def check(config: ml_collections.ConfigDict, mode: str) -> None:
  """Raises UserError for the first setting of `config` that `mode` cannot run with."""
  if mode not in MODES:
    raise UserError(f'--mode={mode} is unknown; use one of {", ".join(MODES)}.')
  if mode == 'train':
    _check_method(config)
    _check_train(config)
    input_pipeline.check_config(config)
    if config.train.eval_every and config.data.num_val_images % config.data.batch_size:
      raise UserError(f'config.data.num_val_images={config.data.num_val_images} must be a '
                      f'multiple of config.data.batch_size={config.data.batch_size}.')
    if config.train.eval_every and config.eval.inception_weights:
      _check_fid(config)  # The held-out evaluation's FID and p-FID.
  elif mode == 'compile':  # The programs' rules, on the target's platform; no data is read.
    _check_method(config)
    _check_train(config)
    programs = tuple(config.compile.programs)
    unknown = sorted(set(programs) - set(COMPILE_PROGRAMS))
    if unknown or 'train' not in programs:
      raise UserError(f'config.compile.programs={programs} must hold train and any of '
                      f"{COMPILE_PROGRAMS[1:]}, e.g. --config.compile.programs=\"('train',)\".")
    if 'sample' in programs:
      _check_sampler(config.sample)
      _check_sample_mode(config.sample)
    if 'precompute' in programs and config.data.source == 'latents':
      _check_precompute_settings(config.precompute)
  elif mode == 'sample':
    _check_sampler(config.sample)
    _check_sample_mode(config.sample)
  elif mode == 'evaluate':
    _check_sampler(config.sample)
    _check_eval(config)
  elif mode == 'precompute':  # Every rule before the first image is encoded.
    _check_precompute(config)
    input_pipeline.check_config(config)
    upsampling.check_mode(config.flow.upsampling_mode)
  elif mode == 'convert' and config.first_stage.name != 'sd_vae':
    raise UserError('--mode=convert converts the SD autoencoder; set '
                    '--config.first_stage.name=sd_vae and --config.first_stage.weights=FILE.')


def _check_sampler(sample_config: ml_collections.ConfigDict) -> None:
  try:
    sampling.check_config(sample_config)
  except ValueError as e:
    raise UserError(str(e)) from None


def _check_method(config: ml_collections.ConfigDict) -> None:
  """The flow, the sampler of validation, the network and the upsampling mode."""
  try:
    flow.check_config(config.flow)
  except ValueError as e:
    raise UserError(str(e)) from None
  _check_sampler(config.sample)
  try:
    unet.check_arguments(**config.model)
  except (ValueError, TypeError) as e:
    raise UserError(f'config.model.{e}') from None
  logging.info(backends.check_backend(backends.platform(), **config.model))
  upsampling.check_mode(config.flow.upsampling_mode)


def _check_train(config: ml_collections.ConfigDict) -> None:
  for name in ('num_steps', 'log_every', 'checkpoint_every'):
    if config.train[name] < 1:
      raise UserError(f'config.train.{name}={config.train[name]} must be at least 1.')
  if config.train.eval_every < 0:
    raise UserError(f'config.train.eval_every={config.train.eval_every} must be 0 (no held-out '
                    'evaluation while training) or at least 1.')
  backends.check_compiler_options(backends.platform(), config.train.cpu_compiler_options)


def _check_precompute(config: ml_collections.ConfigDict) -> None:
  if config.data.source == 'latents':
    raise UserError('config.data.source=latents is already precomputed; precompute from images.')
  _check_precompute_settings(config.precompute)


def _check_precompute_settings(p: ml_collections.ConfigDict) -> None:
  if p.crops_per_image < 1 or p.shard_size < 1 or p.batch_size < 1:
    raise UserError('config.precompute.crops_per_image, shard_size and batch_size must be at least '
                    '1.')


def _check_sample_mode(s: ml_collections.ConfigDict) -> None:
  if s.batch_size < 1:
    raise UserError(f'config.sample.batch_size={s.batch_size} must be at least 1.')
  if s.input_size < 0:
    raise UserError(f'config.sample.input_size={s.input_size} must be 0 (keep the input size) or '
                    'the longer side in pixels that images are resized to.')
  if s.trajectory == 1 or s.trajectory < 0:
    raise UserError(f'config.sample.trajectory={s.trajectory} must be 0 (none) or at least 2 '
                    '(the states at t=0 and t=1 included).')


def _check_eval(config: ml_collections.ConfigDict) -> None:
  e = config.eval
  if config.data.num_val_images < 2:
    raise UserError(f'config.data.num_val_images={config.data.num_val_images}: evaluation needs '
                    'at least 2 held-out images.')
  if not e.nfe_sweep or any(not isinstance(n, int) or n < 1 for n in e.nfe_sweep):
    raise UserError(f'config.eval.nfe_sweep={tuple(e.nfe_sweep)} must be a non-empty list of '
                    'network-evaluation counts of at least 1, e.g. (1, 2, 4, 10, 50).')
  _check_fid(config)
  if e.num_figure_images < 1:
    raise UserError(f'config.eval.num_figure_images={e.num_figure_images} must be at least 1.')


def _check_fid(config: ml_collections.ConfigDict) -> None:
  e = config.eval
  if not 0 < e.crop_size <= config.data.high_res_size:
    raise UserError(f'config.eval.crop_size={e.crop_size} must be in [1, '
                    f'config.data.high_res_size={config.data.high_res_size}].')
  if e.num_crops < 1:
    raise UserError(f'config.eval.num_crops={e.num_crops} must be at least 1.')
  if e.inception_weights and not storage.path(e.inception_weights).exists():
    raise UserError(f'config.eval.inception_weights={e.inception_weights} does not exist; pass '
                    'the pt_inception-2015-12-05-6726825d.pth file of pytorch-fid (or a '
                    '.safetensors with its keys).')
