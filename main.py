"""fmboost_jax entry point.

  python main.py --config=configs/demo.py --workdir=workdirs/demo
  python main.py --config=configs/default.py --workdir=... --config.train.num_steps=200
"""

import os
import shutil
import sys
import traceback

os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')
os.environ.setdefault('EPATH_USE_TF', 'false')  # Buckets through gcsfs (fmboost_jax/storage.py).

from absl import app, flags, logging  # noqa: E402
from ml_collections import config_flags  # noqa: E402

FLAGS = flags.FLAGS
flags.DEFINE_string('workdir', None, 'Directory for checkpoints, logs, samples and results.')
flags.DEFINE_enum('mode', 'train',
                  ['train', 'sample', 'evaluate', 'precompute', 'convert', 'export', 'compile'],
                  'train: train and evaluate in --workdir (resuming from it). sample: boost '
                  '--inputs with the checkpoint in --workdir (or config.sample.stages) into '
                  '--outdir. evaluate: PSNR/SSIM/FID/p-FID/spectral tables, NFE sweep and '
                  'figure of the checkpoints in --workdir (or config.eval.checkpoints) on the '
                  'held-out images, in WORKDIR/eval. precompute: write '
                  'the training latents of config.data to --workdir. convert: turn the '
                  'PyTorch autoencoder weights of --config.first_stage.weights into a Flax (Orbax) '
                  'checkpoint in --workdir. export: write the sampling weights and config of the '
                  'checkpoint in --workdir to --outdir (default WORKDIR/export), a model '
                  'that sample, evaluate and trained_model.load take without the workdir. '
                  'compile: compile the training programs of the config for '
                  '--config.compile.target (a TPU slice or NVIDIA GPUs) on this machine and '
                  'report their memory per device, FLOPs and collectives in WORKDIR/compile.')
flags.DEFINE_list('inputs', [], '--mode=sample: image or .npy/.npz latent files or folders '
                  '(comma-separated), or skimage for the bundled photographs.')
flags.DEFINE_string('outdir', None, 'Output folder of --mode=sample (default WORKDIR/boosted) '
                    'and --mode=export (default WORKDIR/export).')
flags.DEFINE_enum('export_dtype', 'float32', ['float32', 'bfloat16'],
                  '--mode=export: the dtype of the exported weights.')
flags.DEFINE_string('coordinator_address', None,
                    'host:port of process 0 for multi-process runs (jax.distributed); with '
                    '--num_processes and --process_id. Unset: a single process, unless '
                    '--distributed asks JAX to detect the cluster (TPU pods, SLURM).')
flags.DEFINE_integer('num_processes', None, 'Number of processes (with --coordinator_address).')
flags.DEFINE_integer('process_id', None, 'This process\'s index (with --coordinator_address).')
flags.DEFINE_bool('distributed', False,
                  'Call jax.distributed.initialize() with cluster auto-detection.')
flags.DEFINE_integer('heartbeat_timeout_seconds', 60,
                     'Multi-process runs: a process whose heartbeats the coordination service has '
                     'missed for this long (killed, hung, its host lost) stops all the others, '
                     'each with one line naming it and a non-zero exit status. The death of '
                     'process 0 (the coordinator) stops them at once.')
config_flags.DEFINE_config_file('config', None, 'Path to an ml_collections config file.',
                                lock_config=True)
flags.mark_flags_as_required(['config', 'workdir'])


# How long a process of a multi-process run that raised waits for the others to shut down with it.
SHUTDOWN_AFTER_ERROR_SECONDS = 10


def exit_now(code: int) -> None:
  """Exits after a user error without interpreter teardown, where background threads of
  libraries (Orbax's async machinery after a refused restore) would print tracebacks after the one
  error line. Everything the run wrote has been flushed or waited for by then."""
  sys.stdout.flush()
  sys.stderr.flush()
  os._exit(code)


def _unknown_field(error: Exception, argv) -> str:
  """One sentence for an override of a field the config does not have (ml_collections raises a
  KeyError whose text is a repr and a suggestion on two lines), or ''."""
  import re  # noqa: PLC0415

  inner = error.args[0] if error.args and isinstance(error.args[0], KeyError) else error
  if not isinstance(inner, KeyError) or not inner.args:
    return ''
  text = str(inner.args[0])
  key = re.match(r"'([^']+)'", text)
  if not key:
    return ''
  pattern = rf'--config\.((?:\w+\.)*{re.escape(key[1])})(?=[.=]|$)'
  flag = next((a for a in argv if re.match(pattern, a)), '')
  path = re.match(pattern, flag)[1] if flag else key[1]
  suggestion = re.search(r'Did you mean "([^"]+)"', text)
  hint = (f'did you mean {path.rsplit(".", 1)[0] + "." if "." in path else ""}{suggestion[1]}?'
          if suggestion else 'check the spelling against the config file.')
  return f'the config has no field {path}; {hint}' + (f' (from {flag})' if flag else '')


def parse_flags(argv):
  """Parses flags; a bad flag or config override is one line on stderr and exit code 2."""
  try:
    argv = FLAGS(argv)
    FLAGS.config.get('train')  # The config file loads lazily: load it (and fail) here.
    return argv
  except Exception as e:  # noqa: BLE001  (absl, ml_collections and the config file raise many kinds)
    message = str(e.args[0] if isinstance(e, KeyError) and e.args else e).replace('\n', ' ')
    unknown = _unknown_field(e, argv)
    if unknown:
      message = unknown
    elif isinstance(e, OSError):  # The file is missing or does not load.
      reason = [line.strip() for line in str(e).splitlines() if line.strip()][-1]
      message = (f'the --config file could not be loaded ({reason}); pass the path of an '
                 'ml_collections config file such as configs/demo.py.')
    print(f'error: {message}', file=sys.stderr)
    print(f'usage: {argv[0]} --config=configs/demo.py --workdir=DIR [--config.FIELD=VALUE ...]',
          file=sys.stderr)
    sys.exit(2)


def initialize_distributed() -> None:
  """Joins the processes of a multi-host run into one JAX runtime (one global device mesh)."""
  import jax  # noqa: PLC0415

  from fmboost_jax.errors import UserError  # noqa: PLC0415

  explicit = FLAGS.coordinator_address is not None
  if explicit and (FLAGS.num_processes is None or FLAGS.process_id is None):
    raise UserError('--coordinator_address needs --num_processes and --process_id too.')
  if explicit and not 0 <= FLAGS.process_id < FLAGS.num_processes:
    raise UserError(f'--process_id={FLAGS.process_id} must be in [0, {FLAGS.num_processes}).')
  slurm_tasks = os.environ.get('SLURM_NTASKS') if 'SLURM_JOB_ID' in os.environ else None
  if explicit and slurm_tasks and int(slurm_tasks) != FLAGS.num_processes:
    raise UserError(f'--num_processes={FLAGS.num_processes} disagrees with SLURM_NTASKS='
                    f'{slurm_tasks} of this SLURM job; use --distributed without the explicit '
                    'flags, or make them agree.')
  if FLAGS.heartbeat_timeout_seconds < 1:
    raise UserError(f'--heartbeat_timeout_seconds={FLAGS.heartbeat_timeout_seconds} must be at '
                    'least 1.')
  if jax.config.jax_platforms in (None, '', 'cpu') and explicit:
    jax.config.update('jax_cpu_collectives_implementation', 'gloo')  # CPU collectives across hosts.
  try:
    if explicit:
      jax.distributed.initialize(coordinator_address=FLAGS.coordinator_address,
                                 num_processes=FLAGS.num_processes, process_id=FLAGS.process_id,
                                 heartbeat_timeout_seconds=FLAGS.heartbeat_timeout_seconds)
    else:
      jax.distributed.initialize(heartbeat_timeout_seconds=FLAGS.heartbeat_timeout_seconds)
  except (RuntimeError, ValueError) as e:
    raise UserError(f'jax.distributed.initialize failed ({str(e).splitlines()[0][:200]}); check '
                    'the coordinator address, process count and id, or the cluster environment.') \
        from None


def output_directory(mode: str) -> str:
  """Where a mode writes: --workdir, or a folder of --outdir / the workdir."""
  if mode in ('sample', 'export'):
    return FLAGS.outdir or os.path.join(FLAGS.workdir, 'boosted' if mode == 'sample' else 'export')
  return os.path.join(FLAGS.workdir, 'eval') if mode == 'evaluate' else FLAGS.workdir


def ensure_writable(directory: str) -> str | None:
  """Creates `directory` and checks that files can be written there; a path that is a file, lies
  under a file or is not writable is one UserError naming the flag to change. Returns the
  outermost folder it created (None when `directory` existed)."""
  from fmboost_jax import storage  # noqa: PLC0415
  from fmboost_jax.errors import UserError  # noqa: PLC0415

  flag = '--outdir' if FLAGS.outdir and directory == FLAGS.outdir else '--workdir'
  if storage.is_remote(directory):
    import jax  # noqa: PLC0415

    # Process 0 alone probes a bucket path: another process's probe object would be listed in
    # the folder, or its parent check see a folder being written.
    if jax.process_index() == 0:
      _check_writable_bucket_path(directory, flag)
    return None  # A bucket's folders are implicit: nothing to remove.
  existing, created = os.path.abspath(directory), None
  while not os.path.exists(existing):
    existing, created = os.path.dirname(existing), existing
  if not os.path.isdir(existing):
    under = existing != os.path.abspath(directory)
    where = f'lies under the file {existing}' if under else 'is a file'
    raise UserError(f'the output directory {directory} {where}; choose another {flag}.')
  try:
    os.makedirs(directory, exist_ok=True)
    probe = os.path.join(directory, f'.write_test.{os.getpid()}')
    with open(probe, 'w') as f:
      f.write('ok')
    os.remove(probe)
  except OSError as e:
    raise UserError(f'the output directory {directory} is not writable ({e.strerror}); choose '
                    f'another {flag}.') from None
  return created


def _check_writable_bucket_path(directory: str, flag: str) -> None:
  """A bucket path is writable when no object lies at it or above it and a probe object can be
  written and removed there."""
  from fmboost_jax import storage  # noqa: PLC0415
  from fmboost_jax.errors import UserError  # noqa: PLC0415

  target = storage.path(directory)
  bucket = 'gs://' + directory[len('gs://'):].split('/', 1)[0]
  for folder in (target, *target.parents):
    if not os.fspath(folder).startswith(bucket + '/'):
      break
    if folder.is_file():
      where = 'is an object' if folder == target else f'lies under the object {folder}'
      raise UserError(f'the output directory {directory} {where}; choose another {flag}.')
  probe = target / f'.write_test.{os.getpid()}'
  try:
    probe.write_text('ok')
    probe.unlink()
  except Exception as e:  # noqa: BLE001  (the storage client's errors vary)
    raise UserError(f'the output directory {directory} is not writable ({type(e).__name__}: '
                    f'{str(e).splitlines()[0][:160] if str(e) else ""}); check your access to the '
                    f'bucket or choose another {flag}.') from None


def check_paths(config, mode: str) -> None:
  """Every bucket a run names exists and can be reached with the credentials at hand; one
  UserError naming the flag otherwise (local paths are checked where they are read)."""
  from fmboost_jax import storage  # noqa: PLC0415

  named = [('--workdir', FLAGS.workdir), ('--outdir', FLAGS.outdir),
           ('config.data.path', config.data.path), ('config.data.val_path', config.data.val_path),
           ('config.first_stage.weights', config.first_stage.weights),
           ('config.train.compilation_cache_dir', config.train.compilation_cache_dir),
           ('config.eval.inception_weights', config.eval.inception_weights),
           *(('config.eval.checkpoints', p) for p in config.eval.checkpoints),
           *(('--inputs', p) for p in (FLAGS.inputs if mode == 'sample' else ()))]
  buckets = set()
  for flag, value in named:
    if not value or not storage.is_remote(value):
      continue
    bucket = os.fspath(value).split('/', 3)[:3]
    if tuple(bucket) not in buckets:
      buckets.add(tuple(bucket))
      storage.check_bucket(value, flag)


def remove_if_empty(directory: str, created: str | None) -> None:
  """Removes the folders from `directory` up to `created` that a refused run made and left empty
  or holding only the folder source's index of image sizes, which the run wrote while checking
  its data (never a folder that holds anything else)."""
  if created is None:
    return
  from fmboost_jax.data_sources import INDEX_FOLDER  # noqa: PLC0415

  path = os.path.abspath(directory)
  if os.path.isdir(os.path.join(path, INDEX_FOLDER)) and os.listdir(path) == [INDEX_FOLDER]:
    shutil.rmtree(os.path.join(path, INDEX_FOLDER))
  while path.startswith(created):
    try:
      os.rmdir(path)  # Only ever removes an empty folder.
    except OSError:
      return
    path = os.path.dirname(path)


def convert(config, workdir: str) -> None:
  """Loads the autoencoder weights strictly and writes them as a Flax (Orbax) checkpoint (every
  process of a multi-process run reads them; Orbax writes them once)."""
  import jax  # noqa: PLC0415
  from flax import nnx  # noqa: PLC0415

  from fmboost_jax import config_checks, first_stages, weights  # noqa: PLC0415

  config_checks.check(config, 'convert')
  first_stage = first_stages.first_stage_from_config(config)
  path = weights.save_flax_checkpoint(nnx.state(first_stage, nnx.Param), workdir,
                                      first_stages.weights_fingerprint(config))
  if jax.process_index() == 0:
      print(f'Wrote {path}; train with --config.first_stage.weights={path}')


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'unexpected arguments: {" ".join(argv[1:])}')
  if FLAGS.mode == 'compile':  # Before JAX loads libtpu: no metadata server, no TPU runtime.
    from fmboost_jax import accelerators  # noqa: PLC0415
    accelerators.prepare_compile_environment()
  import jax  # noqa: PLC0415  (after flags, so XLA_FLAGS from the environment apply)

  from fmboost_jax.errors import UserError  # noqa: PLC0415

  if FLAGS.coordinator_address or FLAGS.distributed:
    try:
      initialize_distributed()
    except UserError as e:
      print(f'error: {e}', file=sys.stderr)
      sys.exit(1)

  if FLAGS.config.train.compilation_cache_dir:
    jax.config.update('jax_compilation_cache_dir', FLAGS.config.train.compilation_cache_dir)
    jax.config.update('jax_persistent_cache_min_compile_time_secs', 0.0)
  backend, kind = jax.default_backend(), jax.local_devices()[0].device_kind
  logging.info('JAX process %d of %d: backend %s, device kind %s, %d local / %d global devices.',
               jax.process_index(), jax.process_count(), backend, kind, jax.local_device_count(),
               jax.device_count())
  if jax.process_count() > 1:  # A lost process: one line, not jaxlib's crash report.
    from fmboost_jax import peer_loss  # noqa: PLC0415
    peer_loss.install(jax.process_index(), jax.process_count(), FLAGS.heartbeat_timeout_seconds)
  outdir, created = output_directory(FLAGS.mode), None
  try:
    from fmboost_jax import config_checks  # noqa: PLC0415
    if FLAGS.mode != 'compile':  # Compiling for a target runs anywhere.
      config_checks.check_platform(FLAGS.config.train.get('platform', 'any'), backend, kind)
    check_paths(FLAGS.config, FLAGS.mode)
    created = ensure_writable(outdir)
    if FLAGS.mode in ('train', 'evaluate', 'precompute') and not FLAGS.config.data.index_dir:
      FLAGS.config.data.index_dir = outdir  # The folder source's index of image sizes.
    if jax.process_count() > 1:  # Every process has probed the output folder before any uses it.
      from fmboost_jax import sharding  # noqa: PLC0415
      sharding.wait_for_all_processes(f'{FLAGS.mode}: output checked', 600)
    if FLAGS.mode == 'train':
      from fmboost_jax import train  # noqa: PLC0415
      train.train_and_evaluate(FLAGS.config, FLAGS.workdir)
    elif FLAGS.mode == 'sample':
      from fmboost_jax import inference  # noqa: PLC0415
      inference.sample(FLAGS.config, FLAGS.workdir, FLAGS.inputs, outdir)
    elif FLAGS.mode == 'export':
      from fmboost_jax import trained_model  # noqa: PLC0415
      # The export holds the network's weights and the config (with the autoencoder's path, or
      # its override), none of the autoencoder's weights: it needs no autoencoder file.
      model = trained_model.load(FLAGS.workdir,
                                 first_stage_weights=FLAGS.config.first_stage.weights,
                                 with_first_stage=False)
      model.export(outdir, FLAGS.export_dtype)
      from fmboost_jax import storage  # noqa: PLC0415
      if jax.process_index() == 0:
        size = sum(p.stat().length for p in storage.files_under(outdir))
        print(f'Exported step {model.step} of {FLAGS.workdir} ({FLAGS.export_dtype}, '
              f'{size / 2**20:.1f} MiB) to {outdir}; sample with --workdir={outdir}.')
    elif FLAGS.mode == 'evaluate':
      from fmboost_jax import evaluate  # noqa: PLC0415
      evaluate.evaluate(FLAGS.config, FLAGS.workdir)
    elif FLAGS.mode == 'precompute':
      from fmboost_jax import precompute  # noqa: PLC0415
      meta = precompute.precompute(FLAGS.config, FLAGS.workdir)
      if jax.process_index() == 0:
        print(f"Wrote {meta['num_records']} records to {FLAGS.workdir}; train with "
              f'--config.data.source=latents --config.data.path={FLAGS.workdir}')
    elif FLAGS.mode == 'convert':
      convert(FLAGS.config, FLAGS.workdir)
    elif FLAGS.mode == 'compile':
      from fmboost_jax import aot  # noqa: PLC0415
      aot.compile_for_target(FLAGS.config, FLAGS.workdir)
  except UserError as e:
    # The first line only: JAX appends a note on its traceback filtering to errors raised while
    # tracing.
    from fmboost_jax.errors import ReportedElsewhere  # noqa: PLC0415
    if not isinstance(e, ReportedElsewhere):  # Process 0 prints that one.
      print(f'error: {str(e).splitlines()[0]}', file=sys.stderr)
    if jax.process_index() == 0:  # No empty output folder is left behind.
      remove_if_empty(outdir, created)
    if jax.process_count() > 1:  # Leave together if all hit it (a diverged loss, a bad config).
      from fmboost_jax import peer_loss  # noqa: PLC0415
      peer_loss.shut_down_within(SHUTDOWN_AFTER_ERROR_SECONDS)
    exit_now(1)
  except Exception as e:
    if jax.process_count() == 1:
      raise
    from fmboost_jax import peer_loss  # noqa: PLC0415
    # A collective that lost its peer fails at once: the coordination service names the lost
    # process within the heartbeat timeout, and its line ends this process instead of a traceback.
    peer_loss.await_verdict(e, FLAGS.heartbeat_timeout_seconds)
    # Anything else: the traceback, and out through the shutdown barrier if the other processes
    # reach it soon (they failed too), else without it (they stop within the heartbeat timeout,
    # naming this one).
    traceback.print_exc()
    peer_loss.shut_down_within(SHUTDOWN_AFTER_ERROR_SECONDS)
    exit_now(1)


if __name__ == '__main__':
  app.run(main, flags_parser=parse_flags)
