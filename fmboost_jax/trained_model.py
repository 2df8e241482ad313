"""A trained model: restore it, boost images or latents with it, export it.

  from fmboost_jax import trained_model
  model = trained_model.load('workdirs/demo')           # a --mode=train workdir or an export
  boosted = model.boost(photo)                          # PIL images, 2x the size of `photo`
  latents = trained_model.boost([stage1, stage2], latents=z, output_type='latent')  # a cascade

`load(path)` restores the latest checkpoint of a training workdir (the config saved with that
step, so a workdir whose config changed between runs restores each step with its own) or a
directory written by `--mode=export`: the config, the EMA weights (or the online ones when the run
trained with `config.ema.use_for_sampling=False`) and the first stage. The rules that make a model
portable live here: the recorded first-stage weights path is replaced by `first_stage_weights`
when one is given, and a recorded path that no longer exists is one clear error naming the override.

Boosting runs the models of a cascade in turn (`Cascade`): each builds its source from its input as
in training (its objective and upsampling mode), integrates with its solver settings (`sample`),
and passes latents on; the last one's latents are decoded tiled. Inputs are batched and sharded
over the local devices, each input shape compiled once. Inputs whose size the network cannot take
are padded at the bottom and right by edge replication and the outputs cropped back, so every
output is exactly the input size times the models' factors. `upsample_held_out` is the same lift
for held-out images inside jit (training's validation and `--mode=evaluate`).

The model layer takes and returns float32 NHWC arrays; `boost` is the user's entry, and
`conversions` turns what users hold (PIL images, uint8 arrays, NCHW latents) into those arrays and
back.
"""

import dataclasses
import math
import os
import time
from collections.abc import Iterator, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import nnx

from fmboost_jax import (
  conversions,
  first_stages,
  flow,
  model_files,
  sampling,
  sharding,
  storage,
  upsampling,
)
from fmboost_jax.errors import UserError
from fmboost_jax.models import layers, unet

WEIGHTS_FLAG = '--config.first_stage.weights'


def velocity_fn(graphdef: nnx.GraphDef, params) -> sampling.VelocityFn:
  """The network as v(x_t, context, t), from its graph and a pure-dict of parameters."""
  model = nnx.merge(graphdef, nnx.State(params))
  return lambda x_t, context, t: model(jnp.concatenate([x_t, context], axis=-1), t)


def network(config: ml_collections.ConfigDict, channels: int,
            rngs: nnx.Rngs | layers.ParamKeys) -> unet.UNet:
  """The velocity network of `config.model` on latents of `channels` channels: its input is
  concat[x_t, context] (2 * channels), its output the velocity (channels). Inside jit or
  eval_shape, build it with `layers.ParamKeys`."""
  return unet.UNet(in_channels=2 * channels, out_channels=channels, **config.model, rngs=rngs)


def model_graphdef(config: ml_collections.ConfigDict, channels: int) -> nnx.GraphDef:
  """The network's graph for `config.model` on latents of `channels` channels (no weights)."""
  graphdef, _ = nnx.split(layers.abstract(network, config, channels), nnx.Param)
  return graphdef


def lift(graphdef: nnx.GraphDef, params, first_stage: first_stages.FirstStage,
         config: ml_collections.ConfigDict, sample: ml_collections.ConfigDict,
         target_size: tuple[int, int], key: jax.Array, *, low_res_images: jax.Array | None = None,
         low_res_latents: jax.Array | None = None, save_trajectory: int = 0) -> sampling.Solution:
  """Lifts low-res images [B, h, w, 3] or latents [B, h', w', C] to the latent grid
  [B, *target_size, C] as `config` trained (upsampling mode, objective), sampled with `sample`."""
  x_up = upsampling.upsample(first_stage, config.flow.upsampling_mode, target_size,
                             low_res_images=low_res_images, low_res_latents=low_res_latents)
  return flow.objective(config.flow).sample(velocity_fn(graphdef, params), x_up, key, sample,
                                            save_trajectory=save_trajectory)


def upsample_held_out(graphdef: nnx.GraphDef, params, first_stage: first_stages.FirstStage,
                      config: ml_collections.ConfigDict, sample: ml_collections.ConfigDict,
                      targets: jax.Array,
                      key: jax.Array) -> tuple[jax.Array, jax.Array, sampling.Solution]:
  """Held-out images [B, S, S, 3] -> (their low-res input, the model's [B, S, S, 3], Solution),
  as `config` trained, with `sample`'s solver settings; a pure function to jit. The model's latents
  are decoded as sampling decodes them, in tiles (bounded memory at 1024 px and above)."""
  low_res = upsampling.low_res_images(targets, config.data.low_res_size)
  grid = (targets.shape[1] // first_stage.factor, targets.shape[2] // first_stage.factor)
  solution = lift(graphdef, params, first_stage, config, sample, grid, key,
                  low_res_images=low_res)
  return low_res, first_stage.decode_tiled(solution.x1), solution


# ----------------------------------------------------------------------------- restoring


@dataclasses.dataclass
class TrainedModel:
  path: str  # The training workdir or export directory it was restored from.
  step: int
  config: ml_collections.ConfigDict  # The training config saved with the weights.
  sample: ml_collections.ConfigDict  # The solver settings to sample with.
  first_stage: Any
  graphdef: nnx.GraphDef
  params: Any
  mesh: jax.sharding.Mesh
  # The compiled cascades this model starts, by the models in them: boosting again reuses them.
  cascades: dict = dataclasses.field(default_factory=dict, init=False, repr=False, compare=False)

  @property
  def scale(self) -> int:
    """Output size / input size."""
    return self.config.data.high_res_size // self.config.data.low_res_size

  @property
  def unit(self) -> int:
    """Network input sizes (the latent grid) must be multiples of this."""
    return 2**(len(self.config.model.channel_mult) - 1)

  @property
  def objective(self) -> flow.Objective:
    return flow.objective(self.config.flow)

  def velocity(self) -> sampling.VelocityFn:
    return velocity_fn(self.graphdef, self.params)

  def boost(self, image=None, **kwargs):
    """`boost([self], image, ...)`."""
    return boost([self], image, **kwargs)

  def export(self, directory: str, dtype: str = 'float32') -> str:
    """Writes the config and the sampling weights (cast to `dtype`: float32 or bfloat16) to
    `directory`, which `load` restores without the training workdir; returns the directory."""
    if dtype not in ('float32', 'bfloat16'):
      raise UserError(f'export dtype {dtype!r} is unknown; use float32 or bfloat16.')
    params = jax.tree.map(lambda x: x.astype(dtype), self.params)
    model_files.write_export(directory, params, self.config,
                               {'step': self.step, 'source': os.fspath(storage.path(self.path)),
                                'dtype': dtype})
    return directory


def abstract_network(config: ml_collections.ConfigDict, channels: int,
                     mesh: jax.sharding.Mesh) -> tuple[nnx.GraphDef, Any]:
  """The network's graph and its parameters as ShapeDtypeStructs (a pure dict) replicated on
  `mesh`: what restoring reads into, and what compiling for a target takes."""
  graphdef, shapes = nnx.split(layers.abstract(network, config, channels), nnx.Param)
  replicated = sharding.replicated(mesh)
  return graphdef, jax.tree.map(
      lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=replicated),
      nnx.to_pure_dict(shapes))


def with_first_stage_weights(config: ml_collections.ConfigDict, weights: str, path: str, *,
                             must_exist: bool = True) -> ml_collections.ConfigDict:
  """The recorded config with its first-stage weights replaced by `weights` when given; a recorded
  path that is gone is a UserError naming the override (when `must_exist`)."""
  config = ml_collections.ConfigDict(config.to_dict())
  if weights:
    config.first_stage.weights = weights
  elif (must_exist and config.first_stage.name != 'identity' and config.first_stage.weights
        and not storage.path(config.first_stage.weights).exists()):
    raise UserError(
        f'{path} was trained with the first-stage weights {config.first_stage.weights}, which '
        f'no longer exist there; pass the same autoencoder with {WEIGHTS_FLAG}=PATH.')
  return config


def load(path: str, *, sample: ml_collections.ConfigDict | None = None,
         first_stage_weights: str = '', mesh: jax.sharding.Mesh | None = None,
         with_first_stage: bool = True) -> TrainedModel:
  """Restores a training workdir's latest checkpoint or an exported model, replicated on `mesh`
  (default: all devices). `sample` (config.sample's fields) replaces the saved solver settings.
  `with_first_stage=False` leaves the first stage's weights unread (its parameters abstract): for
  what needs only the network's, such as an export."""
  mesh = mesh or sharding.data_mesh()
  exported = model_files.is_export(path)
  if exported:
    saved_config, info = model_files.read_export_config(path)
    step = info['step']
  else:
    directory = storage.join(path, 'checkpoints')
    step = model_files.latest_step(directory)
    if step is None:
      raise UserError(f'{path} holds no checkpoint (nothing in {directory}); point --workdir (or a '
                      'stage of config.sample.stages) at the workdir of a --mode=train run or at '
                      f'a --mode=export directory, or train it first with --mode=train '
                      f'--workdir={path}.')
    saved_config = model_files.restore_config(directory, step)
  config = with_first_stage_weights(saved_config, first_stage_weights, path,
                                    must_exist=with_first_stage)
  sampling_config = ml_collections.ConfigDict((sample or config.sample).to_dict())
  try:
    sampling.check_config(sampling_config)
  except ValueError as e:
    raise UserError(f'{path}: {e}') from None
  first_stage = first_stages.first_stage_from_config(config, weights_loaded=with_first_stage)
  graphdef, abstract = abstract_network(config, first_stage.channels, mesh)
  if exported:
    params = model_files.read_export_params(path, abstract)
  else:
    name = 'ema_params' if config.ema.use_for_sampling else 'params'
    params = model_files.restore_subtree(directory, step, name, abstract)
  return TrainedModel(path=path, step=step, config=config, sample=sampling_config,
                      first_stage=first_stage, graphdef=graphdef, params=params, mesh=mesh)


# ----------------------------------------------------------------------------- boosting


@dataclasses.dataclass
class Batch:
  """One batch through a cascade (host arrays, the padding for the devices removed)."""
  images: np.ndarray  # [n, H, W, 3] in [-1, 1].
  latents: np.ndarray  # [n, H/f, W/f, C], scaled, the last model's output.
  nfe: list[np.ndarray]  # Per model, [n] network evaluations spent.
  ok: list[np.ndarray]  # Per model, [n] True where the solver reached t=1.
  trajectory: list[np.ndarray]  # The last model's ODE states, decoded, each [n, H, W, 3].
  seconds: float  # Wall clock without compilation.


def _pad_to(x: jax.Array, unit: int) -> jax.Array:
  """Pads [B, H, W, C] at the bottom/right by edge replication to multiples of `unit`."""
  h, w = x.shape[1:3]
  pad = ((0, 0), (0, -h % unit), (0, -w % unit), (0, 0))
  return jnp.pad(x, pad, mode='edge') if any(p[1] for p in pad) else x


class Cascade:
  """Trained models applied in turn (one model is a cascade of one), compiled once per shape."""

  def __init__(self, models: Sequence[TrainedModel]):
    if not models:
      raise UserError('a cascade needs at least one trained model.')
    first = models[0].config.first_stage.to_dict()
    for i, model in enumerate(models[1:], start=2):
      if model.config.first_stage.to_dict() != first:
        raise UserError(f'stage {i} ({model.path}) was trained with another first stage than '
                        f'stage 1 ({models[0].path}); stages pass latents on, so train every '
                        'stage of a cascade with the same config.first_stage.')
    self.models = list(models)
    self.first_stage = models[0].first_stage
    self.mesh = models[0].mesh
    self.batch_sharding = sharding.batch_sharded(self.mesh)
    self.replicated = sharding.replicated(self.mesh)
    self.devices = self.mesh.devices.size
    self.compile_seconds = 0.0
    self._cache: dict[Any, Any] = {}

  def _compiled(self, cache_key, program: jax.stages.Wrapped, *args):
    if cache_key not in self._cache:
      t0 = time.perf_counter()
      self._cache[cache_key] = program.lower(*args).compile()
      self.compile_seconds += time.perf_counter() - t0
    return self._cache[cache_key](*args)

  def _input_unit(self, model: TrainedModel, kind: str) -> int:
    """Input sizes must be multiples of this so that the target latent grid fits the network."""
    factor = model.first_stage.factor if kind == 'image' else 1
    unit = model.unit * factor // math.gcd(model.unit * factor, model.scale)
    if kind == 'image' and model.config.flow.upsampling_mode != 'psu':
      unit = math.lcm(unit, model.first_stage.factor)  # The low-res image itself is encoded.
    return unit

  def lift_program(self, index: int, kind: str, shape: tuple[int, ...],
                   save_trajectory: int = 0) -> jax.stages.Wrapped:
    """Model `index`'s lift of a batch of `shape` [B, h, w, C] (images or latents, by `kind`) to
    its latent grid, jitted: (params, first-stage params, x, key) -> Solution."""
    model = self.models[index]
    factor = model.first_stage.factor if kind == 'image' else 1
    target = (shape[1] * model.scale // factor, shape[2] * model.scale // factor)
    fs_graphdef = nnx.graphdef(model.first_stage)

    def fn(params, fs_params, x, key):
      inputs = {'low_res_images' if kind == 'image' else 'low_res_latents': x}
      return lift(model.graphdef, params, nnx.merge(fs_graphdef, fs_params), model.config,
                  model.sample, target, key, save_trajectory=save_trajectory, **inputs)

    return jax.jit(fn, in_shardings=(self.replicated, self.replicated, self.batch_sharding,
                                     self.replicated))

  def decode_program(self, tiled: bool = True) -> jax.stages.Wrapped:
    """The first stage's decode, jitted: (first-stage params, latents) -> images."""
    graphdef = nnx.graphdef(self.first_stage)

    def fn(params, z):
      model = nnx.merge(graphdef, params)
      return model.decode_tiled(z) if tiled else model.decode(z)

    return jax.jit(fn, in_shardings=(self.replicated, self.batch_sharding))

  def _lift(self, index: int, kind: str, x: jax.Array, key: jax.Array,
            save_trajectory: int) -> sampling.Solution:
    model = self.models[index]
    return self._compiled(('lift', index, kind, x.shape, save_trajectory),
                          self.lift_program(index, kind, x.shape, save_trajectory), model.params,
                          nnx.state(model.first_stage), x, key)

  def decode(self, latents, tiled: bool = True) -> jax.Array:
    """Latents [n, h, w, C] -> images [n, h f, w f, 3] (padded to fill the devices and cropped)."""
    n = len(latents)
    padded = sharding.put(sharding.pad_batch(latents, sharding.round_up(n, self.devices)),
                          self.batch_sharding)
    return self._compiled(('decode', padded.shape, tiled), self.decode_program(tiled),
                          nnx.state(self.first_stage), padded)[:n]

  def run(self, x: np.ndarray, kind: str, key: jax.Array, *, save_trajectory: int = 0) -> Batch:
    """Boosts one batch x [n, h, w, 3] of images in [-1, 1] (kind 'image') or [n, h, w, C] of
    scaled latents (kind 'latent'); model k draws its noise from fold_in(key, k)."""
    n = len(x)
    padded = sharding.pad_batch(x, sharding.round_up(n, self.devices))
    compile_before, t0 = self.compile_seconds, time.perf_counter()
    z = sharding.put(padded, self.batch_sharding)  # Each process places its devices' share.
    pixels = tuple(d * (1 if kind == 'image' else self.first_stage.factor) for d in x.shape[1:3])
    nfes, oks, solution = [], [], None
    for k, model in enumerate(self.models):
      save = save_trajectory if k == len(self.models) - 1 else 0
      solution = self._lift(k, kind, _pad_to(z, self._input_unit(model, kind)),
                            jax.random.fold_in(key, k), save)
      pixels = (pixels[0] * model.scale, pixels[1] * model.scale)
      grid = (-(-pixels[0] // self.first_stage.factor), -(-pixels[1] // self.first_stage.factor))
      z, kind = solution.x1[:, :grid[0], :grid[1]], 'latent'
      nfes.append(jnp.broadcast_to(solution.nfe, (len(padded),)))
      oks.append(jnp.broadcast_to(solution.ok, (len(padded),)))
    decoded = self.decode(z)[:, :pixels[0], :pixels[1]]
    frames = [] if solution.trajectory is None else [
        self.decode(s[:, :grid[0], :grid[1]])[:, :pixels[0], :pixels[1]]
        for s in solution.trajectory]
    decoded, z, nfes, oks, frames = sharding.to_host((decoded, z, nfes, oks, frames))
    seconds = time.perf_counter() - t0 - (self.compile_seconds - compile_before)
    return Batch(images=decoded[:n], latents=z[:n], nfe=[v[:n] for v in nfes],
                 ok=[v[:n] for v in oks], trajectory=[f[:n] for f in frames], seconds=seconds)

  def batches(self, inputs: Sequence[tuple[str, np.ndarray]], batch_size: int, seed: int, *,
              save_trajectory: int = 0) -> Iterator[tuple[list[int], Batch]]:
    """Boosts (kind, array) inputs in batches of up to `batch_size` of one kind and shape, in
    order of first appearance; yields (input indices, Batch). Batch b draws from
    fold_in(key(seed), b), so the same inputs, batch size and seed give the same outputs."""
    if batch_size < 1:
      raise UserError(f'the batch size {batch_size} must be at least 1.')
    groups: dict[Any, list[int]] = {}
    for i, (kind, array) in enumerate(inputs):
      groups.setdefault((kind, array.shape), []).append(i)
    key = jax.random.key(seed)
    ids_of_batches = [ids[j:j + batch_size] for ids in groups.values()
                      for j in range(0, len(ids), batch_size)]
    for b, ids in enumerate(ids_of_batches):
      kind = inputs[ids[0]][0]
      yield ids, self.run(np.stack([inputs[i][1] for i in ids]), kind,
                          jax.random.fold_in(key, b), save_trajectory=save_trajectory)


def boost(models: TrainedModel | Sequence[TrainedModel], image=None, *, latents=None,
          output_type: str = 'pil', seed: int = 0, batch_size: int = 8,
          latents_scaled: bool = True):
  """Boosts low-res images or latents with one model or a cascade (a list of them).

  Args:
    models: a TrainedModel or a list applied in turn.
    image: a PIL image, an RGB array [h, w, 3] (uint8, or float in [0, 1]), or a list / batch
      [N, h, w, 3] of them; sizes may differ.
    latents: instead of images, first-stage latents [N,] C, h, w (NCHW, as diffusers returns them)
      or [N,] h, w, C; already times the scale factor unless `latents_scaled=False`.
    output_type: 'pil' (a list of PIL images), 'np' (float32 [N, H, W, 3] in [0, 1], a list when
      the sizes differ) or 'latent' (float32 NCHW [N, C, H/f, W/f], scaled, a list when the sizes
      differ), as diffusers pipelines return them.
    seed: the noise of the sources; the same inputs, batch size and seed give the same outputs.
    batch_size: inputs per compiled call (padded to a multiple of the local devices).

  Each input shape is compiled once per cascade; boosting again with the same models reuses it.
  """
  models = [models] if isinstance(models, TrainedModel) else list(models)
  if not models:
    raise UserError('boost needs at least one trained model.')
  key = tuple(id(m) for m in models)
  if key not in models[0].cascades:
    models[0].cascades[key] = Cascade(models)
  cascade = models[0].cascades[key]
  conversions.check_output_type(output_type)
  if (image is None) == (latents is None):
    raise UserError('pass either images or latents to boost.')
  if image is not None:
    inputs = [('image', x) for x in conversions.images_in(image)]
  else:
    fs = cascade.first_stage
    inputs = [('latent', z) for z in conversions.latents_in(latents, fs.channels, fs.scale_factor,
                                                            latents_scaled)]
  results: list[Any] = [None] * len(inputs)
  for ids, batch in cascade.batches(inputs, batch_size, seed):
    for j, i in enumerate(ids):
      results[i] = conversions.output(batch.images[j], batch.latents[j], output_type)
  return conversions.outputs(results, output_type)
