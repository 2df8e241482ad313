"""The official PyTorch training step of UNet-base, timed on this machine (the yardstick).

  .venv/bin/python benchmarks/torch_unet_step.py --steps=5

The official FMBoost EfficientUNet with the unet-base_psu config, written in PyTorch from the
reference description (docs: ../shared/reference/official_fmboost.md, sections 3.1-3.8; NCHW, GN
eps 1e-5, scale-shift ResBlocks, zero-initialised output convolutions, attention at the deepest
level with the official raw-reshape head split, cos|sin time embedding of the unscaled t). The
parameter count is checked against the reference (305,806,340). One step is what reference 3.9
times: forward, the flow-matching MSE loss, backward and Adam, float32, batch 2 on 8x64x64 inputs
(x_t and the context), `torch.set_num_threads(--threads)`. Reported: median, min and max over
--steps steps after 2 warm-up steps, and the process's peak RSS. PyTorch is a test and benchmark
dependency only (requirements-dev.txt).

On a GPU (benchmarks/accelerator.py), as the official config trains (precision bf16-mixed):

  python benchmarks/torch_unet_step.py --device=cuda --precision=bf16-mixed --batch=32 --size=128 \
      --pipelined --steps=5 --repeats=3

--precision=bf16-mixed runs the forward pass and the loss under bf16 autocast (float32 weights and
Adam), as Lightning does; on CUDA cuDNN picks its fastest algorithms (cudnn.benchmark). --pipelined
times --steps steps back to back with one wait at the end, --repeats times (per-step time = each
run's average, as a training loop runs them). --model=tiny is a small UNet of the same code
(configs/demo.py:tiny's widths) for smoke runs.
"""

import argparse
import math
import resource
import statistics
import time

import torch
from common import report
from torch import nn
from torch.nn import functional as F

REFERENCE_PARAMETERS = 305_806_340


def _zero(module: nn.Module) -> nn.Module:
  for p in module.parameters():
    nn.init.zeros_(p)
  return module


class ResBlock(nn.Module):

  def __init__(self, cin: int, cout: int, emb: int):
    super().__init__()
    self.norm1, self.conv1 = nn.GroupNorm(32, cin), nn.Conv2d(cin, cout, 3, padding=1)
    self.emb = nn.Linear(emb, 2 * cout)
    self.norm2, self.conv2 = nn.GroupNorm(32, cout), _zero(nn.Conv2d(cout, cout, 3, padding=1))
    self.skip = nn.Identity() if cin == cout else nn.Conv2d(cin, cout, 1)

  def forward(self, x, emb):
    h = self.conv1(F.silu(self.norm1(x)))
    scale, shift = self.emb(F.silu(emb))[:, :, None, None].chunk(2, dim=1)
    h = self.conv2(F.silu(self.norm2(h) * (1 + scale) + shift))
    return self.skip(x) + h


class Attention(nn.Module):
  """The official SpatialSelfAttention, head split by a raw reshape of the channel-major qkv."""

  def __init__(self, channels: int, heads: int = 4, head_dim: int = 64):
    super().__init__()
    self.heads, self.head_dim = heads, head_dim
    self.norm = nn.GroupNorm(32, channels)
    self.qkv = nn.Conv1d(channels, 3 * heads * head_dim, 1)
    self.proj_out = _zero(nn.Conv1d(heads * head_dim, channels, 1))

  def forward(self, x):
    b, c, h, w = x.shape
    qkv = self.qkv(self.norm(x).reshape(b, c, h * w)).reshape(b, self.heads, h * w, -1)
    q, k, v = qkv.chunk(3, dim=-1)
    out = F.scaled_dot_product_attention(q, k, v).reshape(b, self.heads * self.head_dim, h * w)
    return x + self.proj_out(out).reshape(b, c, h, w)


class Block(nn.Module):

  def __init__(self, cin, cout, emb, attention=False, upsample=False):
    super().__init__()
    self.res = ResBlock(cin, cout, emb)
    self.attn = Attention(cout) if attention else None
    self.up = nn.Conv2d(cout, cout, 3, padding=1) if upsample else None

  def forward(self, x, emb):
    h = self.res(x, emb)
    if self.attn is not None:
      h = self.attn(h)
    if self.up is not None:
      h = self.up(F.interpolate(h, scale_factor=2, mode='nearest'))
    return h


class EfficientUNet(nn.Module):

  def __init__(self, cin=8, cout=4, ch=128, mult=(1, 2, 4, 8), num_res=3, attention_levels=(3,)):
    super().__init__()
    self.ch, emb = ch, 4 * ch
    self.time = nn.Sequential(nn.Linear(ch, emb), nn.SiLU(), nn.Linear(emb, emb))
    self.inputs = nn.ModuleList([nn.Conv2d(cin, ch, 3, padding=1)])
    skips, c = [ch], ch
    for level, m in enumerate(mult):
      for _ in range(num_res):
        self.inputs.append(Block(c, m * ch, emb, attention=level in attention_levels))
        c = m * ch
        skips.append(c)
      if level != len(mult) - 1:
        self.inputs.append(nn.Conv2d(c, c, 3, stride=2, padding=1))
        skips.append(c)
    self.middle = nn.ModuleList([ResBlock(c, c, emb), Attention(c), ResBlock(c, c, emb)])
    self.outputs = nn.ModuleList()
    for level, m in reversed(list(enumerate(mult))):
      for i in range(num_res + 1):
        self.outputs.append(Block(c + skips.pop(), m * ch, emb, attention=level in attention_levels,
                                  upsample=level != 0 and i == num_res))
        c = m * ch
    self.out = nn.Sequential(nn.GroupNorm(32, c), nn.SiLU(),
                             _zero(nn.Conv2d(c, cout, 3, padding=1)))

  def forward(self, x, t):
    half = self.ch // 2
    freqs = torch.exp(-math.log(10000.0) * torch.arange(half, dtype=torch.float32,
                                                        device=t.device) / half)
    args = t[:, None] * freqs[None]
    emb = self.time(torch.cat([torch.cos(args), torch.sin(args)], dim=1))
    h, hs = x, []
    for block in self.inputs:
      h = block(h, emb) if isinstance(block, Block) else block(h)
      hs.append(h)
    h = self.middle[2](self.middle[1](self.middle[0](h, emb)), emb)
    for block in self.outputs:
      h = block(torch.cat([h, hs.pop()], dim=1), emb)
    return self.out(h)


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--steps', type=int, default=5)
  parser.add_argument('--threads', type=int, default=2)
  parser.add_argument('--model', choices=['unet_base', 'tiny'], default='unet_base')
  parser.add_argument('--batch', type=int, default=2)
  parser.add_argument('--size', type=int, default=64, help='Latent edge (the paper: 64 -> 128).')
  parser.add_argument('--device', default='cpu', help="'cpu' or 'cuda'.")
  parser.add_argument('--precision', choices=['32', 'bf16-mixed'], default='32')
  parser.add_argument('--pipelined', action='store_true',
                      help='Time --steps steps back to back (one wait at the end), --repeats '
                      'times.')
  parser.add_argument('--repeats', type=int, default=3)
  parser.add_argument('--json', help='Also write the results to this file.')
  args = parser.parse_args()
  torch.set_num_threads(args.threads)
  torch.manual_seed(0)
  device = torch.device(args.device)
  if device.type == 'cuda':
    if not torch.cuda.is_available():
      raise SystemExit('--device=cuda: this PyTorch sees no CUDA device.')
    torch.backends.cudnn.benchmark = True
  model = (EfficientUNet() if args.model == 'unet_base' else
           EfficientUNet(ch=32, mult=(1, 2), num_res=1, attention_levels=(1,)))
  params = sum(p.numel() for p in model.parameters())
  if args.model == 'unet_base' and params != REFERENCE_PARAMETERS:
    raise SystemExit(f'the PyTorch UNet-base has {params:,} parameters, not the reference '
                     f'{REFERENCE_PARAMETERS:,}; the port is wrong.')
  model = model.to(device)
  optimizer = torch.optim.Adam(model.parameters(), lr=3e-5)
  b, s = args.batch, args.size
  x1, x_up = torch.randn(b, 4, s, s, device=device), torch.randn(b, 4, s, s, device=device)
  autocast = torch.autocast(device.type, dtype=torch.bfloat16,
                            enabled=args.precision == 'bf16-mixed')

  def step():
    t = torch.rand(b, device=device)
    x0 = x_up + 0.1 * torch.randn_like(x_up)
    x_t = (1 - t[:, None, None, None]) * x0 + t[:, None, None, None] * x1
    with autocast:
      loss = F.mse_loss(model(torch.cat([x_t, x_up], dim=1), t), x1 - x0)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
    return loss.detach()

  def wait():
    if device.type == 'cuda':
      torch.cuda.synchronize(device)

  times = []
  for i in range(2 if args.pipelined else args.steps + 2):  # 2 warm-up steps first.
    t0 = time.perf_counter()
    loss = float(step())
    if i >= 2 and not args.pipelined:
      times.append(time.perf_counter() - t0)
  for _ in range(args.repeats if args.pipelined else 0):
    wait()
    t0 = time.perf_counter()
    for _ in range(args.steps):
      last = step()
    wait()
    times.append((time.perf_counter() - t0) / args.steps)
    loss = float(last)
  median = statistics.median(times)
  results = {'parameters': params, 'threads': args.threads, 'torch': torch.__version__,
             'step_seconds_median': median, 'step_seconds_min': min(times),
             'step_seconds_max': max(times),
             'peak_rss_mib': resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
             'model': args.model, 'batch_size': b, 'size': s, 'device': args.device,
             'precision': args.precision, 'pipelined': args.pipelined,
             'samples_per_second': b / median, 'loss': loss}
  if device.type == 'cuda':
    results.update(device_name=torch.cuda.get_device_name(device),
                   cuda_peak_mib=torch.cuda.max_memory_allocated(device) / 2**20)
  report(results, args.json)


if __name__ == '__main__':
  main()
