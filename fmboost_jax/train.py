"""Training loop: `train_and_evaluate(config, workdir)`.

The loop knows a loss, a sampler and a first stage; what they compute lives in flow.py,
sampling.py, upsampling.py and models/.
"""

import concurrent.futures
import contextlib
import dataclasses
import signal
import time
from typing import Any

import flax
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from absl import logging
from flax import nnx

from fmboost_jax import (
  accelerators,
  config_checks,
  costs,
  first_stages,
  flow,
  held_out,
  input_pipeline,
  metrics,
  sharding,
  storage,
  summaries,
  trained_model,
  upsampling,
)
from fmboost_jax import images as images_lib
from fmboost_jax.errors import UserError
from fmboost_jax.models import backends, layers

# How long the processes of a run wait for each other to finish compiling the step.
STARTUP_BARRIER_SECONDS = 3600
# What JAX reports when a program is loaded from the persistent compilation cache.
_CACHE_HIT_EVENT = '/jax/compilation_cache/cache_hits'


class TrainingDiverged(UserError):
  """The loss or gradient became NaN or infinite."""


@flax.struct.dataclass
class TrainState:
  step: jax.Array  # int32 scalar: number of optimizer updates done.
  params: Any  # Nested dict of float32 arrays (nnx.to_pure_dict of the model's Params).
  opt_state: Any
  ema_params: Any


# ----------------------------------------------------------------------------- optimisation


def learning_rate_schedule(optim_config: ml_collections.ConfigDict) -> optax.Schedule:
  """Constant rate after linear warm-up; update k (0-based) uses lr * min(1, (k+1)/warmup)."""
  lr, warmup = optim_config.learning_rate, max(optim_config.warmup_steps, 1)
  return lambda count: lr * jnp.minimum(1.0, (count + 1) / warmup)


def make_optimizer(optim_config: ml_collections.ConfigDict) -> optax.GradientTransformation:
  """Adam (no weight decay) with warm-up, after optional global-norm clipping."""
  adam = optax.adam(learning_rate_schedule(optim_config), b1=optim_config.b1, b2=optim_config.b2,
                    eps=optim_config.eps)
  if optim_config.grad_clip_norm > 0:
    return optax.chain(optax.clip_by_global_norm(optim_config.grad_clip_norm), adam)
  return adam


def ema_decay(step: jax.Array, ema_config: ml_collections.ConfigDict) -> jax.Array:
  """Decay after `step` updates: 0 (copy) until start_step, then min(decay, 1-(1+e)^-power)."""
  e = (step - ema_config.start_step).astype(jnp.float32)
  d = jnp.minimum(ema_config.decay, 1.0 - (1.0 + jnp.maximum(e, 0.0))**(-ema_config.power))
  return jnp.where(e <= 0, 0.0, d)


def ema_update(ema_params, params, step: jax.Array, ema_config: ml_collections.ConfigDict):
  d = ema_decay(step, ema_config)
  return jax.tree.map(lambda e, p: d * e + (1.0 - d) * p, ema_params, params)


# ----------------------------------------------------------------------------- model and state


def init_state(config: ml_collections.ConfigDict, channels: int,
               tx: optax.GradientTransformation, key: jax.Array) -> TrainState:
  model = trained_model.network(config, channels, layers.ParamKeys(key))
  params = nnx.to_pure_dict(nnx.state(model, nnx.Param))
  return TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params),
                    ema_params=params)


def train_step(state: TrainState, batch: dict[str, jax.Array], first_stage_params: nnx.State,
               key: jax.Array, *, graphdef: nnx.GraphDef, first_stage_graphdef: nnx.GraphDef,
               tx: optax.GradientTransformation, config: ml_collections.ConfigDict):
  """One optimizer update on a global batch; returns (state, metrics).

  The batch is {'image': uint8 [B, S, S, 3]} or precomputed latents {'x1', 'x_up'}
  (input_pipeline.py).

  The first stage is frozen: its parameters are an input, never differentiated or updated.
  """
  step_key = jax.random.fold_in(key, state.step)
  objective = flow.objective(config.flow)
  first_stage = nnx.merge(first_stage_graphdef, first_stage_params)
  x1, x_up = upsampling.training_pair(first_stage, batch, config.data.low_res_size,
                                      config.flow.upsampling_mode)

  def loss_fn(params):
    return objective.loss(trained_model.velocity_fn(graphdef, params), x1, x_up, step_key)

  loss, grads = jax.value_and_grad(loss_fn)(state.params)
  updates, opt_state = tx.update(grads, state.opt_state, state.params)
  params = optax.apply_updates(state.params, updates)
  step = state.step + 1
  measurements = {
      'loss': loss,
      'grad_norm': optax.tree.norm(grads),
      'param_norm': optax.tree.norm(params),
      'learning_rate': learning_rate_schedule(config.optim)(state.step),
  }
  new_state = TrainState(step=step, params=params, opt_state=opt_state,
                         ema_params=ema_update(state.ema_params, params, step, config.ema))
  return new_state, measurements


# ----------------------------------------------------------------------------- the programs


@dataclasses.dataclass(frozen=True)
class StepPrograms:
  """The programs a training run executes on a mesh, jitted with explicit shardings, and the
  abstract arguments (shapes, dtypes, shardings) they are lowered for: `--mode=train` runs them,
  `--mode=compile` compiles the same ones for a target's devices.

  The state is created directly on the mesh, laid out by the rule of `sharding.array_sharding`
  (never materialised whole on one device); the first stage's parameters are replicated inputs.
  """
  init: Any  # key -> TrainState, on the mesh.
  train: Any  # (state, batch, first_stage_params) -> (state, measurements); the state donated.
  evaluate: Any  # held_out.program: (params, images, first_stage_params, key) -> per image.
  state: TrainState  # ShapeDtypeStructs with shardings, as are the two below.
  batch: dict[str, jax.ShapeDtypeStruct]
  first_stage_params: Any

  def place_first_stage(self, params) -> Any:
    """The first stage's parameters on the mesh, as the programs take them."""
    return jax.device_put(params, jax.tree.map(lambda x: x.sharding, self.first_stage_params))

  def lower_train(self) -> jax.stages.Lowered:
    return self.train.lower(self.state, self.batch, self.first_stage_params)

  def lower_evaluate(self, config: ml_collections.ConfigDict) -> jax.stages.Lowered:
    """The held-out evaluation of one batch of config.data.batch_size images."""
    b, s = config.data.batch_size, config.data.high_res_size
    sharded = next(iter(self.batch.values())).sharding
    images = jax.ShapeDtypeStruct((b, s, s, 3), jnp.float32, sharding=sharded)
    key = jax.ShapeDtypeStruct((), jax.random.key(0).dtype,
                               sharding=sharding.replicated(sharded.mesh))
    return self.evaluate.lower(self.state.ema_params, images, self.first_stage_params, key)


def step_programs(config: ml_collections.ConfigDict, mesh: jax.sharding.Mesh,
                  first_stage_graphdef: nnx.GraphDef, first_stage_params, channels: int,
                  tx: optax.GradientTransformation, init_key: jax.Array,
                  train_key: jax.Array, batch_spec=None) -> StepPrograms:
  """The StepPrograms of `config` on `mesh`; `first_stage_params` may be arrays or
  ShapeDtypeStructs, `batch_spec` (default: input_pipeline.batch_spec) the global batch's
  {name: (shape, dtype)}."""
  replicated = sharding.replicated(mesh)
  make_state = lambda k: init_state(config, channels, tx, k)
  abstract_state = jax.eval_shape(make_state, init_key)
  state_sharding = sharding.state_shardings(abstract_state, mesh, config.mesh.fsdp_min_size)
  with_sharding = lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s)
  first_stage_sharding = jax.tree.map(lambda _: replicated, first_stage_params)
  batch_sharding = sharding.batch_sharded(mesh)
  batch = {k: jax.ShapeDtypeStruct(shape, dtype, sharding=batch_sharding)
           for k, (shape, dtype) in (batch_spec or input_pipeline.batch_spec(config)).items()}
  graphdef = trained_model.model_graphdef(config, channels)
  train = jax.jit(
      lambda s, b, f: train_step(s, b, f, train_key, graphdef=graphdef,
                                 first_stage_graphdef=first_stage_graphdef, tx=tx, config=config),
      in_shardings=(state_sharding, {k: batch_sharding for k in batch}, first_stage_sharding),
      out_shardings=(state_sharding, replicated), donate_argnums=0)
  evaluate = held_out.program(graphdef, first_stage_graphdef, config, config.sample, mesh)
  return StepPrograms(
      init=jax.jit(make_state, out_shardings=state_sharding), train=train, evaluate=evaluate,
      state=jax.tree.map(with_sharding, abstract_state, state_sharding), batch=batch,
      first_stage_params=jax.tree.map(with_sharding, first_stage_params, first_stage_sharding))


# ----------------------------------------------------------------------------- the loop's pieces


def image_grid(columns: list[np.ndarray]) -> np.ndarray:
  """Rows of images side by side: columns of [N, H, W, 3] in [-1, 1] -> uint8 [N*H, len*W, 3]."""
  rows = np.concatenate([np.asarray(metrics.to_uint8(c)) for c in columns], axis=2)
  return rows.reshape(-1, *rows.shape[2:])


class _StopFlag:
  """Set by SIGTERM / SIGUSR1 (preemption, SLURM time limit) on any process.

  All processes must stop after the same step, even if only one got the signal: after every step
  the processes' flags are OR-reduced on the devices (dispatched asynchronously, no host sync) and
  the result is read after the next step, so every process sees the same answer at the same step.
  """

  def __init__(self):
    self.signal = None
    self._pending = None
    self._reduce = None

  def __call__(self, signum, frame):
    del frame
    self.signal = signum

  def agreed(self, mesh: jax.sharding.Mesh) -> bool:
    """True once some process's signal has been seen by all of them (one step after it)."""
    if self._reduce is None:
      self._reduce = jax.jit(jnp.any, out_shardings=sharding.replicated(mesh))
    local = np.full((jax.local_device_count(),), self.signal is not None)
    flags = jax.make_array_from_process_local_data(sharding.batch_sharded(mesh), local)
    previous, self._pending = self._pending, self._reduce(flags)
    return previous is not None and bool(jax.device_get(previous))


def throughput_meter(config: ml_collections.ConfigDict,
                     flops_per_step: float) -> summaries.Throughput:
  """The training log's throughput figures for this run's devices: MFU against
  config.train.peak_flops_per_device, else the device kind's peak bf16 rate (none on CPUs)."""
  device = jax.local_devices()[0]
  kind = accelerators.device_kind(device.device_kind)
  peak = config.train.peak_flops_per_device or (kind.peak_bf16_flops if kind else None)
  logging.info(
      'Throughput in the log (perf/*): the train step is %.4g TFLOP over the global batch; %s.',
      flops_per_step / 1e12,
      f'MFU against {peak / 1e12:.4g} TFLOP/s per device' if peak else
      f'no MFU: no peak rate is known for device kind {device.device_kind!r} (set '
      'config.train.peak_flops_per_device)')
  return summaries.Throughput(samples_per_step=config.data.batch_size,
                              flops_per_step=flops_per_step, num_devices=jax.device_count(),
                              peak_flops=peak, devices=jax.local_devices())


def compile_train_step(programs: StepPrograms, config: ml_collections.ConfigDict):
  """(lowered, compiled) train step, ahead of the loop; logs whether the persistent compilation
  cache held it, and waits until every process has compiled it."""
  t0 = time.perf_counter()
  cache_hits = []
  count_hits = lambda event, **_: cache_hits.append(1) if event == _CACHE_HIT_EVENT else None
  jax.monitoring.register_event_listener(count_hits)
  try:
    lowered = programs.lower_train()
    compiled = lowered.compile(compiler_options=backends.compiler_options(
        backends.platform(), config.train.cpu_compiler_options))
  finally:
    jax.monitoring.unregister_event_listener(count_hits)
  logging.info('Compiled the train step in %.1f s%s.', time.perf_counter() - t0,
               ' (from the persistent compilation cache)' if cache_hits else '')
  # Processes compile at different speeds (one from a warm compilation cache, one not): the first
  # step's collectives start only when all have compiled.
  sharding.wait_for_all_processes('train step compiled', STARTUP_BARRIER_SECONDS)
  return lowered, compiled


class Saver:
  """The run's checkpoints (checkpointing.Checkpointer in WORKDIR/checkpoints) and the last step
  saved or restored."""

  def __init__(self, config: ml_collections.ConfigDict, workdir: str, train_iter):
    # Imported here: checkpoints hold the grain iterator, and a train step runs without grain.
    from fmboost_jax import checkpointing  # noqa: PLC0415

    self.checkpointer = checkpointing.Checkpointer(storage.join(workdir, 'checkpoints'),
                                                   keep=config.train.keep_checkpoints)
    self.config, self.train_iter = config, train_iter
    self.last_saved: int | None = None

  def restore_or_init(self, programs: StepPrograms, init_key: jax.Array) -> TrainState:
    """The latest checkpoint's state (and data position), else a new state."""
    latest = self.checkpointer.latest_step()
    if latest is None:
      return programs.init(init_key)
    logging.info('Resuming from the checkpoint at step %d in %s.', latest,
                 self.checkpointer.directory)
    self.last_saved = latest
    return self.checkpointer.restore(latest, programs.state, self.train_iter)

  def due(self, step: int) -> bool:
    return step % self.config.train.checkpoint_every == 0 or step == self.config.train.num_steps

  def save(self, step: int, state: TrainState, buffer: 'MetricsBuffer') -> None:
    buffer.flush(step)  # Never save a state whose steps were not all finite.
    self.checkpointer.save(step, state, self.train_iter, self.config)
    self.last_saved = step

  def save_at_stop(self, step: int, state: TrainState, buffer: 'MetricsBuffer') -> None:
    """Saves `step` (unless just saved) when the processes agreed to stop."""
    logging.info('Received a stop signal (here or on another process): saving at step %d and '
                 'exiting.', step)
    if self.last_saved != step:
      self.save(step, state, buffer)

  def check(self) -> None:
    """Raises the error of a save that failed in the background."""
    self.checkpointer.check()

  def close(self) -> None:
    try:
      self.checkpointer.wait()
    finally:
      self.checkpointer.close()


class MetricsBuffer:
  """The measurements of the steps since the last write, still on the devices: `flush` reads
  them (waiting for the steps), stops loudly on NaN and writes their mean; every
  config.train.log_every steps with the throughput since the last such write."""

  def __init__(self, config: ml_collections.ConfigDict, writer: summaries.SummaryWriter,
               throughput: summaries.Throughput, saver: Saver, first_step: int):
    self.writer, self.throughput, self.saver = writer, throughput, saver
    self.log_every, self.first_step = config.train.log_every, first_step
    self.pending: list[dict[str, jax.Array]] = []

  def append(self, step: int, measurements: dict[str, jax.Array]) -> None:
    """The measurements of the step that made `step`."""
    self.pending.append(measurements)
    # The first step of a run may still wait for its inputs: the throughput clock starts after it.
    if step == self.first_step:
      jax.block_until_ready(measurements)
      self.throughput(step)
    if step % self.log_every == 0:
      self.flush(step, with_throughput=True)

  def flush(self, step: int, with_throughput: bool = False) -> None:
    """Writes the pending steps' mean at `step` (and the throughput since the last such write)."""
    if not self.pending:
      return
    values = jax.device_get(self.pending)  # Waits for the steps to finish.
    first = step - len(values) + 1
    for i, m in enumerate(values):
      if not all(np.isfinite(v) for v in m.values()):
        raise TrainingDiverged(
            f'training diverged at step {first + i}: {m}; the last good checkpoint '
            f'(step {self.saver.last_saved}) in {self.saver.checkpointer.directory} is intact; '
            'lower config.optim.learning_rate or set config.optim.grad_clip_norm.')
    scalars = {k: float(np.mean([m[k] for m in values])) for k in values[0]}
    throughput = self.throughput(step) if with_throughput else {}
    self.writer.write_scalars(step, {**scalars, **throughput})
    self.pending.clear()


class Profiler:
  """A profiler trace of `steps` steps (none if 0) into `logdir`, from `first_step` on."""

  def __init__(self, steps: int, first_step: int, logdir: str):
    self.steps, self.first_step, self.logdir = steps, first_step, logdir

  def before(self, step: int) -> None:
    """Called before the step that makes it step + 1."""
    if self.steps > 0 and step == self.first_step:
      jax.profiler.start_trace(self.logdir)

  def after(self, step: int, state: TrainState) -> None:
    if self.steps > 0 and step == self.first_step + self.steps:
      jax.block_until_ready(state)
      jax.profiler.stop_trace()
      logging.info('Wrote a profiler trace of steps %d-%d to %s.', self.first_step + 1, step,
                   self.logdir)


class Validation:
  """Training's held-out evaluation (held_out.Evaluator, with the loop's compiled program on the
  training mesh), every config.train.eval_every steps and at the end: val/* scalars and the image
  grid in TensorBoard, WORKDIR/samples/step_*.png, and WORKDIR/results.json and results.md in
  --mode=evaluate's format (the bilinear row and the model's)."""

  def __init__(self, config: ml_collections.ConfigDict, workdir: str, mesh: jax.sharding.Mesh,
               upsample, first_stage_params):
    self.config, self.workdir = config, workdir
    self.upsample, self.first_stage_params = upsample, first_stage_params
    self.images = input_pipeline.validation_images(config)
    self.evaluator = held_out.Evaluator(config, self.images, mesh, config.data.batch_size)
    # The full-size grid's PNG (8192x4096 px at the paper's size: seconds to encode) is written by
    # a thread of its own while training goes on; the next evaluation and close() wait for it.
    self._files = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix='samples')
    self._written: concurrent.futures.Future | None = None

  def due(self, step: int) -> bool:
    return step % self.config.train.eval_every == 0 or step == self.config.train.num_steps

  def __call__(self, step: int, state: TrainState,
               writer: summaries.SummaryWriter) -> dict[str, Any]:
    """Evaluates the state's sampling weights; returns the results (held_out.results)."""
    config, n = self.config, self.config.train.num_grid_images
    params = state.ema_params if config.ema.use_for_sampling else state.params
    acc, kept, _ = self.evaluator.run(self.upsample, params, self.first_stage_params, n)
    bilinear = self.evaluator.bilinear_row
    model = {'method': flow.objective(config.flow).name.upper(), 'checkpoint': self.workdir,
             'step': step, **self.evaluator.summarise(acc)}
    results = held_out.results(config, self.images, [bilinear, model])
    scalars = {f'val/{k}_bilinear': v for k, v in bilinear.items() if isinstance(v, float)}
    scalars.update({'val/nfe' if k == 'nfe' else f'val/{k}_model': v for k, v in model.items()
                    if isinstance(v, float)})
    writer.write_scalars(step, scalars)
    if sharding.is_writer():
      targets = self.images[:n]
      grid = image_grid([self.evaluator.low_res(targets, 'nearest'),
                         self.evaluator.low_res(targets, 'linear'), kept, targets])
      writer.write_images(step, {'val/low_res|bilinear|model|target': grid[None]})
      self.wait()
      self._written = self._files.submit(self._write_grid, step, grid)
      held_out.write(results, self.workdir)
    return results

  def _write_grid(self, step: int, grid: np.ndarray) -> None:
    storage.path(storage.join(self.workdir, 'samples')).mkdir(parents=True, exist_ok=True)
    images_lib.write_png(storage.join(self.workdir, 'samples', f'step_{step:07d}.png'), grid)

  def wait(self) -> None:
    """Waits for the grid being written; raises its error."""
    written, self._written = self._written, None
    if written is not None:
      written.result()

  def close(self) -> None:
    try:
      self.wait()
    finally:
      self._files.shutdown()

  def report(self, step: int, results: dict[str, Any]) -> None:
    if sharding.is_writer():
      table = held_out.markdown(results)
      logging.info('Held-out results at step %d:\n%s', step, table)
      print(f'\nHeld-out results at step {step} ({len(self.images)} images):\n{table}')


def _log_parameter_overview(params) -> None:
  # The parameter table at start-up is the only use of clu: imported here, so that the library
  # imports without it.
  from clu import parameter_overview  # noqa: PLC0415

  if sharding.is_writer():
    parameter_overview.log_parameter_overview(params)


# ----------------------------------------------------------------------------- the loop


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict[str, Any]:
  """Trains (resuming from `workdir` if it holds a checkpoint), evaluates, and checkpoints.

  Returns the last held-out evaluation's results (held_out.results; none with
  config.train.eval_every=0).
  """
  config_checks.check(config, 'train')
  stop = _StopFlag()
  previous_handlers = {s: signal.signal(s, stop) for s in (signal.SIGTERM, signal.SIGUSR1)}
  try:
    return _train_and_evaluate(config, workdir, stop)
  finally:
    for s, h in previous_handlers.items():
      signal.signal(s, h)


def _train_and_evaluate(config: ml_collections.ConfigDict, workdir: str,
                        stop: _StopFlag) -> dict[str, Any]:
  mesh = sharding.make_mesh(config.mesh)
  sharding.check_batch_size(config.data.batch_size, mesh)
  logging.info('Device mesh %s.', dict(mesh.shape))
  first_stage = first_stages.first_stage_from_config(config)
  first_stages.record_fingerprint(config, workdir)
  first_stage_graphdef, first_stage_params = nnx.split(first_stage)
  init_key, train_key, _ = jax.random.split(jax.random.key(config.seed), 3)
  train_iter = input_pipeline.create_train_iterator(config)
  programs = step_programs(config, mesh, first_stage_graphdef, first_stage_params,
                           first_stage.channels, make_optimizer(config.optim), init_key, train_key)
  first_stage_params = programs.place_first_stage(first_stage_params)
  results, stopped = {}, False
  with contextlib.ExitStack() as closing:  # Closed in reverse order, each even if one fails.
    saver = Saver(config, workdir, train_iter)
    closing.callback(saver.close)
    state = saver.restore_or_init(programs, init_key)
    step = int(jax.device_get(state.step))
    _log_parameter_overview(state.params)
    validation = (Validation(config, workdir, mesh, programs.evaluate, first_stage_params)
                  if config.train.eval_every > 0 else None)
    if validation:
      closing.callback(validation.close)
    lowered_step, compiled_step = compile_train_step(programs, config)
    writer = summaries.SummaryWriter(workdir, enabled=sharding.is_writer())
    closing.callback(writer.close)
    progress = summaries.Progress(writer, config.train.num_steps)
    throughput = throughput_meter(config, costs.flops(lowered_step))
    buffer = MetricsBuffer(config, writer, throughput, saver, first_step=step + 1)
    profiler = Profiler(config.train.profile_steps, step + 1, storage.join(workdir, 'profile'))
    while step < config.train.num_steps:
      profiler.before(step)
      batch = sharding.global_batch(next(train_iter), mesh)  # The step's one host-to-device copy.
      # Inputs already on the devices: an implicit transfer (a hidden host sync) is an error.
      with jax.transfer_guard('disallow'):
        state, measurements = compiled_step(state, batch, first_stage_params)
      step += 1
      profiler.after(step, state)
      buffer.append(step, measurements)
      progress(step)
      saver.check()  # A save that failed in the background stops training here.
      if validation and validation.due(step):
        buffer.flush(step)
        with progress.paused(), throughput.paused():
          results = validation(step, state, writer)
      if saver.due(step):
        with throughput.paused():
          saver.save(step, state, buffer)
      if stopped := stop.agreed(mesh):
        saver.save_at_stop(step, state, buffer)
        break
    buffer.flush(step)
    if validation and not results and not stopped:
      results = validation(step, state, writer)
  if validation and results:
    validation.report(step, results)
  return results
