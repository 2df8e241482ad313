"""PyTorch weights -> Flax NNX state, strictly: the SD autoencoder (LDM `.ckpt`, diffusers
`.safetensors`) and, at the end, the FID Inception-v3 (`pt_inception-2015-12-05`).

Two on-disk formats are read:
  * LDM / CompVis checkpoints (`.ckpt`, `.pt`, `.bin`): a bare state dict or one under
    `'state_dict'`, read by `torch_files.read_torch`, a restricted unpickler that never imports
    or runs anything from the file (tensors are rebuilt as `torch.load(weights_only=True)` rebuilds
    them, the extra objects of full PyTorch Lightning checkpoints become inert placeholders, and
    any other pickled global refuses the file). Keys of a full SD
    checkpoint carry a `first_stage_model.` prefix, which is stripped; discriminator (`loss.*`) and
    any other non-autoencoder keys are ignored.
  * safetensors files (`diffusion_pytorch_model.safetensors`, or the hub's float16
    `diffusion_pytorch_model.fp16.safetensors` when it is the only one, of a diffusers `vae/`
    folder, or an LDM-named `.safetensors`), read with the safetensors numpy API (no PyTorch
    needed). The format is recognised from the file's header, not from its name.

Diffusers names are mapped to LDM names (reference `official_fmboost.md` 4.5; the pre-0.14 attention
names query/key/value/proj_attn too), and LDM names are the attribute paths of
`fmboost_jax.models.autoencoder.AutoencoderKL`. Loading is strict: every expected key present, no
unknown key, every shape right, else one `UserError` listing the offending keys.

Layout conversion: conv `[O, I, kh, kw]` -> kernel `[kh, kw, I, O]`; attention q/k/v/proj_out
(`[C, C, 1, 1]` 1x1 convs in LDM, `[C, C]` Linear in diffusers) -> Dense kernel `[in, out]`;
GroupNorm weight -> scale; biases unchanged. Every array becomes float32.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import struct
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
from etils import epath
from flax import nnx

from fmboost_jax import errors, model_files, orbax_logs, sharding, storage, torch_files
from fmboost_jax.errors import UserError
from fmboost_jax.models import inception, layers

orbax_logs.quiet()

AUTOENCODER_PREFIXES = ('encoder.', 'decoder.', 'quant_conv.', 'post_quant_conv.')
FULL_MODEL_PREFIX = 'first_stage_model.'
DIFFUSERS_FILENAME = 'diffusion_pytorch_model.safetensors'
DIFFUSERS_FP16_FILENAME = 'diffusion_pytorch_model.fp16.safetensors'
# How long the processes of a multi-process conversion wait for each other between its steps.
BARRIER_SECONDS = 600
# Written into a converted checkpoint's directory: the fingerprint of the weights it holds.
FINGERPRINT_FILE = 'fmboost_fingerprint.json'
_FINGERPRINTS: dict[tuple[str, int, Any], str] = {}

_ATTN_NAMES = {'group_norm': 'norm', 'to_q': 'q', 'to_k': 'k', 'to_v': 'v', 'to_out.0': 'proj_out',
               'query': 'q', 'key': 'k', 'value': 'v', 'proj_attn': 'proj_out'}


def diffusers_to_ldm_key(key: str, num_levels: int) -> str:
  """Maps one diffusers `AutoencoderKL` key to its LDM name (LDM keys come back unchanged).

  Args:
    key: e.g. `decoder.up_blocks.0.resnets.2.conv_shortcut.weight`.
    num_levels: Resolution levels of the model (len(ch_mult)); decoder `up_blocks.i` is LDM
      `up.(num_levels - 1 - i)`.

  Returns:
    e.g. `decoder.up.3.block.2.nin_shortcut.weight`.
  """
  k = re.sub(r'^(encoder|decoder)\.conv_norm_out\.', r'\1.norm_out.', key)
  k = re.sub(r'\.mid_block\.resnets\.([01])\.',
             lambda m: f'.mid.block_{int(m.group(1)) + 1}.', k)
  m = re.match(r'^(encoder|decoder)\.mid_block\.attentions\.0\.'
               r'(group_norm|to_q|to_k|to_v|to_out\.0|query|key|value|proj_attn)\.'
               r'(weight|bias)$', k)
  if m:
    k = f'{m.group(1)}.mid.attn_1.{_ATTN_NAMES[m.group(2)]}.{m.group(3)}'
  k = re.sub(r'^encoder\.down_blocks\.(\d+)\.resnets\.(\d+)\.', r'encoder.down.\1.block.\2.', k)
  k = re.sub(r'^encoder\.down_blocks\.(\d+)\.downsamplers\.0\.conv\.',
             r'encoder.down.\1.downsample.conv.', k)

  def up(m: re.Match) -> str:
    level = num_levels - 1 - int(m.group(1))
    if level < 0:  # More levels than the model: keep the name so it is reported as unexpected.
      return m.group(0)
    rest = m.group(2)
    rest = re.sub(r'^resnets\.(\d+)\.', r'block.\1.', rest)
    rest = re.sub(r'^upsamplers\.0\.conv\.', 'upsample.conv.', rest)
    return f'decoder.up.{level}.{rest}'

  k = re.sub(r'^decoder\.up_blocks\.(\d+)\.(.*)$', up, k)
  if '.block.' in k:
    k = k.replace('.conv_shortcut.', '.nin_shortcut.')
  return k


def _expected_torch_shape(flax_name: str, shape: tuple[int, ...]) -> tuple[int, ...]:
  """The PyTorch (LDM) shape of a Flax parameter."""
  if flax_name == 'kernel' and len(shape) == 4:  # Conv [kh, kw, I, O] <- [O, I, kh, kw].
    return (shape[3], shape[2], shape[0], shape[1])
  if flax_name == 'kernel' and len(shape) == 2:  # Dense [I, O] <- 1x1 conv [O, I, 1, 1].
    return (shape[1], shape[0], 1, 1)
  return tuple(shape)


def _to_flax(array: np.ndarray, flax_name: str, flax_shape: tuple[int, ...]) -> np.ndarray:
  """Converts a PyTorch-layout array (already shape-checked) to the Flax layout."""
  array = np.asarray(array, np.float32)
  if flax_name == 'kernel' and len(flax_shape) == 4:
    return np.ascontiguousarray(array.transpose(2, 3, 1, 0))
  if flax_name == 'kernel' and len(flax_shape) == 2:
    return np.ascontiguousarray(array.reshape(flax_shape[1], flax_shape[0]).T)
  return array


def _ldm_name(path: tuple[Any, ...]) -> str:
  """Flax path -> LDM key: (..., 'block', 1, 'norm1', 'scale') -> '....block.1.norm1.weight'."""
  last = {'kernel': 'weight', 'scale': 'weight'}.get(path[-1], path[-1])
  return '.'.join(str(p) for p in (*path[:-1], last))


def _listing(keys: list[str], limit: int = 6) -> str:
  shown = ', '.join(keys[:limit])
  more = f', and {len(keys) - limit} more' if len(keys) > limit else ''
  return f'{shown}{more}'


def _resolve_path(value: str | os.PathLike) -> str:
  path = epath.Path(os.fspath(value))
  if path.is_dir():
    # The float32 file first; the hub's float16 variant (widened to float32) only when it is alone.
    for folder in (path, path / 'vae'):
      for name in (DIFFUSERS_FILENAME, DIFFUSERS_FP16_FILENAME):
        if (folder / name).is_file():
          return os.fspath(folder / name)
    raise UserError(f'weights directory {value} holds no {DIFFUSERS_FILENAME} or '
                    f'{DIFFUSERS_FP16_FILENAME} (nor a vae/ folder with one); point '
                    'config.first_stage.weights at the .ckpt or .safetensors file itself.')
  if not path.is_file():
    raise UserError(f'autoencoder weights file {value} does not exist; set '
                    'config.first_stage.weights to an SD VAE .ckpt or diffusers '
                    f'{DIFFUSERS_FILENAME}.')
  return os.fspath(path)


def _is_safetensors(path: str) -> bool:
  """True if the file starts like a safetensors file (u64 header length, then a JSON object)."""
  size = os.path.getsize(path)
  with open(path, 'rb') as f:
    head = f.read(9)
  if len(head) < 9:
    return False
  (header_len,) = struct.unpack('<Q', head[:8])
  return head[8:9] == b'{' and 8 + header_len <= size


def _read_safetensors(path: str) -> dict[str, np.ndarray]:
  from safetensors import safe_open  # noqa: PLC0415
  try:
    # framework='numpy' also returns bfloat16 tensors (as ml_dtypes arrays).
    with safe_open(path, framework='numpy') as f:
      return {key: f.get_tensor(key) for key in f.keys()}  # noqa: SIM118 (not a dict)
  except Exception as e:  # pylint: disable=broad-except
    raise UserError(f'{path} is not a readable safetensors file ({errors.short(e)}); the file '
                    'may be truncated or corrupt, so download or convert it again.') from None


def read_state_dict(path: str | os.PathLike) -> dict[str, Any]:
  """Reads the raw name -> array mapping of a `.ckpt`/`.pt`/`.bin` or `.safetensors` file.

  Args:
    path: A file, or a diffusers model directory (or its parent) holding
      `diffusion_pytorch_model.safetensors` or only `diffusion_pytorch_model.fp16.safetensors`.

  Returns:
    The state dict (unwrapped from `'state_dict'`), with numpy arrays for tensors.
  """
  path = _resolve_path(path)
  with storage.local_copy(path) as local:
    if _is_safetensors(local):
      return _read_safetensors(local)
    if path.endswith('.safetensors'):
      raise UserError(f'{path} is not a safetensors file (its header is not a safetensors '
                      'header); the file may be truncated or corrupt, so download or convert it '
                      'again.')
    return torch_files.read_torch(local)


def autoencoder_state_dict(raw: Mapping[str, Any],
                           num_levels: int) -> tuple[dict[str, Any], list[str]]:
  """Selects the autoencoder keys of a raw state dict and renames them to LDM names.

  Args:
    raw: A state dict of an LDM or diffusers autoencoder, or of a full SD model.
    num_levels: Resolution levels of the target model (for diffusers' decoder numbering).

  Returns:
    `(state, ignored)`: LDM-named autoencoder entries, and the names of the ignored keys.
  """
  keys = list(raw)
  if any(k.startswith(FULL_MODEL_PREFIX) for k in keys):
    ignored = [k for k in keys if not k.startswith(FULL_MODEL_PREFIX)]
    raw = {k[len(FULL_MODEL_PREFIX):]: v for k, v in raw.items() if k.startswith(FULL_MODEL_PREFIX)}
  else:
    ignored = []
  state = {}
  for key, value in raw.items():
    if key.startswith(AUTOENCODER_PREFIXES):
      state[diffusers_to_ldm_key(key, num_levels)] = value
    else:
      ignored.append(key)
  return state, ignored


def _match_strictly(expected: Mapping[str, tuple[tuple[Any, ...], Any]],
                    state: Mapping[str, Any], *,
                    allow_1x1_as_linear: bool) -> tuple[list[tuple[Any, Any]], list[str]]:
  """Pairs every expected variable with its PyTorch array, converted to the Flax layout.

  Args:
    expected: PyTorch key -> (Flax path, variable) of the target state.
    state: PyTorch key -> array read from the file.
    allow_1x1_as_linear: accept a `[O, I]` Linear weight where a `[O, I, 1, 1]` conv is expected.

  Returns:
    ([(path, variable with the converted value)], problems): problems is empty when every key is
    present, none is unknown and every shape is right; otherwise it lists them, grouped.
  """
  missing = [k for k in expected if k not in state]
  unexpected = [k for k in state if k not in expected]
  mismatched, values = [], []
  for key, (p, var) in expected.items():
    if key not in state:
      continue
    value, flax_shape = state[key], tuple(var.shape)
    want = _expected_torch_shape(p[-1], flax_shape)
    got = tuple(getattr(value, 'shape', ()))
    as_linear = allow_1x1_as_linear and len(want) == 4 and want[2:] == (1, 1) and got == want[:2]
    if not isinstance(value, np.ndarray):
      mismatched.append(f'{key} (not a tensor)')
    elif got != want and not as_linear:
      mismatched.append(f'{key} (file {list(got)}, model {list(want)})')
    else:
      values.append((p, var.replace(value=jnp.asarray(_to_flax(value, p[-1], flax_shape)))))
  parts = []
  if missing:
    parts.append(f'{len(missing)} missing keys ({_listing(missing)})')
  if unexpected:
    parts.append(f'{len(unexpected)} unexpected keys ({_listing(unexpected)})')
  if mismatched:
    parts.append(f'{len(mismatched)} shape mismatches ({_listing(mismatched, 4)})')
  return values, parts


def load_autoencoder_weights(path: str | os.PathLike, model_or_abstract_state: Any) -> nnx.State:
  """Loads SD autoencoder weights onto the parameter structure of an `AutoencoderKL`.

  Args:
    path: LDM `.ckpt` (bare, under 'state_dict', or a full SD checkpoint), diffusers
      `diffusion_pytorch_model.safetensors` (or its directory), or an LDM-named `.safetensors`.
    model_or_abstract_state: An `AutoencoderKL` (concrete or from `nnx.eval_shape`) or its
      `nnx.state(model, nnx.Param)`; only the parameter paths and shapes are used.

  Returns:
    An `nnx.State` of float32 `nnx.Param`s with the target's structure; apply it with
    `nnx.update(model, state)` or `nnx.merge(graphdef, state)`.

  Raises:
    UserError: missing file, unreadable/truncated file, or keys / shapes that do not match the
      model (one message listing the offending keys).
  """
  target = model_or_abstract_state
  if isinstance(target, nnx.Module):
    target = nnx.state(target, nnx.Param)
  if storage.path(path).is_dir() and ocp.path.format_utils.is_orbax_checkpoint(storage.path(path)):
    return _load_flax_checkpoint(os.fspath(path), target)
  flat = list(nnx.to_flat_state(target))
  down = {p[2] for p, _ in flat if p[:2] == ('encoder', 'down') and len(p) > 2}
  num_levels = len(down)
  expected = {_ldm_name(p): (p, v) for p, v in flat}

  path = os.fspath(path)
  state, ignored = autoencoder_state_dict(read_state_dict(path), num_levels)

  values, parts = _match_strictly(expected, state, allow_1x1_as_linear=True)
  if parts:
    note = ''
    if ignored and not state:
      note = (f' (the file has {len(ignored)} keys and none belongs to an autoencoder, e.g. '
              f'{_listing(ignored, 3)})')
    raise UserError(
        f'weights file {path} does not match the autoencoder: {"; ".join(parts)}{note}; use the '
        'SD v1 KL-f8 VAE weights and make config.first_stage (ch, ch_mult, num_res_blocks, '
        'z_channels) match them.')
  return nnx.from_flat_state(values)


def file_sha256(path: str | os.PathLike) -> str:
  """The sha256 of a file's bytes (local or in a bucket), read in 16 MiB pieces."""
  digest = hashlib.sha256()
  with storage.open_binary(path) as f:
    while piece := f.read(1 << 24):
      digest.update(piece)
  return digest.hexdigest()


def fingerprint(path: str | os.PathLike) -> str | None:
  """The fingerprint of the autoencoder weights at `path`: the sha256 of the weights file's bytes
  (of the file a diffusers folder holds), or, for a checkpoint written by `save_flax_checkpoint`,
  the fingerprint of the file it was converted from, recorded then in its FINGERPRINT_FILE. None
  for a converted checkpoint without one. A file is hashed once per process while its size and
  modification time are unchanged.

  Raises:
    UserError: When `path` is not a weights file, a diffusers folder or a converted checkpoint.
  """
  directory = storage.path(path)
  if directory.is_dir() and ocp.path.format_utils.is_orbax_checkpoint(directory):
    recorded = directory / FINGERPRINT_FILE
    return json.loads(recorded.read_text())['sha256'] if recorded.is_file() else None
  resolved = _resolve_path(path)
  if storage.is_remote(resolved):
    info = storage.path(resolved).stat()
    key = (resolved, info.length, info.mtime)
  else:
    info = os.stat(resolved)
    key = (resolved, info.st_size, info.st_mtime_ns)
  if key not in _FINGERPRINTS:
    _FINGERPRINTS[key] = file_sha256(resolved)
  return _FINGERPRINTS[key]


def save_flax_checkpoint(state: nnx.State, directory: str | os.PathLike,
                         source_fingerprint: str | None = None) -> str:
  """Writes autoencoder parameters (Flax layouts) as an Orbax checkpoint; returns its path.

  The directory must not exist or be empty, so a conversion never overwrites anything. With
  `source_fingerprint` (the `fingerprint` of the file the parameters were read from), the
  checkpoint carries it in FINGERPRINT_FILE, so that latents and runs made with either are known
  to share the autoencoder.
  """
  directory = storage.path(directory)
  if directory.exists() and any(directory.iterdir()):
    raise UserError(f'the output directory {directory} is not empty; choose a new --workdir for '
                    'the converted weights.')
  params = nnx.to_pure_dict(state)
  if jax.process_count() > 1:  # Every process saves the same global arrays; Orbax writes once.
    sharding.wait_for_all_processes('convert: output checked', BARRIER_SECONDS)
    replicated = sharding.replicated(sharding.data_mesh())
    params = jax.tree.map(lambda x: sharding.put(np.asarray(x), replicated), params)
  if directory.is_dir() and sharding.is_writer():
    directory.rmdir()  # Orbax writes the directory itself.
  sharding.wait_for_all_processes('convert: output ready', BARRIER_SECONDS)
  with ocp.Checkpointer(model_files.array_tree_handler()) as checkpointer:
    checkpointer.save(directory, args=ocp.args.PyTreeSave(params))
  if source_fingerprint and sharding.is_writer():
    storage.write_text_atomically(directory / FINGERPRINT_FILE,
                                  json.dumps({'sha256': source_fingerprint}))
  return os.fspath(directory)


def _load_flax_checkpoint(directory: str, target: nnx.State) -> nnx.State:
  """Restores a `save_flax_checkpoint` directory onto the structure and shapes of `target`.

  The arrays' names and shapes are compared with the saved metadata first; the weights are then
  read onto this process's first device, whatever devices saved them: in any process of any job.
  """
  directory = storage.path(directory)
  device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
  abstract = jax.tree.map(lambda v: jax.ShapeDtypeStruct(v.shape, jnp.float32, sharding=device),
                          nnx.to_pure_dict(target))

  def refused(reason: str) -> UserError:
    return UserError(f'{directory} is not a converted checkpoint of this autoencoder ({reason}); '
                     'convert the weights again with --mode=convert and the same '
                     'config.first_stage settings.')

  try:
    with ocp.StandardCheckpointer() as checkpointer:
      saved = _shapes(checkpointer.metadata(directory).item_metadata.tree)
  except Exception as e:  # pylint: disable=broad-except
    raise refused(errors.short(e)) from None
  wanted = _shapes(abstract)
  if saved.keys() != wanted.keys():
    names = sorted(saved.keys() ^ wanted.keys())
    raise refused(f'{len(names)} arrays in one of the checkpoint and the model only: '
                  f'{_listing(names, 3)}')
  bad = [f'{k} (file {list(saved[k])}, model {list(wanted[k])})' for k in sorted(wanted)
         if saved[k] != wanted[k]]
  if bad:
    raise UserError(f'{directory} does not match the autoencoder of config.first_stage: '
                    f'{len(bad)} shape mismatches: {_listing(bad)}.')
  try:
    with ocp.StandardCheckpointer() as checkpointer:
      restored = checkpointer.restore(directory, abstract)
  except Exception as e:  # pylint: disable=broad-except
    raise refused(errors.short(e)) from None
  state = jax.tree.map(lambda v: v, target)
  nnx.replace_by_pure_dict(state, restored)
  return state


def _shapes(tree) -> dict[str, tuple[int, ...]]:
  """'encoder/conv_in/kernel' -> shape, for every array of a tree or its Orbax metadata."""
  def name(key):
    return str(getattr(key, 'key', getattr(key, 'name', getattr(key, 'idx', key))))
  return {'/'.join(name(k) for k in path): tuple(leaf.shape)
          for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]}


# --- FID Inception-v3 (pt_inception-2015-12-05) -------------------------------------------------

INCEPTION_FILENAME = 'pt_inception-2015-12-05-6726825d.pth'
_INCEPTION_HINT = (f'supply {INCEPTION_FILENAME} (from the pytorch-fid GitHub release) via '
                   '--config.eval.inception_weights=PATH')
_INCEPTION_NAMES = {'kernel': 'weight', 'scale': 'weight', 'mean': 'running_mean',
                    'var': 'running_var'}


def _inception_ignored(key: str) -> bool:
  """The classifier (only the pool features are used) and BatchNorm's step counters."""
  return key.startswith('fc.') or key.endswith('.num_batches_tracked')


def load_inception_weights(path: str | os.PathLike, model_or_abstract_state: Any) -> nnx.State:
  """Loads the FID Inception-v3 weights onto the variables of `models.inception.InceptionV3`.

  Args:
    path: The PyTorch state dict `pt_inception-2015-12-05-6726825d.pth` (pytorch-fid's file;
      torch-fidelity's `weights-inception-2015-12-05-6726825d.pth` has the same keys), or a
      `.safetensors` file with the same key names. `fc.*` and `*.num_batches_tracked` are ignored.
    model_or_abstract_state: An `InceptionV3` (concrete or from `nnx.eval_shape`) or its
      `nnx.state(model)`; only the variable paths and shapes are used.

  Returns:
    An `nnx.State` with the target's structure (conv kernels HWIO, BatchNorm scale/bias as
    `nnx.Param`, running mean/var as `nnx.BatchStat`), all float32.

  Raises:
    UserError: missing file, unreadable file, or keys / shapes that do not match the network
      (one message listing the offending keys).
  """
  target = model_or_abstract_state
  if isinstance(target, nnx.Module):
    target = nnx.state(target)
  path = os.fspath(path)
  if not storage.path(path).is_file():
    raise UserError(f'Inception weights file {path} does not exist; {_INCEPTION_HINT}.')
  raw = read_state_dict(path)
  state = {k: v for k, v in raw.items() if not _inception_ignored(k)}
  expected = {'.'.join(map(str, (*p[:-1], _INCEPTION_NAMES.get(p[-1], p[-1])))): (p, v)
              for p, v in nnx.to_flat_state(target)}

  values, parts = _match_strictly(expected, state, allow_1x1_as_linear=False)
  if parts:
    raise UserError(f'weights file {path} does not match the FID Inception-v3: '
                    f'{"; ".join(parts)}; {_INCEPTION_HINT}.')
  return nnx.from_flat_state(values)


def inception_from_weights(path: str | os.PathLike) -> inception.InceptionV3:
  """The FID `InceptionV3` with the weights of `path` (see `load_inception_weights`)."""
  abstract = layers.abstract(inception.InceptionV3)
  return nnx.merge(nnx.graphdef(abstract), load_inception_weights(path, abstract))
