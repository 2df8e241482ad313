"""The held-out evaluation: training's periodic validation and `--mode=evaluate` both run it.

Every held-out image [S, S, 3] is downsized to `low_res_size` and upsampled back by bilinear
interpolation and by a model, whose outputs are compared with the ground truth:

  PSNR, SSIM, MSE          per image, averaged (metrics.py), in the compiled program;
  FID, p-FID               Inception pool features of the full images and of `eval.num_crops`
                           random `eval.crop_size` crops per image, the same boxes for the real and
                           the generated images (reference 6.1), with `eval.inception_weights`;
  spectral distance, HF    the radially averaged power spectra against the ground truth's
  energy                   (metrics.spectral_detail).

A model's upsampling is one compiled program (`program`) on the run's mesh: the images are split
over the devices, and so are its per-image outputs (nothing is gathered on the devices; the host
collects them). The sampler settings are its argument. `results` and `markdown` are the one
results format (results.json, results.md) of both modes: a row per method (bilinear first), and
for --mode=evaluate the NFE sweep.
"""

import functools
import json
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import nnx

from fmboost_jax import data_sources, metrics, sharding, storage, upsampling, weights
from fmboost_jax.trained_model import upsample_held_out

FID_FLAG = '--config.eval.inception_weights'
COLUMNS = (  # (key, header, format); FID columns first as in the paper's Table 2.
    ('fid', 'FID', '{:.2f}'), ('pfid', 'p-FID', '{:.2f}'), ('ssim', 'SSIM', '{:.4f}'),
    ('psnr', 'PSNR (dB)', '{:.2f}'), ('mse', 'MSE', '{:.5f}'),
    ('spectral_distance', 'spectral dist.', '{:.3f}'), ('hf_energy_db', 'HF energy (dB)',
                                                         '{:+.2f}'),
    ('nfe', 'NFE', '{:.0f}'))


# ----------------------------------------------------------------------------- the program


def upsample_and_score(graphdef: nnx.GraphDef, params, first_stage,
                       config: ml_collections.ConfigDict, sample: ml_collections.ConfigDict,
                       images: jax.Array, key: jax.Array) -> dict[str, jax.Array]:
  """Held-out images [B, S, S, 3] -> {'model': the model's [B, S, S, 3], and per image [B]:
  'psnr', 'ssim', 'mse', 'nfe', 'ok' (the solver reached t=1)}, the model trained with `config`
  and sampled with `sample`'s settings; a pure function to jit."""
  _, pred, solution = upsample_held_out(graphdef, params, first_stage, config, sample, images, key)
  per_image = lambda x: jnp.broadcast_to(x, images.shape[:1])
  return {'model': pred, 'psnr': metrics.psnr(pred, images), 'ssim': metrics.ssim(pred, images),
          'mse': metrics.mse(pred, images), 'nfe': per_image(solution.nfe.astype(jnp.float32)),
          'ok': per_image(solution.ok)}


def program(graphdef: nnx.GraphDef, first_stage_graphdef: nnx.GraphDef,
            config: ml_collections.ConfigDict, sample: ml_collections.ConfigDict,
            mesh: jax.sharding.Mesh, params_sharding=None) -> jax.stages.Wrapped:
  """`upsample_and_score` jitted on `mesh`: (params, images, first-stage params, key) -> its
  dict, the images and every output split over the devices as a batch is; the parameters laid
  out by `params_sharding` (None: as they come, e.g. the training state's)."""
  batch, replicated = sharding.batch_sharded(mesh), sharding.replicated(mesh)

  def fn(params, images, first_stage_params, key):
    first_stage = nnx.merge(first_stage_graphdef, first_stage_params)
    return upsample_and_score(graphdef, params, first_stage, config, sample, images, key)

  # Per-image scores and images stay split over the devices as the batch is (replicated, a
  # batch of 1024 px outputs would sit whole on every device); the host gathers them.
  return jax.jit(fn, in_shardings=(params_sharding, batch, replicated, replicated),
                 out_shardings=batch)


# ----------------------------------------------------------------------------- accumulating


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


class Accumulator:
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
  """Upsamples the held-out images with bilinear interpolation and with models, and summarises
  each method's outputs as a row of the results.

  `batch_size` images go through a program at a time (the last batch padded), every process
  placing its devices' share; every process gets the scores.
  """

  def __init__(self, config: ml_collections.ConfigDict, images: np.ndarray,
               mesh: jax.sharding.Mesh, batch_size: int):
    self.config = config
    self.images = images
    self.batch = sharding.batch_sharded(mesh)
    self.batch_size = sharding.round_up(max(batch_size, 1), mesh.devices.size)
    self.inception = (weights.inception_from_weights(config.eval.inception_weights)
                      if config.eval.inception_weights else None)
    self._measure = jax.jit(lambda pred, target: {
        'psnr': metrics.psnr(pred, target), 'ssim': metrics.ssim(pred, target),
        'mse': metrics.mse(pred, target)})

  @functools.cached_property
  def boxes(self) -> np.ndarray:
    """The crop boxes [N, num_crops, 2] of p-FID and of --mode=evaluate's figure."""
    size = self.images.shape[1]
    return metrics.crop_boxes(self.config.eval.seed, len(self.images), size, size,
                              self.config.eval.crop_size, self.config.eval.num_crops)

  def _batches(self):
    """(start, n, padded global batch) over the held-out images, padded to fill every device."""
    for start in range(0, len(self.images), self.batch_size):
      chunk = self.images[start:start + self.batch_size]
      padded = sharding.pad_batch(chunk, self.batch_size)
      yield start, len(chunk), sharding.put(padded, self.batch)  # Each process places its share.

  def features(self, images: np.ndarray, start: int) -> dict[str, np.ndarray]:
    """Inception features of images [n, S, S, 3] (held-out indices start .. start + n) and of
    their crop boxes; empty without Inception weights."""
    if self.inception is None:
      return {}
    boxes = self.boxes[start:start + len(images)]
    crops = metrics.crops(images, boxes, self.config.eval.crop_size)
    return {'full': inception_features(self.inception, images, self.batch_size),
            'crops': inception_features(self.inception, crops, self.batch_size)}

  def run(self, upsample: jax.stages.Wrapped, params, first_stage_params,
          keep: int) -> tuple[Accumulator, np.ndarray, list[bool]]:
    """Upsamples every held-out image with `upsample` (a `program`) and the model's `params`.

    Returns the accumulated metrics, the first `keep` outputs and the solver's per-image ok flags.
    Batch b starting at image i draws its noise from fold_in(key(config.eval.seed), i).
    """
    acc, kept, oks = Accumulator(), [], []
    key = jax.random.key(self.config.eval.seed)
    for start, n, images in self._batches():
      out = sharding.to_host(upsample(params, images, first_stage_params,
                                      jax.random.fold_in(key, start)))
      out = {k: v[:n] for k, v in out.items()}
      pred = out.pop('model')
      oks.extend(bool(ok) for ok in out.pop('ok'))
      acc.add(out, self.features(pred, start), pred)
      if sum(len(k) for k in kept) < keep:
        kept.append(pred)
    kept = np.concatenate(kept)[:keep] if kept else self.images[:0]
    return acc, kept, oks

  def low_res(self, images: np.ndarray, method: str) -> np.ndarray:
    """The low-res inputs of held-out images, brought back to their size by `method`."""
    low = upsampling.low_res_images(jnp.asarray(images), self.config.data.low_res_size)
    return np.asarray(upsampling.resize(low, images.shape[1:3], method))

  @functools.cached_property
  def references(self) -> tuple[Accumulator, Accumulator]:
    """The ground truth's features and spectrum, and the bilinear baseline's metrics."""
    truth, bilinear = Accumulator(), Accumulator()
    for start in range(0, len(self.images), self.batch_size):
      target = self.images[start:start + self.batch_size]
      truth.add({}, self.features(target, start), target)
      pred = self.low_res(target, 'linear')
      bilinear.add(jax.device_get(self._measure(pred, target)), self.features(pred, start), pred)
    return truth, bilinear

  def summarise(self, acc: Accumulator) -> dict[str, float]:
    """A method's row: its mean scores, spectral detail and (with Inception weights) FIDs."""
    truth, _ = self.references
    row = acc.mean_scores()
    row.update(metrics.spectral_detail(acc.spectrum(), truth.spectrum(),
                                       self.config.data.low_res_size))
    if self.inception is not None:
      row['fid'] = metrics.fid(truth.all_features('full'), acc.all_features('full'))
      row['pfid'] = metrics.fid(truth.all_features('crops'), acc.all_features('crops'))
    return row

  @functools.cached_property
  def bilinear_row(self) -> dict[str, Any]:
    """The results' first row, bilinear interpolation's."""
    return {'method': 'bilinear', 'checkpoint': '', 'step': None,
            **self.summarise(self.references[1])}


# ----------------------------------------------------------------------------- results


def results(config: ml_collections.ConfigDict, images: np.ndarray, rows: list[dict[str, Any]],
            sweeps: dict[str, list[dict[str, float]]] | None = None) -> dict[str, Any]:
  """The results of both modes: the setting, the rows (bilinear first) and the NFE sweep."""
  sample = config.sample
  return {
      'num_images': len(images), 'image_size': images.shape[1],
      'low_res_size': config.data.low_res_size,
      'data': data_sources.held_out_description(config),
      'solver': sample.solver,
      'sample_setting': (f'rtol={sample.rtol}, atol={sample.atol}' if sample.solver == 'dopri5'
                         else f'{sample.nfe} NFE'),
      'seed': config.eval.seed, 'crop_size': config.eval.crop_size,
      'num_crops': config.eval.num_crops,
      'inception_weights': config.eval.inception_weights or None,
      'rows': rows,
      'nfe_sweep_nfe': [] if sweeps is None else list(config.eval.nfe_sweep),
      'nfe_sweep': sweeps or {},
  }


def _cell(row: dict[str, Any], key: str, fmt: str) -> str:
  if key in ('fid', 'pfid') and key not in row:
    return f'needs `{FID_FLAG}`'
  if key not in row:
    return '–'
  return fmt.format(row[key])


def markdown(results: dict[str, Any]) -> str:
  """results.md: the setting, the table (the paper's Table 2 layout) and the NFE sweep."""
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


def write(results: dict[str, Any], outdir: str) -> str:
  """Writes OUTDIR/results.json and results.md; returns the markdown."""
  storage.path(outdir).mkdir(parents=True, exist_ok=True)
  storage.path(storage.join(outdir, 'results.json')).write_text(json.dumps(results, indent=2))
  table = markdown(results)
  storage.path(storage.join(outdir, 'results.md')).write_text(table)
  return table
