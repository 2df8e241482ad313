"""The device mesh, and how parameters and batches are laid out on it.

The mesh has two axes: `data` (batch-parallel replicas) and `fsdp` (the batch is split over it too,
and so are the large parameter, optimizer and EMA arrays, which XLA gathers where they are used).
With fsdp=1 every array of the state is replicated and training is plain data parallelism.
"""

import hashlib
import math

import jax
import ml_collections
import numpy as np
import orbax.checkpoint as ocp
from jax.experimental import multihost_utils
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from fmboost_jax.errors import ReportedElsewhere, UserError

DATA_AXIS = 'data'
FSDP_AXIS = 'fsdp'
AXES = (DATA_AXIS, FSDP_AXIS)


def make_mesh(mesh_config: ml_collections.ConfigDict, devices=None, target: str = '') -> Mesh:
  """The (data, fsdp) mesh of config.mesh over `devices` (default: all of JAX's; those of the
  compile target named `target`); one of the two axes may be -1 (fills)."""
  n = len(devices) if devices is not None else jax.device_count()
  sizes = {axis: mesh_config.get(axis, 1) for axis in AXES}
  described = ' x '.join(f'config.mesh.{a}={v}' for a, v in sizes.items())
  if any(v == 0 or v < -1 for v in sizes.values()) or list(sizes.values()).count(-1) > 1:
    raise UserError(f'{described} is not a mesh: each axis is a positive size, and at most one '
                    'is -1 (all remaining devices).')
  fixed = math.prod(v for v in sizes.values() if v != -1)
  for axis, v in sizes.items():
    if v == -1:
      sizes[axis] = n // fixed if n % fixed == 0 else 0
  if math.prod(sizes.values()) != n:
    of = f' of the target {target}' if target else ''
    if -1 in (mesh_config.get(axis, 1) for axis in AXES):
      raise UserError(f'{described} does not match the {n} devices{of}: {fixed} does not divide '
                      f'{n}; make the fixed axis a divisor of {n}.')
    raise UserError(f'{described} does not match the {n} devices{of}; make the product of the axes '
                    f'{n} (or set one axis to -1).')
  # Auto axes: the compiler propagates shardings from the step's in/out shardings.
  return jax.make_mesh(tuple(sizes.values()), AXES, devices=devices,
                       axis_types=(jax.sharding.AxisType.Auto,) * len(AXES))


def data_mesh(devices=None) -> Mesh:
  """All `devices` (default: all of JAX's) on the data axis: batch parallelism, nothing split."""
  return make_mesh(ml_collections.ConfigDict({DATA_AXIS: -1, FSDP_AXIS: 1}), devices)


def batch_devices(mesh: Mesh) -> int:
  return mesh.shape[DATA_AXIS] * mesh.shape[FSDP_AXIS]


def check_batch_size(batch_size: int, mesh: Mesh) -> None:
  n = batch_devices(mesh)
  if batch_size % n:
    raise UserError(f'config.data.batch_size={batch_size} is not divisible by the {n} devices of '
                    f'the data x fsdp axes; use a multiple of {n}.')


def round_up(n: int, devices: int) -> int:
  """The batch of n inputs padded to fill the devices: the next multiple of `devices`."""
  return n + -n % devices


def pad_batch(x, size: int):
  """x [n, ...] (NumPy or JAX) padded to `size` rows by repeating its last row: every batch of a
  program has one shape, and the outputs of the padding are dropped."""
  if len(x) == size:
    return x
  xp = np if isinstance(x, np.ndarray) else jax.numpy
  return xp.concatenate([x, xp.repeat(x[-1:], size - len(x), axis=0)])


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def batch_sharded(mesh: Mesh) -> NamedSharding:
  """Leading (batch) axis split over data x fsdp."""
  return NamedSharding(mesh, P(AXES))


def array_sharding(shape: tuple[int, ...], mesh: Mesh, min_size: int) -> NamedSharding:
  """The rule for one array of the state: arrays of at least `min_size` elements are split over
  `fsdp` along their largest dimension divisible by it (the last such one on ties); all other
  arrays (biases, norms, scalars, or nothing divisible) are replicated."""
  fsdp = mesh.shape[FSDP_AXIS]
  if fsdp == 1 or math.prod(shape) < min_size:
    return replicated(mesh)
  candidates = [(d, i) for i, d in enumerate(shape) if d % fsdp == 0]
  if not candidates:
    return replicated(mesh)
  _, dim = max(candidates)
  spec = [None] * len(shape)
  spec[dim] = FSDP_AXIS
  return NamedSharding(mesh, P(*spec))


def state_shardings(abstract_state, mesh: Mesh, min_size: int):
  """`array_sharding` for every leaf of a pytree of arrays or ShapeDtypeStructs."""
  return jax.tree.map(lambda x: array_sharding(tuple(x.shape), mesh, min_size), abstract_state)


def global_batch(local_batch: dict[str, np.ndarray], mesh: Mesh) -> dict[str, jax.Array]:
  """Assembles each process's share of a batch into global arrays sharded over data x fsdp."""
  sharding = batch_sharded(mesh)
  return {
      k: jax.make_array_from_process_local_data(sharding, np.asarray(v))
      for k, v in local_batch.items()
  }


def wait_for_all_processes(name: str, timeout_seconds: int) -> None:
  """A barrier of all processes through the coordination service, not a device collective: it
  needs no CPU collectives context (whose set-up times out after 30 s when processes arrive far
  apart). A no-op in one process."""
  if jax.process_count() > 1:
    ocp.multihost.sync_global_processes(f'fmboost_jax: {name}', timeout=timeout_seconds)


def put(x, target: NamedSharding) -> jax.Array:
  """`x` (a host array that every process holds whole, or a jax.Array) laid out by `target`, a
  sharding over the global mesh: each process places the parts of its own devices."""
  if isinstance(x, jax.Array):
    return jax.device_put(x, target)
  x = np.asarray(x)
  return jax.make_array_from_callback(x.shape, target, lambda index: x[index])


def to_host(tree):
  """The arrays of `tree` (laid out over the global mesh) whole, as NumPy arrays, in every
  process: one gather across the processes of a multi-process run."""
  if jax.process_count() == 1:
    return jax.device_get(tree)
  return multihost_utils.process_allgather(tree, tiled=True)


def is_writer() -> bool:
  """Whether this process writes the outputs of a run (process 0 does; the others compute)."""
  return jax.process_index() == 0


def _digest(text: str) -> np.ndarray:
  """sha256 of `text` as 8 uint32s: what processes gather to compare what they hold."""
  return np.frombuffer(hashlib.sha256(text.encode()).digest(), np.uint32)


def same_in_all_processes(text: str) -> bool:
  """Whether every process holds the same `text` (True in one process): one gather of a digest."""
  if jax.process_count() == 1:
    return True
  gathered = multihost_utils.process_allgather(_digest(text))  # [processes, 8]
  return bool((gathered == gathered[:1]).all())


def check_same_in_all_processes(values: dict[str, object], what: str) -> None:
  """Raises UserError when the processes of a run got different `values` (a flat dict of
  settings, such as a config section), naming the ones that differ; only process 0 reports it
  (the others raise `ReportedElsewhere`). A no-op in one process."""
  if jax.process_count() == 1:
    return
  keys = sorted(values)
  mine = np.stack([_digest(repr(keys)), _digest(repr([(k, values[k]) for k in keys]))])
  gathered = multihost_utils.process_allgather(mine)  # [processes, 2, 8]
  if (gathered == gathered[:1]).all():
    return
  same_keys = (gathered[:, 0] == gathered[0, 0]).all()
  differing = 'its fields'
  if same_keys:
    per_field = multihost_utils.process_allgather(
        np.stack([_digest(repr(values[k])) for k in keys]))  # [processes, fields, 8]
    names = [k for i, k in enumerate(keys) if not (per_field[:, i] == per_field[0, i]).all()]
    differing = ', '.join(names)
  processes = [p for p in range(len(gathered)) if not (gathered[p] == gathered[0]).all()]
  who = (f'process {processes[0]} differs' if len(processes) == 1
         else f'processes {", ".join(map(str, processes))} differ')
  message = (f'the processes of this run got different {what} ({who} from process 0 in '
             f'{differing}); start every process with the same flags.')
  if not is_writer():
    raise ReportedElsewhere(message)
  raise UserError(message)


def raise_once(error: UserError | None) -> None:
  """After checks that every process of a run makes alike: raises in every process when any of
  them found a problem (`error`, or None), so that they stop together; the line is printed once,
  by the first process that found it (process 0 when all did; the others raise
  `ReportedElsewhere`). Raises `error` itself in one process."""
  if jax.process_count() == 1:
    if error is not None:
      raise error
    return
  failed = multihost_utils.process_allgather(np.array([error is not None], np.int32)).reshape(-1)
  if not failed.any():
    return
  first = int(np.argmax(failed))
  if jax.process_index() == first:
    raise error
  raise ReportedElsewhere(str(error) if error is not None else f'process {first} stopped the run')
