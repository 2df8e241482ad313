"""A trained velocity network as sampling and evaluation use it.

`load(workdir, ...)` restores the latest checkpoint of a `--mode=train` workdir: the config saved
with that checkpoint (an Orbax item beside the state, so a workdir whose training config changed
between runs still restores each step with its own config), the EMA weights (or the online ones
when the run trained with `config.ema.use_for_sampling=False`) and the first stage. The rules that
make a workdir portable live here: the recorded first-stage weights path is replaced by
`first_stage_weights` when one is given, and a recorded path that no longer exists is one clear
error naming the override.
"""

import dataclasses
import os
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
from flax import nnx

from fmboost_jax import checkpointing, flow, upsampling
from fmboost_jax.errors import UserError
from fmboost_jax.models import unet

WEIGHTS_FLAG = '--config.first_stage.weights'


def velocity_fn(graphdef: nnx.GraphDef, params) -> flow.VelocityFn:
  """The network as v(x_t, context, t), from its graph and a pure-dict of parameters."""
  model = nnx.merge(graphdef, nnx.State(params))
  return lambda x_t, context, t: model(jnp.concatenate([x_t, context], axis=-1), t)


def model_graphdef(config: ml_collections.ConfigDict, channels: int) -> nnx.GraphDef:
  """The network's graph for `config.model` on latents of `channels` channels (no weights)."""
  abstract = nnx.eval_shape(
      lambda: unet.unet_from_config(config.model, channels, rngs=nnx.Rngs(0)))
  graphdef, _ = nnx.split(abstract, nnx.Param)
  return graphdef


@dataclasses.dataclass
class TrainedModel:
  workdir: str
  step: int
  config: ml_collections.ConfigDict  # The training config saved with the checkpoint.
  sample: ml_collections.ConfigDict  # The solver settings to sample with.
  scale: int  # Output size / input size.
  unit: int  # Network input sizes (latent grid) must be multiples of this.
  first_stage: Any
  graphdef: nnx.GraphDef
  params: Any

  def velocity(self) -> flow.VelocityFn:
    return velocity_fn(self.graphdef, self.params)


def with_first_stage_weights(config: ml_collections.ConfigDict, weights: str,
                             workdir: str) -> ml_collections.ConfigDict:
  """The recorded config with its first-stage weights replaced by `weights` when given; a recorded
  path that is gone is a UserError naming the override."""
  config = ml_collections.ConfigDict(config.to_dict())
  if weights:
    config.first_stage.weights = weights
  elif (config.first_stage.name != 'identity' and config.first_stage.weights
        and not os.path.exists(config.first_stage.weights)):
    raise UserError(
        f'{workdir} was trained with the first-stage weights {config.first_stage.weights}, which '
        f'no longer exist there; pass the same autoencoder with {WEIGHTS_FLAG}=PATH.')
  return config


def load(workdir: str, sample_config: ml_collections.ConfigDict,
         replicated: jax.sharding.Sharding, *, first_stage_weights: str = '') -> TrainedModel:
  """Restores the latest checkpoint of a training workdir onto `replicated` devices."""
  directory = os.path.join(workdir, 'checkpoints')
  step = checkpointing.latest_step(directory)
  if step is None:
    raise UserError(f'{workdir} holds no checkpoint (nothing in {directory}); point --workdir (or '
                    'a stage of config.sample.stages) at the workdir of a --mode=train run, or '
                    f'train it first with --mode=train --workdir={workdir}.')
  config = with_first_stage_weights(checkpointing.restore_config(directory, step),
                                    first_stage_weights, workdir)
  first_stage = upsampling.first_stage_from_config(config)
  graphdef = model_graphdef(config, first_stage.channels)
  shapes = nnx.to_pure_dict(nnx.state(nnx.eval_shape(
      lambda: unet.unet_from_config(config.model, first_stage.channels, rngs=nnx.Rngs(0))),
      nnx.Param))
  abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=replicated),
                          shapes)
  name = 'ema_params' if config.ema.use_for_sampling else 'params'
  params = checkpointing.restore_subtree(directory, step, name, abstract)
  scale = config.data.high_res_size // config.data.low_res_size
  unit = 2**(len(config.model.channel_mult) - 1)
  return TrainedModel(workdir=workdir, step=step, config=config, sample=sample_config, scale=scale,
                      unit=unit, first_stage=first_stage, graphdef=graphdef, params=params)
