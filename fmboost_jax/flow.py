"""What is learned: coupling flow matching (CFM) and its baselines.

Time runs from t=0 (source x0) to t=1 (target x1). All tensors are NHWC latents (or pixels when the
first stage is the identity): x1 is the high-res target, `x_up` the low-res input brought to the
target grid (e.g. by PSU). The network is called as `v(concat[x_t, context], t)`.

Objectives (config.flow.objective):
  cfm: x0 = noise_augment(x_up), context = x_up (the paper's method).
  fm:  x0 ~ N(0, I), context = x_up (naive flow matching, paper Table 2).
  l1 / l2: regression; one network call at t=0 from x0 = context = x_up predicts x1 - x_up, so a
    single Euler step of size 1 is the regression output and sampling needs no special case.
"""

from typing import Callable

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

OBJECTIVES = ('cfm', 'fm', 'l1', 'l2')
SCHEDULES = ('linear', 'gvp')

# v(x_t [B,H,W,C], context [B,H,W,C], t [B]) -> velocity [B,H,W,C].
VelocityFn = Callable[[jax.Array, jax.Array, jax.Array], jax.Array]


def check_config(flow_config: ml_collections.ConfigDict) -> None:
  """Raises ValueError with one sentence if the flow settings are inconsistent."""
  c = flow_config
  if c.objective not in OBJECTIVES:
    raise ValueError(f'config.flow.objective={c.objective!r} is unknown; use one of {OBJECTIVES}.')
  if c.schedule not in SCHEDULES:
    raise ValueError(f'config.flow.schedule={c.schedule!r} is unknown; use one of {SCHEDULES}.')
  if c.schedule == 'gvp' and c.sigma_min != 0:
    raise ValueError('config.flow.sigma_min must be 0 with the gvp schedule; set it to 0.')
  if c.sigma_min < 0:
    raise ValueError(f'config.flow.sigma_min={c.sigma_min} is negative; use a value >= 0.')
  if c.noising_step == 1 or c.noising_step >= c.num_noising_steps:
    raise ValueError(
        f'config.flow.noising_step={c.noising_step} is invalid; use 0 (off) or an integer in '
        f'[2, {c.num_noising_steps - 1}].')
  if c.objective == 'fm' and c.noising_step > 0:
    raise ValueError('config.flow.objective=fm starts from pure noise, so noise augmentation does '
                     'not apply; set config.flow.noising_step=0.')


def alpha_bar(step: int, num_steps: int = 1000) -> np.float32:
  """Cosine noise schedule of the augmentation: about cos^2(pi/2 * step/(num_steps-1)).

  This is the log-SNR form of the reference, logSNR = -2 log(tan(pi tau/2) + 1e-5) and
  alpha_bar = sigmoid(logSNR), computed in float64 and stored as float32: alpha_bar(400) =
  0.653904, alpha_bar(999) = 3.7e-33. `step` is a static integer.
  """
  tau = np.float64(step) / (num_steps - 1)
  log_snr = -2.0 * np.log(np.tan(np.pi * tau / 2) + 1e-5)
  return np.float32(1.0 / (1.0 + np.exp(-log_snr)))


def noise_augment(x: jax.Array, key: jax.Array, step: int, num_steps: int = 1000) -> jax.Array:
  """q-sample: sqrt(ab) * x + sqrt(1 - ab) * eps with eps ~ N(0, I) drawn from `key`."""
  ab = alpha_bar(step, num_steps)
  eps = jax.random.normal(key, x.shape, x.dtype)
  return jnp.sqrt(ab) * x + jnp.sqrt(1.0 - ab) * eps


def source_and_context(x_up: jax.Array, key: jax.Array,
                       flow_config: ml_collections.ConfigDict) -> tuple[jax.Array, jax.Array]:
  """Builds (x0, context) from the upsampled low-res input, the same way at training and inference.

  Args:
    x_up: [B, H, W, C] low-res input on the target grid.
    key: PRNG key for the source noise (fresh at training and at inference).
    flow_config: config.flow.

  Returns:
    x0 [B, H, W, C] (the source at t=0) and context [B, H, W, C] (the clean x_up).
  """
  c = flow_config
  if c.objective == 'fm':
    x0 = jax.random.normal(key, x_up.shape, x_up.dtype)
  elif c.objective == 'cfm' and c.noising_step > 0:
    x0 = noise_augment(x_up, key, c.noising_step, c.num_noising_steps)
  else:
    x0 = x_up
  return x0, x_up


def interpolant(x0: jax.Array, x1: jax.Array, t: jax.Array,
                schedule: str) -> tuple[jax.Array, jax.Array]:
  """x_t = alpha(t) x1 + sigma(t) x0 and its velocity u_t = alpha'(t) x1 + sigma'(t) x0.

  Args:
    x0, x1: [B, H, W, C].
    t: [B] times in [0, 1].
    schedule: 'linear' (alpha = t, sigma = 1 - t) or 'gvp' (alpha = sin(pi t/2), sigma = cos).
  """
  t = t[:, None, None, None]
  if schedule == 'linear':
    return t * x1 + (1 - t) * x0, x1 - x0
  if schedule == 'gvp':
    a, s = jnp.sin(jnp.pi * t / 2), jnp.cos(jnp.pi * t / 2)
    return a * x1 + s * x0, jnp.pi / 2 * (s * x1 - a * x0)
  raise ValueError(f'unknown schedule {schedule!r}')


def loss(velocity_fn: VelocityFn, x1: jax.Array, x_up: jax.Array, key: jax.Array,
         flow_config: ml_collections.ConfigDict) -> jax.Array:
  """The training loss, a float32 scalar.

  Args:
    velocity_fn: the network v(x_t, context, t).
    x1: [B, H, W, C] target (high-res latent).
    x_up: [B, H, W, C] low-res latent upsampled to the target grid.
    key: PRNG key for the source noise, t and sigma_min noise.
    flow_config: config.flow.
  """
  c = flow_config
  source_key, t_key, sigma_key = jax.random.split(key, 3)
  x0, context = source_and_context(x_up, source_key, c)
  batch = x1.shape[0]
  if c.objective in ('l1', 'l2'):
    v = velocity_fn(x0, context, jnp.zeros((batch,), jnp.float32))
    err = v - (x1 - x0)
    return jnp.mean(jnp.abs(err)) if c.objective == 'l1' else jnp.mean(jnp.square(err))
  t = jax.random.uniform(t_key, (batch,), jnp.float32)
  x_t, u_t = interpolant(x0, x1, t, c.schedule)
  if c.sigma_min > 0:
    x_t = x_t + c.sigma_min * jax.random.normal(sigma_key, x_t.shape, x_t.dtype)
  v = velocity_fn(x_t, context, t)
  return jnp.mean(jnp.square(v.astype(jnp.float32) - u_t))
