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
    freqs = torch.exp(-math.log(10000.0) * torch.arange(half, dtype=torch.float32) / half)
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
  parser.add_argument('--json', help='Also write the results to this file.')
  args = parser.parse_args()
  torch.set_num_threads(args.threads)
  torch.manual_seed(0)
  model = EfficientUNet()
  params = sum(p.numel() for p in model.parameters())
  if params != REFERENCE_PARAMETERS:
    raise SystemExit(f'the PyTorch UNet-base has {params:,} parameters, not the reference '
                     f'{REFERENCE_PARAMETERS:,}; the port is wrong.')
  optimizer = torch.optim.Adam(model.parameters(), lr=3e-5)
  x1, x_up = torch.randn(2, 4, 64, 64), torch.randn(2, 4, 64, 64)

  def step():
    t = torch.rand(2)
    x0 = x_up + 0.1 * torch.randn_like(x_up)
    x_t = (1 - t[:, None, None, None]) * x0 + t[:, None, None, None] * x1
    loss = F.mse_loss(model(torch.cat([x_t, x_up], dim=1), t), x1 - x0)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
    return float(loss)

  times = []
  for i in range(args.steps + 2):
    t0 = time.perf_counter()
    step()
    if i >= 2:
      times.append(time.perf_counter() - t0)
  results = {'parameters': params, 'threads': args.threads, 'torch': torch.__version__,
             'step_seconds_median': statistics.median(times), 'step_seconds_min': min(times),
             'step_seconds_max': max(times),
             'peak_rss_mib': resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}
  report(results, args.json)


if __name__ == '__main__':
  main()
