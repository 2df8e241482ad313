"""Test set-up: 8 fake CPU devices for in-process tests, set before JAX is imported."""

import os

os.environ['XLA_FLAGS'] = '--xla_force_host_platform_device_count=8'
os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')
