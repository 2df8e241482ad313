"""The device mesh, and how parameters and batches are laid out on it."""

import jax
import ml_collections
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from fmboost_jax.errors import UserError

DATA_AXIS = 'data'


def make_mesh(mesh_config: ml_collections.ConfigDict) -> Mesh:
  """A 1-D data-parallel mesh over config.mesh.data devices (-1: all devices)."""
  n = jax.device_count()
  data = n if mesh_config.data == -1 else mesh_config.data
  if data != n:
    raise UserError(f'config.mesh.data={mesh_config.data} does not match the {n} devices; '
                    f'set it to {n} or -1.')
  # Auto axes: the compiler propagates shardings from the step's in/out shardings.
  return jax.make_mesh((data,), (DATA_AXIS,), axis_types=(jax.sharding.AxisType.Auto,))


def check_batch_size(batch_size: int, mesh: Mesh) -> None:
  n = mesh.shape[DATA_AXIS]
  if batch_size % n:
    raise UserError(f'config.data.batch_size={batch_size} is not divisible by the {n} devices of '
                    f'the data axis; use a multiple of {n}.')


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def batch_sharded(mesh: Mesh) -> NamedSharding:
  """Leading (batch) axis split over the data axis."""
  return NamedSharding(mesh, P(DATA_AXIS))


def global_batch(local_batch: dict[str, np.ndarray], mesh: Mesh) -> dict[str, jax.Array]:
  """Assembles each process's share of a batch into global arrays sharded over the data axis."""
  sharding = batch_sharded(mesh)
  return {
      k: jax.make_array_from_process_local_data(sharding, np.asarray(v))
      for k, v in local_batch.items()
  }
