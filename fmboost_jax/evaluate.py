"""`main.py --mode=evaluate`: the paper's Table 2 and Fig. 5 on held-out images, from checkpoints.

  python main.py --mode=evaluate --config=configs/demo.py --workdir=workdirs/demo \
      "--config.eval.checkpoints=('workdirs/demo', 'workdirs/demo_fm', 'workdirs/demo_l2')"

Every checkpoint is a `--mode=train` workdir or an export (the EMA weights and the config they were
trained with, see `trained_model.load`; `--config.first_stage.weights`, when set,
replaces the recorded autoencoder path). The held-out images are those of
`--config.data` (`input_pipeline.validation_images`, `config.data.num_val_images` of them). Each is
downsized to `low_res_size` and upsampled back by bilinear interpolation and by every checkpoint
(flows with `config.sample`'s solver and NFE, regression with its one step), and every output is
compared with the ground truth:

  PSNR, SSIM, MSE          per image, averaged (metrics.py);
  FID, p-FID               Inception pool features of the full images and of `eval.num_crops`
                           random `eval.crop_size` crops per image, the same boxes for the real and
                           the generated images (reference 6.1); they need
                           `--config.eval.inception_weights`, and say so in the table otherwise;
  spectral distance, HF    the radially averaged power spectra against the ground truth's
  energy                   (metrics.spectral_detail): blur and invented detail without weights.

Flows are also swept over `eval.nfe_sweep` network evaluations with Euler (Fig. 5). Written to
WORKDIR/eval: results.md and results.json (Table 2 layout and the sweep), nfe_sweep.png and
figure.png (matching crops of every method). The same config and checkpoints give the same numbers.
"""

import functools
import io
import json
import os
import sys
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import nnx
from PIL import Image, ImageDraw

from fmboost_jax import (
  config_checks,
  input_pipeline,
  metrics,
  sharding,
  storage,
  upsampling,
  weights,
)
from fmboost_jax import images as images_lib
from fmboost_jax.errors import UserError
from fmboost_jax.trained_model import TrainedModel, load, upsample_held_out

FID_FLAG = '--config.eval.inception_weights'
COLUMNS = (  # (key, header, format); FID columns first as in the paper's Table 2.
    ('fid', 'FID', '{:.2f}'), ('pfid', 'p-FID', '{:.2f}'), ('ssim', 'SSIM', '{:.4f}'),
    ('psnr', 'PSNR (dB)', '{:.2f}'), ('mse', 'MSE', '{:.5f}'),
    ('spectral_distance', 'spectral dist.', '{:.3f}'), ('hf_energy_db', 'HF energy (dB)',
                                                         '{:+.2f}'),
    ('nfe', 'NFE', '{:.0f}'))


def _label(stage: TrainedModel, taken: set[str]) -> str:
  label = stage.objective.name.upper()
  if label in taken:
    label = f'{label} ({os.path.basename(os.path.normpath(stage.path))})'
  taken.add(label)
  return label


def _check_compatible(stage: TrainedModel, config: ml_collections.ConfigDict) -> None:
  for field in ('high_res_size', 'low_res_size'):
    if stage.config.data[field] != config.data[field]:
      raise UserError(f'{stage.path} was trained with data.{field}='
                      f'{stage.config.data[field]}, but the held-out images of --config use '
                      f'{config.data[field]}; evaluate it with the config it was trained with.')


@functools.partial(jax.jit, static_argnums=0)
def _inception_forward(graphdef: nnx.GraphDef, state: nnx.State, images: jax.Array) -> jax.Array:
  return nnx.merge(graphdef, state)(metrics.to_uint8(images).astype(jnp.float32))


def inception_features(model, images: np.ndarray, chunk: int) -> np.ndarray:
  """FID features [N, 2048] of images [N, H, W, 3] in [-1, 1] (quantised to uint8 values first),
  in chunks of a fixed size (the last one padded), so that one compiled program serves them all."""
  graphdef, state = nnx.split(model)
  out = []
  for i in range(0, len(images), chunk):
    part = images[i:i + chunk]
    padded = sharding.pad_batch(part, chunk)
    out.append(np.asarray(_inception_forward(graphdef, state, padded))[:len(part)])
  return np.concatenate(out)


class _Accumulator:
  """Streams per-image scores, Inception features and power spectra of one method's outputs."""

  def __init__(self):
    self.scores: dict[str, list[np.ndarray]] = {}
    self.features: dict[str, list[np.ndarray]] = {}
    self.spectrum_sum, self.count = 0.0, 0

  def add(self, scores: dict[str, np.ndarray], features: dict[str, np.ndarray],
          outputs: np.ndarray) -> None:
    for k, v in scores.items():
      self.scores.setdefault(k, []).append(np.asarray(v))
    for k, v in features.items():
      self.features.setdefault(k, []).append(np.asarray(v))
    self.spectrum_sum = self.spectrum_sum + metrics.radial_power_spectrum(outputs) * len(outputs)
    self.count += len(outputs)

  def spectrum(self) -> np.ndarray:
    return self.spectrum_sum / self.count

  def mean_scores(self) -> dict[str, float]:
    return {k: float(np.mean(np.concatenate(v))) for k, v in self.scores.items()}

  def all_features(self, name: str) -> np.ndarray:
    return np.concatenate(self.features[name])


class Evaluator:
  """Upsamples the held-out images with every method and accumulates their metrics."""

  def __init__(self, config: ml_collections.ConfigDict, images: np.ndarray, mesh):
    self.config = config
    self.images = images
    self.batch = sharding.batch_sharded(mesh)
    self.replicated = sharding.replicated(mesh)
    self.devices = mesh.devices.size
    self.batch_size = sharding.round_up(max(config.sample.batch_size, 1), self.devices)
    size = images.shape[1]
    self.boxes = metrics.crop_boxes(config.eval.seed, len(images), size, size,
                                    config.eval.crop_size, config.eval.num_crops)
    self.inception = (weights.inception_from_weights(config.eval.inception_weights)
                      if config.eval.inception_weights else None)
    self._measure = jax.jit(lambda pred, target: {
        'psnr': metrics.psnr(pred, target), 'ssim': metrics.ssim(pred, target),
        'mse': metrics.mse(pred, target)})

  def _batches(self):
    """(start, n, padded global batch) over the held-out images, padded to fill every device."""
    for start in range(0, len(self.images), self.batch_size):
      chunk = self.images[start:start + self.batch_size]
      n = len(chunk)
      padded = sharding.pad_batch(chunk, self.batch_size)
      yield start, n, sharding.put(padded, self.batch)  # Each process places its share.

  def features(self, images: np.ndarray, start: int) -> dict[str, np.ndarray]:
    """Inception features of images [n, S, S, 3] (held-out indices start .. start + n) and of
    their crop boxes; empty without Inception weights."""
    if self.inception is None:
      return {}
    boxes = self.boxes[start:start + len(images)]
    crops = metrics.crops(images, boxes, self.config.eval.crop_size)
    return {'full': inception_features(self.inception, images, self.batch_size),
            'crops': inception_features(self.inception, crops, self.batch_size)}

  def run(self, stage: TrainedModel, sample: ml_collections.ConfigDict,
          keep: int) -> tuple[_Accumulator, np.ndarray, list[bool]]:
    """Upsamples every held-out image with `stage` under `sample` settings.

    Returns the accumulated metrics, the first `keep` outputs and the solver's per-image ok flags.
    """
    fs_graphdef, fs_params = nnx.split(stage.first_stage)

    def upsample(params, images, fs_params, key):
      _, pred, solution = upsample_held_out(stage.graphdef, params,
                                            nnx.merge(fs_graphdef, fs_params), stage.config,
                                            sample, images, key)
      return pred, solution.nfe, solution.ok

    # The outputs stay split over the devices as the batch is; the host gathers them.
    step_fn = jax.jit(upsample,
                      in_shardings=(self.replicated, self.batch, self.replicated, self.replicated),
                      out_shardings=(self.batch, self.replicated, self.replicated))
    acc, kept, oks = _Accumulator(), [], []
    key = jax.random.key(self.config.eval.seed)
    for start, n, images in self._batches():
      pred, nfe, ok = sharding.to_host(step_fn(stage.params, images, fs_params,
                                               jax.random.fold_in(key, start)))
      pred = pred[:n]
      measured = jax.device_get(self._measure(pred, self.images[start:start + n]))
      acc.add({**measured, 'nfe': np.full((n,), float(nfe))}, self.features(pred, start), pred)
      oks.extend([bool(ok)] * n)
      if sum(len(k) for k in kept) < keep:
        kept.append(pred)
    kept = np.concatenate(kept)[:keep] if kept else self.images[:0]
    return acc, kept, oks

  def low_res(self, images: np.ndarray, method: str) -> np.ndarray:
    """The low-res inputs of held-out images, brought back to their size by `method`."""
    low = upsampling.low_res_images(jnp.asarray(images), self.config.data.low_res_size)
    return np.asarray(upsampling.resize(low, images.shape[1:3], method))

  def references(self) -> tuple[_Accumulator, _Accumulator]:
    """The ground truth's features and spectrum, and the bilinear baseline's metrics."""
    truth, bilinear = _Accumulator(), _Accumulator()
    for start in range(0, len(self.images), self.batch_size):
      target = self.images[start:start + self.batch_size]
      truth.add({}, self.features(target, start), target)
      pred = self.low_res(target, 'linear')
      bilinear.add(jax.device_get(self._measure(pred, target)), self.features(pred, start), pred)
    return truth, bilinear

  def summarise(self, acc: _Accumulator, truth: _Accumulator) -> dict[str, float]:
    row = acc.mean_scores()
    row.update(metrics.spectral_detail(acc.spectrum(), truth.spectrum(),
                                       self.config.data.low_res_size))
    if self.inception is not None:
      row['fid'] = metrics.fid(truth.all_features('full'), acc.all_features('full'))
      row['pfid'] = metrics.fid(truth.all_features('crops'), acc.all_features('crops'))
    return row


# ----------------------------------------------------------------------------- outputs


def _cell(row: dict[str, Any], key: str, fmt: str) -> str:
  if key in ('fid', 'pfid') and key not in row:
    return f'needs `{FID_FLAG}`'
  if key not in row:
    return '–'
  return fmt.format(row[key])


def markdown(results: dict[str, Any]) -> str:
  r = results
  lines = [
      f"Held-out images: {r['num_images']} of {r['image_size']} px from {r['low_res_size']} px "
      f"({r['data']}); flows sampled with {r['solver']} ({r['sample_setting']}), "
      'regression with its one step; checkpoints: ' +
      ', '.join(f"{x['method']} = {x['checkpoint']} (step {x['step']})"
                for x in r['rows'] if x['checkpoint']) + '.',
      '',
      '| method | ' + ' | '.join(h for _, h, _ in COLUMNS) + ' |',
      '|---|' + '---:|' * len(COLUMNS),
  ]
  for row in r['rows']:
    lines.append(f"| {row['method']} | " +
                 ' | '.join(_cell(row, k, f) for k, _, f in COLUMNS) + ' |')
  lines += ['', 'SSIM, PSNR: higher is better; FID, p-FID, MSE, spectral distance: lower is '
            'better; '
            'HF energy: power above the low-res Nyquist frequency relative to the ground truth '
            '(negative = blurrier, positive = more high-frequency detail than the ground truth).']
  if r['nfe_sweep']:
    nfes = r['nfe_sweep_nfe']
    lines += ['', f'NFE sweep (Euler, {r["num_images"]} images):', '',
              '| method | metric | ' + ' | '.join(str(n) for n in nfes) + ' |',
              '|---|---|' + '---:|' * len(nfes)]
    for method, sweep in r['nfe_sweep'].items():
      for key, header, fmt in COLUMNS[:-1]:
        if key in sweep[0]:
          lines.append(f'| {method} | {header} | ' +
                       ' | '.join(fmt.format(s[key]) for s in sweep) + ' |')
  return '\n'.join(lines) + '\n'


def sweep_plot(results: dict[str, Any], path: str) -> None:
  """Metric against NFE for every flow; bilinear and regression rows as horizontal lines."""
  import matplotlib  # noqa: PLC0415
  matplotlib.use('Agg')
  import matplotlib.pyplot as plt  # noqa: PLC0415

  keys = [k for k in ('fid', 'pfid', 'psnr', 'ssim', 'spectral_distance')
          if k in results['rows'][0]]
  headers = {k: h for k, h, _ in COLUMNS}
  fig, axes = plt.subplots(1, len(keys), figsize=(3.6 * len(keys), 3.2), squeeze=False)
  nfes = results['nfe_sweep_nfe']
  colors = iter(plt.rcParams['axes.prop_cycle'].by_key()['color'] * 4)
  color = {r['method']: 'black' if r['method'] == 'bilinear' else next(colors)
           for r in results['rows']}
  for ax, key in zip(axes[0], keys):
    for method, sweep in results['nfe_sweep'].items():
      ax.plot(nfes, [s[key] for s in sweep], marker='o', color=color[method], label=method)
    for row in results['rows']:
      if row['method'] not in results['nfe_sweep']:
        ax.axhline(row[key], linestyle='--', linewidth=1, color=color[row['method']],
                   label=row['method'])
    ax.set_xscale('log')
    ax.set_xticks(nfes, [str(n) for n in nfes])
    ax.set_xlabel('NFE (Euler)')
    ax.set_title(headers[key])
  axes[0][0].legend(fontsize=8)
  fig.tight_layout()
  buffer = io.BytesIO()
  fig.savefig(buffer, dpi=120, format='png')
  storage.path(path).write_bytes(buffer.getvalue())
  plt.close(fig)


def _enlarge(image: np.ndarray, factor: int) -> np.ndarray:
  return np.repeat(np.repeat(image, factor, axis=0), factor, axis=1)


def crops_figure(columns: list[tuple[str, np.ndarray]], boxes: np.ndarray, crop_size: int,
                 path: str, min_cell: int = 128) -> None:
  """Per image two rows: the full images of every column (the crop box outlined), then the same
  crop of each, zoomed to the full size. Small images are enlarged (nearest) to `min_cell` px."""
  size = columns[0][1].shape[1]
  scale = max(1, min_cell // size)
  cell = size * scale
  header = 16
  rows = []
  for i in range(len(columns[0][1])):
    top, left = boxes[i, 0]
    full = [np.array(metrics.to_uint8(c[i])) for _, c in columns]
    zoomed = [_enlarge(f[top:top + crop_size, left:left + crop_size], cell // crop_size)
              for f in full]
    zoomed = [np.pad(z, ((0, cell - z.shape[0]), (0, cell - z.shape[1]), (0, 0))) for z in zoomed]
    full = [_enlarge(f, scale) for f in full]
    y, x, c = top * scale, left * scale, crop_size * scale
    for f in full:  # Outline the crop.
      f[y, x:x + c] = f[y + c - 1, x:x + c] = 255
      f[y:y + c, x] = f[y:y + c, x + c - 1] = 255
    rows += [np.concatenate(full, axis=1), np.concatenate(zoomed, axis=1)]
  body = np.concatenate(rows, axis=0)
  canvas = Image.new('RGB', (body.shape[1], body.shape[0] + header), 'white')
  canvas.paste(Image.fromarray(body), (0, header))
  draw = ImageDraw.Draw(canvas)
  for j, (name, _) in enumerate(columns):
    draw.text((j * cell + 3, 2), name, fill='black')
  images_lib.write_png(path, canvas)


# ----------------------------------------------------------------------------- the mode


def evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict[str, Any]:
  """Evaluates the models of `config.eval.checkpoints` (default: `workdir`) on the held-out
  images; writes WORKDIR/eval/{results.md, results.json, nfe_sweep.png, figure.png}."""
  config_checks.check(config, 'evaluate')
  # Every process reads the held-out images and upsamples its devices' share of each batch;
  # process 0 writes the tables and figures.
  sharding.check_same_in_all_processes(config.data.to_dict(), '--config.data')
  writer = sharding.is_writer()
  mesh = sharding.make_mesh(config.mesh)
  paths = list(config.eval.checkpoints) or [workdir]
  stages = [load(path, sample=config.sample, first_stage_weights=config.first_stage.weights,
                 mesh=mesh) for path in paths]
  for stage in stages:
    _check_compatible(stage, config)
  outdir = storage.join(workdir, 'eval')
  # The held-out images of --config.data, read as the first checkpoint's first stage and flow
  # expect (precomputed latents are checked against what that checkpoint was trained with).
  data_config = ml_collections.ConfigDict(stages[0].config.to_dict())
  data_config.data = ml_collections.ConfigDict(config.data.to_dict())
  images = input_pipeline.validation_images(data_config)
  evaluator = Evaluator(config, images, mesh)
  keep = min(config.eval.num_figure_images, len(images))

  truth, bilinear = evaluator.references()
  rows = [{'method': 'bilinear', 'checkpoint': '', 'step': None,
           **evaluator.summarise(bilinear, truth)}]
  figure_columns = [('low-res', evaluator.low_res(images[:keep], 'nearest')),
                    ('bilinear', evaluator.low_res(images[:keep], 'linear'))]
  taken: set[str] = set()
  sweeps, failed = {}, 0
  for stage in stages:
    label = _label(stage, taken)
    if writer:
      print(f'evaluating {label} ({stage.path}, step {stage.step})', file=sys.stderr, flush=True)
    acc, kept, oks = evaluator.run(stage, stage.sample, keep)
    failed += oks.count(False)
    row = {'method': label, 'checkpoint': stage.path, 'step': stage.step,
           **evaluator.summarise(acc, truth)}
    rows.append(row)
    figure_columns.append((label, kept))
    if stage.objective.is_flow:
      sweep = []
      for nfe in config.eval.nfe_sweep:
        if (stage.sample.solver, stage.sample.nfe) == ('euler', nfe):
          sweep.append({k: v for k, v in row.items() if k not in ('method', 'checkpoint', 'step')})
          continue
        sample = ml_collections.ConfigDict(stage.sample.to_dict())
        sample.solver, sample.nfe = 'euler', nfe
        swept, _, oks = evaluator.run(stage, sample, 0)
        failed += oks.count(False)
        sweep.append(evaluator.summarise(swept, truth))
      sweeps[label] = sweep
  figure_columns.append(('ground truth', images[:keep]))

  sample = config.sample
  results = {
      'num_images': len(images), 'image_size': images.shape[1],
      'low_res_size': config.data.low_res_size,
      'data': config.data.source + (f' {config.data.path}' if config.data.path else ''),
      'solver': sample.solver,
      'sample_setting': (f'rtol={sample.rtol}, atol={sample.atol}' if sample.solver == 'dopri5'
                         else f'{sample.nfe} NFE'),
      'seed': config.eval.seed, 'crop_size': config.eval.crop_size,
      'num_crops': config.eval.num_crops,
      'inception_weights': config.eval.inception_weights or None,
      'rows': rows,
      'nfe_sweep_nfe': list(config.eval.nfe_sweep), 'nfe_sweep': sweeps,
  }
  if not writer:
    return results
  storage.path(outdir).mkdir(parents=True, exist_ok=True)
  storage.path(storage.join(outdir, 'results.json')).write_text(json.dumps(results, indent=2))
  table = markdown(results)
  storage.path(storage.join(outdir, 'results.md')).write_text(table)
  if sweeps:
    sweep_plot(results, storage.join(outdir, 'nfe_sweep.png'))
  crops_figure(figure_columns, evaluator.boxes, config.eval.crop_size,
               storage.join(outdir, 'figure.png'))
  if failed:
    print(f'warning: the solver stopped before t=1 for {failed} images; raise '
          'config.sample.max_steps or loosen rtol/atol.', file=sys.stderr)
  print(table)
  print(f'Wrote {outdir}/results.md, results.json, figure.png'
        + (', nfe_sweep.png' if sweeps else '') + '.')
  return results
