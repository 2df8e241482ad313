"""Specification of the ODE sampler: step rules, NFE accounting, convergence orders, sharding."""

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from fmboost_jax import sampling

# Linear test problem dx/dt = A x + b with elementwise A = -1.3 and b = the context:
# x(1) = (x0 + b/A) exp(A) - b/A.
A = -1.3


def linear_field(x, context, t):
  del t
  return A * x + context


def exact_linear(x0, b):
  return (x0 + b / A) * np.exp(A) - b / A


def linear_problem():
  x0 = jnp.asarray(np.linspace(0.5, 2.0, 8, dtype=np.float32).reshape(2, 2, 2, 1))
  context = jnp.full_like(x0, 0.3)
  # exact x(1) lies in [0.30, 0.71]: far from 0, so relative errors are meaningful.
  return x0, context, exact_linear(np.asarray(x0, np.float64), 0.3)


class EvaluationCounter:
  """Counts the vector-field evaluations really executed (a host callback per call) and records
  the time of each."""

  def __init__(self, field):
    self.field, self.times = field, []

  def _record(self, t):
    self.times.append(float(t[0]))

  def __call__(self, x, context, t):
    jax.debug.callback(self._record, t)
    return self.field(x, context, t)

  @property
  def count(self):
    return len(self.times)


def relative_error(x1, exact):
  return float(np.max(np.abs(np.asarray(x1, np.float64) - exact) / np.abs(exact)))


# ------------------------------------------------------------------ fixed-step solvers


@pytest.mark.parametrize('nfe', [1, 4, 40])
def test_euler_takes_exactly_nfe_network_evaluations(nfe):
  v = EvaluationCounter(lambda x, context, t: -0.5 * x + context)
  x0 = jnp.ones((2, 3, 3, 1))
  context = jnp.full_like(x0, 0.1)
  sol = jax.jit(lambda x, c: sampling.solve(v, x, c, solver='euler', nfe=nfe))(x0, context)
  jax.block_until_ready(sol.x1)
  assert int(sol.nfe) == nfe == v.count
  assert bool(sol.ok)
  # Euler on dx/dt = a x + b with step h: x <- (1 + a h) x + b h, applied nfe times.
  x, h = np.ones((2, 3, 3, 1)), 1.0 / nfe
  for _ in range(nfe):
    x = (1 - 0.5 * h) * x + 0.1 * h
  np.testing.assert_allclose(sol.x1, x, rtol=1e-5)


def test_euler_passes_the_time_of_each_step():
  sol = sampling.solve(lambda x, c, t: jnp.broadcast_to(t[:, None, None, None], x.shape),
                       jnp.zeros((1, 1, 1, 1)), jnp.zeros((1, 1, 1, 1)), solver='euler', nfe=4)
  # x(1) = sum of t_k * h over t_k = 0, 1/4, 2/4, 3/4.
  np.testing.assert_allclose(sol.x1, 1.5 / 4, rtol=1e-6)


@pytest.mark.parametrize('nfe', [2, 8])
def test_heun_spends_two_evaluations_per_step_at_both_ends(nfe):
  v = EvaluationCounter(linear_field)
  x0, context, _ = linear_problem()
  sol = sampling.solve(v, x0, context, solver='heun', nfe=nfe)
  jax.block_until_ready(sol.x1)
  steps, h = nfe // 2, 2.0 / nfe
  assert int(sol.nfe) == nfe == v.count
  # diffrax's Heun is not FSAL: both ends of every step are evaluated, t = 0, h, h, 2h, ...
  np.testing.assert_allclose(v.times, np.repeat(np.arange(steps + 1) * h, 2)[1:-1], atol=1e-6)
  # x <- x + h/2 (f(x) + f(x + h f(x))).
  x, b = np.asarray(x0, np.float64), 0.3
  for _ in range(steps):
    f0 = A * x + b
    x = x + h / 2 * (f0 + A * (x + h * f0) + b)
  np.testing.assert_allclose(sol.x1, x, rtol=1e-5)


@pytest.mark.parametrize('solver,nfe,order', [('euler', 20, 1), ('heun', 40, 2)])
def test_fixed_step_error_shrinks_with_the_order_of_the_method(solver, nfe, order):
  x0, context, exact = linear_problem()
  errors = [relative_error(sampling.solve(linear_field, x0, context, solver=solver, nfe=n).x1,
                           exact) for n in (nfe, 2 * nfe)]
  ratio = errors[0] / errors[1]
  expected = 2.0**order  # Halving the step divides the global error by 2^order.
  assert expected * 0.9 <= ratio <= expected * 1.1, (errors, ratio)


# ------------------------------------------------------------------ adaptive solver


def test_dopri5_meets_its_tolerance_and_reports_every_evaluation():
  x0, context, exact = linear_problem()
  v = EvaluationCounter(linear_field)
  # Tolerances are traced: one compilation serves both.
  run = jax.jit(lambda x, c, rtol, atol: sampling.solve(v, x, c, solver='dopri5', nfe=1,
                                                        rtol=rtol, atol=atol))
  nfes = []
  for rtol in (1e-3, 1e-6):
    v.times.clear()
    sol = run(x0, context, rtol, rtol * 1e-3)
    jax.block_until_ready(sol.x1)
    assert bool(sol.ok)
    assert relative_error(sol.x1, exact) < 10 * rtol
    # 7-stage FSAL: 1 evaluation at the start, then 6 per step attempt.
    assert int(sol.nfe) == v.count
    assert (v.count - 1) % 6 == 0
    nfes.append(v.count)
  assert nfes[1] > nfes[0]


def test_dopri5_counts_the_evaluations_of_rejected_steps():
  # A fast decay: the controller overshoots and rejects attempts, the first one included.
  v = EvaluationCounter(lambda x, c, t: -40.0 * x + c)
  x0 = jnp.ones((1, 2, 2, 1))
  sol = jax.jit(lambda x: sampling.solve(v, x, x, solver='dopri5', nfe=1, rtol=1e-6,
                                         atol=1e-9))(x0)
  jax.block_until_ready(sol.x1)
  # A rejected attempt is visible as time going back (the retry's first stage is earlier).
  rejections = int(np.sum(np.diff(v.times) < 0))
  assert rejections >= 1
  assert bool(sol.ok)
  assert int(sol.nfe) == v.count


def test_dopri5_out_of_steps_is_reported_not_raised():
  x0, context, _ = linear_problem()
  v = EvaluationCounter(linear_field)
  sol = jax.jit(lambda x, c: sampling.solve(v, x, c, solver='dopri5', nfe=1, rtol=1e-6,
                                            atol=1e-9, max_steps=3))(x0, context)
  jax.block_until_ready(sol.x1)
  assert not bool(sol.ok)
  assert int(sol.nfe) == v.count == 6 * 3 + 1
  assert np.all(np.isfinite(sol.x1))  # The state where integration stopped.


def test_trajectory_holds_the_states_on_the_grid():
  x0, context, _ = linear_problem()
  sol = sampling.solve(linear_field, x0, context, solver='euler', nfe=4, save_trajectory=5)
  assert sol.trajectory.shape == (5,) + x0.shape
  x, b = np.asarray(x0, np.float64), 0.3
  for k in range(5):
    np.testing.assert_allclose(sol.trajectory[k], x, rtol=1e-5, atol=1e-6)
    x = x + 0.25 * (A * x + b)
  np.testing.assert_allclose(sol.trajectory[-1], sol.x1, rtol=1e-6)
  assert sampling.solve(linear_field, x0, context, solver='euler', nfe=4).trajectory is None


# ------------------------------------------------------------------ sharding


@pytest.mark.parametrize('solver,nfe', [('euler', 4), ('heun', 4), ('dopri5', 1)])
def test_sampling_keeps_the_batch_sharding_and_never_gathers(solver, nfe):
  mesh = jax.make_mesh((8,), ('data',), axis_types=(jax.sharding.AxisType.Auto,))
  sharding = NamedSharding(mesh, P('data'))
  x0 = jax.random.normal(jax.random.key(0), (8, 4, 4, 2))
  context = jax.random.normal(jax.random.key(1), (8, 4, 4, 2))

  def v(x, c, t):  # Per example: a pointwise nonlinearity and the per-example time.
    return -jnp.tanh(x) + c * t[:, None, None, None]

  run = jax.jit(lambda x, c: sampling.solve(v, x, c, solver=solver, nfe=nfe))
  x0_s, context_s = jax.device_put(x0, sharding), jax.device_put(context, sharding)
  hlo = run.lower(x0_s, context_s).compile().as_text()
  assert 'all-gather' not in hlo
  sol = run(x0_s, context_s)
  assert sol.x1.sharding.is_equivalent_to(x0_s.sharding, x0_s.ndim)
  reference = run(x0, context)  # Unsharded, on one device.
  np.testing.assert_allclose(sol.x1, reference.x1, rtol=1e-5, atol=1e-6)
  assert int(sol.nfe) == int(reference.nfe)


# ------------------------------------------------------------------ boost


@pytest.mark.parametrize('objective,solver,nfe,expected_nfe', [
    ('cfm', 'heun', 4, 4), ('fm', 'dopri5', 1, None), ('l2', 'heun', 4, 1)])
def test_flows_use_the_sampler_and_regression_takes_one_step(objective, solver, nfe,
                                                             expected_nfe):
  from configs import default
  from fmboost_jax import flow
  config = default.get_config()
  config.flow.objective = objective
  config.flow.noising_step = 400 if objective == 'cfm' else 0
  config.sample.solver, config.sample.nfe = solver, nfe
  x_up = jax.random.uniform(jax.random.key(0), (2, 8, 8, 3))
  field = lambda x, c, t: c - x  # noqa: E731  (the straight path to the context)
  sol = flow.objective(config.flow).sample(field, x_up, jax.random.key(1), config.sample)
  assert sol.x1.shape == (2, 8, 8, 3) and bool(sol.ok)
  if expected_nfe is None:  # Adaptive: 6 evaluations per attempt plus the first one.
    assert int(sol.nfe) % 6 == 1 and int(sol.nfe) > 1
  else:
    assert int(sol.nfe) == expected_nfe
  # Regression is one Euler step of size 1 from x_up: x_up + v(x_up, x_up, 0) = x_up exactly.
  if objective == 'l2':
    np.testing.assert_allclose(sol.x1, x_up)


# ------------------------------------------------------------------ settings


@pytest.mark.parametrize('settings,match', [
    ({'solver': 'rk4', 'nfe': 4}, r'config\.sample\.solver=.*use one of'),
    ({'solver': 'euler', 'nfe': 0}, r'config\.sample\.nfe=0 must be .*at least 1'),
    ({'solver': 'heun', 'nfe': 3}, r'config\.sample\.nfe=3 is odd.*use an even nfe'),
    ({'solver': 'dopri5', 'nfe': 1, 'rtol': 0.0}, r'config\.sample\.rtol=0.0 must be positive'),
    ({'solver': 'dopri5', 'nfe': 1, 'atol': -1e-6},
     r'config\.sample\.atol=-1e-06 must be positive'),
    ({'solver': 'dopri5', 'nfe': 1, 'max_steps': 0},
     r'config\.sample\.max_steps=0 must be .*least 1'),
])
def test_bad_sampler_settings(settings, match):
  with pytest.raises(ValueError, match=match):
    sampling.check_config(ml_collections.ConfigDict(settings))


def test_default_sampler_settings_are_valid():
  from configs import default
  sampling.check_config(default.get_config().sample)
  sampling.check_config(ml_collections.ConfigDict(
      {'solver': 'dopri5', 'nfe': 1, 'rtol': 1e-5, 'atol': 1e-7, 'max_steps': 100}))


def test_solve_rejects_bad_arguments_before_tracing():
  x0 = jnp.zeros((1, 1, 1, 1))
  with pytest.raises(ValueError, match='odd'):
    sampling.solve(linear_field, x0, x0, solver='heun', nfe=5)
  with pytest.raises(ValueError, match='save_trajectory=1'):
    sampling.solve(linear_field, x0, x0, solver='euler', nfe=2, save_trajectory=1)
