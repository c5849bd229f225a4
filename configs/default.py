"""The paper's settings (Ouyang et al., IEEE TMI 2020, Sections III-IV).

Every constant of the paper lives here with the paper's value as default. Variants import this
file and override only what differs (see ``att_rn34_us.py``, ``att_rn34_ss.py``, ``rn34_us.py``).

Run:
    python train.py --config configs/default.py --fold 0 --config.data.manifest=/path/to/manifest.csv

The paper's TV-set 5-fold results (Table II) are AUC 0.984-0.988; on your own data expect
whatever your data gives. Full-size volumes need an accelerator (see docs/benchmarks.md).
"""

import ml_collections


def get_config() -> ml_collections.ConfigDict:
  config = ml_collections.ConfigDict()
  config.variant = "att_rn34_us"  # Name of the run's folder under <workdir>/.
  config.seed = 0

  # ---------------------------------------------------------------- data (Section IV-B).
  data = config.data = ml_collections.ConfigDict()
  data.manifest = ""  # CSV describing the dataset; empty -> synthetic phantoms (below).
  data.cache_dir = ""  # Empty -> <workdir>/cache.
  data.target_spacing = (0.7168, 0.7168, 1.25)  # mm, (x, y, z) as in the paper.
  data.scale_factor = 0.5  # One common down-sampling factor on all axes ("approximately half").
  data.target_shape = (138, 256, 256)  # (D, H, W) = (z, y, x) after down-sampling + zero padding.
  data.hu_window = (-1350.0, 150.0)  # Window 1500, level -600 -> clip then scale to [0, 1].
  data.apply_lung_mask = True  # Input = windowed CT multiplied by the lung mask.
  # Mask on the input grid, then resample (True), or resample, then mask (False). The paper
  # does not say; see preprocess.masked_image.
  data.mask_on_input_grid = False
  data.lung_mask_fallback = True  # Classical lung segmentation when the manifest gives none.
  # Infection ratio without an infection mask: "mask_or_estimate" (estimate where no mask),
  # "estimate" (every case: no label leak when only one class has masks), "mask" (NaN without).
  data.infection_ratio = "mask_or_estimate"
  data.num_folds = 5  # Patient-level cross-validation.
  data.fold_seed = 0
  data.sampling = "uniform"  # "uniform" (US) or "size_balanced" (SS), Section III-C.
  data.covid_small_ratio = 0.030  # COVID r < 0.030 -> small-infection group.
  data.cap_small_ratio = 0.001  # CAP r <= 0.001 -> small-infection group.
  data.num_workers = 0  # grain worker processes (0 = in-process).
  data.prefetch = 2  # Batches prefetched to device.
  # Synthetic phantom set, used when data.manifest is empty.
  data.synthetic = ml_collections.ConfigDict()
  data.synthetic.num_cases = 200
  data.synthetic.seed = 0
  data.synthetic.out_dir = ""  # Empty -> <workdir>/synthetic.
  data.synthetic.size_scale = 1.0  # Multiplies the phantoms' voxel counts (see docs/synthetic.md).
  data.synthetic.test_fraction = 0.2  # Patients held out as an independent test split.
  data.preprocess_workers = -1  # Processes building the cache (-1 = all cores, 0 = in process).
  data.skip_bad = False  # Skip (and report) cases that cannot be read instead of stopping.

  # --------------------------------------------------------------- model (Section III-A/B).
  model = config.model = ml_collections.ConfigDict()
  model.depth = 34  # 3D ResNet depth: 10, 18, 34, 50 (Hara et al.).
  model.stage_sizes = ()  # Blocks per stage; empty -> the depth's (3, 4, 6, 3 for ResNet34).
  model.width = 64  # Channels of the first stage (64 in ResNet34).
  model.stage_strides = (1, 2, 2, 1)  # Last stage stride 1 -> features at 1/16 per axis.
  model.attention = True  # False -> the paper's "RN34" baseline (no online attention).
  model.attention_alpha = 100.0  # Eq. 2.
  model.attention_beta = 0.4  # Eq. 2.
  model.cam_use_bias = False  # Eq. 1 uses only the Dense kernel w (see dsan_jax/models/dsan.py).
  model.dtype = "float32"  # Compute dtype; "bfloat16" for mixed precision (params stay fp32).
  model.conv_impl = "auto"  # "xla", "folded", "onednn" or "auto" (per backend: runtime.py).
  model.remat = ""  # "", "stem", "blocks" or "all": recompute activations in the backward.
  model.stem_pool = "slices"  # Stem max-pool: "slices" or "reduce_window" (same values).
  model.stem_conv_impl = "auto"  # The stem conv (1 input channel); "auto": dsan_jax/runtime.py.

  # ----------------------------------------------------------------- loss (Section III-D).
  loss = config.loss = ml_collections.ConfigDict()
  loss.attention_weight = 0.5  # lambda in Eq. 4.

  # ------------------------------------------------------------ optimiser (Section IV-C).
  optim = config.optim = ml_collections.ConfigDict()
  optim.learning_rate = 2e-4
  optim.b1 = 0.9  # "momentum set to 0.9".
  optim.b2 = 0.999  # PyTorch's Adam default (the paper does not say).
  optim.eps = 1e-8
  optim.weight_decay = 1e-4  # L2 added to the gradient, as torch.optim.Adam(weight_decay=...).
  optim.lr_decay_factor = 0.1  # "reduced by a factor of 10 ...
  optim.lr_decay_every_epochs = 5  # ... after every 5 epochs".

  # --------------------------------------------------------------------------- training.
  train = config.train = ml_collections.ConfigDict()
  train.batch_size = 20  # Global batch, split over all devices.
  train.grad_accum_steps = 1  # Micro-batches per optimiser step (batch_size must divide).
  train.num_epochs = 20
  train.select_metric = "auc"  # Validation metric that picks the best epoch.
  train.log_every_steps = 10
  train.checkpoint_every_steps = 0  # Also save "latest" every N steps (0 = at epoch ends only).
  train.max_consecutive_nonfinite = 5  # Stop after this many skipped (non-finite) steps in a row.
  train.max_nonfinite_fraction = 0.1  # ... or when this fraction of an epoch's steps was skipped.

  # ------------------------------------------------------------ ensemble (Section III-E).
  ensemble = config.ensemble = ml_collections.ConfigDict()
  ensemble.w_extreme = 0.35  # w for r < low_ratio or r > high_ratio.
  ensemble.w_middle = 0.96  # w otherwise.
  ensemble.low_ratio = 0.001
  ensemble.high_ratio = 0.030
  ensemble.search = False  # True -> grid-search both weights on pooled validation predictions.
  ensemble.search_grid_step = 0.01
  # What the search maximises: "accuracy" (at eval.threshold; ties -> AUC, then nearest to the
  # paper's weights) or "auc" (see dsan_jax/evaluation/ensemble.py:search_weights).
  ensemble.search_objective = "accuracy"

  # -------------------------------------------------------------------------- evaluation.
  evaluation = config.eval = ml_collections.ConfigDict()
  evaluation.threshold = 0.5  # COVID positive when P >= threshold.
  evaluation.ratio_groups = (0.005, 0.030)  # Table III: < 0.005, 0.005-0.030, > 0.030.
  evaluation.batch_size = 4
  # evaluate.py (dsan_jax/evaluation/evaluate.py): attention quality on COVID validation cases with masks.
  evaluation.attention_quality = True  # Compute mass-inside / soft Dice of every model's map.
  evaluation.attention_max_cases = 0  # Per fold model, at most this many cases (0 = all).
  evaluation.figure_case_ids = ()  # Case ids for the Fig. 5-like panels; empty -> chosen.
  # Calibration rows in Tables II/III (dsan_jax/evaluation/reference.py): "size_only" (log infection
  # ratio), "density_features" (seven crude lung-density features); () -> none.
  evaluation.reference_models = ("size_only", "density_features")
  # The evaluators run in this order (dsan_jax/evaluation/evaluate.py:EVALUATORS): re-predictions
  # (first), consistency with training's saved predictions, attention quality, Fig. 5-like
  # figures, training curves, the dual-sampling ensemble, the paper's findings, reference rows.
  evaluation.evaluators = ("predictions", "consistency", "attention", "figures", "curves",
                           "ensemble", "findings", "reference")
  return config
