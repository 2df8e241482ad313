"""The paper setup: 512 -> 1024 px, i.e. SD latents 64^2 -> 128^2 (reference 3.1 and 5).

Every other config starts from this one and changes a few fields.
"""

import ml_collections


def get_config() -> ml_collections.ConfigDict:
  config = ml_collections.ConfigDict()
  config.seed = 2024

  # First stage: 'sd_vae' is the SD KL-f8 autoencoder (latents are its posterior mean x 0.18215);
  # 'identity' trains in pixel space.
  config.first_stage = ml_collections.ConfigDict()
  config.first_stage.name = 'sd_vae'
  # sd_ae.ckpt (official FMBoost README), an SD checkpoint, or diffusers'
  # diffusion_pytorch_model.safetensors (e.g. stabilityai/sd-vae-ft-mse) or its folder.
  config.first_stage.weights = ''
  config.first_stage.ch = 128
  config.first_stage.ch_mult = (1, 2, 4, 4)
  config.first_stage.num_res_blocks = 2
  config.first_stage.z_channels = 4
  config.first_stage.scale_factor = 0.18215
  config.first_stage.compute_dtype = 'float32'

  # Velocity network v_theta(concat[x_t, context], t) (reference 3: UNet-base).
  config.model = ml_collections.ConfigDict()
  config.model.model_channels = 128
  config.model.channel_mult = (1, 2, 4, 8)
  config.model.num_res_blocks = 3
  # Level indices (0 = full resolution); the middle block always attends.
  config.model.attention_levels = (3,)
  config.model.num_heads = 4
  config.model.head_dim = 64
  # What the network computes with; 'auto' picks the measured fastest per backend
  # (fmboost_jax/models/backends.py, docs/benchmarks.md) and logs it at start-up:
  # compute_dtype: 'bfloat16' (float32 master weights) on GPU/TPU, 'float32' on CPU;
  # conv_impl: 'matmul' (one im2col matrix product per convolution) on CPU, 'xla' on GPU/TPU;
  # attention_impl: 'cudnn' (fused attention, where it applies, else XLA's) on GPU, 'xla' elsewhere.
  # Parameters, checkpoints and results are the same whichever is chosen, up to rounding.
  config.model.compute_dtype = 'auto'  # 'auto' | 'float32' | 'bfloat16'
  config.model.conv_impl = 'auto'  # 'auto' | 'xla' | 'matmul'
  config.model.attention_impl = 'auto'  # 'auto' | 'xla' | 'cudnn'
  # Rematerialisation of each residual block in the backward pass, trading compute for activation
  # memory: 'none' | 'full' (keep block inputs only) | 'dots' (also keep unbatched matrix products;
  # see models/unet.py). No effect on CPUs, where XLA folds the recomputation back.
  config.model.remat = 'none'

  # What is learned (fmboost_jax/flow.py).
  config.flow = ml_collections.ConfigDict()
  config.flow.objective = 'cfm'  # 'cfm' | 'fm' (source N(0, I)) | 'l1' | 'l2' (regression).
  config.flow.schedule = 'linear'  # 'linear' | 'gvp'.
  config.flow.sigma_min = 0.0
  config.flow.noising_step = 400  # Cosine noise augmentation of the source; 0 disables it.
  config.flow.num_noising_steps = 1000
  config.flow.upsampling_mode = 'psu'  # 'psu' | 'bilinear' | 'nearest'.

  # Data (fmboost_jax/input_pipeline.py). Images are float32 NHWC in [-1, 1].
  config.data = ml_collections.ConfigDict()
  # 'folder' | 'tfds' | 'skimage' (the bundled photographs) | 'latents' (from --mode=precompute).
  config.data.source = 'folder'
  config.data.path = ''  # Folder of images when source='folder' (set it on the command line).
  config.data.tfds_name = ''  # e.g. 'oxford_flowers102' when source='tfds'.
  config.data.tfds_split = 'train'
  config.data.tfds_data_dir = ''
  # The held-out set: 'images' = whole images never trained on (val_path, tfds_val_split, or a
  # val_fraction share of data.path picked by a hash of each file's relative path); 'strips' = the
  # bottom high_res_size rows of every image (the bundled photographs of the demo).
  config.data.holdout = 'images'
  config.data.val_path = ''  # A folder of held-out images (source='folder'); '' = val_fraction.
  config.data.val_fraction = 0.02
  config.data.tfds_val_split = 'validation'
  # Images with a shorter side below high_res_size are skipped (and counted); True scales them up.
  config.data.resize_small = False
  # Images with more pixels are skipped (and counted) without being decoded.
  config.data.max_pixels = 64_000_000
  # Where the folder source keeps its index of image sizes, so that a restart reads the headers of
  # new and changed files only (local or gs://); '' = the --workdir of train, evaluate and
  # precompute (main.py), none elsewhere.
  config.data.index_dir = ''
  config.data.high_res_size = 1024
  config.data.low_res_size = 512
  config.data.batch_size = 64  # Global, over all processes and devices.
  config.data.num_val_images = 64
  config.data.num_threads = 8
  config.data.prefetch_buffer_size = 32  # Images buffered ahead (at least one batch per thread).

  # main.py --mode=precompute: seeded random crops per image, records per .npy shard (about
  # shard_size / crops_per_image whole images each), images per encode call on each process.
  config.precompute = ml_collections.ConfigDict()
  config.precompute.crops_per_image = 4
  config.precompute.shard_size = 4096
  config.precompute.batch_size = 8

  # Adam with linear warm-up (reference 5.1).
  config.optim = ml_collections.ConfigDict()
  config.optim.learning_rate = 3e-5
  config.optim.warmup_steps = 1000
  config.optim.b1 = 0.9
  config.optim.b2 = 0.999
  config.optim.eps = 1e-8
  config.optim.grad_clip_norm = 0.0  # 0 disables clipping.

  # EMA with warm-up (reference 5.4).
  config.ema = ml_collections.ConfigDict()
  config.ema.decay = 0.999
  config.ema.power = 0.75
  config.ema.start_step = 1000
  config.ema.use_for_sampling = True

  # Sampler used by validation.
  config.sample = ml_collections.ConfigDict()
  config.sample.solver = 'euler'  # 'euler' | 'heun' (fixed NFE) | 'dopri5' (adaptive).
  config.sample.nfe = 40  # Network evaluations of euler/heun (the paper: Euler, 40).
  config.sample.rtol = 1e-3  # dopri5 only.
  config.sample.atol = 1e-6
  config.sample.max_steps = 4096
  # main.py --mode=sample (fmboost_jax/inference.py).
  # A cascade, applied in turn: each stage a path (a --mode=train workdir or a --mode=export
  # directory) or a dict {'workdir': PATH, 'solver': .., 'nfe': .., 'rtol': .., 'atol': ..,
  # 'max_steps': ..} (unset settings come from the fields above); () = --workdir alone. E.g.
  # --config.sample.stages="('runs/x2', {'workdir': 'runs/x4', 'nfe': 10})".
  config.sample.stages = ()
  config.sample.batch_size = 8  # Inputs per solve (padded to a multiple of the devices).
  config.sample.seed = 0  # Noise augmentation of the source.
  config.sample.latents_scaled = True  # .npy/.npz latents are already times scale_factor.
  config.sample.input_size = 0  # > 0 resizes input images so their longer side is this many px.
  config.sample.figure = False  # Also write figures/NAME.png: low-res | bilinear | model.
  config.sample.trajectory = 0  # K >= 2 adds the ODE states at K times in [0, 1] to the figure.

  # main.py --mode=evaluate (fmboost_jax/evaluate.py) on config.data.num_val_images held-out images.
  config.eval = ml_collections.ConfigDict()
  # Models to compare (workdirs or exports; rows named by their objective); () = --workdir. E.g.
  # --config.eval.checkpoints="('runs/cfm', 'runs/fm')".
  config.eval.checkpoints = ()
  config.eval.nfe_sweep = (1, 2, 4, 10, 50)  # Euler network evaluations (the paper's Fig. 5).
  # pt_inception-2015-12-05-6726825d.pth (pytorch-fid's FID Inception weights) for FID and p-FID.
  config.eval.inception_weights = ''
  config.eval.crop_size = 512  # p-FID crops (reference 6.1: 4 crops of 512 px at 1024 px).
  config.eval.num_crops = 4
  config.eval.num_figure_images = 4
  config.eval.seed = 0  # Noise augmentation and crop boxes.

  # Device mesh (data x fsdp = all devices; one axis may be -1 to fill). The batch is split over
  # both axes; state arrays of at least fsdp_min_size elements are split over fsdp along their
  # largest divisible dimension, the rest replicated (fmboost_jax/sharding.py).
  config.mesh = ml_collections.ConfigDict()
  config.mesh.data = -1
  config.mesh.fsdp = 1
  config.mesh.fsdp_min_size = 2**18

  config.train = ml_collections.ConfigDict()
  # The backend JAX must see, else no start: 'any' | 'cpu' | 'gpu' | 'tpu' (the SLURM launch script
  # sets gpu, the TPU one tpu, so a job that lost its accelerators never trains on the CPU).
  config.train.platform = 'any'
  config.train.num_steps = 500_000
  config.train.log_every = 50
  config.train.eval_every = 5000  # Held-out PSNR/SSIM every N steps and at the end; 0: never.
  config.train.checkpoint_every = 10_000
  config.train.keep_checkpoints = 3  # The latest ones; 0 keeps all.
  config.train.num_grid_images = 8
  # Persistent XLA compilation cache shared by runs (e.g. on storage all hosts see); '' disables.
  config.train.compilation_cache_dir = ''
  # XLA compiler options of the train step on CPUs, as (name, value) pairs, e.g.
  # (('xla_cpu_experimental_ynn_fusion_type', ''),); GPUs and TPUs compile without them.
  config.train.cpu_compiler_options = ()
  # > 0: a profiler trace (TensorBoard / Perfetto) of this many steps, from the second step on,
  # in WORKDIR/profile.
  config.train.profile_steps = 0
  # The peak FLOP/s of one device that the logged MFU is measured against; 0 takes the device
  # kind's dense bfloat16 peak from fmboost_jax/accelerators.py (on CPUs and unknown kinds the log
  # gives TFLOP/s without MFU unless this is set).
  config.train.peak_flops_per_device = 0.0

  # main.py --mode=compile (fmboost_jax/aot.py): compile this config's programs, on this machine,
  # for a TPU slice or NVIDIA GPUs, and report per-device memory against HBM, FLOPs, collectives.
  config.compile = ml_collections.ConfigDict()
  # A libtpu topology (v5e:2x2, v5e:4x4, v5p:2x2x2, v6e:8x8: the chip grid) or GPUs per host
  # [x hosts] (h100:8, h200:8x4, a100:8); fmboost_jax/accelerators.py lists them.
  config.compile.target = ''
  # The programs to compile, of those this config's runs need: 'train' (the train step),
  # 'evaluate' (the loop's held-out evaluation, when train.eval_every > 0), 'sample'
  # (--mode=sample's solve and tiled decode of config.sample.batch_size latents of low_res_size)
  # and 'precompute' (its encoder of precompute.batch_size crops per host, when training from
  # data.source='latents').
  config.compile.programs = ('train', 'evaluate', 'sample', 'precompute')
  config.compile.max_batch = False  # Also find the largest per-device batch that fits.
  # > 0: the MFU this many training samples per second per device would need on the target.
  config.compile.samples_per_second = 0.0

  return config
