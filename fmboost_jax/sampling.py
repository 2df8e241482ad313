"""How the learned flow is used: integrate dx/dt = v(x, context, t) from t=0 to t=1 with diffrax.

`nfe` counts network evaluations, never grid points (the official code's `num_steps` counts grid
points: its "Euler, 40 NFE" is our `euler` with nfe=40).

Solvers and the network evaluations (NFE) they spend, checked by counting host callbacks inside the
vector field (tests/test_sampling.py):

  euler   fixed grid, nfe steps of size 1/nfe, 1 evaluation per step:       NFE = num_steps = nfe.
  heun    fixed grid, nfe/2 steps of size 2/nfe (nfe must be even). diffrax.Heun is not FSAL (its
          last stage is the predictor's end point, not the corrected state), so each step evaluates
          the field twice, at (t, x) and at (t + h, x + h v):              NFE = 2 num_steps = nfe.
  dopri5  adaptive, diffrax.Dopri5 + PIDController(rtol, atol); 7 stages, first-same-as-last, so
          each step attempt (accepted or rejected) evaluates 6 new stages; the field at (t0, x0) is
          evaluated once when the solver starts:                         NFE = 6 num_steps + 1,
          num_steps = num_accepted_steps + num_rejected_steps (diffrax stats).
          Stock diffrax 0.7.2 re-evaluates the first stage on every rejected attempt before the
          first accepted step (its FSAL flag is only cleared by an accepted step), which would make
          the count depend on a number the stats do not report; `_Dopri5` evaluates v(t0, x0) in
          `init` instead, which makes the formula exact (and saves those evaluations).
          The first trial step is `DOPRI5_FIRST_STEP` (diffrax's automatic choice silently falls
          back to 0.01 because diffeqsolve wraps the term, so we state it).

Failures are visible, never raised inside jit: `Solution.ok` is False when diffrax did not reach
t=1 (e.g. dopri5 hit `max_steps`); x1 is then the state where integration stopped.

Always `adjoint=diffrax.ForwardMode()` and `throw=False`: the default `throw=True` silently
replicates a batch-sharded state. The state x [B, H, W, C] stays sharded over the batch ('data')
axis; the adaptive step-size controller's error norm is one scalar per solve (an all-reduce), so
the whole batch shares one step sequence.
"""

from collections.abc import Callable
from typing import NamedTuple

import diffrax
import jax
import jax.numpy as jnp
import ml_collections

SOLVERS = ('euler', 'heun', 'dopri5')

# v(x_t [B,H,W,C], context [B,H,W,C], t [B]) -> velocity [B,H,W,C].
VelocityFn = Callable[[jax.Array, jax.Array, jax.Array], jax.Array]

# Defaults while config.sample has no such fields (torchdiffeq's defaults in the official code).
DEFAULT_RTOL = 1e-3
DEFAULT_ATOL = 1e-6
DEFAULT_MAX_STEPS = 4096
DOPRI5_FIRST_STEP = 0.01


class Solution(NamedTuple):
  """Result of `solve`.

  x1: [B, H, W, C] state at t=1 (or where integration stopped when `ok` is False).
  nfe: int32 scalar, network evaluations actually spent (see the module docstring).
  ok: bool scalar, True iff diffrax reached t=1 successfully.
  trajectory: [K, B, H, W, C] states at t = linspace(0, 1, K) if save_trajectory=K, else None.
  """
  x1: jax.Array
  nfe: jax.Array
  ok: jax.Array
  trajectory: jax.Array | None


def solver_settings(sample_config: ml_collections.ConfigDict) -> dict:
  """The keyword arguments of `solve` set by config.sample: solver, nfe, rtol, atol, max_steps."""
  return {'solver': sample_config.solver, 'nfe': sample_config.nfe,
          'rtol': sample_config.get('rtol', DEFAULT_RTOL),
          'atol': sample_config.get('atol', DEFAULT_ATOL),
          'max_steps': sample_config.get('max_steps', DEFAULT_MAX_STEPS)}


def _check(solver, nfe, rtol, atol, max_steps, prefix: str) -> None:
  if solver not in SOLVERS:
    raise ValueError(f'{prefix}solver={solver!r} is unknown; use one of {SOLVERS}.')
  if not isinstance(nfe, int) or nfe < 1:
    raise ValueError(f'{prefix}nfe={nfe!r} must be an integer of at least 1.')
  if solver == 'heun' and nfe % 2:
    raise ValueError(f'{prefix}nfe={nfe} is odd but heun spends 2 network evaluations per step; '
                     f'use an even nfe such as {nfe + 1}.')
  if solver == 'dopri5':
    for name, value in (('rtol', rtol), ('atol', atol)):
      if isinstance(value, (int, float)) and not value > 0:
        raise ValueError(f'{prefix}{name}={value} must be positive for dopri5; use e.g. '
                         f'{name}={DEFAULT_RTOL if name == "rtol" else DEFAULT_ATOL}.')
    if not isinstance(max_steps, int) or max_steps < 1:
      raise ValueError(f'{prefix}max_steps={max_steps!r} must be an integer of at least 1 for '
                       f'dopri5; use e.g. max_steps={DEFAULT_MAX_STEPS}.')


def check_config(sample_config: ml_collections.ConfigDict) -> None:
  """Raises ValueError with one sentence if the sampler settings are impossible."""
  _check(**solver_settings(sample_config), prefix='config.sample.')


def evaluations_as_code(solver: str) -> int:
  """The network evaluations a compiled solve holds as code: the loop's body (one step) once, and
  dopri5's first evaluation before it. XLA's cost analysis counts a loop body once whatever its
  trip count, so a solve of NFE evaluations costs its counted FLOPs plus
  (NFE - evaluations_as_code) network evaluations (aot.py)."""
  return {'euler': 1, 'heun': 2, 'dopri5': 7}[solver]


class _Dopri5(diffrax.Dopri5):
  """Dopri5 whose FSAL cache holds v(t0, x0) from the start, so every step attempt costs exactly 6
  evaluations (stock diffrax evaluates the first stage again after each rejected first attempt)."""

  def init(self, terms, t0, t1, y0, args):
    # Same solver state as diffrax's FSAL init: (first_step flag, f0 in vector-field space).
    return jnp.array(False), self.func(terms, t0, y0, args)


def solve(velocity_fn: VelocityFn, x0: jax.Array, context: jax.Array, *, solver: str,
          nfe: int, rtol: float = DEFAULT_RTOL, atol: float = DEFAULT_ATOL,
          max_steps: int = DEFAULT_MAX_STEPS, save_trajectory: int = 0) -> Solution:
  """Integrates the flow from x0 at t=0 to t=1.

  Args:
    velocity_fn: v(x_t [B,H,W,C], context [B,H,W,C], t [B]) -> [B,H,W,C].
    x0: [B, H, W, C] source (may be sharded over the batch; the sharding is kept).
    context: [B, H, W, C] conditioning, passed on every call.
    solver: one of SOLVERS.
    nfe: network evaluations for the fixed-step solvers (static); unused by dopri5.
    rtol, atol: dopri5 tolerances (Python floats or traced scalars).
    max_steps: dopri5 step-attempt budget (static); beyond it `ok` is False.
    save_trajectory: K >= 2 also returns the states at t = linspace(0, 1, K) (dense output
      between solver steps); 0 returns none.

  Returns:
    Solution(x1, nfe, ok, trajectory).
  """
  _check(solver, nfe, rtol, atol, max_steps, prefix='')
  if save_trajectory == 1 or save_trajectory < 0:
    raise ValueError(f'save_trajectory={save_trajectory} must be 0 (none) or at least 2 '
                     '(states at t=0 and t=1 included).')

  def vector_field(t, x, args):
    return velocity_fn(x, args, jnp.full((x.shape[0],), t, jnp.float32)).astype(x.dtype)

  if solver == 'dopri5':
    method = _Dopri5()
    controller = diffrax.PIDController(rtol=rtol, atol=atol)
    dt0, steps_budget = DOPRI5_FIRST_STEP, max_steps
  else:
    method, evals_per_step = {'euler': (diffrax.Euler(), 1), 'heun': (diffrax.Heun(), 2)}[solver]
    num_steps = nfe // evals_per_step
    # An explicit grid: exactly num_steps steps, no accumulated-time round-off.
    controller = diffrax.StepTo(ts=jnp.linspace(0.0, 1.0, num_steps + 1, dtype=jnp.float32))
    dt0, steps_budget = None, num_steps

  if save_trajectory:
    ts = jnp.linspace(0.0, 1.0, save_trajectory, dtype=jnp.float32)
    saveat = diffrax.SaveAt(subs=[diffrax.SubSaveAt(t1=True), diffrax.SubSaveAt(ts=ts)])
  else:
    saveat = diffrax.SaveAt(t1=True)

  sol = diffrax.diffeqsolve(
      diffrax.ODETerm(vector_field), method, t0=0.0, t1=1.0, dt0=dt0, y0=x0, args=context,
      saveat=saveat, stepsize_controller=controller, max_steps=steps_budget,
      adjoint=diffrax.ForwardMode(), throw=False)

  attempts = sol.stats['num_steps']
  spent = 6 * attempts + 1 if solver == 'dopri5' else evals_per_step * attempts
  if save_trajectory:
    ys_end, trajectory = sol.ys
  else:
    ys_end, trajectory = sol.ys, None
  ok = sol.result == diffrax.RESULTS.successful
  return Solution(x1=ys_end[-1], nfe=jnp.asarray(spent, jnp.int32), ok=ok, trajectory=trajectory)
