"""What the networks compute with on each backend: compute dtypes, the convolution and attention
implementations, and the `auto` setting that picks the measured fastest one per backend.
"""

from __future__ import annotations

import contextlib
import contextvars
from collections.abc import Iterator

import jax
import jax.numpy as jnp
from absl import logging

from fmboost_jax.errors import UserError
from fmboost_jax.models.layers import conv_as_matmul

Array = jax.Array

DTYPES = {'float32': jnp.float32, 'bfloat16': jnp.bfloat16}
CONV_IMPLS = {'xla': jax.lax.conv_general_dilated, 'matmul': conv_as_matmul}
# Attention: 'xla', or 'cudnn' (cuDNN's fused attention: NVIDIA GPUs, bfloat16 compute, head_dim a
# multiple of 8 up to 128); 'auto' resolves to 'cudnn_or_xla' on GPUs: cuDNN where it applies, else
# XLA's.
AUTO = 'auto'
KNOWN_BACKENDS = ('cpu', 'gpu', 'tpu')
_TARGET = contextvars.ContextVar('fmboost_jax_target_platform', default=None)


def platform() -> str:
  """The backend the programs being built will run on: JAX's default backend, or inside
  `compiling_for(p)` the platform of the devices they are compiled for (`--mode=compile`)."""
  return _TARGET.get() or jax.default_backend()


@contextlib.contextmanager
def compiling_for(target_platform: str) -> Iterator[None]:
  """Networks built and programs compiled inside make the choices of `target_platform` ('tpu',
  'gpu'), whatever the machine that compiles them runs on."""
  token = _TARGET.set(target_platform)
  try:
    yield
  finally:
    _TARGET.reset(token)


def backend_settings(backend: str, *, compute_dtype: str, conv_impl: str, attention_impl: str,
                     head_dim: int) -> dict[str, str]:
  """The concrete compute dtype, convolution and attention for `backend` ('cpu', 'gpu', 'tpu'),
  replacing each 'auto' by the fastest choice (measured on CPUs, docs/benchmarks.md; on GPUs and
  TPUs the established practice, not yet measured by this project): bfloat16 compute with
  float32 master weights on GPUs and TPUs, float32 on CPUs; convolutions as matrix products on CPUs
  (the UNet-base step: 4.78 s against XLA's 9.57 s), XLA's elsewhere; cuDNN attention on GPUs when
  computing in bfloat16 with a head_dim cuDNN takes, XLA's elsewhere. Another backend gets float32,
  XLA's convolutions and XLA's attention. Settings other than 'auto' are kept."""
  known = backend in KNOWN_BACKENDS
  if compute_dtype == AUTO:
    compute_dtype = 'bfloat16' if backend in ('gpu', 'tpu') else 'float32'
  if conv_impl == AUTO:
    conv_impl = 'matmul' if backend == 'cpu' else 'xla'
  if attention_impl == AUTO:
    cudnn = (known and backend == 'gpu' and compute_dtype == 'bfloat16'
             and head_dim % 8 == 0 and head_dim <= 128)
    attention_impl = 'cudnn_or_xla' if cudnn else 'xla'
  return {'compute_dtype': compute_dtype, 'conv_impl': conv_impl, 'attention_impl': attention_impl}


def check_backend(backend: str, *, compute_dtype: str = AUTO, conv_impl: str = AUTO,
                  attention_impl: str = AUTO, head_dim: int = 64, **unused) -> str:
  """Raises UserError when the settings cannot run on `backend`; returns one line naming the
  settings the network will use there (for the log)."""
  del unused
  s = backend_settings(backend, compute_dtype=compute_dtype, conv_impl=conv_impl,
                       attention_impl=attention_impl, head_dim=head_dim)
  if attention_impl == 'cudnn' and (backend != 'gpu' or s['compute_dtype'] != 'bfloat16'):
    raise UserError(
        f"config.model.attention_impl='cudnn' needs an NVIDIA GPU and bfloat16 compute (here: "
        f"{backend}, {s['compute_dtype']}); set --config.model.attention_impl=auto (cuDNN where it "
        "applies, else XLA) or xla.")
  attention = s['attention_impl'].replace('cudnn_or_xla', 'cudnn (XLA where it cannot run)')
  line = (f"UNet on {backend}: compute {s['compute_dtype']}, convolutions {s['conv_impl']}, "
          f"attention {attention}")
  if backend not in KNOWN_BACKENDS and AUTO in (compute_dtype, conv_impl, attention_impl):
    line += f" (auto settings on the unknown backend {backend!r}: the portable defaults)"
  return line + '.'


def compiler_options(backend: str, cpu_options) -> dict[str, str] | None:
  """XLA's compiler options for a program compiled for `backend`: the (name, value) pairs of
  config.train.cpu_compiler_options on CPUs, none elsewhere."""
  if backend != 'cpu' or not cpu_options:
    return None
  return {str(name): str(value) for name, value in cpu_options}


def check_compiler_options(backend: str, cpu_options) -> None:
  """Raises UserError unless config.train.cpu_compiler_options is (name, value) pairs that this
  XLA takes (on CPUs: a trivial program is compiled with them)."""
  field = 'config.train.cpu_compiler_options'
  if not all(isinstance(p, (tuple, list)) and len(p) == 2 and isinstance(p[0], str)
             for p in cpu_options):
    raise UserError(f"{field}={tuple(cpu_options)!r} must be (name, value) pairs, e.g. "
                    "(('xla_cpu_experimental_ynn_fusion_type', ''),).")
  options = compiler_options(backend, cpu_options)
  if options:
    try:
      jax.jit(lambda x: x + 1).lower(jnp.zeros(())).compile(compiler_options=options)
    except jax.errors.JaxRuntimeError as e:
      reason = str(e).strip().splitlines()[0].removeprefix('INVALID_ARGUMENT: ')
      raise UserError(f'{field}: this XLA does not take them ({reason}); correct or remove '
                      'the option.') from None


def attention(q: Array, k: Array, v: Array, scale: float, implementation: str) -> Array:
  """Softmax attention of `[B, L, heads, head_dim]` q, k, v by `implementation`. cuDNN's shape,
  dtype and platform limits are checked while tracing: 'cudnn_or_xla' then falls back to XLA's
  attention (logged), 'cudnn' raises one UserError, both before the step runs."""
  if implementation in ('cudnn', 'cudnn_or_xla'):
    # JAX checks the cuDNN it finds installed, not the devices the program is compiled for.
    reason = f'the program is compiled for {platform()}, not an NVIDIA GPU'
    if platform() == 'gpu':
      try:
        return jax.nn.dot_product_attention(q, k, v, scale=scale, implementation='cudnn')
      except (RuntimeError, ValueError, NotImplementedError) as e:
        reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
    if implementation == 'cudnn':
      raise UserError(f"config.model.attention_impl='cudnn' cannot run here ({reason}); set "
                      '--config.model.attention_impl=auto or xla.')
    logging.log_first_n(logging.WARNING, 'cuDNN attention cannot run here (%s); using XLA '
                        'attention.', 1, reason)
  return jax.nn.dot_product_attention(q, k, v, scale=scale, implementation='xla')
