"""Test set-up, before JAX is imported: 8 fake CPU devices for in-process tests, compiled quickly
(`runs.FAST_COMPILE`), and one persistent compilation cache for the session, shared by the
`main.py` subprocesses the tests start (most of them compile the same tiny programs; the cache
roughly halves each run)."""

import atexit
import os
import shutil
import tempfile

from tests import runs  # Standard library and NumPy only: JAX is not imported yet.

os.environ['XLA_FLAGS'] = runs.xla_flags(8)
# The tests run on CPUs. requirements-dev.txt installs libtpu and the CUDA plugin for compiling
# for TPUs and GPUs (--mode=compile); without this JAX would try to start them here.
os.environ['JAX_PLATFORMS'] = 'cpu'
# Every test process imports libtpu with JAX (and --mode=compile starts it): no cloud metadata
# server is ever asked anything; a client that tried would meet a closed loopback port.
for _name, _value in (('TPU_SKIP_MDS_QUERY', '1'), ('NO_GCE_CHECK', 'True'),
                      ('GCE_METADATA_HOST', '127.0.0.1:1'), ('GCE_METADATA_ROOT', '127.0.0.1:1'),
                      ('GCE_METADATA_IP', '127.0.0.1:1')):
  os.environ[_name] = _value
os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')
if 'JAX_COMPILATION_CACHE_DIR' not in os.environ:
  _cache = tempfile.mkdtemp(prefix='fmboost_jax_test_compilation_cache_')
  atexit.register(shutil.rmtree, _cache, ignore_errors=True)
  os.environ['JAX_COMPILATION_CACHE_DIR'] = _cache
  os.environ['JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS'] = '0'


import pytest  # noqa: E402


@pytest.fixture(scope='session')
def tiny_cfm_workdir(tmp_path_factory) -> str:
  """A pixel-space CFM checkpoint of `configs/demo.py:tiny` (8 -> 16 px, 2 steps, the EMA started
  after step 1, so that its EMA and online weights differ), trained once per session for the tests
  that sample or evaluate (they must not write into it)."""
  return runs.train_tiny(tmp_path_factory.mktemp('tiny_cfm') / 'workdir', ema__start_step=1)


# The heaviest test files, heaviest first (seconds per file in a whole-suite run with 2 workers,
# 2026-12-05, after the changes of that day: about 400, 378, 371, 281, 275, 263, 190, 92, 84, 77,
# 74). They start first, so that no worker is left with a six-minute file while the other has
# finished (xdist's own order puts the files with the most tests first, which started the demo and
# the paper rehearsal last).
HEAVIEST_FIRST = ('test_compile.py', 'test_demo.py', 'test_paper_workflow.py', 'test_sample.py',
                  'test_buckets.py', 'test_train.py', 'test_multiprocess.py', 'test_evaluate.py',
                  'test_benchmark_scripts.py', 'test_latent_training.py',
                  'test_multiprocess_modes.py', 'test_data_sources.py')


def pytest_collection_modifyitems(items):
  rank = {name: i for i, name in enumerate(HEAVIEST_FIRST)}
  items.sort(key=lambda item: rank.get(item.path.name, len(rank)))
