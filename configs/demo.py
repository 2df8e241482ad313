"""The embedded default: pixel-space CFM on random crops of the bundled photographs.

  python main.py --config=configs/demo.py --workdir=workdirs/demo

2x upsampling of 16 px to 32 px crops; 1500 steps take 5 to 9 minutes on 2 CPU cores. The noise
augmentation is step 100 rather than the latent-space default 400: in pixel space and at this budget
the smaller step converges much faster. Validation (and `--mode=sample`) uses Euler at 2 NFE, where
the NFE sweep of docs/results.md peaks in PSNR and SSIM: more steps invent more detail, which costs
PSNR.
`--config=configs/demo.py:tiny` is the same setup shrunk to seconds, for tests and smoke runs.
`:fm`, `:l1` and `:l2` are the paper's Table 2 baselines with the same network, data and budget:
naive flow matching from N(0, I) (context still concatenated) and L1 / L2 regression.
"""

from configs import default


def get_config(variant: str = ''):
  config = default.get_config()
  config.first_stage.name = 'identity'

  config.model.model_channels = 32
  config.model.channel_mult = (1, 1, 2)
  config.model.num_res_blocks = 1
  config.model.attention_levels = (2,)
  config.model.num_heads = 2
  config.model.head_dim = 32
  # At these widths XLA's convolutions beat the matrix products on CPUs too (0.41 against 0.44 s
  # per step, docs/benchmarks.md), and float32 keeps the CPU and accelerator runs comparable.
  config.model.conv_impl = 'xla'
  config.model.compute_dtype = 'float32'
  # XLA's CPU backend hands convolutions (and their gradients) and reductions to YNNPACK by
  # default. XLA's own kernels run these narrow convolutions faster, and YNNPACK's reductions (the
  # gradients of the norms and biases) beat XLA's by far: with only the reductions left to YNNPACK
  # a step costs a fifth less than with all or none (benchmarks/results.md items 15 and 17).
  config.train.cpu_compiler_options = (
      ('xla_cpu_experimental_ynn_fusion_type', 'LIBRARY_FUSION_TYPE_REDUCE'),)

  config.data.source = 'skimage'
  config.data.holdout = 'strips'  # 15 photographs: each lends its bottom strip to the held-out set.
  config.data.high_res_size = 32
  config.data.low_res_size = 16
  config.data.batch_size = 16
  config.data.num_val_images = 32

  config.optim.learning_rate = 1e-3
  config.optim.warmup_steps = 100
  config.ema.start_step = 100

  config.flow.noising_step = 100
  config.sample.nfe = 2
  config.eval.crop_size = 16

  config.train.num_steps = 1500
  config.train.log_every = 50
  config.train.eval_every = 500
  config.train.checkpoint_every = 500

  if variant == 'tiny':
    config.model.channel_mult = (1, 2)
    config.model.attention_levels = (1,)
    config.model.head_dim = 16
    config.train.cpu_compiler_options = ()  # At this size YNNPACK is the faster (0.11 s, 0.13 s).
    config.data.high_res_size = 16
    config.data.low_res_size = 8
    config.data.batch_size = 8
    config.data.num_val_images = 8
    config.data.num_threads = 2
    config.optim.warmup_steps = 2
    config.ema.start_step = 2
    config.sample.nfe = 2
    config.eval.crop_size = 8
    config.eval.nfe_sweep = (1, 2)
    config.train.num_steps = 6
    config.train.log_every = 1
    config.train.eval_every = 1000
    config.train.checkpoint_every = 3
    config.train.num_grid_images = 4
  elif variant in ('fm', 'l1', 'l2'):
    config.flow.objective = variant
    config.flow.noising_step = 0  # FM starts from noise; regression from the clean x_up.
  elif variant:
    raise ValueError(f"unknown demo variant {variant!r}; use 'tiny', 'fm', 'l1', 'l2' or nothing.")
  return config
