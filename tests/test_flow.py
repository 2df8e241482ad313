"""Specification of the CFM objective, the noise augmentation and the baselines (reference 1)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import default
from fmboost_jax import flow


def flow_config(**overrides):
  c = default.get_config().flow
  c.update(overrides)
  return c


def loss(v, x1, x_up, key, c):
  return flow.objective(c).loss(v, x1, x_up, key)


@pytest.mark.parametrize('step,ab,signal,noise', [
    (400, 0.653904, 0.808643, 0.588299),
    (100, 0.975477, 0.98766, 0.15660),
    (700, 0.205216, 0.45301, 0.89151),
])
def test_alpha_bar_matches_reference_table(step, ab, signal, noise):
  a = flow.alpha_bar(step)
  np.testing.assert_allclose(a, ab, atol=1e-6)
  np.testing.assert_allclose(jnp.sqrt(a), signal, atol=1e-5)
  np.testing.assert_allclose(jnp.sqrt(1 - a), noise, atol=1e-5)


def test_alpha_bar_endpoints():
  assert float(flow.alpha_bar(0)) == 1.0
  np.testing.assert_allclose(flow.alpha_bar(999), 3.7e-33, rtol=0.05)


def test_noise_augment_is_the_q_sample_formula():
  x = jax.random.normal(jax.random.key(0), (2, 8, 8, 4))
  key = jax.random.key(1)
  eps = jax.random.normal(key, x.shape)
  np.testing.assert_allclose(flow.noise_augment(x, key, 400), 0.808643 * x + 0.588299 * eps,
                             atol=2e-6)


def test_linear_interpolant_and_target():
  k0, k1, k2 = jax.random.split(jax.random.key(0), 3)
  x0, x1 = jax.random.normal(k0, (3, 4, 5, 2)), jax.random.normal(k1, (3, 4, 5, 2))
  t = jax.random.uniform(k2, (3,))
  x_t, u = flow.interpolant(x0, x1, t, 'linear')
  tt = np.asarray(t)[:, None, None, None]
  np.testing.assert_allclose(x_t, tt * x1 + (1 - tt) * x0, rtol=1e-6, atol=1e-6)
  np.testing.assert_allclose(u, x1 - x0, rtol=1e-6, atol=1e-6)
  # The endpoints are the source and the target.
  np.testing.assert_allclose(flow.interpolant(x0, x1, jnp.zeros(3), 'linear')[0], x0)
  np.testing.assert_allclose(flow.interpolant(x0, x1, jnp.ones(3), 'linear')[0], x1)


def test_gvp_velocity_is_the_time_derivative():
  k0, k1 = jax.random.split(jax.random.key(0))
  x0, x1 = jax.random.normal(k0, (2, 3, 3, 1)), jax.random.normal(k1, (2, 3, 3, 1))
  t = jnp.array([0.2, 0.7])
  h = 1e-3
  x_plus, _ = flow.interpolant(x0, x1, t + h, 'gvp')
  x_minus, _ = flow.interpolant(x0, x1, t - h, 'gvp')
  _, u = flow.interpolant(x0, x1, t, 'gvp')
  np.testing.assert_allclose(u, (x_plus - x_minus) / (2 * h), atol=2e-3)
  np.testing.assert_allclose(flow.interpolant(x0, x1, jnp.ones(2), 'gvp')[0], x1, atol=1e-6)


def _oracle_and_inputs():
  k0, k1 = jax.random.split(jax.random.key(3))
  x1 = jax.random.normal(k0, (4, 8, 8, 3))
  x_up = x1 + 0.3 * jax.random.normal(k1, x1.shape)
  return x1, x_up


def test_cfm_loss_is_mse_against_x1_minus_x0():
  x1, x_up = _oracle_and_inputs()
  key = jax.random.key(7)
  c = flow_config()
  seen = {}

  def v(x_t, context, t):
    seen.update(x_t=x_t, context=context, t=t)
    return jnp.zeros_like(x_t)

  value = loss(v, x1, x_up, key, c)
  source_key, t_key, _ = jax.random.split(key, 3)
  x0 = flow.noise_augment(x_up, source_key, 400)
  t = jax.random.uniform(t_key, (4,))
  np.testing.assert_allclose(seen['t'], t)
  np.testing.assert_allclose(seen['context'], x_up)  # The context is the clean input.
  np.testing.assert_allclose(seen['x_t'], flow.interpolant(x0, x1, t, 'linear')[0], atol=1e-6)
  np.testing.assert_allclose(value, jnp.mean((x1 - x0)**2), rtol=1e-6)


def test_fm_starts_from_standard_normal_noise():
  x1, x_up = _oracle_and_inputs()
  x0, context = flow.objective(flow_config(objective='fm', noising_step=0)).source(
      jnp.zeros((64, 16, 16, 4)), jax.random.key(0))
  assert abs(float(x0.mean())) < 0.02 and abs(float(x0.std()) - 1) < 0.02
  np.testing.assert_array_equal(context, 0.0)


def test_cfm_sigma_min_perturbs_x_t_only():
  """cfm: the I-CFM form of the official code, sigma_min * eps added to x_t, target unchanged."""
  x1, x_up = _oracle_and_inputs()
  got = {}
  loss(lambda x, c, t: got.setdefault('a', x), x1, x_up, jax.random.key(0), flow_config())
  loss(lambda x, c, t: got.setdefault('b', x), x1, x_up, jax.random.key(0),
       flow_config(sigma_min=0.1))
  diff = np.asarray(got['b'] - got['a'])
  assert 0.09 < diff.std() < 0.11
  # The target is still x1 - x0: the oracle on the unperturbed path has the same loss.
  key = jax.random.key(0)
  source_key, _, _ = jax.random.split(key, 3)
  x0 = flow.noise_augment(x_up, source_key, 400)
  value = loss(lambda x, c, t: x1 - x0, x1, x_up, key, flow_config(sigma_min=0.1))
  assert float(value) == pytest.approx(0.0, abs=1e-10)


@pytest.mark.parametrize('sigma_min', [0.0, 0.1])
def test_fm_follows_the_papers_equations_3_to_5(sigma_min):
  """fm: x_t = (1 - (1 - s) t) x0 + t x1 with target x1 - (1 - s) x0 (s = sigma_min)."""
  x1, x_up = _oracle_and_inputs()
  key = jax.random.key(5)
  c = flow_config(objective='fm', noising_step=0, sigma_min=sigma_min)
  seen = {}

  def v(x_t, context, t):
    seen.update(x_t=x_t, t=t)
    return jnp.zeros_like(x_t)

  value = loss(v, x1, x_up, key, c)
  source_key, t_key, _ = jax.random.split(key, 3)
  x0 = jax.random.normal(source_key, x1.shape)
  t = np.asarray(jax.random.uniform(t_key, (4,)))[:, None, None, None]
  np.testing.assert_allclose(seen['x_t'], (1 - (1 - sigma_min) * t) * x0 + t * x1, atol=1e-6)
  np.testing.assert_allclose(value, jnp.mean((x1 - (1 - sigma_min) * x0)**2), rtol=1e-5)
  # At t = 1 the path ends at x1 + sigma_min x0: a Gaussian of width sigma_min around the target.
  end = flow.objective(c).path(x0, x1, jnp.ones((4,)), key)[0]
  np.testing.assert_allclose(end, x1 + sigma_min * x0, atol=1e-6)


@pytest.mark.parametrize('objective', ['l1', 'l2'])
def test_regression_predicts_the_residual_at_t0(objective):
  x1, x_up = _oracle_and_inputs()
  c = flow_config(objective=objective, noising_step=0)
  # A perfect predictor of x1 - x_up has zero loss; a zero predictor has the L1/L2 residual.
  perfect = loss(lambda x, ctx, t: x1 - x, x1, x_up, jax.random.key(0), c)
  assert float(perfect) == pytest.approx(0.0, abs=1e-7)
  zero = loss(lambda x, ctx, t: jnp.zeros_like(x), x1, x_up, jax.random.key(0), c)
  expected = jnp.mean(jnp.abs(x1 - x_up)) if objective == 'l1' else jnp.mean((x1 - x_up)**2)
  np.testing.assert_allclose(zero, expected, rtol=1e-6)


@pytest.mark.parametrize('overrides,match', [
    (dict(objective='dm'), 'objective'),
    (dict(schedule='cosine'), 'schedule'),
    (dict(schedule='gvp', sigma_min=0.1), 'sigma_min'),
    (dict(noising_step=1), 'noising_step'),
    (dict(noising_step=1000), 'noising_step'),
    (dict(objective='fm'), 'noising_step=0'),
    (dict(objective='l2'), 'noising_step=0'),
    (dict(objective='l1', noising_step=0, sigma_min=0.1), 'sigma_min=0'),
])
def test_bad_flow_settings_are_rejected(overrides, match):
  with pytest.raises(ValueError, match=match):
    flow.check_config(flow_config(**overrides))


@pytest.mark.parametrize('name,is_flow', [('cfm', True), ('fm', True), ('l1', False),
                                          ('l2', False)])
def test_objective_names_and_kinds(name, is_flow):
  o = flow.objective(flow_config(objective=name, noising_step=400 if name == 'cfm' else 0))
  assert (o.name, o.is_flow) == (name, is_flow)
