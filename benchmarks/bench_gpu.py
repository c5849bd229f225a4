"""DSAN at the paper's full size on one accelerator: throughput, TFLOP/s, latency and memory.

Written for a lease-limited GPU: one command, sections in order of importance, each printed as
soon as it is measured (Markdown rows on stdout, one JSON line per row in ``--jsonl``), and a
``--budget_s`` after which the remaining sections are skipped and named as skipped.

Sections:
  ceiling    a bf16 matrix product (8192^3) in JAX: the rate this chip really reaches here.
  train      the real train step (``steps.make_train_step``: DSAN ResNet34 width 64 with
             attention, forward, Eq. 4 loss in fp32, backward, Adam + L2, non-finite guard) at
             138x256x256 with ``DSAN(dtype=bfloat16)`` (fp32 parameters), the paper's batch 20 in
             one pass. Volumes/s, TFLOP/s, share of the peak (``--profile``: GPU kernel time
             by class and the top kernels, from a ``jax.profiler`` trace).
  infer      batch-1 inference (logit + CAM) at full size, bf16 and fp32: latency, |dP|.
  memory24   batch 20 for a 24 GB card: compiled memory of remat / accumulation variants, and
             the speed of the accumulation variant that fits.
  scaling    bf16 at smaller batches (--batches) and fp32.
  folded     the convolution implementations side by side: native 3D everywhere, native with
             the stem folded (the default row, all folded on GPU, is the ``train`` section's).
  pool       the stem max-pool implementations (``resnet3d.stem_max_pool``) in the bf16 step.
  torch      the identical network in PyTorch on the same GPU (``benchmarks/torch_dsan.py``),
             bf16 autocast, channels_last_3d, cudnn.benchmark; run in a subprocess.

TFLOP/s counts model FLOPs (``dsan_jax.models.flops.count_flops``: the convolutions and matrix products
of the traced program, 2 per multiply-add, forward and both backward convolutions of training;
1.86 TFLOP per training volume and 0.64 per inference at 138x256x256). XLA's cost analysis cannot
be used on GPU: the compiled program's cuDNN convolutions are library calls it does not count.
"Peak" is the card's dense bf16 datasheet rate (--peak_tflops; 989.4 for H100/H200 SXM) and the
measured matmul ceiling. Device memory: ``compiled.memory_analysis()`` (XLA's buffer assignment,
what the step needs) and the allocator's ``peak_bytes_in_use`` (what the process really held).

Usage (GPU):
  python benchmarks/bench_gpu.py --budget_s 500 --jsonl /tmp/bench_gpu.jsonl
Smoke check of the script on CPU (tiny sizes, no meaning as numbers):
  python benchmarks/bench_gpu.py --allow_cpu --shape 16,32,32 --batches 2 --big_batch 4 \
      --accum 2 --matmul 256 --reps 2
"""

import os
import sys

# JAX must not grab 75 % of the GPU up front: the PyTorch section shares the card, and the
# allocator's peak then says what the steps really used.
os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")

import argparse  # pylint: disable=g-import-not-at-top,wrong-import-position
import json  # pylint: disable=g-import-not-at-top,wrong-import-position
import platform  # pylint: disable=g-import-not-at-top,wrong-import-position
import statistics  # pylint: disable=g-import-not-at-top,wrong-import-position
import subprocess  # pylint: disable=g-import-not-at-top,wrong-import-position
import time  # pylint: disable=g-import-not-at-top,wrong-import-position
import traceback  # pylint: disable=g-import-not-at-top,wrong-import-position

_HERE = os.path.dirname(os.path.abspath(__file__))
_ROOT = os.path.dirname(_HERE)
sys.path.insert(0, _ROOT)
sys.path.insert(0, _HERE)

import jax  # pylint: disable=g-import-not-at-top,wrong-import-position
import jax.numpy as jnp  # pylint: disable=g-import-not-at-top,wrong-import-position
import numpy as np  # pylint: disable=g-import-not-at-top,wrong-import-position

from configs import default as default_config  # pylint: disable=wrong-import-position
from dsan_jax.models import flops as flops_lib  # pylint: disable=wrong-import-position
from dsan_jax.training import optim, sharding, steps  # pylint: disable=wrong-import-position
from dsan_jax import runtime  # pylint: disable=wrong-import-position
from dsan_jax.models.dsan import DSAN  # pylint: disable=wrong-import-position

GB = 1e9
# A preprocessed real CT (P002, float16) for the inference input when present (see --input).
DEFAULT_INPUT = os.path.join(_ROOT, ".gpu_inputs", "P002_preprocessed_f16.npz")


class Report:
  """Prints Markdown rows as they come and appends them as JSON lines."""

  def __init__(self, jsonl: str):
    self.jsonl = jsonl
    self.t0 = time.perf_counter()

  def elapsed(self) -> float:
    return time.perf_counter() - self.t0

  def line(self, text: str = ""):
    print(text, flush=True)

  def record(self, section: str, row: str, **data):
    print(row, flush=True)
    if self.jsonl:
      with open(self.jsonl, "a") as f:
        f.write(json.dumps(dict(section=section, t=round(self.elapsed(), 1), **data),
                           default=float) + "\n")


def _flops(stage) -> float:
  """FLOPs from a Compiled stage's cost analysis (nan when unavailable)."""
  try:
    cost = stage.cost_analysis()
  except Exception:  # pylint: disable=broad-except
    return float("nan")
  if isinstance(cost, (list, tuple)):
    cost = cost[0] if cost else {}
  return float((cost or {}).get("flops", float("nan")))


def _memory(compiled) -> dict[str, float]:
  m = compiled.memory_analysis()
  if m is None:
    return {}
  out = dict(argument=m.argument_size_in_bytes, output=m.output_size_in_bytes,
             alias=m.alias_size_in_bytes, temp=m.temp_size_in_bytes)
  out["total"] = out["argument"] + out["output"] - out["alias"] + out["temp"]
  return out


def _peak_bytes() -> float:
  stats = jax.devices()[0].memory_stats() or {}
  return float(stats.get("peak_bytes_in_use", float("nan")))


def _device_batch(shape, batch: int, seed: int = 0) -> dict[str, jax.Array]:
  """A batch of the batch contract made on the device: COVID with masks and CAP.

  Labels follow a period-3 pattern, so the strided micro-batches of gradient accumulation
  (rows i, a + i, ...) each hold both classes for a = 2 and 4.
  """
  k1, k2 = jax.random.split(jax.random.key(seed))
  label = (np.arange(batch) % 3 != 2).astype(np.int32)
  return dict(
      image=jax.random.uniform(k1, (batch, *shape), jnp.float32),
      infection_mask=(jax.random.uniform(k2, (batch, *shape)) < 0.1).astype(jnp.uint8),
      has_mask=jnp.ones(batch, bool), label=jnp.asarray(label),
      weight=jnp.ones(batch, jnp.float32))


def _version(module: str) -> str:
  try:
    return __import__(module).__version__
  except (ImportError, AttributeError):
    return "?"


def _time(fn, reps: int) -> list[float]:
  times = []
  for _ in range(reps):
    t0 = time.perf_counter()
    fn()
    times.append(time.perf_counter() - t0)
  return times


_HOST_STATE = {}


def _host_state(tx) -> steps.TrainState:
  """The initial train state (seed 0) on the host, made once; params are size-independent."""
  if "state" not in _HOST_STATE:
    state = jax.jit(lambda: steps.create_train_state(DSAN(), tx, 0, (1, 16, 32, 32)))()
    _HOST_STATE["state"] = jax.tree_util.tree_map(np.asarray, state)
  return _HOST_STATE["state"]


class TrainRun:
  """The compiled train step for one variant; ``__call__`` runs one step and blocks."""

  def __init__(self, shape, batch: int, dtype, remat: str = "", accum: int = 1,
               pool: str | None = None, conv_impl: str = "auto",
               stem_conv_impl: str = "auto"):
    config = default_config.get_config()
    self.model = DSAN(dtype=dtype, remat=remat,
                      conv_impl=runtime.resolve_conv_impl(conv_impl, dtype=dtype),
                      stem_pool=pool or "slices",
                      stem_conv_impl=runtime.resolve_stem_conv_impl(stem_conv_impl, dtype=dtype))
    mesh = sharding.make_mesh(jax.devices()[:1])
    tx = optim.make_optimizer(config.optim, steps_per_epoch=100)
    step = steps.make_train_step(self.model, mesh, config.loss.attention_weight,
                                 grad_accum_steps=accum)
    # Parameters do not depend on the input size (GAP) or the compute dtype: initialise once, on
    # a small input, and give every variant a fresh device copy (the step donates it).
    state = jax.device_put(_host_state(tx), sharding.replicated(mesh))
    batch_arrays = jax.device_put(_device_batch(shape, batch), sharding.batch_sharding(mesh))
    self.flops = flops_lib.count_flops(step, state, batch_arrays)["total"]
    t0 = time.perf_counter()
    self.compiled = step.lower(state, batch_arrays).compile()
    self.compile_s = time.perf_counter() - t0
    self.compiled_flops = _flops(self.compiled)  # XLA's count; misses library calls on GPU.
    self.memory = _memory(self.compiled)
    self.state, self.batch = state, batch_arrays
    self.loss = None

  def __call__(self):
    self.state, metrics = self.compiled(self.state, self.batch)
    self.loss = float(metrics["loss"])  # Blocks until the step is done.


class InferRun:
  """Batch-1 inference (logit + CAM), compiled ahead of time."""

  def __init__(self, image: np.ndarray, variables, dtype):
    impl = runtime.resolve_conv_impl("auto", dtype=dtype)
    model = DSAN(dtype=dtype, conv_impl=impl, stem_conv_impl=impl)

    def fn(variables, x):
      logits, aux = model.apply(variables, x, train=False)
      return logits, aux["cam"]

    self.variables = jax.device_put(variables)
    self.x = jax.device_put(jnp.asarray(image))
    self.flops = flops_lib.count_flops(fn, self.variables, self.x)["total"]
    t0 = time.perf_counter()
    self.compiled = jax.jit(fn).lower(self.variables, self.x).compile()
    self.compile_s = time.perf_counter() - t0
    self.logit = self.cam = None

  def __call__(self):
    logit, cam = self.compiled(self.variables, self.x)
    self.cam = np.asarray(cam, np.float32)  # Blocks until done.
    self.logit = float(np.ravel(logit)[0])


def _kernel_category(name: str) -> str:
  """A coarse class of a GPU kernel from its name (cuDNN/cuBLAS names, or XLA fusion names)."""
  n = name.lower()
  for key, cat in (("dgrad", "conv input gradient (dgrad)"), ("wgrad", "conv kernel gradient (wgrad)"),
                   ("fprop", "conv forward (fprop)"), ("conv", "conv, other"),
                   ("gemm", "matmul (gemm)"), ("cutlass", "matmul (gemm)"),
                   ("transpose", "transpose"), ("reduce", "XLA reduction fusion"),
                   ("memcpy", "memcpy / memset"), ("memset", "memcpy / memset")):
    if key in n:
      return cat
  return "XLA elementwise / other fusion"


def summarize_gpu_trace(logdir: str, steps: int) -> dict:
  """Per-step GPU kernel time by category and the top kernels, from a ``jax.profiler`` trace.

  Args:
    logdir: the directory given to ``jax.profiler.trace``.
    steps: how many steps the trace holds.

  Returns:
    dict with ``busy_ms`` (kernel time per step), ``categories`` {name: ms per step},
    ``top`` [(kernel name, hlo op, calls per step, ms per step)], ``lines`` (stream names used).
  """
  import glob  # pylint: disable=g-import-not-at-top
  paths = sorted(glob.glob(os.path.join(logdir, "**", "*.xplane.pb"), recursive=True))
  if not paths:
    raise FileNotFoundError(f"no .xplane.pb under {logdir}")
  data = jax.profiler.ProfileData.from_file(paths[-1])
  kernels: dict[tuple[str, str], list[float]] = {}
  used = []
  for plane in data.planes:
    if not plane.name.startswith("/device:GPU"):
      continue
    lines = ([line for line in plane.lines if line.name.startswith("Stream")]
             or [line for line in plane.lines
                 if not line.name.startswith(("XLA", "Steps", "Launch", "Framework"))])
    for line in lines:
      used.append(f"{plane.name}/{line.name}")
      for ev in line.events:
        hlo = ""
        try:
          stats = dict(ev.stats)
          hlo = str(stats.get("hlo_op", ""))
        except Exception:  # pylint: disable=broad-except
          pass  # Stats are optional decoration.
        kernels.setdefault((ev.name, hlo), []).append(ev.duration_ns / 1e6)
  cats: dict[str, float] = {}
  for (name, _), durs in kernels.items():
    cats[_kernel_category(name)] = cats.get(_kernel_category(name), 0.0) + sum(durs) / steps
  top = sorted(((name, hlo, len(d) / steps, sum(d) / steps) for (name, hlo), d in kernels.items()),
               key=lambda t: -t[3])[:20]
  return dict(busy_ms=sum(cats.values()), categories=cats, top=top, lines=used)


def _train_row(r: Report, name: str, shape, batch: int, run: TrainRun, times, peak: float,
               peak_tflops: float, ceiling: float, note: str = ""):
  med, best = statistics.median(times), min(times)
  tfs = run.flops / med / 1e12
  mem = run.memory.get("total", float("nan")) / GB
  r.record("train", f"| {name} | {batch} | {med * 1e3:.1f} ({best * 1e3:.1f}) | "
           f"{batch / med:.1f} | {tfs:.1f} | {100 * tfs / peak_tflops:.0f} % | "
           f"{100 * tfs / ceiling:.0f} % | {mem:.1f} | {peak / GB:.1f} | {run.compile_s:.0f} | "
           f"{run.loss:.4f} | {note} |",
           name=name, shape=list(shape), batch=batch, median_s=med, min_s=best, times=times,
           flops=run.flops, compiled_flops=run.compiled_flops, tflops=tfs, memory=run.memory,
           process_peak_bytes=peak, compile_s=run.compile_s, loss=run.loss)


def main(argv=None) -> int:  # pylint: disable=too-many-statements
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                              formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--shape", default="138,256,256", help="D,H,W of the input volume")
  p.add_argument("--big_batch", type=int, default=20, help="the paper's batch, one pass")
  p.add_argument("--batches", default="4,8", help="further bf16 batches for the scaling rows")
  p.add_argument("--accum", default="4,2", help="accumulation steps tried at --big_batch")
  p.add_argument("--reps", type=int, default=10, help="timed repetitions after one warm-up")
  p.add_argument("--matmul", type=int, default=8192, help="n of the n^3 bf16 ceiling matmul")
  p.add_argument("--peak_tflops", type=float, default=989.4,
                 help="datasheet dense bf16 TFLOP/s of the card (H100/H200 SXM: 989.4)")
  p.add_argument("--budget_gb", type=float, default=24.0)
  p.add_argument("--budget_s", type=float, default=480.0,
                 help="skip sections that would start after this many seconds")
  p.add_argument("--sections", default="ceiling,train,infer,memory24,scaling,folded,torch,pool")
  p.add_argument("--profile", action="store_true",
                 help="profile the batch-20 bf16 step (jax.profiler) and print its GPU kernel time "
                      "by class and the top kernels")
  p.add_argument("--input", default=DEFAULT_INPUT, help="npz with 'image' [D,H,W] (inference)")
  p.add_argument("--jsonl", default="")
  p.add_argument("--allow_cpu", action="store_true", help="run on CPU (smoke check only)")
  p.add_argument("--torch_only", action="store_true", help=argparse.SUPPRESS)
  args = p.parse_args(argv)
  shape = tuple(int(s) for s in args.shape.split(","))
  if args.torch_only:
    return _torch_main(args, shape)
  if jax.default_backend() == "cpu" and not args.allow_cpu:
    print("bench_gpu.py measures an accelerator; jax found only the CPU (use --allow_cpu for a "
          "smoke check).", file=sys.stderr)
    return 2
  sections = args.sections.split(",")
  r = Report(args.jsonl)
  dev = jax.devices()[0]

  r.line(f"## DSAN on one accelerator (`bench_gpu.py`)\n")
  versions = ", ".join(f"{m} {_version(m)}" for m in ("jax", "jaxlib", "flax", "optax", "chex"))
  r.line(f"- device: {dev.device_kind} ({jax.default_backend()}), {jax.device_count()} device(s); "
         f"{versions}, python {platform.python_version()}")
  try:
    smi = subprocess.run(["nvidia-smi", "--query-gpu=name,memory.total,driver_version,"
                          "clocks.max.sm,power.limit", "--format=csv,noheader"],
                         capture_output=True, text=True, timeout=20, check=False).stdout.strip()
    r.line(f"- nvidia-smi: {smi}")
  except (OSError, subprocess.SubprocessError):
    pass
  r.line(f"- XLA_FLAGS: `{os.environ.get('XLA_FLAGS', '') or '(none)'}`; input {shape}, "
         f"ResNet34 width 64, attention on, conv_impl auto -> {runtime.resolve_conv_impl('auto')}, "
         f"stem_conv_impl auto -> {runtime.resolve_stem_conv_impl('auto')}")
  r.line(f"- command: `python benchmarks/bench_gpu.py {' '.join(sys.argv[1:] if argv is None else argv)}`")
  r.line()

  def run_section(name, fn):
    if name not in sections:
      return
    if r.elapsed() > args.budget_s:
      r.record(name, f"\n(section {name} skipped: {r.elapsed():.0f} s > budget {args.budget_s:.0f} s)",
               skipped=True)
      return
    try:
      fn()
    except Exception as e:  # pylint: disable=broad-except
      r.record(name, f"\n(section {name} failed after {r.elapsed():.0f} s: "
               f"{type(e).__name__}: {str(e)[:400]})", error=f"{type(e).__name__}: {e}")
      traceback.print_exc()

  ceiling = [args.peak_tflops]

  def sec_ceiling():
    n = args.matmul
    a = jax.random.normal(jax.random.key(1), (n, n), jnp.bfloat16)
    b = jax.random.normal(jax.random.key(2), (n, n), jnp.bfloat16)
    mm = jax.jit(lambda a, b: a @ b)
    mm(a, b).block_until_ready()
    times = _time(lambda: mm(a, b).block_until_ready(), 20)
    tfs = 2 * n ** 3 / statistics.median(times) / 1e12
    ceiling[0] = tfs
    r.record("ceiling", f"- bf16 matmul {n}^3 (random data), median of 20: {tfs:.0f} TFLOP/s "
             f"({100 * tfs / args.peak_tflops:.0f} % of the datasheet {args.peak_tflops:g})",
             n=n, tflops=tfs, times=times)

  header = ("\n| variant | batch | step ms median (min) | volumes/s | TFLOP/s | of datasheet "
            "peak | of matmul ceiling | compiled memory GB | process peak GB | compile s | "
            "loss | note |\n| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: "
            "| ---: | --- |")

  def train_variant(name, batch, dtype, remat="", accum=1, pool=None, note="", conv_impl="auto",
                    stem_conv_impl="auto"):
    run = TrainRun(shape, batch, dtype, remat=remat, accum=accum, pool=pool, conv_impl=conv_impl,
                   stem_conv_impl=stem_conv_impl)
    run()  # Warm-up (and cuDNN/allocator first-use costs).
    times = _time(run, args.reps)
    _train_row(r, name, shape, batch, run, times, _peak_bytes(), args.peak_tflops, ceiling[0],
               note)
    del run

  def sec_train():
    r.line(header)
    if not args.profile:
      train_variant("bf16", args.big_batch, jnp.bfloat16, note="the paper's batch, one pass")
      return
    run = TrainRun(shape, args.big_batch, jnp.bfloat16)
    run()
    times = _time(run, args.reps)
    _train_row(r, "bf16", shape, args.big_batch, run, times, _peak_bytes(), args.peak_tflops,
               ceiling[0], "the paper's batch, one pass")
    import tempfile  # pylint: disable=g-import-not-at-top
    logdir = tempfile.mkdtemp(prefix="bench_gpu_trace_")
    steps = 3
    with jax.profiler.trace(logdir):
      for _ in range(steps):
        run()
    prof = summarize_gpu_trace(logdir, steps)
    step_ms = 1e3 * statistics.median(times)
    r.line(f"\nProfile of that step (`jax.profiler`, {steps} steps; kernel time per step, "
           f"{prof['busy_ms']:.1f} ms busy of {step_ms:.1f} ms wall; streams: "
           f"{', '.join(prof['lines'])[:300]}):\n")
    r.line("| kernel class | ms per step | share of kernel time |")
    r.line("| --- | ---: | ---: |")
    for cat, ms in sorted(prof["categories"].items(), key=lambda kv: -kv[1]):
      r.record("profile", f"| {cat} | {ms:.1f} | {100 * ms / prof['busy_ms']:.0f} % |",
               category=cat, ms=ms)
    r.line("\n| top kernels | HLO op | calls per step | ms per step |")
    r.line("| --- | --- | ---: | ---: |")
    for name, hlo, calls, ms in prof["top"]:
      r.record("profile", f"| `{name[:110]}` | {hlo[:40]} | {calls:.0f} | {ms:.2f} |",
               kernel=name, hlo=hlo, calls=calls, ms=ms)
    del run

  def sec_folded():
    """The convolution implementations side by side (the default row is in ``train``)."""
    r.line(header)
    train_variant("bf16 conv_impl=xla stem=xla", args.big_batch, jnp.bfloat16, conv_impl="xla",
                  stem_conv_impl="xla", note="native 3D convolutions everywhere")
    if r.elapsed() < args.budget_s:
      train_variant("bf16 conv_impl=xla", args.big_batch, jnp.bfloat16, conv_impl="xla",
                    note="native 3D convolutions, stem folded (stem_conv_impl auto)")

  def sec_infer():
    if os.path.exists(args.input) and shape == (138, 256, 256):
      image = np.load(args.input)["image"].astype(np.float32)
      source = f"preprocessed real CT {os.path.basename(args.input)}"
    else:
      image = np.random.default_rng(1).random(shape).astype(np.float32)
      source = "uniform noise"
    image = image[None, ..., None]
    model = DSAN()
    variables = jax.tree_util.tree_map(
        np.asarray, dict(model.init(jax.random.key(0), jnp.zeros((1, 16, 32, 32, 1)))))
    r.line(f"\nInference, batch 1, {shape}, input: {source}, untrained weights; "
           f"median of {2 * args.reps} after a warm-up.\n")
    r.line("| dtype | latency ms median (min) | TFLOP/s | compile s | logit | vs fp32 |")
    r.line("| --- | ---: | ---: | ---: | ---: | --- |")
    runs = {}
    for name, dtype in (("fp32", jnp.float32), ("bf16", jnp.bfloat16)):
      run = InferRun(image, variables, dtype)
      run()
      times = _time(run, 2 * args.reps)
      runs[name] = run
      med = statistics.median(times)
      diff = ""
      if name != "fp32":
        ref = runs["fp32"]
        dl = abs(run.logit - ref.logit)
        cam_err = float(np.max(np.abs(run.cam - ref.cam)) / max(np.max(np.abs(ref.cam)), 1e-30))
        diff = f"abs dlogit {dl:.1e} (abs dP <= {dl / 4:.1e}); CAM max rel. err. {cam_err:.1e}"
      r.record("infer", f"| {name} | {med * 1e3:.1f} ({min(times) * 1e3:.1f}) | "
               f"{run.flops / med / 1e12:.0f} | {run.compile_s:.0f} | {run.logit:.5f} | {diff} |",
               dtype=name, median_s=med, min_s=min(times), times=times, flops=run.flops,
               logit=run.logit, compile_s=run.compile_s, peak_bytes=_peak_bytes())

  def sec_memory24():
    b = args.big_batch
    r.line(f"\nBatch {b} for a {args.budget_gb:g} GB card: compiled memory of the bf16 train step "
           "(XLA buffer assignment: arguments + outputs - donated + temporaries). The first "
           "accumulation variant that fits is also timed.\n")
    r.line("| variant | micro-batch | temp GB | total GB | fits | compile s |")
    r.line("| --- | ---: | ---: | ---: | --- | ---: |")
    variants = [(f"bf16+accum={a}", "", a) for a in sorted(int(v) for v in args.accum.split(",") if v)]
    variants += [("bf16+remat=stem", "stem", 1)]
    timed = None
    for name, remat, accum in variants:
      if b % accum or r.elapsed() > args.budget_s:
        continue
      run = TrainRun(shape, b, jnp.bfloat16, remat=remat, accum=accum)
      total = run.memory.get("total", float("nan"))
      fits = total <= args.budget_gb * GB
      r.record("memory24", f"| {name} | {b // accum} | {run.memory.get('temp', 0) / GB:.2f} | "
               f"{total / GB:.2f} | {'yes' if fits else 'no'} | {run.compile_s:.0f} |",
               name=name, batch=b, memory=run.memory, compile_s=run.compile_s)
      if fits and accum > 1 and timed is None:
        run()
        timed = (name, accum, run, _time(run, args.reps))
      del run
    if timed:
      name, accum, run, times = timed
      r.line(header)
      _train_row(r, name, shape, b, run, times, _peak_bytes(), args.peak_tflops, ceiling[0],
                 f"{accum} micro-batches of {b // accum}; fits {args.budget_gb:g} GB")

  def sec_scaling():
    r.line(header)
    for bs in [int(v) for v in args.batches.split(",") if v]:
      if r.elapsed() > args.budget_s:
        break
      train_variant("bf16", bs, jnp.bfloat16)
    if r.elapsed() < args.budget_s:
      bs = int(args.batches.split(",")[0])
      train_variant("fp32", bs, jnp.float32, note="XLA's default fp32 precision on this backend")

  def sec_pool():
    bs = int(args.batches.split(",")[0])
    r.line(header)
    train_variant("bf16 pool=reduce_window", bs, jnp.bfloat16, pool="reduce_window",
                  note="nn.max_pool; compare the bf16 row of this batch (pool=slices)")

  def sec_torch():
    left = max(30.0, args.budget_s + 60 - r.elapsed())
    cmd = [sys.executable, os.path.abspath(__file__), "--torch_only", "--shape", args.shape,
           "--batches", args.batches, "--reps", str(args.reps)]
    r.line(f"\nPyTorch, the identical network on the same device (subprocess, {left:.0f} s "
           "allowed):\n")
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=left, check=False)
    for row in proc.stdout.splitlines():
      r.record("torch", row, text=row)
    if proc.returncode:
      r.line(f"(torch subprocess exit {proc.returncode}: {proc.stderr[-800:]})")

  run_section("ceiling", sec_ceiling)
  run_section("train", sec_train)
  run_section("infer", sec_infer)
  run_section("memory24", sec_memory24)
  run_section("scaling", sec_scaling)
  run_section("folded", sec_folded)
  run_section("torch", sec_torch)
  run_section("pool", sec_pool)
  r.line(f"\n- total {r.elapsed():.0f} s; process peak device memory "
         f"{_peak_bytes() / GB:.1f} GB (allocator, whole run)")
  return 0


def _torch_main(args, shape) -> int:
  """The PyTorch rows (run as a subprocess so its memory and JAX's do not mix)."""
  import torch  # pylint: disable=g-import-not-at-top
  import torch_dsan  # pylint: disable=g-import-not-at-top
  if not torch.cuda.is_available():
    print("| PyTorch | - | no CUDA device |")
    return 0
  torch.backends.cudnn.benchmark = True
  dev = torch.device("cuda")
  cfg = default_config.get_config().optim
  print(f"torch {torch.__version__}, {torch.cuda.get_device_name()}, bf16 autocast, "
        "channels_last_3d, cudnn.benchmark\n")
  print("| PyTorch | batch | ms median (min) | volumes/s | peak GB |")
  print("| --- | ---: | ---: | ---: | ---: |", flush=True)

  def sync_time(fn, reps):
    fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(reps):
      t0 = time.perf_counter()
      fn()
      torch.cuda.synchronize()
      times.append(time.perf_counter() - t0)
    return times

  for bs in [int(v) for v in args.batches.split(",") if v][:1]:
    model = torch_dsan.DSAN().to(dev).to(memory_format=torch.channels_last_3d).train()
    opt = torch.optim.Adam(model.parameters(), lr=cfg.learning_rate, betas=(cfg.b1, cfg.b2),
                           eps=cfg.eps, weight_decay=cfg.weight_decay)
    x = torch.rand((bs, 1, *shape), device=dev).to(memory_format=torch.channels_last_3d)
    mask = (torch.rand((bs, *shape), device=dev) < 0.1).float()
    label = (torch.arange(bs, device=dev) % 2 == 0).int()
    has_mask = torch.ones(bs, dtype=torch.bool, device=dev)

    def step():
      opt.zero_grad(set_to_none=True)
      with torch.autocast("cuda", dtype=torch.bfloat16):
        logits, aux = model(x, return_attention=True)
      loss = torch_dsan.dsan_loss(logits.float(), aux["attention"].float(), mask, label, has_mask)
      loss.backward()
      opt.step()

    torch.cuda.reset_peak_memory_stats()
    times = sync_time(step, args.reps)  # cudnn.benchmark picks algorithms in the warm-up.
    med = statistics.median(times)
    print(f"| train bf16 autocast | {bs} | {med * 1e3:.1f} ({min(times) * 1e3:.1f}) | "
          f"{bs / med:.1f} | {torch.cuda.max_memory_allocated() / GB:.1f} |", flush=True)
    del model, opt, x, mask

  model = torch_dsan.DSAN().to(dev).to(memory_format=torch.channels_last_3d).eval()
  x = torch.rand((1, 1, *shape), device=dev).to(memory_format=torch.channels_last_3d)
  for name, ctx in (("fp32", torch.autocast("cuda", enabled=False)),
                    ("bf16 autocast", torch.autocast("cuda", dtype=torch.bfloat16))):

    def infer(ctx=ctx):
      with torch.inference_mode(), ctx:
        logits, aux = model(x)
        aux["cam"].float().cpu()
        float(logits[0])

    torch.cuda.reset_peak_memory_stats()
    times = sync_time(infer, 2 * args.reps)
    med = statistics.median(times)
    print(f"| inference {name} | 1 | {med * 1e3:.1f} ({min(times) * 1e3:.1f}) | {1 / med:.1f} | "
          f"{torch.cuda.max_memory_allocated() / GB:.1f} |", flush=True)
  return 0


if __name__ == "__main__":
  sys.exit(main())
