"""What the model layer reads and writes with Orbax: a training checkpoint's config and weights, and
exported models.

A training checkpoint (`checkpointing.Checkpointer`) is a composite of the items `state`, `data`,
`position` and `config` per step; this module reads its config and one subtree of its state (the
EMA weights, without the optimizer state) for sampling, evaluation and export.

An exported model (`write_export`, `--mode=export`) is a directory of its own: `export.json` (what
it was exported from) beside a composite of two items, `config` (the training config, as in a
checkpoint) and `params` (the sampling weights only), written under a temporary name and renamed
when complete.

Every path goes through `storage` (local disks or gs:// buckets).
"""

import json

import jax
import ml_collections
import orbax.checkpoint as ocp

from fmboost_jax import orbax_logs, sharding, storage
from fmboost_jax.errors import UserError

orbax_logs.quiet()

# How long the processes of a multi-process export wait for each other between its steps.
EXPORT_BARRIER_SECONDS = 600

EXPORT_INFO = 'export.json'


def latest_step(directory: str) -> int | None:
  """The newest complete checkpoint in `directory`, or None."""
  steps = finished_steps(storage.path(directory))
  return steps[-1] if steps else None


def finished_steps(directory: storage.Path) -> list[int]:
  """The finished checkpoints' steps in `directory`, ascending (Orbax's test: a renamed step folder
  on disks, a commit marker in buckets)."""
  return sorted(ocp.utils.checkpoint_steps(directory))


def _composite(**item_handlers: ocp.CheckpointHandler) -> ocp.Checkpointer:
  """A synchronous reader and writer of composite checkpoints: with `item_handlers`, of those items
  only; without, Orbax's handler for each item's arguments."""
  return ocp.Checkpointer(ocp.CompositeCheckpointHandler(**item_handlers))


def array_tree_handler() -> ocp.PyTreeCheckpointHandler:
  """Orbax's handler of array trees (a checkpoint's `state`, an export's `params`) that stages the
  writes of a save and commits them in one OCDBT transaction, the one Orbax uses where no limit is
  set on the bytes in flight. A write that fails (a full disk) then fails that one commit, with no
  other write of the save in flight.

  With a limit (Orbax's default, 96 GB), each array's writes are awaited on their own, and the
  first failed write ends the save while the others are still writing. Orbax (0.12.8) then closes
  the event loop that awaits them, and each of them, as it ends, reports `RuntimeError: Event loop
  is closed` to stderr (measured: 0 to 89 reports per failed save of 96 arrays, none in 10 failed
  saves this way). Saving takes the same time and memory either way (docs/benchmarks.md,
  benchmarks/checkpoint_save.py), and the files are the same: either handler reads them."""
  return ocp.PyTreeCheckpointHandler(
      handler_impl=ocp.BasePyTreeCheckpointHandler(save_concurrent_bytes=None))


def tree_restore(target, *, partial: bool = False) -> ocp.args.PyTreeRestore:
  """Restore arguments that read an array tree onto `target` (ShapeDtypeStructs with shardings;
  saved arrays are cast to their dtypes); `partial` leaves the saved arrays that `target` lacks
  unread."""
  return ocp.args.PyTreeRestore(item=target, partial_restore=partial,
                                restore_args=ocp.checkpoint_utils.construct_restore_args(target))


def restore_config(directory: str, step: int) -> ml_collections.ConfigDict:
  """The config saved with the checkpoint at `step` (lists where the config had tuples)."""
  try:
    return _read_config(storage.path(directory) / str(step))
  except KeyError:
    raise UserError(f'the checkpoint at step {step} in {directory} holds no saved config; it was '
                    'written by an older version of fmboost_jax: train it again.') from None


def _read_config(path: storage.Path) -> ml_collections.ConfigDict:
  """The `config` item of the composite checkpoint at `path` (KeyError if it has none)."""
  with _composite() as checkpointer:
    restored = checkpointer.restore(path, args=ocp.args.Composite(config=ocp.args.JsonRestore()))
  return ml_collections.ConfigDict(restored['config'])


def config_item(config: ml_collections.ConfigDict) -> ocp.args.JsonSave:
  """`config` as the JSON item of a checkpoint or an export."""
  return ocp.args.JsonSave(json.loads(config.to_json_best_effort()))


def is_export(directory: str) -> bool:
  return (storage.path(directory) / EXPORT_INFO).is_file()


def write_export(directory: str, params, config: ml_collections.ConfigDict,
                 info: dict) -> None:
  """Writes an exported model: `info` (JSON), `config` and the weights `params` (a pytree).

  A local export is written under a temporary name and renamed when complete; in a bucket (no
  renaming of folders there) `export.json` is written last, so only a complete export is one.
  In a multi-process run every process calls this with the same global arrays: Orbax writes the
  weights once, process 0 everything else.
  """
  target = storage.path(directory)
  if target.exists() and (not target.is_dir() or any(target.iterdir())):
    raise UserError(f'{directory} already exists; export into a new directory (or remove it).')
  remote = storage.is_remote(target)
  partial = target if remote else target.parent / f'{target.name}.partial'
  writer = jax.process_index() == 0
  sharding.wait_for_all_processes('export: output checked', EXPORT_BARRIER_SECONDS)
  if writer and not remote:
    partial.rmtree(missing_ok=True)  # Left by an export that was stopped; Orbax creates it anew.
  sharding.wait_for_all_processes('export: folder cleared', EXPORT_BARRIER_SECONDS)
  with _composite(params=array_tree_handler(), config=ocp.JsonCheckpointHandler()) as checkpointer:
    checkpointer.save(partial, args=ocp.args.Composite(config=config_item(config),
                                                       params=ocp.args.PyTreeSave(params)))
  if writer:
    (partial / EXPORT_INFO).write_text(
        json.dumps({'format': 'fmboost_jax export', 'version': 1, **info}, indent=2))
    if not remote:
      if target.is_dir():
        target.rmdir()
      partial.rename(target)
  sharding.wait_for_all_processes('export: written', EXPORT_BARRIER_SECONDS)


def read_export_config(directory: str) -> tuple[ml_collections.ConfigDict, dict]:
  """(the training config, export.json) of an exported model."""
  path = storage.path(directory)
  info = json.loads((path / EXPORT_INFO).read_text())
  return _read_config(path), info


def read_export_params(directory: str, abstract):
  """The weights of an exported model onto `abstract` (ShapeDtypeStructs with shardings; saved
  bfloat16 weights are cast to their dtype)."""
  path = storage.path(directory)
  check_fits(_saved_tree(path, 'params'), abstract, f'the exported model in {directory}')
  with _composite() as checkpointer:
    restored = checkpointer.restore(path, args=ocp.args.Composite(params=tree_restore(abstract)))
  return restored['params']


def restore_subtree(directory: str, step: int, name: str, abstract):
  """Restores only `state[name]` of the checkpoint at `step` onto `abstract` (ShapeDtypeStructs
  with shardings), e.g. the EMA weights for inference without the optimizer state.

  Orbax's standard restore reads a whole tree; leaving the rest of the saved tree (the optimizer
  state) unread takes the PyTree handler's `partial_restore`.
  """
  path = storage.path(directory) / str(step)
  target = {name: abstract}
  check_fits(_saved_tree(path, 'state'), target, f'the checkpoint at step {step} in {directory}',
             only=name)
  with _composite() as checkpointer:
    restored = checkpointer.restore(path, args=ocp.args.Composite(
        state=tree_restore(target, partial=True)))
  return restored['state'][name]


def _saved_tree(path: storage.Path, item: str):
  """The metadata tree (names, shapes, dtypes) of the array item `item` of the composite at
  `path`, read from the item alone (a composite's metadata would need every item's handler)."""
  with ocp.StandardCheckpointer() as checkpointer:
    return checkpointer.metadata(path / item).item_metadata.tree


def check_fits(saved, abstract, what: str, only: str | None = None) -> None:
  """Compares the saved arrays' names and shapes (`saved`: a metadata tree) with the target before
  restoring anything (only those under the top-level key `only`, if given)."""
  saved = _shapes(saved)
  if only is not None:
    saved = {k: v for k, v in saved.items() if k.split('/', 1)[0] == only}
  wanted = _shapes(abstract)
  problems = [f'{k} (saved {saved.get(k)}, config {wanted.get(k)})'
              for k in sorted(saved.keys() | wanted.keys()) if saved.get(k) != wanted.get(k)]
  if problems:
    listed = '; '.join(problems[:3]) + (f'; and {len(problems) - 3} more' if len(problems) > 3
                                        else '')
    raise UserError(
        f'{what} does not fit this config ({listed}); use the config it was made with (saved '
        'beside it in checkpoints/STEP/config) or choose a new --workdir.')


def _shapes(tree) -> dict[str, tuple[int, ...]]:
  """'params/input_blocks/0/kernel' -> shape, for every array of a state or its metadata."""
  def name(key):
    return str(getattr(key, 'key', getattr(key, 'name', getattr(key, 'idx', key))))
  return {'/'.join(name(k) for k in path): tuple(leaf.shape)
          for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]}
