"""`main.py --mode=evaluate`: the paper's Table 2 and Fig. 5 on held-out images, from checkpoints.

  python main.py --mode=evaluate --config=configs/demo.py --workdir=workdirs/demo \
      "--config.eval.checkpoints=('workdirs/demo', 'workdirs/demo_fm', 'workdirs/demo_l2')"

Every checkpoint is a `--mode=train` workdir or an export (the EMA weights and the config they were
trained with, see `trained_model.load`; `--config.first_stage.weights`, when set,
replaces the recorded autoencoder path). The held-out images are those of
`--config.data` (`input_pipeline.validation_images`, `config.data.num_val_images` of them),
upsampled by bilinear interpolation and by every checkpoint (flows with `config.sample`'s solver
and NFE, regression with its one step) and scored by `held_out.Evaluator`, the evaluator of
training's periodic validation (PSNR, SSIM, MSE, FID and p-FID with
`--config.eval.inception_weights`, spectral distance and HF energy).

Flows are also swept over `eval.nfe_sweep` network evaluations with Euler (Fig. 5). Written to
WORKDIR/eval: results.md and results.json (`held_out.results`: Table 2 layout and the sweep),
nfe_sweep.png and figure.png (matching crops of every method). The same config and checkpoints
give the same numbers.
"""

import io
import os
import sys
from typing import Any

import ml_collections
import numpy as np
from flax import nnx
from PIL import Image, ImageDraw

from fmboost_jax import config_checks, held_out, input_pipeline, metrics, sharding, storage
from fmboost_jax import images as images_lib
from fmboost_jax.errors import UserError
from fmboost_jax.trained_model import TrainedModel, load


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


# ----------------------------------------------------------------------------- outputs


def sweep_plot(results: dict[str, Any], path: str) -> None:
  """Metric against NFE for every flow; bilinear and regression rows as horizontal lines."""
  import matplotlib  # noqa: PLC0415
  matplotlib.use('Agg')
  import matplotlib.pyplot as plt  # noqa: PLC0415

  keys = [k for k in ('fid', 'pfid', 'psnr', 'ssim', 'spectral_distance')
          if k in results['rows'][0]]
  headers = {k: h for k, h, _ in held_out.COLUMNS}
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


def _run(evaluator: held_out.Evaluator, stage: TrainedModel, sample: ml_collections.ConfigDict,
         keep: int) -> tuple[held_out.Accumulator, np.ndarray, list[bool]]:
  """`evaluator.run` of `stage` sampled with `sample`'s settings, its parameters replicated."""
  fs_graphdef, fs_params = nnx.split(stage.first_stage)
  upsample = held_out.program(stage.graphdef, fs_graphdef, stage.config, sample, stage.mesh,
                              params_sharding=sharding.replicated(stage.mesh))
  return evaluator.run(upsample, stage.params, fs_params, keep)


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
  evaluator = held_out.Evaluator(config, images, mesh, config.sample.batch_size)
  keep = min(config.eval.num_figure_images, len(images))

  rows = [evaluator.bilinear_row]
  figure_columns = [('low-res', evaluator.low_res(images[:keep], 'nearest')),
                    ('bilinear', evaluator.low_res(images[:keep], 'linear'))]
  taken: set[str] = set()
  sweeps, failed = {}, 0
  for stage in stages:
    label = _label(stage, taken)
    if writer:
      print(f'evaluating {label} ({stage.path}, step {stage.step})', file=sys.stderr, flush=True)
    acc, kept, oks = _run(evaluator, stage, stage.sample, keep)
    failed += oks.count(False)
    row = {'method': label, 'checkpoint': stage.path, 'step': stage.step,
           **evaluator.summarise(acc)}
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
        swept, _, oks = _run(evaluator, stage, sample, 0)
        failed += oks.count(False)
        sweep.append(evaluator.summarise(swept))
      sweeps[label] = sweep
  figure_columns.append(('ground truth', images[:keep]))

  results = held_out.results(config, images, rows, sweeps)
  if not writer:
    return results
  table = held_out.write(results, outdir)
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
