"""How the learned flow is used: integrate dx/dt = v(x, context, t) from t=0 to t=1 with diffrax.

`nfe` counts network evaluations, never grid points: Euler with nfe=40 takes 40 steps of size 1/40.
"""

import diffrax
import jax
import jax.numpy as jnp
import ml_collections

from fmboost_jax import flow
from fmboost_jax import upsampling

SOLVERS = ('euler',)


def check_config(sample_config: ml_collections.ConfigDict) -> None:
  """Raises ValueError with one sentence if the sampler settings are impossible."""
  if sample_config.solver not in SOLVERS:
    raise ValueError(f'config.sample.solver={sample_config.solver!r} is unknown; '
                     f'use one of {SOLVERS}.')
  if sample_config.nfe < 1:
    raise ValueError(f'config.sample.nfe={sample_config.nfe} must be at least 1.')


def solve(velocity_fn: flow.VelocityFn, x0: jax.Array, context: jax.Array, *, solver: str,
          nfe: int) -> tuple[jax.Array, jax.Array]:
  """Integrates the flow from x0 at t=0 to t=1.

  Args:
    velocity_fn: v(x_t [B,H,W,C], context [B,H,W,C], t [B]) -> [B,H,W,C].
    x0: [B, H, W, C] source.
    context: [B, H, W, C] conditioning, passed on every call.
    solver: 'euler'.
    nfe: number of network evaluations (static).

  Returns:
    x1 [B, H, W, C] and the number of network evaluations spent (int32 scalar).
  """
  if solver != 'euler':
    raise ValueError(f'solver {solver!r} is unknown; use one of {SOLVERS}.')

  def vector_field(t, x, args):
    return velocity_fn(x, args, jnp.full((x.shape[0],), t, jnp.float32)).astype(x.dtype)

  sol = diffrax.diffeqsolve(
      diffrax.ODETerm(vector_field), diffrax.Euler(), t0=0.0, t1=1.0, dt0=1.0 / nfe, y0=x0,
      args=context, saveat=diffrax.SaveAt(t1=True), max_steps=nfe,
      adjoint=diffrax.ForwardMode(), throw=False)
  return sol.ys[-1], sol.stats['num_steps']


def boost(velocity_fn: flow.VelocityFn, first_stage: upsampling.FirstStage,
          low_res_images: jax.Array, target_size: tuple[int, int], key: jax.Array,
          flow_config: ml_collections.ConfigDict,
          sample_config: ml_collections.ConfigDict) -> jax.Array:
  """Lifts low-res images [B, h, w, 3] to high-res images [B, *target_size * f, 3].

  The source is built exactly as in training (upsampling mode, fresh noise augmentation from
  `key`); regression objectives take the single step they were trained for.
  """
  x_up = upsampling.upsample(first_stage, flow_config.upsampling_mode, target_size,
                             low_res_images=low_res_images)
  x0, context = flow.source_and_context(x_up, key, flow_config)
  regression = flow_config.objective in ('l1', 'l2')
  x1, _ = solve(velocity_fn, x0, context, solver='euler' if regression else sample_config.solver,
                nfe=1 if regression else sample_config.nfe)
  return first_stage.decode(x1)
