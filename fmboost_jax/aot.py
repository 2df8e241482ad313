"""`--mode=compile`: the programs of a training run, compiled on this machine for a TPU slice or
NVIDIA GPUs (`config.compile.target`), with what they need per device against its memory.

  python main.py --mode=compile --config=configs/default.py --workdir=runs/plan \
      --config.compile.target=v5e:4x4 --config.first_stage.weights=

The programs are the ones `--mode=train` builds (`train.step_programs`, not a copy), with the
config's mesh, global batch, dtype and remat, the backend choices made for the target's platform
(`backends.compiling_for`), and the first stage's parameters as inputs of known shape (no weight
file is read). For each program the report gives per device: the state (parameters, Adam moments,
EMA) and the batch by the arithmetic of their shardings, XLA's arguments, temporaries and total
against the device's HBM; FLOPs per step and per sample; the step time at the device's peak bf16
rate (a lower bound) and the MFU a given throughput needs; the collectives by kind and bytes; the
compile time. It is printed and written to WORKDIR/compile/<target>.json and .md. A program that
does not fit is one UserError naming the shortfall and settings that would fit.
"""

import dataclasses
import json
import re
import time

import jax
import ml_collections
import numpy as np
from absl import logging
from flax import nnx

from fmboost_jax import (
  accelerators,
  config_checks,
  costs,
  first_stages,
  input_pipeline,
  precompute,
  sampling,
  sharding,
  storage,
  train,
  trained_model,
)
from fmboost_jax.errors import UserError
from fmboost_jax.models import backends

GiB = accelerators.GiB
# The largest per-device batch `max_batch` tries (a bound on the search, not a limit of the model).
MAX_PER_DEVICE_BATCH = 4096
MAX_BATCH_COMPILES = 8


@dataclasses.dataclass
class ProgramReport:
  """One compiled program's figures, per device unless named otherwise."""
  name: str
  compile_seconds: float
  memory: costs.Memory
  flops: float  # The whole program over its batch.
  collectives: dict[str, dict[str, int]]
  samples: int  # The batch the program takes (images or latents), over `devices`.
  devices: int
  solve: str = ''  # Programs that integrate the flow: config.sample's solver and NFE.
  state_bytes: dict[str, int] = dataclasses.field(default_factory=dict)  # Train step only.
  batch_bytes: int = 0


class DoesNotFit(Exception):
  """XLA refused the program for the device's memory (RESOURCE_EXHAUSTED)."""


def _compile(name: str, lowered: jax.stages.Lowered) -> tuple[jax.stages.Compiled, float]:
  t0 = time.perf_counter()
  try:
    compiled = lowered.compile(
        compiler_options=accelerators.DEVICELESS_COMPILER_OPTIONS[backends.platform()])
  except jax.errors.JaxRuntimeError as e:
    if 'RESOURCE_EXHAUSTED' in str(e):
      raise DoesNotFit(str(e).strip().splitlines()[0].removeprefix('RESOURCE_EXHAUSTED: ')) \
          from None
    raise
  seconds = time.perf_counter() - t0
  logging.info('Compiled the %s in %.1f s.', name, seconds)
  return compiled, seconds


def _report(name: str, lowered: jax.stages.Lowered, flops: float, samples: int,
            devices: int) -> ProgramReport:
  compiled, seconds = _compile(name, lowered)
  return ProgramReport(name=name, compile_seconds=seconds, memory=costs.memory(compiled),
                       flops=flops, collectives=costs.collectives(compiled.as_text()),
                       samples=samples, devices=devices)


def _one_device(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """`config` on one device, with XLA's attention in place of cuDNN's (which has no CPU lowering;
  the same products): where the FLOPs are counted."""
  one_device = ml_collections.ConfigDict(config.to_dict())
  one_device.mesh.data, one_device.mesh.fsdp = 1, 1
  one_device.model.attention_impl = 'xla'
  return one_device


def _global_flops(config: ml_collections.ConfigDict, lower) -> float:
  """The FLOPs of a program over its whole batch, counted by XLA on the same program lowered for
  one CPU device (the compile-only clients of TPUs and GPUs do not count them); `lower(config,
  devices, target)` gives the Lowered, and `config` must hold the target's batch."""
  return costs.flops(lower(_one_device(config), jax.devices('cpu')[:1], 'cpu'))


def _network_flops(config: ml_collections.ConfigDict) -> float:
  """The FLOPs of one network evaluation of one sample at high_res_size (one CPU device)."""
  config = _one_device(config)
  first_stage = first_stages.first_stage_from_config(config, weights_loaded=False)
  size, c = config.data.high_res_size // first_stage.factor, first_stage.channels
  graphdef, params = trained_model.abstract_network(
      config, c, sharding.data_mesh(jax.devices('cpu')[:1]))
  x = jax.ShapeDtypeStruct((1, size, size, c), np.float32)
  evaluate = lambda p, x, t: trained_model.velocity_fn(graphdef, p)(x, x, t)
  return costs.flops(jax.jit(evaluate).lower(params, x, jax.ShapeDtypeStruct((1,), np.float32)))


def _solve_flops(config: ml_collections.ConfigDict, counted: float, samples: int) -> float:
  """A program with a solve of config.sample's NFE: XLA counted its loop body once (`counted`);
  the other evaluations are added (dopri5: at nfe evaluations, its count being chosen as it
  runs)."""
  missing = config.sample.nfe - sampling.evaluations_as_code(config.sample.solver)
  return counted + missing * samples * _network_flops(config)


def _programs(config: ml_collections.ConfigDict, devices: list,
              target: str) -> train.StepPrograms:
  """train.step_programs of `config` on a mesh of `devices`, the first stage abstract."""
  mesh = sharding.make_mesh(config.mesh, devices, target)
  sharding.check_batch_size(config.data.batch_size, mesh)
  first_stage = first_stages.first_stage_from_config(config, weights_loaded=False)
  graphdef, params = nnx.split(first_stage)
  size = config.data.high_res_size // first_stage.factor
  batch_spec = input_pipeline.batch_spec(config, (size, size, first_stage.channels))
  init_key, train_key = jax.random.split(jax.random.key(config.seed))
  return train.step_programs(config, mesh, graphdef, params, first_stage.channels,
                             train.make_optimizer(config.optim), init_key, train_key, batch_spec)


def _train_step_report(config: ml_collections.ConfigDict, programs: train.StepPrograms,
                       count_flops: bool = True) -> ProgramReport:
  """The train step's report; DoesNotFit carries the state and batch bytes when XLA refuses."""
  state = programs.state
  state_bytes = {
      'parameters': costs.bytes_per_device(state.params),
      'adam_moments': costs.bytes_per_device(state.opt_state),
      'ema': costs.bytes_per_device(state.ema_params),
  }
  batch_bytes = costs.bytes_per_device(programs.batch)
  flops = _global_flops(config, lambda *a: _programs(*a).lower_train()) if count_flops else 0.0
  try:
    devices = next(iter(programs.batch.values())).sharding.mesh.devices.size
    report = _report('train step', programs.lower_train(), flops, config.data.batch_size, devices)
  except DoesNotFit as e:
    e.state_bytes, e.batch_bytes = sum(state_bytes.values()), batch_bytes
    raise
  report.state_bytes, report.batch_bytes = state_bytes, batch_bytes
  return report


def _abstract(tree, named_sharding) -> object:
  """`tree`'s arrays as ShapeDtypeStructs laid out by `named_sharding`."""
  return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=named_sharding),
                      tree)


def _sample_lowered(config: ml_collections.ConfigDict, devices: list, target: str,
                    program: str) -> jax.stages.Lowered:
  """One of --mode=sample's programs (trained_model.Cascade's own) for a model trained with
  `config`, on its config.mesh over `devices` as --mode=sample lays them out: 'solve', the lift of
  config.sample.batch_size first-stage latents of low_res_size (a diffusion model's output, the
  paper's use) to the model's grid with config.sample's solver, or 'decode', the tiled decode of
  the result."""
  mesh = sharding.make_mesh(config.mesh, devices, target)
  first_stage = first_stages.first_stage_from_config(config, weights_loaded=False)
  graphdef, params = trained_model.abstract_network(config, first_stage.channels, mesh)
  cascade = trained_model.Cascade([trained_model.TrainedModel(
      path='', step=0, config=config, sample=config.sample, first_stage=first_stage,
      graphdef=graphdef, params=params, mesh=mesh)])
  fs_params = _abstract(nnx.state(first_stage), cascade.replicated)
  batch = sharding.round_up(config.sample.batch_size, cascade.devices)
  f, c = first_stage.factor, first_stage.channels
  latents = lambda size: jax.ShapeDtypeStruct((batch, size // f, size // f, c), np.float32,
                                              sharding=cascade.batch_sharding)
  if program == 'decode':
    return cascade.decode_program().lower(fs_params, latents(config.data.high_res_size))
  low_res = latents(config.data.low_res_size)
  key = _abstract(jax.eval_shape(lambda: jax.random.key(0)), cascade.replicated)
  return cascade.lift_program(0, 'latent', low_res.shape).lower(params, fs_params, low_res, key)


def _precompute_lowered(config: ml_collections.ConfigDict, devices: list,
                        target: str) -> jax.stages.Lowered:
  """--mode=precompute's encoder (precompute.encoder_program) on the devices of one host, as each
  process of a precompute runs it."""
  del target
  host = [d for d in devices if d.process_index == devices[0].process_index]
  first_stage = first_stages.first_stage_from_config(config, weights_loaded=False)
  mesh = sharding.data_mesh(host)
  program, images = precompute.encoder_program(config, first_stage, mesh)
  return program.lower(_abstract(nnx.state(first_stage), sharding.replicated(mesh)), images)


def _other_reports(config: ml_collections.ConfigDict, target,
                   devices: list) -> list[ProgramReport]:
  """The reports of config.compile.programs other than the train step, for those the config's
  runs need; a program that does not fit is a UserError naming its setting."""
  wanted, kind, n = tuple(config.compile.programs), target.kind, target.num_devices
  # (name, lower(config, devices, target), samples, devices, the setting that sizes it, whether it
  # holds a solve of config.sample's NFE)
  jobs = []
  if 'evaluate' in wanted and config.train.eval_every > 0:
    jobs.append(('held-out evaluation', lambda c, *a: _programs(c, *a).lower_evaluate(c),
                 config.data.batch_size, n, 'config.data.batch_size (or set '
                 '--config.train.eval_every=0)', True))
  if 'precompute' in wanted and config.data.source == 'latents':
    host = sum(d.process_index == devices[0].process_index for d in devices)
    batch = sharding.round_up(config.precompute.batch_size, host)
    config = _with(config, 'precompute.batch_size', batch)  # The same batch on one CPU device.
    jobs.append(('precompute encoder', _precompute_lowered, batch, host,
                 'config.precompute.batch_size', False))
  if 'sample' in wanted:
    batch = sharding.round_up(config.sample.batch_size, n)
    config = _with(config, 'sample.batch_size', batch)
    for program in ('solve', 'decode'):
      jobs.append((f'sample: {program}', lambda *a, p=program: _sample_lowered(*a, p), batch, n,
                   'config.sample.batch_size', program == 'solve'))
  reports = []
  for name, lower, samples, count, setting, solves in jobs:
    on = f'{samples} samples on {count} device{"s" if count > 1 else ""}'
    flops = _global_flops(config, lower)
    try:
      reports.append(_report(name, lower(config, devices, target.name),
                             _solve_flops(config, flops, samples) if solves else flops, samples,
                             count))
      if solves:
        reports[-1].solve = f'{config.sample.solver}, {config.sample.nfe} NFE'
    except DoesNotFit as e:
      raise UserError(f'the {name} of {on} does not fit a '
                      f'{kind.device_kind} ({e}); lower {setting}.') from None
    if reports[-1].memory.total > kind.hbm_bytes:
      raise UserError(f'the {name} of {on} needs '
                      f'{reports[-1].memory.total / GiB:.2f} GiB per device, but a '
                      f'{kind.device_kind} has {kind.hbm_bytes / GiB:.1f} GiB; lower {setting}.')
  return reports


def _with(config: ml_collections.ConfigDict, field: str, value) -> ml_collections.ConfigDict:
  """A copy of `config` with the dotted `field` set to `value`."""
  config = ml_collections.ConfigDict(config.to_dict())
  group, name = field.split('.')
  config[group][name] = value
  return config


def _with_batch(config: ml_collections.ConfigDict, per_device: int, num_devices: int):
  return _with(config, 'data.batch_size', per_device * num_devices)


def compile_for_target(config: ml_collections.ConfigDict, workdir: str) -> dict:
  """Compiles the programs of `config` for config.compile.target, writes the reports to
  WORKDIR/compile and returns the JSON report; UserError when a program does not fit."""
  target = accelerators.parse_target(config.compile.target)
  kind = target.kind
  devices = accelerators.target_devices(target)
  with backends.compiling_for(kind.platform):
    config_checks.check(config, 'compile')
    programs = _programs(config, devices, target.name)
    try:
      step = _train_step_report(config, programs)
    except DoesNotFit as e:  # XLA's TPU compiler checks the HBM itself.
      temporaries = re.search(r'HLO temporaries \(([\d.]+)([KMGT])\)', str(e))
      raise UserError(_does_not_fit_line(
          config, target, state=e.state_bytes, batch=e.batch_bytes, code=0,
          temporaries=float(temporaries[1]) * 2**(10 * ' KMGT'.index(temporaries[2]))
          if temporaries else None,
          refusal=str(e))) from None
    if step.memory.total > kind.hbm_bytes:  # XLA's GPU compiler does not.
      raise UserError(_does_not_fit_line(
          config, target, state=sum(step.state_bytes.values()), batch=step.batch_bytes,
          code=step.memory.code, temporaries=step.memory.temporaries))
    reports = [step, *_other_reports(config, target, devices)]
    max_batch = _max_batch(config, target, devices, step) if config.compile.max_batch else None
  report = _json_report(config, target, reports, max_batch)
  table = markdown(report)
  if jax.process_index() == 0:
    directory = storage.path(workdir) / 'compile'
    directory.mkdir(parents=True, exist_ok=True)
    (directory / f'{target.file_name}.json').write_text(json.dumps(report, indent=2))
    (directory / f'{target.file_name}.md').write_text(table + '\n')
    print(table)
  return report


def _fits(config, target, devices, per_device: int) -> tuple[bool, ProgramReport | None]:
  try:
    config = _with_batch(config, per_device, target.num_devices)
    report = _train_step_report(config, _programs(config, devices, target.name),
                                count_flops=False)
  except DoesNotFit:
    return False, None
  return report.memory.total <= target.kind.hbm_bytes, report


def _max_batch(config, target, devices, step: ProgramReport) -> dict:
  """The largest per-device batch whose train step fits: the line through the totals at the
  config's batch and twice it gives an estimate, compiles at it and one above it test it, and a
  bisection between the largest batch known to fit and the smallest known not to settles it
  (at most MAX_BATCH_COMPILES compiles in all)."""
  per_device = config.data.batch_size // target.num_devices
  lo, hi, compiles = per_device, None, 0  # The config's own batch fits (checked before).

  def probe(batch: int) -> ProgramReport | None:
    nonlocal lo, hi, compiles
    compiles += 1
    ok, report = _fits(config, target, devices, batch)
    if ok:
      lo = max(lo, batch)
    else:
      hi = batch if hi is None else min(hi, batch)
    return report

  double = probe(2 * per_device)
  if double is None:  # XLA refused twice the batch outright: its memory is unknown.
    slope = step.memory.total / per_device
  else:
    slope = max((double.memory.total - step.memory.total) / per_device, 1.0)
  estimate = per_device + int((target.kind.hbm_bytes - step.memory.total) // slope)
  estimate = max(per_device, min(estimate, MAX_PER_DEVICE_BATCH))
  for batch in (estimate, estimate + 1):
    if lo < batch < (hi or MAX_PER_DEVICE_BATCH + 1) and compiles < MAX_BATCH_COMPILES:
      probe(batch)
  while compiles < MAX_BATCH_COMPILES and (hi is None or hi - lo > 1):
    batch = 2 * lo if hi is None else (lo + hi) // 2
    if batch > MAX_PER_DEVICE_BATCH:
      break
    probe(batch)
  return {'per_device_batch': lo, 'exact': hi == lo + 1, 'estimate': estimate,
          'compiles': compiles, 'bytes_per_sample': int(slope)}


def _does_not_fit_line(config, target, *, state: int, batch: int, code: int,
                       temporaries: float | None, refusal: str = '') -> str:
  """One sentence: what the train step needs per device (state and batch by arithmetic, XLA's
  temporaries) against the HBM, and settings that would fit."""
  kind, n = target.kind, target.num_devices
  per_device = config.data.batch_size // n
  if temporaries is not None:
    need = (f'the train step needs {(state + batch + temporaries + code) / GiB:.2f} GiB per '
            f'device (state {state / GiB:.2f}, batch {batch / GiB:.2f}, temporaries '
            f'{temporaries / GiB:.2f} GiB)')
    # Temporaries (activations) and the batch grow with the per-device batch; the state does not.
    room = kind.hbm_bytes - state - code
    fitting = int(room // ((temporaries + batch) / per_device)) if room > 0 else 0
  else:
    need = f'XLA refused the train step ({refusal})'
    fitting = 0
  fixes = []
  if config.mesh.fsdp < n and state > kind.hbm_bytes / 10:
    fixes.append(f'--config.mesh.fsdp={n} --config.mesh.data=1 (parameters, Adam moments and EMA '
                 f'split {n} ways: {state / GiB:.2f} GiB now)')
  if config.model.remat == 'none':
    fixes.append('--config.model.remat=dots (activations recomputed in the backward pass)')
  if 0 < fitting < per_device:
    fixes.append(f'a per-device batch of at most about {fitting} '
                 f'(--config.data.batch_size={fitting * n}, estimated from the temporaries per '
                 'sample)')
  elif per_device > 1:
    fixes.append(f'a per-device batch below {per_device}')
  return (f'{need} on {target.name}, but a {kind.device_kind} has '
          f'{kind.hbm_bytes / GiB:.1f} GiB; try ' + ', or '.join(fixes) + '.')


def _json_report(config, target, programs: list[ProgramReport], max_batch) -> dict:
  kind, n = target.kind, target.num_devices
  batch = config.data.batch_size
  out = {
      'target': target.name, 'device_kind': kind.device_kind, 'num_devices': n,
      'num_hosts': _num_hosts(target), 'hbm_bytes': kind.hbm_bytes,
      'peak_bf16_flops': kind.peak_bf16_flops, 'peak_source': kind.source,
      'mesh': {'data': config.mesh.data, 'fsdp': config.mesh.fsdp},
      'global_batch': batch, 'per_device_batch': batch // n,
      'model': {k: config.model[k] for k in ('compute_dtype', 'conv_impl', 'attention_impl',
                                              'remat')},
      'backend_settings': backends.backend_settings(
          kind.platform, compute_dtype=config.model.compute_dtype,
          conv_impl=config.model.conv_impl, attention_impl=config.model.attention_impl,
          head_dim=config.model.head_dim),
      'programs': [],
  }
  for p in programs:
    per_device_flops = p.flops / p.devices
    entry = {
        'name': p.name, 'compile_seconds': round(p.compile_seconds, 2),
        'memory': {**dataclasses.asdict(p.memory), 'total': p.memory.total,
                   'fits': p.memory.total <= kind.hbm_bytes},
        'samples': p.samples, 'devices': p.devices, **({'solve': p.solve} if p.solve else {}),
        'flops': p.flops, 'flops_per_device': per_device_flops,
        'flops_per_sample': p.flops / p.samples,
        # The step at the device's peak rate: a lower bound, reached only at 100% MFU.
        'step_seconds_at_peak': per_device_flops / kind.peak_bf16_flops,
        'collectives': p.collectives,
    }
    if p.state_bytes:
      entry['state_bytes'] = p.state_bytes
      entry['batch_bytes'] = p.batch_bytes
      if config.compile.samples_per_second > 0:  # Per device.
        entry['mfu_for_samples_per_second'] = {
            'samples_per_second': config.compile.samples_per_second,
            'mfu': config.compile.samples_per_second * p.flops / batch / kind.peak_bf16_flops}
    out['programs'].append(entry)
  if max_batch:
    out['max_batch'] = max_batch
  return out


def _num_hosts(target) -> int:
  return target.shape[1] if target.kind.platform == 'gpu' else 0


def markdown(report: dict) -> str:
  """The report as a markdown table a person reads: one column per program."""
  g = lambda b: f'{b / GiB:.2f} GiB' if b >= GiB / 10 else f'{b / 2**20:.1f} MiB'
  programs = report['programs']
  head = (f"{report['target']}: {report['num_devices']} x {report['device_kind']} "
          f"({report['hbm_bytes'] / GiB:.1f} GiB HBM, {report['peak_bf16_flops'] / 1e12:.0f} "
          f"TFLOP/s bf16 peak each); mesh data={report['mesh']['data']} "
          f"fsdp={report['mesh']['fsdp']}, global batch {report['global_batch']} "
          f"({report['per_device_batch']} per device); "
          + ', '.join(f'{k} {v}' for k, v in report['backend_settings'].items())
          + f", remat {report['model']['remat']}.")
  rows = [('| per device | ' + ' | '.join(p['name'] for p in programs) + ' |'),
          '|---|' + '---|' * len(programs)]

  def row(label, fn):
    rows.append(f'| {label} | ' + ' | '.join(fn(p) for p in programs) + ' |')

  row('samples per step (devices)', lambda p: f"{p['samples']} ({p['devices']})")
  if any('solve' in p for p in programs):
    row('solver (FLOPs counted at its NFE)', lambda p: p.get('solve', ''))
  state = lambda p, k: g(p['state_bytes'][k]) if 'state_bytes' in p else ''
  row('parameters (f32)', lambda p: state(p, 'parameters'))
  row('Adam moments', lambda p: state(p, 'adam_moments'))
  row('EMA', lambda p: state(p, 'ema'))
  row('batch', lambda p: g(p['batch_bytes']) if 'batch_bytes' in p else '')
  row('arguments (XLA)', lambda p: g(p['memory']['arguments']))
  row('temporaries (XLA)', lambda p: g(p['memory']['temporaries']))
  row('total / HBM', lambda p: f"{g(p['memory']['total'])} / {report['hbm_bytes'] / GiB:.1f} "
      f"GiB ({100 * p['memory']['total'] / report['hbm_bytes']:.0f}%)")
  row('fits', lambda p: 'yes' if p['memory']['fits'] else '**no**')
  row('TFLOP per step (per device)', lambda p: f"{p['flops_per_device'] / 1e12:.4g}")
  row('GFLOP per sample (all devices)', lambda p: f"{p['flops_per_sample'] / 1e9:.4g}")
  row('step time at peak (lower bound)', lambda p: f"{1e3 * p['step_seconds_at_peak']:.3g} ms")
  row('collectives', lambda p: ', '.join(
      f"{v['count']} {k} ({v['bytes'] / 2**20:.1f} MiB)" for k, v in p['collectives'].items())
      or 'none')
  row('compile time', lambda p: f"{p['compile_seconds']:.1f} s")
  lines = [head, '', *rows]
  train_step = programs[0]
  if 'mfu_for_samples_per_second' in train_step:
    m = train_step['mfu_for_samples_per_second']
    lines += ['', f"{m['samples_per_second']:g} training samples/s per device need "
              f"{100 * m['mfu']:.3g}% MFU on a {report['device_kind']}."]
  if 'max_batch' in report:
    b = report['max_batch']
    lines += ['', f"Largest per-device batch whose train step fits: {b['per_device_batch']}"
              f"{'' if b['exact'] else ' or more'} (estimated {b['estimate']} from "
              f"{g(b['bytes_per_sample'])} per sample; {b['compiles']} more compiles)."]
  return '\n'.join(lines)

