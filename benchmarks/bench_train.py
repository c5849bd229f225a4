"""Train-step and inference speed of DSAN in JAX against the identical PyTorch network.

One process, one table: for each training size the full train step (``steps.make_train_step``:
forward, DSAN loss, backward, Adam with L2 decay, the non-finite guard) of the real network
(ResNet34, width 64, attention on, batch 2), and full-size inference (138x256x256, batch 1,
``train=False``, logit + CAM; the input is the preprocessed real CT ``../shared/data/ct/P002.nii.gz``
when present, else noise; weights untrained). PyTorch runs ``benchmarks/torch_dsan.py`` with the same weights
(``load_flax_params``), ``torch.optim.Adam(weight_decay=1e-4)`` and 2 threads. Variants are
interleaved inside every repetition (JAX, PyTorch, JAX, ...) because the machine is shared;
the table gives medians and minima (noise only adds time, so the minimum is the less disturbed
estimate) and the ratio JAX / PyTorch of both.

GFLOP/s = model FLOPs (``dsan_jax.models.flops.count_flops``: convolutions and matrix products of the
traced program, 2 per multiply-add, the oneDNN calls included, dead code excluded) / time; the
same count is used for PyTorch (same network), so GFLOP/s compare like volumes/s. (XLA's cost
analysis cannot see into the oneDNN calls of ``conv_impl="onednn"``.)

The recommended XLA:CPU flags are applied before JAX starts
(``runtime.configure_xla_flags``); the header prints the active ``XLA_FLAGS``.

Usage:
  python benchmarks/bench_train.py                       # the default table (~10 min on 2 cores)
  python benchmarks/bench_train.py --sizes 32x64x64 --infer_sizes none --reps 3
  python benchmarks/bench_train.py --impl folded,xla --no-torch
  python benchmarks/bench_train.py --bf16-inference      # + bf16 inference, logit/CAM diff vs fp32
  python benchmarks/bench_train.py --pool reduce_window,slices   # stem max-pool before/after
  python benchmarks/bench_train.py --breakdown           # + pieces of the step (a cheap profile)
"""

# The XLA flag must be in the environment before JAX initialises its backend.
import os
import sys

_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, _ROOT)
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from dsan_jax import runtime  # pylint: disable=g-import-not-at-top,wrong-import-position

if "--no-flags" not in sys.argv:
  _ADDED_FLAGS = runtime.configure_xla_flags()
else:
  _ADDED_FLAGS = ""

import argparse  # pylint: disable=wrong-import-position,g-import-not-at-top
import functools  # pylint: disable=wrong-import-position,g-import-not-at-top
import platform  # pylint: disable=wrong-import-position,g-import-not-at-top
import statistics  # pylint: disable=wrong-import-position,g-import-not-at-top
import time  # pylint: disable=wrong-import-position,g-import-not-at-top

import jax  # pylint: disable=wrong-import-position,g-import-not-at-top
import jax.numpy as jnp  # pylint: disable=wrong-import-position,g-import-not-at-top
import numpy as np  # pylint: disable=wrong-import-position,g-import-not-at-top

from configs import default as default_config  # pylint: disable=wrong-import-position
from dsan_jax.models import flops as flops_lib  # pylint: disable=wrong-import-position
from dsan_jax.training import optim, sharding, steps  # pylint: disable=wrong-import-position
from dsan_jax.models import resnet3d  # pylint: disable=wrong-import-position
from dsan_jax.models.dsan import DSAN  # pylint: disable=wrong-import-position
from dsan_jax.kernels import onednn  # pylint: disable=wrong-import-position
from dsan_jax.models import conv  # pylint: disable=wrong-import-position
import timing  # pylint: disable=wrong-import-position  (benchmarks/timing.py)

# The stem keeps the config default ("auto", resolved here) whatever --impl the rest uses.
_STEM_IMPL = functools.partial(runtime.resolve_stem_conv_impl, "auto")

TRAIN_SIZES = "32x64x64,48x96x96,64x128x128"
INFER_SIZES = "138x256x256"


def _parse_sizes(text: str) -> list[tuple[int, int, int]]:
  if not text or text == "none":
    return []
  return [tuple(int(v) for v in s.split("x")) for s in text.split(",")]


def _size_name(size) -> str:
  return "x".join(str(v) for v in size)


def _pool_kw(kind: str) -> dict:
  """DSAN keyword for the stem's max-pool implementation ("default": the model's default)."""
  return {} if kind == "default" else {"stem_pool": kind}


def _batch(size, batch: int, seed: int = 0) -> dict[str, np.ndarray]:
  """A synthetic batch of the batch contract: half COVID with masks, half CAP."""
  rng = np.random.default_rng(seed)
  label = (np.arange(batch) % 2 == 0).astype(np.int32)
  return {
      "image": rng.random((batch, *size)).astype(np.float32),
      "infection_mask": (rng.random((batch, *size)) < 0.1).astype(np.uint8),
      "has_mask": np.ones(batch, bool),
      "label": label,
      "weight": np.ones(batch, np.float32),
  }


class JaxTrain:
  """A jitted, compiled ``make_train_step`` and a state that it advances (donated)."""

  def __init__(self, size, batch: int, impl: str, pool: str = "default"):
    config = default_config.get_config()
    self.model = DSAN(conv_impl=impl, stem_conv_impl=_STEM_IMPL(), **_pool_kw(pool))
    mesh = sharding.make_mesh(jax.devices()[:1])
    tx = optim.make_optimizer(config.optim, steps_per_epoch=100)
    self.state = steps.create_train_state(self.model, tx, 0, (batch, *size))
    self.variables = {"params": jax.tree_util.tree_map(np.asarray, self.state.params),
                      "batch_stats": jax.tree_util.tree_map(np.asarray, self.state.batch_stats)}
    self.batch = sharding.shard_batch(_batch(size, batch), mesh)
    step = steps.make_train_step(self.model, mesh, config.loss.attention_weight)
    t0 = time.perf_counter()
    self.compiled = step.lower(self.state, self.batch).compile()
    self.compile_s = time.perf_counter() - t0
    self.flops = flops_lib.count_flops(step, self.state, self.batch)["total"]
    self.loss = None

  def __call__(self):
    self.state, metrics = self.compiled(self.state, self.batch)
    self.loss = float(metrics["loss"])  # Blocks until the step is done.


class TorchTrain:
  """The identical PyTorch network, same initial weights, Adam with L2 decay (the paper's)."""

  def __init__(self, size, batch: int, variables, config):
    import torch  # pylint: disable=g-import-not-at-top
    import torch_dsan  # pylint: disable=g-import-not-at-top
    self.torch = torch
    self.torch_dsan = torch_dsan
    self.model = torch_dsan.load_flax_params(torch_dsan.DSAN().train(), variables)
    o = config.optim
    self.opt = torch.optim.Adam(self.model.parameters(), lr=o.learning_rate, betas=(o.b1, o.b2),
                                eps=o.eps, weight_decay=o.weight_decay)
    b = _batch(size, batch)
    self.x = torch.from_numpy(b["image"][:, None].copy())
    self.mask = torch.from_numpy(b["infection_mask"].astype(np.float32))
    self.label = torch.from_numpy(b["label"])
    self.has_mask = torch.from_numpy(b["has_mask"])
    self.loss = None

  def __call__(self):
    self.opt.zero_grad(set_to_none=True)
    logits, aux = self.model(self.x, return_attention=True)
    loss = self.torch_dsan.dsan_loss(logits, aux["attention"], self.mask, self.label,
                                     self.has_mask)
    loss.backward()
    self.opt.step()
    self.loss = float(loss.detach())


class JaxInfer:
  """Inference (``train=False``): logit and CAM, jitted and compiled ahead of time."""

  def __init__(self, size, impl: str, variables, dtype=jnp.float32, pool: str = "default"):
    self.model = DSAN(conv_impl=impl, stem_conv_impl=_STEM_IMPL(dtype=dtype), dtype=dtype,
                      **_pool_kw(pool))
    self.variables = jax.device_put(variables)

    def fn(variables, x):
      logits, aux = self.model.apply(variables, x, train=False)
      return logits, aux["cam"]

    self.x = jnp.asarray(_volume(tuple(size)))
    t0 = time.perf_counter()
    self.compiled = jax.jit(fn).lower(self.variables, self.x).compile()
    self.compile_s = time.perf_counter() - t0
    self.flops = flops_lib.count_flops(fn, self.variables, self.x)["total"]
    self.logit = self.cam = None

  def __call__(self):
    logit, cam = self.compiled(self.variables, self.x)
    self.cam = np.asarray(cam, np.float32)  # Blocks until done.
    self.logit = float(np.ravel(logit)[0])


class TorchInfer:

  def __init__(self, size, variables):
    import torch  # pylint: disable=g-import-not-at-top
    import torch_dsan  # pylint: disable=g-import-not-at-top
    self.torch = torch
    self.model = torch_dsan.load_flax_params(torch_dsan.DSAN().eval(), variables)
    self.x = torch.from_numpy(np.moveaxis(_volume(tuple(size)), -1, 1).copy())
    self.logit = self.cam = None

  def __call__(self):
    with self.torch.inference_mode():
      logits, aux = self.model(self.x)
      self.cam = aux["cam"].numpy()
      self.logit = float(logits[0])


_REAL_CT = os.path.join(_ROOT, "..", "shared", "data", "ct", "P002.nii.gz")


@functools.lru_cache(maxsize=2)
def _volume(size, seed: int = 1) -> np.ndarray:
  """[1, D, H, W, 1]: the preprocessed real CT when it exists and fits, else uniform noise."""
  if tuple(size) == (138, 256, 256) and os.path.exists(_REAL_CT):
    from dsan_jax.data.preprocess import load_and_preprocess  # pylint: disable=g-import-not-at-top
    return load_and_preprocess(_REAL_CT).image[None, ..., None].astype(np.float32)
  rng = np.random.default_rng(seed)
  return rng.random((1, *size, 1)).astype(np.float32)


def breakdown(size, batch: int, reps: int, impl: str) -> list[tuple[str, int, float, float]]:
  """Times pieces of the train step in isolation, forward+backward (``sum(out * g)``).

  The pieces are the stem's conv (kernel gradient only, as in the step), the stem's BatchNorm
  (batch statistics) + ReLU, the stem's max-pool in both implementations, one layer1 BatchNorm +
  ReLU and one layer1 3x3x3 convolution (x6 each in the network), and the attention branch
  (trilinear up-sampling to the input, min-max, sigmoid, Eq. 3). Small programs compile in
  seconds, so this is a cheap profile; pieces are interleaved like the main table.

  Returns:
    [(piece, count in the network, median s, min s)].
  """
  from dsan_jax.training import losses  # pylint: disable=g-import-not-at-top
  from dsan_jax.models import dsan as dsan_lib  # pylint: disable=g-import-not-at-top
  import flax.linen as nn  # pylint: disable=g-import-not-at-top
  rng = np.random.default_rng(0)
  d, h, w = size
  half = (batch, -(-d // 2), -(-h // 2), -(-w // 2), 64)
  quarter = (batch, -(-half[1] // 2), -(-half[2] // 2), -(-half[3] // 2), 64)
  feat = (batch, -(-d // 16), -(-h // 16), -(-w // 16))
  arr = lambda shape: jnp.asarray(rng.standard_normal(shape).astype(np.float32))

  def fb(fn, *args, argnums=0):
    """Jitted forward+backward of sum(fn(*args) * g) w.r.t. ``argnums``.

    Every array is an argument of the jitted function: captured arrays would be constants, and
    XLA would constant-fold the whole computation at compile time.
    """
    g = arr(jax.eval_shape(fn, *args).shape)
    grad = jax.jit(jax.grad(lambda g, *a: jnp.sum(fn(*a) * g),
                            argnums=tuple(1 + i for i in np.atleast_1d(argnums))))
    return lambda: jax.block_until_ready(grad(g, *args))

  def bn_relu(x, scale, bias):
    mean = jnp.mean(x, axis=(0, 1, 2, 3))
    var = jnp.mean(jnp.square(x - mean), axis=(0, 1, 2, 3))
    return nn.relu((x - mean) * jax.lax.rsqrt(var + 1e-5) * scale + bias)

  x_in = arr((batch, d, h, w, 1))
  k7 = arr((7, 7, 7, 1, 64)) * 0.01
  k3 = arr((3, 3, 3, 64, 64)) * 0.01
  s64, b64 = jnp.ones(64), jnp.zeros(64)
  stem_act = jax.nn.relu(arr(half))
  cam = jax.nn.relu(arr(feat))
  mask = jnp.asarray((rng.random((batch, d, h, w)) < 0.1).astype(np.float32))
  pieces = {
      "stem conv 7x7x7 s2 (dW only)": (1, fb(
          lambda k, x: conv.conv3d(x, k, (2, 2, 2), [(3, 3)] * 3, impl), k7, x_in)),
      "stem BatchNorm + ReLU": (1, fb(bn_relu, arr(half), s64, b64, argnums=(0, 1, 2))),
      "stem max-pool, nn.max_pool (reduce_window)": (1, fb(
          lambda x: resnet3d.stem_max_pool(x, "reduce_window"), stem_act)),
      "stem max-pool, separable slices (new)": (1, fb(
          lambda x: resnet3d.stem_max_pool(x, "slices"), stem_act)),
      "layer1 BatchNorm + ReLU": (6, fb(bn_relu, arr(quarter), s64, b64, argnums=(0, 1, 2))),
      "layer1 conv 3x3x3 64->64": (6, fb(
          lambda x, k: conv.conv3d(x, k, (1, 1, 1), [(1, 1)] * 3, impl), arr(quarter), k3,
          argnums=(0, 1))),
      "attention: upsample + minmax + sigmoid + Eq. 3": (1, fb(
          lambda c, m: losses.attention_loss(
              dsan_lib.attention_from_cam(c, (d, h, w), 100.0, 0.4), m), cam, mask)),
  }
  fns = {name: fn for name, (_, fn) in pieces.items()}
  for fn in fns.values():
    fn()
  times = timing.interleave(fns, reps)
  return [(name, count, statistics.median(times[name]), min(times[name]))
          for name, (count, _) in pieces.items()]


def _row(kind, size, batch, name, t, flops, ref=None) -> str:
  med, best = statistics.median(t), min(t)
  ratio = "-"
  if ref is not None and name != "PyTorch":
    ratio = f"{med / statistics.median(ref):.2f} ({best / min(ref):.2f})"
  gfs = f"{flops / med / 1e9:.0f}" if np.isfinite(flops) else "-"
  return (f"| {kind} | {_size_name(size)} | {batch} | {name} | {med:.3f} ({best:.3f}) | "
          f"{batch / med:.2f} | {gfs} | {ratio} |")


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--sizes", default=TRAIN_SIZES,
                      help="train-step sizes DxHxW, comma-separated ('none' to skip)")
  parser.add_argument("--infer_sizes", "--infer-sizes", default=INFER_SIZES,
                      help="inference sizes (batch 1), comma-separated ('none' to skip)")
  parser.add_argument("--batch", type=int, default=2, help="train-step batch")
  parser.add_argument("--reps", type=int, default=5, help="timed repetitions (after a warm-up)")
  parser.add_argument("--reps_large", "--reps-large", type=int, default=3,
                      help="repetitions for sizes of 1M voxels or more")
  parser.add_argument("--impl", default="auto",
                      help="JAX conv implementation(s): auto, folded, xla, comma-separated")
  parser.add_argument("--pool", default="default",
                      help="stem max-pool implementation(s), comma-separated: default, "
                           "reduce_window, slices (see dsan_jax/models/resnet3d.py)")
  parser.add_argument("--no-torch", "--no_torch", dest="no_torch", action="store_true")
  parser.add_argument("--bf16-inference", "--bf16_inference", dest="bf16", action="store_true",
                      help="also time bf16-compute inference and report its logit/CAM difference to "
                           "fp32 (|dP| <= |dlogit| / 4)")
  parser.add_argument("--breakdown", action="store_true",
                      help="also time pieces of the step (stem, max-pool, BN, attention) at the "
                           "largest train size")
  parser.add_argument("--no-flags", action="store_true",
                      help="do not add the recommended XLA:CPU flags (must be on the command line)")
  args = parser.parse_args(argv)

  train_sizes, infer_sizes = _parse_sizes(args.sizes), _parse_sizes(args.infer_sizes)
  impls = [runtime.resolve_conv_impl(i) for i in args.impl.split(",")]
  if "onednn" in impls:
    onednn.load()  # The explicit build-and-register step, before anything is traced.
  pools = args.pool.split(",")
  variants = [(impl, pool) for impl in impls for pool in pools]

  def vname(impl, pool, extra=""):
    name = f"JAX {impl}"
    if len(pools) > 1 or pool != "default":
      name += f" pool={pool}"
    return name + extra

  torch_ok = not args.no_torch
  if torch_ok:
    try:
      import torch  # pylint: disable=g-import-not-at-top
      torch.set_num_threads(2)
      torch_version = torch.__version__
    except ImportError:
      print("PyTorch is not installed: JAX only (pip install torch).", file=sys.stderr)
      torch_ok, torch_version = False, "not installed"
  else:
    torch_version = "not run"

  load0 = os.getloadavg()
  print(f"## Train step and inference: JAX vs PyTorch (`bench_train.py`)\n")
  print(f"- machine: {platform.machine()}, {os.cpu_count()} CPUs, python "
        f"{platform.python_version()}, jax {jax.__version__} ({jax.default_backend()}), "
        f"torch {torch_version} ({'2 threads' if torch_ok else '-'})")
  print(f"- XLA_FLAGS active: `{os.environ.get('XLA_FLAGS', '') or '(none)'}` "
        f"(added by runtime.configure_xla_flags: `{_ADDED_FLAGS or 'nothing'}`)")
  print(f"- command: `python benchmarks/bench_train.py {' '.join(sys.argv[1:] if argv is None else argv)}`")
  print(f"- load average at start: {load0[0]:.1f} / {load0[1]:.1f} / {load0[2]:.1f}", flush=True)
  print()
  rows = []
  notes = []
  config = default_config.get_config()

  step_median = {}
  for size in train_sizes:
    reps = args.reps_large if np.prod(size) >= 1_000_000 else args.reps
    fns, flops = {}, {}
    variables = None
    for impl, pool in variants:
      runner = JaxTrain(size, args.batch, impl, pool)
      variables = variables or runner.variables
      name = vname(impl, pool)
      fns[name], flops[name] = runner, runner.flops
      print(f"  compiled train {_size_name(size)} {name}: {runner.compile_s:.1f} s, "
            f"{runner.flops / 1e9:.0f} GFLOP", file=sys.stderr, flush=True)
    if torch_ok:
      fns["PyTorch"] = TorchTrain(size, args.batch, variables, config)
    for fn in fns.values():  # Warm-up (first PyTorch step allocates; JAX's is compiled).
      fn()
    first_losses = {name: fn.loss for name, fn in fns.items()}
    times = timing.interleave(fns, reps)
    ref_flops = flops[vname(*variants[0])]
    for name in fns:
      rows.append(_row("train", size, args.batch, name, times[name], flops.get(name, ref_flops),
                       times.get("PyTorch")))
    step_median[size] = statistics.median(times[vname(*variants[0])])
    notes.append(f"train {_size_name(size)}: loss of the first step "
                 + ", ".join(f"{n} {l:.6f}" for n, l in first_losses.items())
                 + f"; {reps} reps")
    print(rows[-1], file=sys.stderr, flush=True)
    del fns

  for size in infer_sizes:
    reps = args.reps_large if np.prod(size) >= 1_000_000 else args.reps
    model = DSAN()
    variables = jax.tree_util.tree_map(
        np.asarray, dict(model.init(jax.random.key(0), jnp.zeros((1, 16, 32, 32, 1)))))
    fns, flops = {}, {}
    for impl, pool in variants:
      r = JaxInfer(size, impl, variables, pool=pool)
      fns[vname(impl, pool)], flops[vname(impl, pool)] = r, r.flops
      print(f"  compiled infer {_size_name(size)} {vname(impl, pool)}: {r.compile_s:.1f} s",
            file=sys.stderr, flush=True)
      if args.bf16:
        rb = JaxInfer(size, impl, variables, dtype=jnp.bfloat16, pool=pool)
        fns[vname(impl, pool, " bf16")], flops[vname(impl, pool, " bf16")] = rb, r.flops
    if torch_ok:
      fns["PyTorch"] = TorchInfer(size, variables)
    for fn in fns.values():
      fn()
    times = timing.interleave(fns, reps)
    ref_flops = flops[vname(*variants[0])]
    for name in fns:
      rows.append(_row("inference", size, 1, name, times[name], flops.get(name, ref_flops),
                       times.get("PyTorch")))
    ref_name = vname(*variants[0])
    ref_logit, ref_cam = fns[ref_name].logit, fns[ref_name].cam
    parts = []
    for name, fn in fns.items():
      part = f"{name} logit {fn.logit:.5f}"
      if name != ref_name:
        dl = abs(fn.logit - ref_logit)
        part += f" (|dlogit| {dl:.1e}, so |dP| <= {dl / 4:.1e}"
        if fn.cam is not None:
          cam_err = np.max(np.abs(fn.cam - ref_cam)) / max(np.max(np.abs(ref_cam)), 1e-30)
          part += f"; CAM max rel. err. {cam_err:.1e}"
        part += ")"
      parts.append(part)
    input_name = ("preprocessed P002.nii.gz" if tuple(size) == (138, 256, 256)
                  and os.path.exists(_REAL_CT) else "uniform noise")
    notes.append(f"inference {_size_name(size)} (untrained weights, input {input_name}; vs "
                 f"{ref_name}, |dP| <= |dlogit| / 4): " + ", ".join(parts) + f"; {reps} reps")
    print(rows[-1], file=sys.stderr, flush=True)
    del fns

  pieces = []
  if args.breakdown and train_sizes:
    size = max(train_sizes, key=np.prod)
    pieces = breakdown(size, args.batch, args.reps, impls[0])

  load1 = os.getloadavg()
  print("| what | input | batch | implementation | median s (min) | volumes/s | GFLOP/s | "
        "JAX / PyTorch median (min) |")
  print("| --- | --- | --- | --- | --- | --- | --- | --- |")
  for row in rows:
    print(row)
  print()
  for note in notes:
    print(f"- {note}")
  if "onednn" in impls:
    print(f"- oneDNN {onednn.version()}: workspace held after all runs (reordered kernels, "
          f"scratchpads; outside XLA's memory): {onednn.workspace_bytes() / 2**20:.0f} MiB")
  print(f"- load average at end: {load1[0]:.1f} / {load1[1]:.1f} / {load1[2]:.1f} "
        f"({os.cpu_count()} CPUs; above {os.cpu_count()} the machine was shared and timings "
        "are noisy)")
  if pieces:
    size = max(train_sizes, key=np.prod)
    step = step_median.get(size)
    print(f"\n### Pieces of the JAX train step at {_size_name(size)}, batch {args.batch} "
          f"(forward+backward, isolated; {impls[0]} convolutions)\n")
    print("| piece | count in net | median s (min) | x count, share of the step |")
    print("| --- | --- | --- | --- |")
    for name, count, med, best in pieces:
      share = f"{100 * count * med / step:.0f} %" if step else "-"
      print(f"| {name} | {count} | {med:.3f} ({best:.3f}) | {count * med:.3f} s, {share} |")
    if step:
      print(f"\nStep median in this run: {step:.3f} s ({vname(*variants[0])}). Pieces timed "
            "alone miss fusion with their neighbours, so shares are indicative.")
    print()
  print("- GFLOP/s: model FLOPs (dsan_jax.models.flops.count_flops, 2 per multiply-add) / median time; "
        "the same count is used for PyTorch (identical network).")
  return 0


if __name__ == "__main__":
  sys.exit(main())
