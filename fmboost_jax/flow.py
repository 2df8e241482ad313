"""What is learned: coupling flow matching (CFM) and its baselines, each one `Objective`.

Time runs from t=0 (source x0) to t=1 (target x1). All tensors are NHWC latents (or pixels when the
first stage is the identity): x1 is the high-res target, `x_up` the low-res input brought to the
target grid (e.g. by PSU). The network is called as `v(concat[x_t, context], t)`.

Objectives (config.flow.objective; `objective(flow_config)` is the one place that reads the name):
  cfm: x0 = noise_augment(x_up), context = x_up (the paper's method). sigma_min > 0 adds
    sigma_min * eps to x_t with an unchanged target (the I-CFM form the official code uses).
  fm:  x0 ~ N(0, I), context = x_up (naive flow matching, paper Table 2). sigma_min > 0 is the
    paper's eqs. 3-5: x_t = (1 - (1 - sigma_min) t) x0 + t x1, target x1 - (1 - sigma_min) x0.
  l1 / l2: regression; one network call at t=0 from x0 = context = x_up predicts x1 - x_up, so a
    single Euler step of size 1 is the regression output.
Flows are sampled by integrating the ODE with the configured solver (an NFE sweep applies);
regression takes its one step.
"""

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from fmboost_jax import sampling
from fmboost_jax.sampling import VelocityFn

OBJECTIVES = ('cfm', 'fm', 'l1', 'l2')
SCHEDULES = ('linear', 'gvp')


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
  if c.objective != 'cfm' and c.noising_step > 0:
    start = 'pure noise' if c.objective == 'fm' else 'the clean upsampled input'
    raise ValueError(f'config.flow.objective={c.objective} starts from {start}, so noise '
                     'augmentation does not apply; set config.flow.noising_step=0.')
  if c.objective in ('l1', 'l2') and c.sigma_min > 0:
    raise ValueError(f'config.flow.objective={c.objective} is a regression without a path, so '
                     'sigma_min does not apply; set config.flow.sigma_min=0.')


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


class Objective:
  """A training objective: the source it starts from, its loss and how it is sampled.

  `flow_config` is config.flow. Subclasses set `name` and `is_flow` (sampled by integrating an
  ODE, so a solver and an NFE sweep apply) and define `source` and `loss`.
  """
  name = ''
  is_flow = True

  def __init__(self, flow_config: ml_collections.ConfigDict):
    self.config = flow_config

  def source(self, x_up: jax.Array, key: jax.Array) -> tuple[jax.Array, jax.Array]:
    """(x0, context) from the upsampled low-res input [B, H, W, C], the same way at training and
    inference; `key` draws the source noise (fresh at training and at inference)."""
    raise NotImplementedError

  def loss(self, velocity_fn: VelocityFn, x1: jax.Array, x_up: jax.Array,
           key: jax.Array) -> jax.Array:
    """The training loss (a float32 scalar) of target x1 [B, H, W, C] from x_up; `key` draws the
    source noise, the times and the sigma_min noise."""
    raise NotImplementedError

  def sample(self, velocity_fn: VelocityFn, x_up: jax.Array, key: jax.Array,
             sample_config: ml_collections.ConfigDict, *,
             save_trajectory: int = 0) -> sampling.Solution:
    """Lifts x_up to the target: integrates the flow from the source with the solver settings of
    `sample_config` (`sampling.solver_settings`); `save_trajectory` as in `sampling.solve`."""
    x0, context = self.source(x_up, key)
    return sampling.solve(velocity_fn, x0, context, save_trajectory=save_trajectory,
                          **sampling.solver_settings(sample_config))


class CouplingFlow(Objective):
  """cfm: from the noise-augmented x_up to x1 along the schedule's path."""
  name = 'cfm'

  def source(self, x_up, key):
    c = self.config
    x0 = noise_augment(x_up, key, c.noising_step, c.num_noising_steps) if c.noising_step else x_up
    return x0, x_up

  def path(self, x0, x1, t, key):
    """(x_t, target velocity) at times t [B]."""
    x_t, u_t = interpolant(x0, x1, t, self.config.schedule)
    if self.config.sigma_min > 0:
      x_t = x_t + self.config.sigma_min * jax.random.normal(key, x_t.shape, x_t.dtype)
    return x_t, u_t

  def loss(self, velocity_fn, x1, x_up, key):
    source_key, t_key, path_key = jax.random.split(key, 3)
    x0, context = self.source(x_up, source_key)
    t = jax.random.uniform(t_key, (x1.shape[0],), jnp.float32)
    x_t, u_t = self.path(x0, x1, t, path_key)
    v = velocity_fn(x_t, context, t)
    return jnp.mean(jnp.square(v.astype(jnp.float32) - u_t))


class NaiveFlow(CouplingFlow):
  """fm: from N(0, I) to x1, x_up only as context; sigma_min as in the paper's eqs. 3-5."""
  name = 'fm'

  def source(self, x_up, key):
    return jax.random.normal(key, x_up.shape, x_up.dtype), x_up

  def path(self, x0, x1, t, key):
    s = self.config.sigma_min
    if s == 0:
      return super().path(x0, x1, t, key)
    tt = t[:, None, None, None]
    return (1 - (1 - s) * tt) * x0 + tt * x1, x1 - (1 - s) * x0


class Regression(Objective):
  """l1 / l2: one network call at t=0 from x_up predicts the residual x1 - x_up."""
  is_flow = False

  def __init__(self, flow_config: ml_collections.ConfigDict):
    super().__init__(flow_config)
    self.name = flow_config.objective

  def source(self, x_up, key):
    return x_up, x_up

  def loss(self, velocity_fn, x1, x_up, key):
    x0, context = self.source(x_up, key)
    err = velocity_fn(x0, context, jnp.zeros((x1.shape[0],), jnp.float32)) - (x1 - x0)
    return jnp.mean(jnp.abs(err)) if self.name == 'l1' else jnp.mean(jnp.square(err))

  def sample(self, velocity_fn, x_up, key, sample_config, *, save_trajectory=0):
    """The one step the regression was trained for, whatever the solver settings say."""
    x0, context = self.source(x_up, key)
    return sampling.solve(velocity_fn, x0, context, solver='euler', nfe=1,
                          save_trajectory=save_trajectory)


def objective(flow_config: ml_collections.ConfigDict) -> Objective:
  """The objective of config.flow (checked with `check_config`)."""
  check_config(flow_config)
  return {'cfm': CouplingFlow, 'fm': NaiveFlow, 'l1': Regression,
          'l2': Regression}[flow_config.objective](flow_config)
