"""The library imports, trains a step and boosts without TensorFlow, tensorflow-datasets and clu (a
JAX GPU image has none of them): only the tfds source imports TensorFlow and tfds, and only the
training loop's parameter table clu."""

import json
import subprocess
import sys

import pytest

from tests import runs

SCRIPT = r'''
import importlib, importlib.abc, pkgutil, sys

BLOCKED = ('tensorflow', 'tensorflow_datasets', 'clu')


class Block(importlib.abc.MetaPathFinder):
  def find_spec(self, name, path=None, target=None):
    if name.split('.')[0] in BLOCKED:
      raise ImportError(f'{name} is hidden by this test')


sys.meta_path.insert(0, Block())
import fmboost_jax
modules = ['main'] + [m.name for m in pkgutil.walk_packages(fmboost_jax.__path__, 'fmboost_jax.')]
for name in modules:
  importlib.import_module(name)

import jax, numpy as np, optax
from flax import nnx
from configs import demo
from fmboost_jax import first_stages, sharding, train, trained_model, upsampling

config = demo.get_config('tiny')
first_stage = first_stages.IdentityFirstStage()
tx = train.make_optimizer(config.optim)
state = train.init_state(config, 3, tx, jax.random.key(0))
graphdef = trained_model.model_graphdef(config, 3)
fs_graphdef, fs_params = nnx.split(first_stage)
batch = {'image': np.random.default_rng(0).uniform(-1, 1, (8, 16, 16, 3)).astype(np.float32)}
step = jax.jit(lambda s, b, f: train.train_step(s, b, f, jax.random.key(1), graphdef=graphdef,
                                                first_stage_graphdef=fs_graphdef, tx=tx,
                                                config=config))
state, measured = step(state, batch, fs_params)
mesh = sharding.data_mesh()
model = trained_model.TrainedModel(path='', step=1, config=config, sample=config.sample,
                                   first_stage=first_stage, graphdef=graphdef,
                                   params=state.ema_params, mesh=mesh)
out = model.boost(np.zeros((8, 8, 3), np.uint8), output_type='np')
hidden = sorted({m.split('.')[0] for m in sys.modules} & set(BLOCKED))
import json

import pytest
finite = bool(np.isfinite(measured['loss']))
print(json.dumps([len(modules), int(state.step), finite, out.shape, hidden]))
'''


@pytest.mark.slow
def test_modules_import_train_a_step_and_boost_without_tensorflow_and_clu():
  proc = subprocess.run([sys.executable, '-c', SCRIPT], cwd=runs.ROOT, env=runs.env(2),
                        capture_output=True, text=True, timeout=300)
  assert proc.returncode == 0, proc.stderr[-3000:]
  count, step, finite, shape, hidden = json.loads(proc.stdout.strip().splitlines()[-1])
  assert count >= 20  # main and every module of the package.
  assert (step, finite, shape, hidden) == (1, True, [1, 16, 16, 3], [])
