"""Specification of the ODE sampler."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fmboost_jax import sampling


@pytest.mark.parametrize('nfe', [1, 4, 40])
def test_euler_takes_exactly_nfe_network_evaluations(nfe):
  def v(x, context, t):
    return -0.5 * x + context

  x0 = jnp.ones((2, 3, 3, 1))
  context = jnp.full_like(x0, 0.1)
  x1, spent = jax.jit(lambda x, c: sampling.solve(v, x, c, solver='euler', nfe=nfe))(x0, context)
  assert int(spent) == nfe
  # Euler on dx/dt = a x + b with step h: x <- (1 + a h) x + b h, applied nfe times.
  x, h = np.ones((2, 3, 3, 1)), 1.0 / nfe
  for _ in range(nfe):
    x = (1 - 0.5 * h) * x + 0.1 * h
  np.testing.assert_allclose(x1, x, rtol=1e-5)


def test_euler_passes_the_time_of_each_step():
  x1, _ = sampling.solve(lambda x, c, t: jnp.broadcast_to(t[:, None, None, None], x.shape),
                         jnp.zeros((1, 1, 1, 1)), jnp.zeros((1, 1, 1, 1)), solver='euler', nfe=4)
  # x(1) = sum of t_k * h over t_k = 0, 1/4, 2/4, 3/4.
  np.testing.assert_allclose(x1, 1.5 / 4, rtol=1e-6)


@pytest.mark.parametrize('solver,nfe,match', [('rk4', 4, 'solver'), ('euler', 0, 'at least 1')])
def test_bad_sampler_settings(solver, nfe, match):
  from configs import default  # noqa: PLC0415
  c = default.get_config().sample
  c.solver, c.nfe = solver, nfe
  with pytest.raises(ValueError, match=match):
    sampling.check_config(c)
