"""The accelerators this project plans for: each device kind's memory and peak rate, and the
compile targets (`--mode=compile --config.compile.target=T`) that stand for a TPU slice or a set
of NVIDIA GPUs on a machine that has neither.

A target is a libtpu topology name (`v5e:4x4`, `v5p:2x2x2`, `v6e:8x8`: the chips of a slice) or
`<gpu>:<per host>[x<hosts>]` (`h100:8` is one host of 8 GPUs, `h200:8x4` four such hosts). Its
devices come from `jax.experimental.topologies`: libtpu describes TPU slices itself; NVIDIA GPUs
are described by an XLA `GpuTargetConfig` written in this folder's `gpu_targets/` from the GPUs'
public specifications. Programs compiled for them are the programs the target would run, compiled
by XLA's own TPU and GPU compilers.
"""

import dataclasses
import importlib.metadata
import math
import os
import re

from fmboost_jax.errors import UserError

GiB = 2**30
GB = 10**9


@dataclasses.dataclass(frozen=True)
class DeviceKind:
  """One device as JAX sees it (`jax.Device.device_kind`): a TPU chip or one GPU."""
  name: str  # Ours, as in targets: 'v5e', 'h100'.
  device_kind: str  # What JAX reports on the hardware.
  platform: str  # 'tpu' or 'gpu' (the backend name the networks' `auto` settings read).
  hbm_bytes: int
  peak_bf16_flops: float  # Dense (no sparsity) bfloat16 matrix rate, FLOP/s.
  source: str


# Each number from the vendor's public page or datasheet named in `source`.
DEVICE_KINDS = (
    DeviceKind('v4', 'TPU v4', 'tpu', 32 * GiB, 275e12,
               'cloud.google.com/tpu/docs/v4: 32 GiB HBM2, 275 TFLOP/s bf16 per chip'),
    DeviceKind('v5e', 'TPU v5 lite', 'tpu', 16 * GiB, 197e12,
               'cloud.google.com/tpu/docs/v5e: 16 GiB HBM2, 197 TFLOP/s bf16 per chip'),
    DeviceKind('v5p', 'TPU v5', 'tpu', 95 * GiB, 459e12,
               'cloud.google.com/tpu/docs/v5p: 95 GiB HBM2e, 459 TFLOP/s bf16 per chip'),
    DeviceKind('v6e', 'TPU v6 lite', 'tpu', 32 * GiB, 918e12,
               'cloud.google.com/tpu/docs/v6e: 32 GiB HBM, 918 TFLOP/s bf16 per chip'),
    DeviceKind('a100', 'NVIDIA A100-SXM4-80GB', 'gpu', 80 * GB, 312e12,
               'NVIDIA A100 datasheet: 80 GB HBM2e, 312 TFLOP/s dense bf16 (SXM)'),
    DeviceKind('h100', 'NVIDIA H100 80GB HBM3', 'gpu', 80 * GB, 989.4e12,
               'NVIDIA H100 datasheet: 80 GB HBM3, 989 TFLOP/s dense bf16 (SXM; 1,979 sparse)'),
    DeviceKind('h200', 'NVIDIA H200', 'gpu', 141 * GB, 989.4e12,
               'NVIDIA H200 datasheet: 141 GB HBM3e, 989 TFLOP/s dense bf16 (SXM; 1,979 sparse)'),
)
_BY_NAME = {k.name: k for k in DEVICE_KINDS}
TPU_KINDS = tuple(k.name for k in DEVICE_KINDS if k.platform == 'tpu' and k.name != 'v4')
GPU_KINDS = tuple(k.name for k in DEVICE_KINDS if k.platform == 'gpu')
GPU_TARGET_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), 'gpu_targets')
GPU_TARGET_FILES = {'a100': 'a100_80gb.txtpb', 'h100': 'h100_sxm.txtpb', 'h200': 'h200_sxm.txtpb'}
EXAMPLES = 'v5e:2x2, v5e:4x4, v5p:2x2x2, v6e:8x8, h100:8, h200:8x4, a100:8'
# The installs that match the jax in use (jax[tpu] brings the libtpu of its release), read from
# its metadata: this module loads before jax (prepare_compile_environment).
_JAX_VERSION = importlib.metadata.version('jax')
TPU_INSTALL = f'pip install "jax[tpu]=={_JAX_VERSION}"'
GPU_INSTALL = f'pip install "jax[cuda13]=={_JAX_VERSION}"'


# XLA options for compiling without the device. XLA's GPU compiler picks the tiles of its Triton
# matrix-product kernels by autotuning on the GPU; without one it fails on some float32 products
# (those of jax.image.resize at 1024 -> 512 px among them: "Couldn't find output tile sizes"), so
# deviceless GPU compiles use cuBLAS for them. TPU compiles need nothing.
DEVICELESS_COMPILER_OPTIONS = {'gpu': {'xla_gpu_enable_triton_gemm': False}, 'tpu': None}


def device_kind(jax_device_kind: str) -> DeviceKind | None:
  """The table's entry for a device kind as JAX reports it (None for CPUs and unknown kinds)."""
  for k in DEVICE_KINDS:
    if jax_device_kind == k.device_kind or jax_device_kind.startswith(k.device_kind + ' '):
      return k
  return None


@dataclasses.dataclass(frozen=True)
class Target:
  """A compile target: `num_devices` devices of `kind` on `num_hosts` hosts."""
  name: str  # As given: 'v5e:4x4', 'h100:8'.
  kind: DeviceKind
  shape: tuple[int, ...]  # TPU: the chips' grid; GPU: (per host, hosts).

  @property
  def num_devices(self) -> int:
    return math.prod(self.shape)

  @property
  def file_name(self) -> str:
    return self.name.replace(':', '_')


def parse_target(name: str) -> Target:
  """'v5e:4x4' -> Target; an unknown or malformed name is one UserError listing the known ones."""
  match = re.fullmatch(r'([a-z0-9]+):(\d+(?:x\d+)*)', name.strip().lower())
  kind = _BY_NAME.get(match[1]) if match else None
  shape = tuple(int(s) for s in match[2].split('x')) if match else ()
  dims = {'v5e': 2, 'v6e': 2, 'v5p': 3}.get(kind.name) if kind else None
  well_formed = kind is not None and all(shape) and (
      len(shape) == dims if kind.platform == 'tpu' else len(shape) in (1, 2))
  if kind is None or kind.name not in TPU_KINDS + GPU_KINDS or not well_formed:
    raise UserError(
        f'config.compile.target={name!r} is not a known target; use a TPU slice '
        f'({", ".join(TPU_KINDS)}: the chip grid, e.g. v5e:4x4, v5p:2x2x2) or NVIDIA GPUs '
        f'({", ".join(GPU_KINDS)}: GPUs per host [x hosts], e.g. h100:8, h200:8x4); e.g. '
        f'{EXAMPLES}.')
  if kind.platform == 'gpu' and len(shape) == 1:
    shape = (shape[0], 1)
  return Target(name=name.strip().lower(), kind=kind, shape=shape)


def prepare_compile_environment() -> None:
  """Environment for compiling for a target on a machine without it, set before JAX, libtpu and
  equinox load: JAX keeps its CPU backend; libtpu never asks a metadata server what it runs on
  (nor warns that it cannot); compiles run beside each other (or beside a job using the chips:
  compiling touches no chip) without libtpu's one-process lock file; equinox's run-time checks
  (in diffrax's solves) turn into NaNs instead of host callbacks, which a GPU program compiled
  without its GPU cannot lower."""
  for name, value in (('JAX_PLATFORMS', 'cpu'), ('TPU_SKIP_MDS_QUERY', '1'),
                      ('EQX_ON_ERROR', 'nan'),
                      ('ALLOW_MULTIPLE_LIBTPU_LOAD', '1'),
                      ('TPU_ACCELERATOR_TYPE', 'v5litepod-4'),
                      ('TPU_WORKER_HOSTNAMES', 'localhost'),
                      ('JAX_SKIP_CUDA_CONSTRAINTS_CHECK', '1')):
    os.environ.setdefault(name, value)


def target_devices(target: Target) -> list:
  """The target's devices as `jax.experimental.topologies` describes them (no hardware needed),
  ordered by process then id; a missing libtpu or CUDA plugin is one UserError naming the install.
  """
  import jax  # noqa: PLC0415  (after prepare_compile_environment)
  from jax.experimental import topologies  # noqa: PLC0415

  try:
    if target.kind.platform == 'tpu':
      topology = topologies.get_topology_desc(
          platform='tpu', topology_name=f"{target.kind.name}:{'x'.join(map(str, target.shape))}")
    else:
      with open(os.path.join(GPU_TARGET_DIR, GPU_TARGET_FILES[target.kind.name])) as f:
        config = f.read()
      per_host, hosts = target.shape
      topology = topologies.get_topology_desc(platform='cuda', target_config=config,
                                              topology=f'1x{hosts}x{per_host}')
  except (jax.errors.JaxRuntimeError, RuntimeError, ValueError) as e:
    reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
    plugin = 'libtpu' if target.kind.platform == 'tpu' else 'the CUDA plugin'
    install = TPU_INSTALL if target.kind.platform == 'tpu' else GPU_INSTALL
    # jax without libtpu: 'JAX TPU support not installed'; without the CUDA plugin: 'topology
    # not implemented for cuda'.
    if re.search(r'not installed|not implemented for|[Uu]nknown backend', reason):
      raise UserError(f'compiling for {target.name} needs {plugin}, which JAX does not find '
                      f'({reason[:160]}); {install}.') from None
    raise UserError(f'JAX could not describe the target {target.name} ({reason[:200]}); use a '
                    f'topology libtpu knows, e.g. {EXAMPLES}.') from None
  devices = sorted(topology.devices, key=lambda d: (d.process_index, d.id))
  if len(devices) != target.num_devices:
    raise UserError(f'the target {target.name} describes {len(devices)} devices, not '
                    f'{target.num_devices}; use e.g. {EXAMPLES}.')
  return devices
