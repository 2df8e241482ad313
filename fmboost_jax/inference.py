"""`main.py --mode=sample`: boost low-res images or SD latents with trained checkpoints.

  python main.py --mode=sample --config=configs/demo.py --workdir=workdirs/demo \
      --inputs=skimage --config.sample.input_size=64 --config.sample.figure=True

A stage is a training workdir: its latest checkpoint holds the weights (the EMA weights when the
stage was trained with config.ema.use_for_sampling) and the config they were trained with, which
says what the model, the flow and the first stage are (`trained_model.load`). `--config.sample`
holds the solver, the seed, the batch size and, for a cascade, the list of stages;
`--config.first_stage.weights`, when set, replaces the autoencoder path the stages recorded (a moved
workdir or weights file); the rest of --config is not used.

Inputs are images (any size; each stage multiplies it by its high_res_size / low_res_size) or .npy /
.npz files of first-stage latents ([N,] C, h, w or [N,] h, w, C). Every stage builds its source as
in training (sampling.boost_latents); stages pass latents on, and the last one is decoded tiled.
Inputs whose size the network cannot take are padded at the bottom and right by edge replication
and the outputs cropped back, so every output is exactly the input size times the stages' factors.
"""

import dataclasses
import json
import math
import os
import sys
import time
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import nnx
from PIL import Image

from fmboost_jax import input_pipeline, metrics, sampling, sharding, upsampling
from fmboost_jax.errors import UserError
from fmboost_jax.train import ensure_writable
from fmboost_jax.trained_model import TrainedModel, load, velocity_fn

IMAGE_EXTENSIONS = ('.png', '.jpg', '.jpeg', '.webp', '.bmp', '.tif', '.tiff')
LATENT_EXTENSIONS = ('.npy', '.npz')
# Per-stage settings a cascade may override: 'WORKDIR,solver=dopri5,rtol=1e-4;WORKDIR2,nfe=10'.
STAGE_FIELDS = {'solver': str, 'nfe': int, 'rtol': float, 'atol': float, 'max_steps': int}


@dataclasses.dataclass(frozen=True)
class Input:
  name: str  # Stem of the output file.
  source: str  # The file (and array key / index) it came from.
  kind: str  # 'image' or 'latent'.
  array: np.ndarray  # float32 image [h, w, 3] in [-1, 1], or scaled latent [h, w, C].


# ----------------------------------------------------------------------------- stages


def parse_stages(spec: str, workdir: str,
                 sample_config: ml_collections.ConfigDict) -> list[tuple[str, Any]]:
  """`config.sample.stages` -> [(workdir, solver settings)]; empty means the one --workdir."""
  base = {k: sample_config[k] for k in STAGE_FIELDS}
  parts = [p for p in spec.split(';') if p.strip()] if spec.strip() else [workdir]
  stages = []
  for i, part in enumerate(parts):
    path, *settings = [s.strip() for s in part.split(',')]
    settings_config = ml_collections.ConfigDict(dict(base))
    for setting in settings:
      key, _, value = setting.partition('=')
      if key not in STAGE_FIELDS or not value:
        raise UserError(f'stage {i + 1} of config.sample.stages has the setting {setting!r}; '
                        f'write KEY=VALUE with KEY one of {", ".join(STAGE_FIELDS)}.')
      try:
        settings_config[key] = STAGE_FIELDS[key](value)
      except ValueError:
        raise UserError(f'stage {i + 1} of config.sample.stages: {key}={value!r} is not a valid '
                        f'{STAGE_FIELDS[key].__name__}.') from None
    try:
      sampling.check_config(settings_config)
    except ValueError as e:
      raise UserError(f'stage {i + 1} ({path}): {e}') from None
    stages.append((path, settings_config))
  return stages


# ----------------------------------------------------------------------------- inputs


def _resize_image(image: np.ndarray, size: int) -> np.ndarray:
  """uint8 [H, W, 3] resized (Lanczos) so that its longer side is `size`, aspect kept."""
  h, w = image.shape[:2]
  k = size / max(h, w)
  target = (max(1, round(w * k)), max(1, round(h * k)))
  return np.asarray(Image.fromarray(image).resize(target, Image.Resampling.LANCZOS))


def _latent_arrays(path: str) -> list[tuple[str, np.ndarray]]:
  if path.endswith('.npz'):
    with np.load(path, allow_pickle=False) as f:
      return [(key, f[key]) for key in f.files]
  return [('', np.load(path, allow_pickle=False))]


def _latents(path: str, first_stage, scaled: bool) -> list[tuple[str, str, np.ndarray]]:
  """(name suffix, source, latent [h, w, C]) for every latent in an .npy / .npz file."""
  c = first_stage.channels
  out = []
  for key, array in _latent_arrays(path):
    where = f'{path}[{key}]' if key else path
    if not np.issubdtype(array.dtype, np.number) or array.ndim not in (3, 4):
      raise UserError(f'{where} holds a {array.dtype} array of shape {array.shape}; expected '
                      f'latents of shape [N,] {c}, h, w or [N,] h, w, {c}.')
    array = array[None] if array.ndim == 3 else array
    if array.shape[1] == c and array.shape[-1] != c:
      array = array.transpose(0, 2, 3, 1)  # NCHW, as diffusers returns them.
    elif array.shape[-1] != c:
      raise UserError(f'{where} holds latents of shape {array.shape} without the {c} channels of '
                      f"this checkpoint's first stage; expected [N,] {c}, h, w or [N,] h, w, {c}.")
    array = array.astype(np.float32) * np.float32(1.0 if scaled else first_stage.scale_factor)
    for i, latent in enumerate(array):
      suffix = (f'_{key}' if key else '') + (f'_{i}' if len(array) > 1 else '')
      out.append((suffix, f'{where}[{i}]' if len(array) > 1 else where, latent))
  return out


def _files(paths: list[str]) -> list[str]:
  files = []
  for path in paths:
    if os.path.isdir(path):
      found = sorted(os.path.join(d, n) for d, _, names in os.walk(path) for n in names
                     if n.lower().endswith(IMAGE_EXTENSIONS + LATENT_EXTENSIONS))
      if not found:
        raise UserError(f'the input folder {path} holds no images ({", ".join(IMAGE_EXTENSIONS)}) '
                        'or latents (.npy, .npz).')
      files.extend(found)
    elif os.path.isfile(path):
      files.append(path)
    else:
      raise UserError(f'the input {path} does not exist; pass files or folders with --inputs.')
  return files


def collect_inputs(paths: list[str], first_stage, sample_config) -> list[Input]:
  """Reads every input; 'skimage' names the photographs bundled with scikit-image.

  Unreadable files are skipped with one warning line each; no usable input is an error.
  """
  if not paths:
    raise UserError('--inputs is empty; pass image or latent files or folders, or skimage.')
  entries: list[tuple[str, str, str, np.ndarray]] = []
  skipped = 0
  if paths == ['skimage']:
    entries = [(name, 'image', f'skimage.data.{name}', image)
               for name, image in input_pipeline.load_skimage_photos()]
  else:
    for path in _files(paths):
      stem = os.path.splitext(os.path.basename(path))[0]
      try:
        if path.lower().endswith(LATENT_EXTENSIONS):
          for suffix, source, latent in _latents(path, first_stage, sample_config.latents_scaled):
            entries.append((stem + suffix, 'latent', source, latent))
        else:
          entries.append((stem, 'image', path, input_pipeline.decode_image_file(path)))
      except UserError:
        raise
      except Exception as e:  # noqa: BLE001  (Pillow and numpy raise many kinds)
        skipped += 1
        print(f'warning: skipping {path}, which cannot be read ({type(e).__name__}: '
              f'{str(e)[:120]}).', file=sys.stderr)
  if not entries:
    raise UserError(f'none of the {skipped} input files could be read; pass images or .npy/.npz '
                    'latents.')
  inputs, taken = [], set()
  for stem, kind, source, array in entries:
    name, n = stem, 1
    while name in taken:
      n += 1
      name = f'{stem}_{n}'
    taken.add(name)
    if kind == 'image':
      if sample_config.input_size:
        array = _resize_image(array, sample_config.input_size)
      array = input_pipeline.normalize(array)
    inputs.append(Input(name=name, source=source, kind=kind, array=array))
  return inputs


# ----------------------------------------------------------------------------- boosting


def _pad_to(x: jax.Array, unit: int) -> jax.Array:
  """Pads [B, H, W, C] at the bottom/right by edge replication to multiples of `unit`."""
  h, w = x.shape[1:3]
  pad = ((0, 0), (0, -h % unit), (0, -w % unit), (0, 0))
  return jnp.pad(x, pad, mode='edge') if any(p[1] for p in pad) else x


def _input_unit(stage: TrainedModel, kind: str) -> int:
  """Input sizes must be multiples of this so that the target latent grid fits the network."""
  factor = stage.first_stage.factor if kind == 'image' else 1
  unit = stage.unit * factor // math.gcd(stage.unit * factor, stage.scale)
  if kind == 'image' and stage.config.flow.upsampling_mode != 'psu':
    unit = math.lcm(unit, stage.first_stage.factor)  # The low-res image itself is encoded.
  return unit


class _Compiled:
  """AOT-compiled stage solves and decodes, one per input shape, with their compile time."""

  def __init__(self, mesh: jax.sharding.Mesh):
    self.batch = sharding.batch_sharded(mesh)
    self.replicated = sharding.replicated(mesh)
    self.cache: dict[Any, Any] = {}
    self.seconds = 0.0

  def __call__(self, cache_key, fn, *args, in_shardings):
    if cache_key not in self.cache:
      t0 = time.perf_counter()
      self.cache[cache_key] = jax.jit(fn, in_shardings=in_shardings).lower(*args).compile()
      self.seconds += time.perf_counter() - t0
    return self.cache[cache_key](*args)


def _solve_stage(compiled: _Compiled, index: int, stage: TrainedModel, kind: str, x: jax.Array,
                 key: jax.Array, save_trajectory: int) -> sampling.Solution:
  """One stage on a padded batch: low-res input [B, h, w, *] -> Solution on the target grid."""
  factor = stage.first_stage.factor if kind == 'image' else 1
  target = (x.shape[1] * stage.scale // factor, x.shape[2] * stage.scale // factor)
  fs_graphdef, fs_params = nnx.split(stage.first_stage)

  def fn(params, fs_params, x, key):
    first_stage = nnx.merge(fs_graphdef, fs_params)
    inputs = {'low_res_images' if kind == 'image' else 'low_res_latents': x}
    return sampling.boost_latents(velocity_fn(stage.graphdef, params), first_stage, target, key,
                                  stage.config.flow, stage.sample,
                                  save_trajectory=save_trajectory, **inputs)

  return compiled(('solve', index, kind, x.shape, save_trajectory), fn, stage.params, fs_params,
                  x, key, in_shardings=(compiled.replicated, compiled.replicated, compiled.batch,
                                        compiled.replicated))


def _decode(compiled: _Compiled, first_stage, latents: jax.Array, tiled: bool) -> jax.Array:
  graphdef, params = nnx.split(first_stage)

  def fn(params, z):
    model = nnx.merge(graphdef, params)
    return model.decode_tiled(z) if tiled else model.decode(z)

  return compiled(('decode', latents.shape, tiled), fn, params, latents,
                  in_shardings=(compiled.replicated, compiled.batch))


def check_cascade(stages: list[TrainedModel]) -> None:
  first = stages[0].config.first_stage.to_dict()
  for i, stage in enumerate(stages[1:], start=2):
    if stage.config.first_stage.to_dict() != first:
      raise UserError(f'stage {i} ({stage.workdir}) was trained with another first stage than '
                      f'stage 1 ({stages[0].workdir}); stages pass latents on, so train every '
                      'stage of a cascade with the same config.first_stage.')


def _progress(done: int, total: int, seconds: float) -> None:
  width = 30
  filled = width * done // total
  print(f'\rboosting [{"#" * filled}{"." * (width - filled)}] {done}/{total} images, '
        f'{seconds / max(done, 1):.2f} s/image', end='' if done < total else '\n',
        file=sys.stderr, flush=True)


def _save_png(path: str, image: np.ndarray) -> None:
  Image.fromarray(np.asarray(metrics.to_uint8(image))).save(path)


def _figure(low_res: np.ndarray, output: np.ndarray, trajectory: list[np.ndarray]) -> np.ndarray:
  """low-res (nearest) | bilinear | model [| trajectory states], as one [H, W*k, 3] image."""
  size = output.shape[:2]
  x = jnp.asarray(low_res)[None]
  columns = [upsampling.resize(x, size, 'nearest')[0], upsampling.resize(x, size, 'linear')[0],
             output, *trajectory]
  return np.concatenate([np.asarray(c) for c in columns], axis=1)


def check_sample_config(s: ml_collections.ConfigDict) -> None:
  if s.batch_size < 1:
    raise UserError(f'config.sample.batch_size={s.batch_size} must be at least 1.')
  if s.input_size < 0:
    raise UserError(f'config.sample.input_size={s.input_size} must be 0 (keep the input size) or '
                    'the longer side in pixels that images are resized to.')
  if s.trajectory == 1 or s.trajectory < 0:
    raise UserError(f'config.sample.trajectory={s.trajectory} must be 0 (none) or at least 2 '
                    '(the states at t=0 and t=1 included).')


def sample(config: ml_collections.ConfigDict, workdir: str, input_paths: list[str],
           outdir: str | None = None) -> dict[str, Any]:
  """Boosts every input through the stages and writes PNGs, figures and `summary.json`.

  Returns the summary (also written to OUTDIR/summary.json).
  """
  s = config.sample
  check_sample_config(s)
  if jax.process_count() > 1:
    raise UserError('--mode=sample runs in one process on all of its devices; start it without '
                    'the multi-process flags.')
  mesh = sharding.make_mesh(config.mesh)
  compiled = _Compiled(mesh)
  stages = [load(path, settings, compiled.replicated,
                 first_stage_weights=config.first_stage.weights)
            for path, settings in parse_stages(s.stages, workdir, s)]
  check_cascade(stages)
  first_stage = stages[0].first_stage
  inputs = collect_inputs(input_paths, first_stage, s)
  outdir = outdir or os.path.join(workdir, 'boosted')
  ensure_writable(outdir)
  if s.figure:
    os.makedirs(os.path.join(outdir, 'figures'), exist_ok=True)

  groups: dict[Any, list[int]] = {}
  for i, item in enumerate(inputs):
    groups.setdefault((item.kind, item.array.shape), []).append(i)
  batches = [ids[j:j + s.batch_size] for ids in groups.values()
             for j in range(0, len(ids), s.batch_size)]
  devices = mesh.devices.size
  base_key = jax.random.PRNGKey(s.seed)
  records: list[dict[str, Any]] = [{} for _ in inputs]
  done, total_seconds = 0, 0.0
  for b, ids in enumerate(batches):
    items = [inputs[i] for i in ids]
    n, kind = len(items), items[0].kind
    padding = [items[-1].array] * (-n % devices)  # Fill every device; dropped afterwards.
    compile_before, t0 = compiled.seconds, time.perf_counter()
    x = jax.device_put(np.stack([item.array for item in items] + padding), compiled.batch)
    low_res = x
    pixels = tuple(d * (1 if kind == 'image' else first_stage.factor) for d in x.shape[1:3])
    nfes, oks, trajectory = [], [], None
    for k, stage in enumerate(stages):
      save = s.trajectory if s.figure and k == len(stages) - 1 else 0
      key = jax.random.fold_in(jax.random.fold_in(base_key, k), b)
      solution = _solve_stage(compiled, k, stage, kind, _pad_to(x, _input_unit(stage, kind)), key,
                              save)
      pixels = (pixels[0] * stage.scale, pixels[1] * stage.scale)
      grid = (-(-pixels[0] // first_stage.factor), -(-pixels[1] // first_stage.factor))
      x, kind = solution.x1[:, :grid[0], :grid[1]], 'latent'
      nfes.append(solution.nfe)
      oks.append(solution.ok)
      trajectory = solution.trajectory
    outputs = _decode(compiled, first_stage, x, tiled=True)[:, :pixels[0], :pixels[1]]
    outputs, nfes, oks = jax.device_get((outputs, nfes, oks))
    seconds = time.perf_counter() - t0 - (compiled.seconds - compile_before)
    total_seconds += seconds

    for j, item in enumerate(items):
      _save_png(os.path.join(outdir, f'{item.name}.png'), outputs[j])
      records[ids[j]] = {
          'input': item.source, 'output': f'{item.name}.png', 'kind': item.kind,
          'input_size': list(item.array.shape[:2]), 'output_size': list(outputs.shape[1:3]),
          'seconds': seconds / n, 'nfe': [int(v) for v in nfes],
          'solver_ok': [bool(v) for v in oks]}
    if s.figure:
      if items[0].kind == 'latent':
        low_res = _decode(compiled, first_stage, low_res, tiled=False)
      frames = [] if trajectory is None else [
          np.asarray(_decode(compiled, first_stage, z[:, :grid[0], :grid[1]],
                             tiled=True)[:, :pixels[0], :pixels[1]]) for z in trajectory]
      low_res = np.asarray(jax.device_get(low_res))
      for j, item in enumerate(items):
        _save_png(os.path.join(outdir, 'figures', f'{item.name}.png'),
                  _figure(low_res[j], outputs[j], [f[j] for f in frames]))
    done += n
    _progress(done, len(inputs), total_seconds)

  failed = [r['input'] for r in records if not all(r['solver_ok'])]
  if failed:
    print(f'warning: the solver stopped before t=1 for {len(failed)} images (first: {failed[0]}); '
          'raise config.sample.max_steps or loosen rtol/atol.', file=sys.stderr)
  summary = {
      'stages': [{'workdir': st.workdir, 'step': st.step, 'scale': st.scale,
                  'weights': 'ema_params' if st.config.ema.use_for_sampling else 'params',
                  **{k: st.sample[k] for k in STAGE_FIELDS}} for st in stages],
      'seed': s.seed, 'devices': devices, 'batch_size': s.batch_size,
      'num_images': len(inputs), 'compile_seconds': compiled.seconds,
      'seconds_per_image': total_seconds / len(inputs),
      'mean_nfe': [float(np.mean([r['nfe'][k] for r in records])) for k in range(len(stages))],
      'images': records,
  }
  with open(os.path.join(outdir, 'summary.json'), 'w') as f:
    json.dump(summary, f, indent=2)
  print(f'Boosted {len(inputs)} inputs into {outdir} ({summary["seconds_per_image"]:.3f} s/image '
        f'after {compiled.seconds:.1f} s of compilation, mean NFE {summary["mean_nfe"]}); '
        f'per-image times and NFE in {os.path.join(outdir, "summary.json")}.')
  return summary
