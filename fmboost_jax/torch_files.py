"""Reading `torch.save` files without running code from them: a restricted unpickler.

`torch.load(weights_only=True)` refuses full PyTorch Lightning checkpoints (SD v1 `.ckpt` files
carry callbacks keyed by Lightning classes, hparams and loop state besides the weights), and
unpickling them normally runs whatever the file names. `read_torch` loads them through
`_RestrictedUnpickler`: tensors are rebuilt exactly as the weights-only loader rebuilds them, the
objects of a known-harmless allow-list (Lightning, omegaconf, argparse, collections, ...) become
inert placeholders that only hold their state, and any other global refuses the file before it is
called. PyTorch is imported only here, and only when such a file is read.
"""

from __future__ import annotations

import _compat_pickle
import codecs
import functools
import pickle
import types
from collections import Counter, OrderedDict, defaultdict
from collections.abc import Mapping
from typing import Any

from fmboost_jax import errors
from fmboost_jax.errors import UserError

TORCH_PIN = 'torch==2.13.0'


# Pickled globals of full PyTorch Lightning checkpoints besides the weights (`callbacks` keyed by
# callback class, `hparams` / `hyper_parameters`, loop, optimizer and scheduler state): they become
# inert `_Placeholder` classes. Their modules are never imported and nothing of theirs is called.
_PLACEHOLDER_PACKAGES = frozenset({'pytorch_lightning', 'lightning', 'lightning_fabric',
                                   'lightning_utilities', 'omegaconf', 'typing'})
_PLACEHOLDER_NAMES = frozenset({
    'argparse.Namespace', 'pathlib.Path', 'pathlib.PosixPath', 'pathlib.WindowsPath',
    'pathlib.PurePath', 'pathlib.PurePosixPath', 'pathlib.PureWindowsPath', 'datetime.datetime',
    'datetime.date', 'datetime.timedelta', 'datetime.timezone', 'numpy.dtype', 'numpy.ndarray',
    'numpy.core.multiarray.scalar', 'numpy.core.multiarray._reconstruct',
    'numpy._core.multiarray.scalar', 'numpy._core.multiarray._reconstruct'})
# Real builtins and containers that are harmless to create (besides torch's own allow-list).
_CONTAINERS = {'collections.OrderedDict': OrderedDict, 'collections.defaultdict': defaultdict,
               'collections.Counter': Counter}
_CONTAINERS.update({f'builtins.{t.__name__}': t for t in (
    set, frozenset, dict, list, tuple, str, bytes, bytearray, int, float, bool, complex, slice,
    range)})
_DICT_TYPES = (dict, OrderedDict, defaultdict, Counter)


class _Refused(pickle.UnpicklingError):
  """A pickled global or operation outside the allow-list: the file is not unpickled further."""

  def __init__(self, what: str):
    super().__init__(f'refused to unpickle {what}')
    self.what = what


class _Placeholder:
  """An object of an allow-listed class (a Lightning callback, hparams, ...), kept as data only.

  Creating one (by NEWOBJ, REDUCE or INST) stores the pickled arguments; BUILD stores the state,
  SETITEM(S) / APPEND(S) / ADDITEMS store items. The real class is never imported.
  """
  pickled_name = ''

  def __new__(cls, *args, **kwargs):
    obj = super().__new__(cls)
    obj.pickled_args, obj.pickled_kwargs, obj.pickled_state = args, kwargs, None
    obj.pickled_items, obj.pickled_list = {}, []
    return obj

  def __init__(self, *args, **kwargs):
    del args, kwargs

  def __setstate__(self, state: Any) -> None:
    self.pickled_state = state

  def __repr__(self) -> str:
    return f'<unpickled {self.pickled_name}>'


def _is_placeholder_class(obj: Any) -> bool:
  return isinstance(obj, type) and issubclass(obj, _Placeholder)


def _latin1_encode(obj: Any, encoding: str = 'utf-8') -> bytes:
  """`_codecs.encode` as pickle protocol 2 uses it for bytes (str, 'latin1'), and nothing else."""
  if type(obj) is not str or encoding not in ('latin1', 'latin-1'):
    raise _Refused(f'_codecs.encode with {type(obj).__name__}, {encoding!r}')
  return codecs.encode(obj, 'latin1')


@functools.lru_cache(maxsize=1)
def _allowed_globals() -> tuple[dict[str, Any], frozenset[int]]:
  """Name -> object of the real globals allowed, and the ids of those objects."""
  import torch  # noqa: PLC0415  (torch is needed for .ckpt files only)
  from torch import _weights_only_unpickler  # noqa: PLC0415
  # The tensor rebuild functions, dtypes, storage and tensor types of torch.load(weights_only=True).
  allowed = dict(_weights_only_unpickler._get_allowed_globals())  # pylint: disable=protected-access
  allowed.update(_CONTAINERS)
  allowed['_codecs.encode'] = _latin1_encode
  assert 'torch._utils._rebuild_tensor_v2' in allowed and torch.Tensor is allowed['torch.Tensor']
  return allowed, frozenset(id(v) for v in allowed.values())


class _RestrictedUnpickler(pickle._Unpickler):  # pylint: disable=protected-access
  """The pure-Python unpickler with every operation that imports or calls anything restricted.

  GLOBAL / STACK_GLOBAL / INST resolve only allow-listed names (torch's weights-only globals, a few
  builtins and containers, and `_Placeholder` classes for the Lightning names above); REDUCE,
  NEWOBJ, INST and OBJ call only those; BUILD, SETITEM(S), APPEND(S) and ADDITEMS touch only
  tensors, containers and placeholders (as torch's weights-only unpickler does); copyreg extension
  codes are refused. Anything else raises `_Refused` before it runs.
  """
  dispatch = dict(pickle._Unpickler.dispatch)  # pylint: disable=protected-access

  def __init__(self, file, **kwargs):
    import torch  # noqa: PLC0415  (torch is needed for .ckpt files only)
    super().__init__(file, **kwargs)
    self._torch = torch
    self._allowed, self._allowed_ids = _allowed_globals()
    self._placeholders: dict[str, type] = {}

  def find_class(self, module: str, name: str) -> Any:
    if self.proto < 3 and self.fix_imports:
      if (module, name) in _compat_pickle.NAME_MAPPING:
        module, name = _compat_pickle.NAME_MAPPING[(module, name)]
      elif module in _compat_pickle.IMPORT_MAPPING:
        module = _compat_pickle.IMPORT_MAPPING[module]
    full = f'{module}.{name}'
    if full in self._allowed:
      return self._allowed[full]
    if module.split('.')[0] in _PLACEHOLDER_PACKAGES or full in _PLACEHOLDER_NAMES:
      if full not in self._placeholders:
        self._placeholders[full] = type(name.rpartition('.')[2] or 'Placeholder', (_Placeholder,),
                                        {'pickled_name': full, '__module__': __name__})
      return self._placeholders[full]
    raise _Refused(full)

  def _callable(self, func: Any) -> Any:
    if id(func) in self._allowed_ids or _is_placeholder_class(func):
      return func
    raise _Refused(f'a call of {_describe(func)}')

  def _validate_sparse(self, func: Any, result: Any) -> None:
    torch = self._torch
    if func in torch._tensor_classes and 'sparse' in func.__module__:  # As torch does.
      torch._utils._sparse_tensors_to_validate.append(result)  # pylint: disable=protected-access

  def load_reduce(self) -> None:
    args = self.stack.pop()
    func = self._callable(self.stack[-1])
    self.stack[-1] = func(*args)
    self._validate_sparse(func, self.stack[-1])
  dispatch[pickle.REDUCE[0]] = load_reduce

  def _new(self, cls: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
    torch = self._torch
    if not isinstance(cls, type):
      raise _Refused(f'NEWOBJ of {_describe(cls)}')
    self._callable(cls)
    obj = torch.nn.Parameter(*args, **kwargs) if cls is torch.nn.Parameter else cls.__new__(
        cls, *args, **kwargs)
    self._validate_sparse(cls, obj)
    self.append(obj)

  def load_newobj(self) -> None:
    args = self.stack.pop()
    self._new(self.stack.pop(), args, {})
  dispatch[pickle.NEWOBJ[0]] = load_newobj

  def load_newobj_ex(self) -> None:
    kwargs = self.stack.pop()
    args = self.stack.pop()
    self._new(self.stack.pop(), args, kwargs)
  dispatch[pickle.NEWOBJ_EX[0]] = load_newobj_ex

  def _instantiate(self, klass: Any, args: list[Any]) -> None:  # INST and OBJ.
    super()._instantiate(self._callable(klass), args)

  def load_build(self) -> None:
    torch = self._torch
    state = self.stack.pop()
    inst = self.stack[-1]
    kind = type(inst)
    if isinstance(inst, _Placeholder):
      inst.__setstate__(state)
    elif kind is torch.Tensor:  # The cases of torch's weights-only unpickler.
      inst.set_(*state)
    elif kind is torch.nn.Parameter:
      inst.__setstate__(state)
    elif kind is OrderedDict:
      inst.__dict__.update(state)
    elif id(kind) in self._allowed_ids and kind not in _CONTAINERS.values():
      if hasattr(inst, '__setstate__'):
        inst.__setstate__(state)
      else:
        slotstate = None
        if isinstance(state, tuple) and len(state) == 2:
          state, slotstate = state
        if state:
          inst.__dict__.update(state)
        for key, value in (slotstate or {}).items():
          setattr(inst, key, value)
    else:
      raise _Refused(f'BUILD of {_describe(inst)}')
  dispatch[pickle.BUILD[0]] = load_build

  def _target(self, types_: tuple[type, ...], op: str) -> Any:
    target = self.stack[-1]
    if type(target) in types_ or isinstance(target, _Placeholder):
      return target
    raise _Refused(f'{op} on {_describe(target)}')

  def load_append(self) -> None:
    value = self.stack.pop()
    target = self._target((list,), 'APPEND')
    (target.pickled_list if isinstance(target, _Placeholder) else target).append(value)
  dispatch[pickle.APPEND[0]] = load_append

  def load_appends(self) -> None:
    items = self.pop_mark()
    target = self._target((list,), 'APPENDS')
    (target.pickled_list if isinstance(target, _Placeholder) else target).extend(items)
  dispatch[pickle.APPENDS[0]] = load_appends

  def load_setitem(self) -> None:
    value = self.stack.pop()
    key = self.stack.pop()
    target = self._target(_DICT_TYPES, 'SETITEM')
    (target.pickled_items if isinstance(target, _Placeholder) else target)[key] = value
  dispatch[pickle.SETITEM[0]] = load_setitem

  def load_setitems(self) -> None:
    items = self.pop_mark()
    target = self._target(_DICT_TYPES, 'SETITEMS')
    target = target.pickled_items if isinstance(target, _Placeholder) else target
    for i in range(0, len(items), 2):
      target[items[i]] = items[i + 1]
  dispatch[pickle.SETITEMS[0]] = load_setitems

  def load_additems(self) -> None:
    items = self.pop_mark()
    target = self._target((set,), 'ADDITEMS')
    if isinstance(target, _Placeholder):
      target.pickled_list.extend(items)
    else:
      target.update(items)
  dispatch[pickle.ADDITEMS[0]] = load_additems

  def _refuse_extension(self) -> None:
    raise _Refused('a copyreg extension code')
  for _op in (pickle.EXT1, pickle.EXT2, pickle.EXT4):
    dispatch[_op[0]] = _refuse_extension
  del _op


def _describe(obj: Any) -> str:
  if isinstance(obj, type) or callable(obj):
    return f'{getattr(obj, "__module__", "?")}.{getattr(obj, "__qualname__", type(obj).__name__)}'
  return f'a {type(obj).__name__}'


# What `torch.load(pickle_module=...)` uses: `Unpickler` for the data, `load` for the short
# pickles of the pre-zip format (magic number, protocol, system info, storage keys).
_RESTRICTED_PICKLE = types.SimpleNamespace(
    __name__=f'{__name__}._RESTRICTED_PICKLE', Unpickler=_RestrictedUnpickler,
    load=lambda file, **kwargs: _RestrictedUnpickler(file, **kwargs).load())


# The first pickle of torch.save's legacy (pre-zip) format (torch.serialization.MAGIC_NUMBER).
LEGACY_MAGIC_NUMBER = 0x1950a86a20f9469cfc6c


class _DataOnlyUnpickler(pickle.Unpickler):
  """Unpickles plain data only: any global (and so any call or extension code) is an error."""

  def find_class(self, module: str, name: str) -> Any:
    raise pickle.UnpicklingError(f'global {module}.{name}')


def _is_torch_file(path: str) -> bool:
  """True if the file starts like torch.save output: a zip archive, or (the legacy format) a
  protocol-2+ pickle of torch's magic number."""
  with open(path, 'rb') as f:
    head = f.read(4)
    if head == b'PK\x03\x04':
      return True
    if len(head) < 4 or head[0] != 0x80 or not 2 <= head[1] <= 5:
      return False
    f.seek(0)
    try:
      return _DataOnlyUnpickler(f).load() == LEGACY_MAGIC_NUMBER
    except Exception:  # noqa: BLE001  (any bytes that are not that pickle)
      return False


def read_torch(path: str) -> dict[str, Any]:
  """The tensors (as float32 numpy arrays) and other entries of a torch.save file's state dict (its
  `state_dict` entry when it has one), read without running any code from the file."""
  if not _is_torch_file(path):
    raise UserError(f'{path} is not a PyTorch checkpoint (expected a file written by torch.save, '
                    'or a .safetensors file); check the path, or download or convert the file '
                    'again.')
  try:
    import torch  # noqa: PLC0415  (an optional dependency)
  except ImportError:
    raise UserError(f'reading the PyTorch checkpoint {path} needs PyTorch: pip install '
                    f'{TORCH_PIN}, or convert the file to .safetensors.') from None
  try:
    # weights_only=False only because torch.load takes no pickle_module otherwise: the restricted
    # unpickler is stricter than weights_only=True about code and allows inert Lightning objects.
    obj = torch.load(path, map_location='cpu', weights_only=False, pickle_module=_RESTRICTED_PICKLE)
  except _Refused as e:
    raise UserError(
        f'{path} holds pickled Python code or objects ({e.what}) that are not unpickled, since '
        'loading them could run code; use a .safetensors or tensors-only copy of the weights '
        'from a source you trust instead.') from None
  except Exception as e:  # pylint: disable=broad-except
    if 'explicit pickle_module' in str(e):  # TORCH_FORCE_WEIGHTS_ONLY_LOAD=1 forbids a reader.
      raise UserError(f'reading {path} needs the environment variable '
                      'TORCH_FORCE_WEIGHTS_ONLY_LOAD unset (the restricted reader of fmboost_jax '
                      'never runs code either); unset it and run again.') from None
    raise UserError(f'{path} is not a readable PyTorch checkpoint ({errors.short(e)}); the file '
                    'may be truncated or of another kind, so download or convert it '
                    'again.') from None
  if isinstance(obj, Mapping) and isinstance(obj.get('state_dict'), Mapping):
    obj = obj['state_dict']
  if not isinstance(obj, Mapping):
    raise UserError(f'{path} holds a {type(obj).__name__}, not a state dict; save the model with '
                    'torch.save(model.state_dict(), path).')
  out = {}
  for key, value in obj.items():
    if isinstance(value, torch.Tensor):
      out[str(key)] = value.detach().to(device='cpu', dtype=torch.float32).numpy()
    else:
      out[str(key)] = value
  return out


