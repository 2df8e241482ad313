"""Test set-up, before JAX is imported: 8 fake CPU devices for in-process tests, and one persistent
compilation cache for the session, shared by the `main.py` subprocesses the tests start (most of
them compile the same tiny programs; the cache roughly halves each run)."""

import atexit
import os
import shutil
import tempfile

os.environ['XLA_FLAGS'] = '--xla_force_host_platform_device_count=8'
os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')
if 'JAX_COMPILATION_CACHE_DIR' not in os.environ:
  _cache = tempfile.mkdtemp(prefix='fmboost_jax_test_compilation_cache_')
  atexit.register(shutil.rmtree, _cache, ignore_errors=True)
  os.environ['JAX_COMPILATION_CACHE_DIR'] = _cache
  os.environ['JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS'] = '0'
