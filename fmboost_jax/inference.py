"""`main.py --mode=sample`: boost low-res images or SD latents with trained checkpoints.

  python main.py --mode=sample --config=configs/demo.py --workdir=workdirs/demo \
      --inputs=skimage --config.sample.input_size=64 --config.sample.figure=True

A stage is a training workdir or a `--mode=export` directory (`trained_model.load`: the weights and
the config they were trained with, which says what the model, the flow and the first stage are).
`--config.sample` holds the solver, the seed, the batch size and, for a cascade, the list of stages
(`config.sample.stages`, paths or dicts with per-stage solver settings);
`--config.first_stage.weights`, when set, replaces the autoencoder path the stages recorded (a moved
workdir or weights file); the rest of --config is not used.

Inputs are images (any size; each stage multiplies it by its high_res_size / low_res_size;
`config.sample.input_size` first shrinks them as training does) or .npy / .npz files of first-stage
latents ([N,] C, h, w or [N,] h, w, C). Boosting itself is `trained_model.Cascade`; this module
reads the files and writes the PNGs, figures and summary.
"""

import dataclasses
import io
import json
import os
import sys
from typing import Any

import jax.numpy as jnp
import ml_collections
import numpy as np

from fmboost_jax import (
  config_checks,
  conversions,
  images,
  metrics,
  sampling,
  sharding,
  storage,
  trained_model,
  upsampling,
)
from fmboost_jax.errors import UserError

IMAGE_EXTENSIONS = ('.png', '.jpg', '.jpeg', '.webp', '.bmp', '.tif', '.tiff')
LATENT_EXTENSIONS = ('.npy', '.npz')
# Per-stage settings a cascade may override (config.sample.stages).
STAGE_FIELDS = ('solver', 'nfe', 'rtol', 'atol', 'max_steps')


@dataclasses.dataclass(frozen=True)
class Input:
  name: str  # Stem of the output file.
  source: str  # The file (and array key / index) it came from.
  kind: str  # 'image' or 'latent'.
  array: np.ndarray  # float32 image [h, w, 3] in [-1, 1], or scaled latent [h, w, C].


# ----------------------------------------------------------------------------- stages


def stage_settings(sample_config: ml_collections.ConfigDict,
                   workdir: str) -> list[tuple[str, ml_collections.ConfigDict]]:
  """`config.sample.stages` -> [(path, solver settings)]; empty means the one --workdir.

  Each stage is a path (a training workdir or an export) or a dict {'workdir': PATH, and any of
  STAGE_FIELDS}; unset fields come from config.sample.
  """
  specs = list(sample_config.stages) or [workdir]
  stages = []
  for i, spec in enumerate(specs, start=1):
    if isinstance(spec, str):
      spec = {'workdir': spec}
    spec = dict(spec) if isinstance(spec, (dict, ml_collections.ConfigDict)) else None
    if not spec or not isinstance(spec.get('workdir'), str) or not spec['workdir']:
      raise UserError(f'stage {i} of config.sample.stages is {specs[i - 1]!r}; write a path or '
                      "a dict such as {'workdir': PATH, 'nfe': 10}.")
    unknown = sorted(set(spec) - {'workdir', *STAGE_FIELDS})
    if unknown:
      raise UserError(f'stage {i} of config.sample.stages sets {", ".join(unknown)}; a stage sets '
                      f'workdir and any of {", ".join(STAGE_FIELDS)}.')
    settings = ml_collections.ConfigDict({k: sample_config[k] for k in STAGE_FIELDS})
    for key in STAGE_FIELDS:
      if key in spec:
        settings[key] = spec[key]
    try:
      sampling.check_config(settings)
    except ValueError as e:
      raise UserError(f'stage {i} ({spec["workdir"]}): {e}') from None
    stages.append((spec['workdir'], settings))
  return stages


# ----------------------------------------------------------------------------- inputs


def _resize_image(image: np.ndarray, size: int) -> np.ndarray:
  """float32 [H, W, 3] resized so that its longer side is `size`, aspect kept, with the
  degradation of training (bilinear without antialiasing, upsampling.low_res_images)."""
  h, w = image.shape[:2]
  k = size / max(h, w)
  target = (max(1, round(h * k)), max(1, round(w * k)))
  return np.asarray(upsampling.resize(jnp.asarray(image)[None], target, 'linear')[0])


def _latent_arrays(path: str) -> list[tuple[str, np.ndarray]]:
  with storage.open_binary(path) as file:
    loaded = np.load(io.BytesIO(file.read()), allow_pickle=False)
  if path.endswith('.npz'):
    with loaded as f:
      return [(key, f[key]) for key in f.files]
  return [('', loaded)]


def _latents(path: str, first_stage, scaled: bool) -> list[tuple[str, str, np.ndarray]]:
  """(name suffix, source, latent [h, w, C]) for every latent in an .npy / .npz file."""
  out = []
  for key, array in _latent_arrays(path):
    where = f'{path}[{key}]' if key else path
    array = conversions.latent_array(array, first_stage.channels, first_stage.scale_factor,
                                     scaled, where)
    for i, latent in enumerate(array):
      suffix = (f'_{key}' if key else '') + (f'_{i}' if len(array) > 1 else '')
      out.append((suffix, f'{where}[{i}]' if len(array) > 1 else where, latent))
  return out


def _files(paths: list[str]) -> list[str]:
  files = []
  for path in paths:
    if storage.path(path).is_dir():
      found = sorted(os.fspath(p) for p in storage.files_under(path)
                     if p.name.lower().endswith(IMAGE_EXTENSIONS + LATENT_EXTENSIONS))
      if not found:
        raise UserError(f'the input folder {path} holds no images ({", ".join(IMAGE_EXTENSIONS)}) '
                        'or latents (.npy, .npz).')
      files.extend(found)
    elif storage.path(path).is_file():
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
               for name, image in images.load_skimage_photos()]
  else:
    for path in _files(paths):
      stem = os.path.splitext(os.path.basename(path))[0]
      try:
        if path.lower().endswith(LATENT_EXTENSIONS):
          for suffix, source, latent in _latents(path, first_stage, sample_config.latents_scaled):
            entries.append((stem + suffix, 'latent', source, latent))
        else:
          entries.append((stem, 'image', path, images.decode_image_file(path)))
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
      array = images.normalize(array)
      if sample_config.input_size:
        array = _resize_image(array, sample_config.input_size)
    inputs.append(Input(name=name, source=source, kind=kind, array=array))
  return inputs


# ----------------------------------------------------------------------------- outputs


def _flat(tree: dict[str, Any], prefix: str = '') -> dict[str, Any]:
  """A nested dict of settings as {'a.b': value}."""
  out = {}
  for key, value in tree.items():
    if isinstance(value, dict):
      out.update(_flat(value, f'{prefix}{key}.'))
    else:
      out[f'{prefix}{key}'] = value
  return out


def _progress(done: int, total: int, seconds: float) -> None:
  width = 30
  filled = width * done // total
  print(f'\rboosting [{"#" * filled}{"." * (width - filled)}] {done}/{total} images, '
        f'{seconds / max(done, 1):.2f} s/image', end='' if done < total else '\n',
        file=sys.stderr, flush=True)


def _save_png(path: str, image: np.ndarray) -> None:
  images.write_png(path, metrics.to_uint8(image))


def _figure(low_res: np.ndarray, output: np.ndarray, trajectory: list[np.ndarray]) -> np.ndarray:
  """low-res (nearest) | bilinear | model [| trajectory states], as one [H, W*k, 3] image."""
  size = output.shape[:2]
  x = jnp.asarray(low_res)[None]
  columns = [upsampling.resize(x, size, 'nearest')[0], upsampling.resize(x, size, 'linear')[0],
             output, *trajectory]
  return np.concatenate([np.asarray(c) for c in columns], axis=1)


def sample(config: ml_collections.ConfigDict, workdir: str, input_paths: list[str],
           outdir: str) -> dict[str, Any]:
  """Boosts every input through the stages and writes PNGs, figures and `summary.json` to
  `outdir`; returns the summary."""
  s = config.sample
  config_checks.check(config, 'sample')
  # Every process reads every input and places its devices' share of each batch; process 0
  # writes the outputs.
  sharding.check_same_in_all_processes(
      {'inputs': list(input_paths), 'outdir': outdir, **_flat(config.sample.to_dict())},
      '--inputs, --outdir or --config.sample')
  writer = sharding.is_writer()
  mesh = sharding.make_mesh(config.mesh)
  models = [trained_model.load(path, sample=settings, mesh=mesh,
                               first_stage_weights=config.first_stage.weights)
            for path, settings in stage_settings(s, workdir)]
  cascade = trained_model.Cascade(models)
  inputs = collect_inputs(input_paths, cascade.first_stage, s)
  if writer:
    storage.path(storage.join(outdir, 'figures') if s.figure else outdir).mkdir(parents=True,
                                                                                exist_ok=True)

  records: list[dict[str, Any]] = [{} for _ in inputs]
  done, total_seconds = 0, 0.0
  trajectory = s.trajectory if s.figure else 0
  for ids, batch in cascade.batches([(x.kind, x.array) for x in inputs], s.batch_size, s.seed,
                                    save_trajectory=trajectory):
    items = [inputs[i] for i in ids]
    total_seconds += batch.seconds
    for j, item in enumerate(items):
      if writer:
        _save_png(storage.join(outdir, f'{item.name}.png'), batch.images[j])
      records[ids[j]] = {
          'input': item.source, 'output': f'{item.name}.png', 'kind': item.kind,
          'input_size': list(item.array.shape[:2]), 'output_size': list(batch.images.shape[1:3]),
          'seconds': batch.seconds / len(items), 'nfe': [int(v[j]) for v in batch.nfe],
          'solver_ok': [bool(v[j]) for v in batch.ok]}
    if s.figure:
      low_res = np.stack([item.array for item in items])
      if items[0].kind == 'latent':
        low_res = sharding.to_host(cascade.decode(low_res, tiled=False))
      for j, item in enumerate(items if writer else ()):
        _save_png(storage.join(outdir, 'figures', f'{item.name}.png'),
                  _figure(low_res[j], batch.images[j], [f[j] for f in batch.trajectory]))
    done += len(items)
    if writer:
      _progress(done, len(inputs), total_seconds)

  failed = [r['input'] for r in records if not all(r['solver_ok'])]
  if failed and writer:
    print(f'warning: the solver stopped before t=1 for {len(failed)} images (first: {failed[0]}); '
          'raise config.sample.max_steps or loosen rtol/atol.', file=sys.stderr)
  summary = {
      'stages': [{'workdir': m.path, 'step': m.step, 'scale': m.scale,
                  'weights': 'ema_params' if m.config.ema.use_for_sampling else 'params',
                  **{k: m.sample[k] for k in STAGE_FIELDS}} for m in models],
      'seed': s.seed, 'devices': cascade.devices, 'batch_size': s.batch_size,
      'num_images': len(inputs), 'compile_seconds': cascade.compile_seconds,
      'seconds_per_image': total_seconds / len(inputs),
      'mean_nfe': [float(np.mean([r['nfe'][k] for r in records])) for k in range(len(models))],
      'images': records,
  }
  if not writer:
    return summary
  storage.path(storage.join(outdir, 'summary.json')).write_text(json.dumps(summary, indent=2))
  print(f'Boosted {len(inputs)} inputs into {outdir} ({summary["seconds_per_image"]:.3f} s/image '
        f'after {cascade.compile_seconds:.1f} s of compilation, mean NFE {summary["mean_nfe"]}); '
        f'per-image times and NFE in {storage.join(outdir, "summary.json")}.')
  return summary
