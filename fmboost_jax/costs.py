"""What a compiled program costs: its FLOPs, its memory per device and its collectives, read from
XLA (`Lowered.cost_analysis`, `Compiled.memory_analysis`, the compiled HLO), for the training
log's throughput figures and for `--mode=compile`'s reports.
"""

import dataclasses
import math
import re

import jax
import numpy as np

COLLECTIVES = ('all-reduce', 'all-gather', 'reduce-scatter', 'all-to-all', 'collective-permute')
# An HLO instruction: `%name = <result shape> <op>(`, the op possibly an async `-start`.
_INSTRUCTION = re.compile(r'=\s*(\(?[^=]*?\)?)\s+(' + '|'.join(COLLECTIVES) + r')(-start)?\(')
_ARRAY = re.compile(r'\b(pred|[subf]\d+|bf16|f8e\w+|c64|c128)\[([\d,]*)\]')


def flops(lowered: jax.stages.Lowered) -> float:
  """The FLOPs of one run of the whole (global, unpartitioned) program, as XLA's cost analysis
  counts them on the program as written: what MFU is measured against (a rematerialised forward
  pass is not counted twice)."""
  costs = lowered.cost_analysis()
  costs = costs[0] if isinstance(costs, (list, tuple)) else costs
  return float((costs or {}).get('flops', 0.0))


def _itemsize(dtype: str) -> int:
  if dtype == 'pred' or dtype.startswith('f8'):
    return 1
  return {'bf16': 2, 'c64': 8, 'c128': 16}.get(dtype) or int(dtype[1:]) // 8


def _arrays(shape_text: str) -> list[int]:
  """Bytes of each array in an HLO shape such as `(f32[8,128]{1,0}, bf16[4])`."""
  return [math.prod(int(d) for d in dims.split(',') if d) * _itemsize(dtype)
          for dtype, dims in _ARRAY.findall(shape_text)]


def collectives(hlo_text: str) -> dict[str, dict[str, int]]:
  """{kind: {'count': n, 'bytes': result bytes per device}} of the collectives in a compiled
  (partitioned) program's HLO text. An async `-start` is counted once (its `-done` not at all),
  with its largest array: its shape pairs the operands with the results."""
  found = {}
  hlo_text = re.sub(r'/\*.*?\*/', '', hlo_text)  # Long tuples carry /*index=N*/ comments.
  for shape, kind, start in _INSTRUCTION.findall(hlo_text):
    arrays = _arrays(shape)
    entry = found.setdefault(kind, {'count': 0, 'bytes': 0})
    entry['count'] += 1
    entry['bytes'] += max(arrays, default=0) if start else sum(arrays)
  return found


@dataclasses.dataclass(frozen=True)
class Memory:
  """Bytes per device of a compiled program, from `Compiled.memory_analysis()`."""
  arguments: int
  outputs: int
  aliased: int  # Outputs written into donated arguments.
  temporaries: int
  code: int

  @property
  def total(self) -> int:
    """What the program holds at its peak: its arguments, its outputs not written in place of
    donated arguments, its temporaries and its code."""
    return self.arguments + self.outputs - self.aliased + self.temporaries + self.code


def memory(compiled: jax.stages.Compiled) -> Memory:
  m = compiled.memory_analysis()
  return Memory(arguments=m.argument_size_in_bytes, outputs=m.output_size_in_bytes,
                aliased=m.alias_size_in_bytes, temporaries=m.temp_size_in_bytes,
                code=m.generated_code_size_in_bytes)


def bytes_per_device(tree) -> int:
  """The bytes one device holds of a pytree of arrays or ShapeDtypeStructs with shardings: the
  largest shard of each leaf (what the sharding puts on each device)."""
  return sum(math.prod(x.sharding.shard_shape(x.shape)) * np.dtype(x.dtype).itemsize
             for x in jax.tree.leaves(tree))
