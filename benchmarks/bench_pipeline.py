"""Does the input pipeline keep up with the train step? Both measured alone, in one run.

1. Builds (once, reused afterwards) a small cache of synthetic phantoms at the quick-start size
   (``configs/quickstart.py``: 48x64x64, batch 8) with ``prepare.prepare_data``.
2. Pipeline alone: batches/s of ``pipeline.make_train_iterator`` reading that cache with 0, 1 and
   2 grain worker processes, after a warm-up (the first batch pays for starting the workers);
   optionally with the host-to-device copy (``sharding.shard_batch`` + wait) included.
3. Train step alone: steps/s of the jitted quick-start train step on one fixed device batch
   (compiled first, then timed with ``block_until_ready``).

The pipeline does not starve the step when its batches/s exceed the step's steps/s (in training
the loader runs in background threads/processes while the step computes, and
``loop._device_batches`` keeps ``data.prefetch`` batches in flight to the device).

Run:
  python benchmarks/bench_pipeline.py                       # ~2-4 min on 2 cores
  python benchmarks/bench_pipeline.py --workers 0,2 --batches 40 --step_reps 10
"""

import argparse
import os
import pathlib
import statistics
import sys
import time

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))  # For configs/.

from dsan_jax import runtime  # noqa: E402

import jax  # noqa: E402
import numpy as np  # noqa: E402

from configs import quickstart  # noqa: E402
from dsan_jax.data import prepare  # noqa: E402
from dsan_jax.training import loop, optim, sharding, steps
from dsan_jax.data import folds as folds_lib  # noqa: E402
from dsan_jax.data import pipeline  # noqa: E402
from dsan_jax.models.dsan import model_from_config  # noqa: E402


def time_pipeline(dataset, train_idx, config, workers: int, batches: int, warmup: int,
                  to_device: bool, mesh) -> dict[str, float]:
  """Seconds for ``batches`` training batches after ``warmup`` batches, and the first batch's."""
  it = pipeline.make_train_iterator(
      dataset, train_idx, config, seed=0, global_batch_size=config.train.batch_size,
      num_workers=workers, num_steps=warmup + batches, prefetch=config.data.prefetch)
  try:
    t0 = time.perf_counter()
    for _ in range(warmup):
      next(it)
    t1 = time.perf_counter()
    for _ in range(batches):
      b = next(it)
      if to_device:
        jax.block_until_ready(sharding.shard_batch(b, mesh))
    t2 = time.perf_counter()
  finally:
    it.close()
  return dict(first_s=t1 - t0, seconds=t2 - t1, batches_per_s=batches / (t2 - t1))


def time_step(config, mesh, reps: int) -> dict[str, float]:
  """Median seconds of the quick-start train step on a fixed device batch."""
  resolved = runtime.resolve_config(config)
  model = model_from_config(resolved.model, resolved.runtime.device_count)
  tx = optim.make_optimizer(config.optim, steps_per_epoch=100)
  b = config.train.batch_size
  shape = tuple(config.data.target_shape)
  state = sharding.replicate(steps.create_train_state(model, tx, config.seed, (b, *shape)),
                             mesh)
  rng = np.random.default_rng(0)
  batch = dict(image=rng.random((b, *shape), dtype=np.float32),
               infection_mask=(rng.random((b, *shape)) < 0.05).astype(np.uint8),
               has_mask=np.ones(b, bool), label=(np.arange(b) % 2).astype(np.int32),
               ratio=np.full(b, 0.05, np.float32), index=np.arange(b, dtype=np.int32),
               weight=np.ones(b, np.float32))
  batch = sharding.shard_batch(batch, mesh)
  step = steps.make_train_step(model, mesh, config.loss.attention_weight,
                               config.train.grad_accum_steps)
  t0 = time.perf_counter()
  step = step.lower(state, batch).compile()
  compile_s = time.perf_counter() - t0
  state, m = step(state, batch)  # Warm-up run.
  jax.block_until_ready(m)
  times = []
  for _ in range(reps):
    t0 = time.perf_counter()
    state, m = step(state, batch)
    jax.block_until_ready((state, m))
    times.append(time.perf_counter() - t0)
  return dict(compile_s=compile_s, median_s=statistics.median(times), min_s=min(times))


def main(argv=None) -> int:
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
  p.add_argument("--workdir", default="/tmp/dsan_bench_pipeline",
                 help="where the phantoms and the cache are built (reused when present)")
  p.add_argument("--num_cases", type=int, default=48, help="synthetic phantoms to generate")
  p.add_argument("--workers", default="0,1,2", help="grain worker counts to time")
  p.add_argument("--batches", type=int, default=30, help="timed batches per worker count")
  p.add_argument("--warmup", type=int, default=3, help="untimed batches first")
  p.add_argument("--step_reps", type=int, default=5, help="timed train steps")
  p.add_argument("--no_device", action="store_true",
                 help="time the pipeline without the copy to the device")
  args = p.parse_args(argv)
  runtime.configure_xla_flags()  # As train.py does; before any computation.

  config = quickstart.get_config()
  config.data.synthetic.num_cases = args.num_cases
  t0 = time.perf_counter()
  data = prepare.prepare_data(config, args.workdir, progress=False)
  prep_s = time.perf_counter() - t0
  train_idx, _ = folds_lib.split_indices(data.folds, 0)
  mesh = sharding.make_mesh()
  b = config.train.batch_size
  print(f"# jax {jax.__version__}, {jax.device_count()} {jax.default_backend()} device(s), "
        f"{os.cpu_count()} CPU core(s), load average {os.getloadavg()[0]:.1f}; "
        f"XLA_FLAGS={os.environ.get('XLA_FLAGS', '')!r}")
  print(f"# cache: {len(data.dataset)} cases of {tuple(config.data.target_shape)} in "
        f"{args.workdir} ({prep_s:.1f} s to prepare/open); {len(train_idx)} training cases, "
        f"global batch {b}, prefetch {config.data.prefetch}")

  rows = []
  for w in (int(x) for x in args.workers.split(",") if x):
    r = time_pipeline(data.dataset, train_idx, config, w, args.batches, args.warmup,
                      not args.no_device, mesh)
    rows.append((f"pipeline, {w} worker(s)" + ("" if args.no_device else " + device copy"),
                 r["batches_per_s"], f"first {args.warmup} batches {r['first_s']:.2f} s"))
    print(f"#   {rows[-1][0]}: {r['batches_per_s']:.2f} batches/s", flush=True)
  s = time_step(config, mesh, args.step_reps)
  step_rate = 1 / s["median_s"]
  rows.append(("train step alone (median)", step_rate,
               f"median {s['median_s']:.3f} s, min {s['min_s']:.3f} s, "
               f"compile {s['compile_s']:.0f} s"))

  print("| what | batches/s | volumes/s | x train step | notes |")
  print("| --- | ---: | ---: | ---: | --- |")
  for name, rate, note in rows:
    print(f"| {name} | {rate:.2f} | {rate * b:.1f} | {rate / step_rate:.1f} | {note} |")
  return 0


if __name__ == "__main__":
  sys.exit(main())
