"""Per-layer micro-benchmark of the 3D convolution implementations (``dsan_jax.models.conv``).

For every distinct convolution of DSAN's ResNet34 (stage strides (1, 2, 2, 1)) at a given input
size, times ``impl="xla"`` against ``impl="folded"``, forward and forward+backward, and prints the
median time and the achieved GFLOP/s. FLOPs come from XLA's cost analysis of the *xla* program
(the useful work; the folded program's count is the same convolution plus copies), so GFLOP/s is
comparable between implementations. The backward of the stem is taken w.r.t. the kernel only, as
in a train step (the image needs no gradient); the other layers differentiate input and kernel.

Variants are interleaved within each repetition (the machine is shared and noisy) and the median
over repetitions is reported.

Usage:
  python benchmarks/bench_conv.py --size 48,96,96 --batch 2 --reps 5
  # With and without the YNNPACK flag (one subprocess per layer and flag setting, alternated):
  python benchmarks/bench_conv.py --size 48,96,96 --compare_flag
  # The whole network (forward+backward of the DSAN loss), xla vs folded vs PyTorch:
  python benchmarks/bench_conv.py --size 48,96,96 --network
  # Numerics of the gradients against float64, per layer (fp32 relative max error):
  python benchmarks/bench_conv.py --size 48,96,96 --numerics
"""

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, _ROOT)
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import timing  # pylint: disable=wrong-import-position  (benchmarks/timing.py)

# (name, feature scale of the input relative to the volume, C, O, kernel, stride, count in net).
LAYERS = (
    ("stem", 1, 1, 64, 7, 2, 1),
    ("l1", 4, 64, 64, 3, 1, 6),
    ("l2_down", 4, 64, 128, 3, 2, 1),
    ("l2_proj", 4, 64, 128, 1, 2, 1),
    ("l2", 8, 128, 128, 3, 1, 7),
    ("l3_down", 8, 128, 256, 3, 2, 1),
    ("l3_proj", 8, 128, 256, 1, 2, 1),
    ("l3", 16, 256, 256, 3, 1, 11),
    ("l4_first", 16, 256, 512, 3, 1, 1),
    ("l4_proj", 16, 256, 512, 1, 1, 1),
    ("l4", 16, 512, 512, 3, 1, 5),
)
IMPLS = ("xla", "folded")


def _ceil_div(a, b):
  return -(-a // b)


def _layer_problem(layer, size, batch):
  name, scale, c, o, k, s, count = layer
  spatial = tuple(_ceil_div(n, scale) for n in size)
  return dict(name=name, x_shape=(batch, *spatial, c), k=k, s=s, c=c, o=o, count=count,
              wrt_x=name != "stem")


def _make_fns(prob, impl):
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  from dsan_jax.models.conv import conv3d  # pylint: disable=g-import-not-at-top
  k, s = prob["k"], prob["s"]
  pad = [(k // 2, k // 2)] * 3

  def fwd(x, w):
    return conv3d(x, w, (s, s, s), pad, impl)

  def loss(x, w, g):
    return jnp.sum(fwd(x, w) * g)

  argnums = (0, 1) if prob["wrt_x"] else (1,)
  return jax.jit(fwd), jax.jit(jax.grad(loss, argnums))


def _inputs(prob, dtype, seed=0):
  import numpy as np  # pylint: disable=g-import-not-at-top
  rng = np.random.default_rng(seed)
  k, c, o = prob["k"], prob["c"], prob["o"]
  x = rng.standard_normal(prob["x_shape"]).astype(dtype)
  w = (rng.standard_normal((k, k, k, c, o)) / np.sqrt(k**3 * c)).astype(dtype)
  return x, w


def _flops(jitted, *args):
  cost = jitted.lower(*args).compile().cost_analysis()
  if isinstance(cost, (list, tuple)):
    cost = cost[0]
  return float(cost.get("flops", float("nan")))


def bench_layer(prob, reps, impls=IMPLS):
  """Times each impl's forward and forward+backward; returns {impl: {fwd_s, bwd_s, ...}}."""
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top
  x, w = _inputs(prob, np.float32)
  x, w = jnp.asarray(x), jnp.asarray(w)
  fns = {impl: _make_fns(prob, impl) for impl in set(impls) | {"xla"}}
  y = fns[impls[0]][0](x, w)
  g = jnp.asarray(np.random.default_rng(1).standard_normal(y.shape).astype(np.float32))
  flops_fwd = _flops(fns["xla"][0], x, w)
  flops_bwd = _flops(fns["xla"][1], x, w, g)
  times = {impl: {"fwd": [], "bwd": []} for impl in impls}
  for impl in impls:  # Compile and warm up.
    jax.block_until_ready(fns[impl][0](x, w))
    jax.block_until_ready(fns[impl][1](x, w, g))
  for _ in range(reps):
    for impl in impls:
      for kind, fn, args in (("fwd", fns[impl][0], (x, w)), ("bwd", fns[impl][1], (x, w, g))):
        t0 = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times[impl][kind].append(time.perf_counter() - t0)
  out = {}
  for impl in impls:
    fwd = statistics.median(times[impl]["fwd"])
    bwd = statistics.median(times[impl]["bwd"])
    out[impl] = dict(fwd_s=fwd, bwd_s=bwd, fwd_gflops=flops_fwd / fwd / 1e9,
                     bwd_gflops=flops_bwd / bwd / 1e9)
  return out


def numerics_layer(prob, impls=IMPLS):
  """Relative max error (max|a - ref| / max|ref|) of fp32 outputs/gradients vs float64 xla."""
  import jax  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top
  jax.config.update("jax_enable_x64", True)
  x64, w64 = _inputs(prob, np.float64)
  fwd64, grad64 = _make_fns(prob, "xla")
  y64 = np.asarray(fwd64(x64, w64))
  g64 = np.random.default_rng(1).standard_normal(y64.shape)
  ref = [y64] + [np.asarray(a) for a in grad64(x64, w64, g64)]
  out = {}
  for impl in impls:
    fwd, grad = _make_fns(prob, impl)
    x, w, g = (a.astype(np.float32) for a in (x64, w64, g64))
    got = [np.asarray(fwd(x, w))] + [np.asarray(a) for a in grad(x, w, g)]
    names = ["y", "dx", "dw"] if prob["wrt_x"] else ["y", "dw"]
    out[impl] = {n: float(np.max(np.abs(a - r)) / np.max(np.abs(r)))
                 for n, a, r in zip(names, got, ref)}
  return out


def bench_network(size, batch, reps, impls=IMPLS, with_torch=True):
  """Whole-network forward+backward (train mode) of DSAN's loss, per impl and PyTorch.

  The loss is the one of ``torch_dsan.dsan_loss`` (BCE + 0.5 * Eq. 3 over COVID cases with a
  mask), with no optimizer update, so only the network's cost is compared.

  Returns:
    {name: median seconds}, {name: min seconds} and the FLOPs of the xla program. Under
    contention the minimum is the less disturbed estimate (noise only adds time).
  """
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top
  import optax  # pylint: disable=g-import-not-at-top
  from dsan_jax import runtime  # pylint: disable=g-import-not-at-top
  from dsan_jax.models import DSAN  # pylint: disable=g-import-not-at-top
  rng = np.random.default_rng(0)
  x = rng.random((batch, *size, 1)).astype(np.float32)
  mask = (rng.random((batch, *size)) < 0.1).astype(np.float32)
  label = (np.arange(batch) % 2 == 0).astype(np.int32)
  valid = label.astype(np.float32)
  fns, flops = {}, float("nan")
  for impl in impls:
    model = DSAN(conv_impl=impl, stem_conv_impl=runtime.resolve_stem_conv_impl("auto"))
    variables = model.init(jax.random.key(0), jnp.asarray(x[:1]))

    def loss(params, batch_stats, x, model=model):
      (logits, aux), upd = model.apply({"params": params, "batch_stats": batch_stats}, x,
                                       train=True, return_attention=True,
                                       mutable=["batch_stats"])
      att, m = aux["attention"], jnp.asarray(mask)
      per = (jnp.sum((att - m)**2, (1, 2, 3))
             / jnp.maximum(jnp.sum(att, (1, 2, 3)) + jnp.sum(m, (1, 2, 3)), 1e-8))
      bce = jnp.mean(optax.sigmoid_binary_cross_entropy(logits, jnp.asarray(label, jnp.float32)))
      return bce + 0.5 * jnp.sum(per * valid) / max(valid.sum(), 1.0), upd

    args = (variables["params"], variables["batch_stats"], jnp.asarray(x))
    compiled = jax.jit(jax.grad(loss, has_aux=True)).lower(*args).compile()
    if impl == "xla":
      cost = compiled.cost_analysis()
      flops = float((cost[0] if isinstance(cost, (list, tuple)) else cost)["flops"])
    fns[impl] = lambda c=compiled, a=args: jax.block_until_ready(c(*a))
  if with_torch:
    try:
      import torch  # pylint: disable=g-import-not-at-top
      sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
      import torch_dsan  # pylint: disable=g-import-not-at-top
    except ImportError:
      print("PyTorch not installed: skipping it (pip install dsan_jax[benchmarks])")
    else:
      tmodel = torch_dsan.DSAN().train()
      xt = torch.from_numpy(np.moveaxis(x, -1, 1).copy())
      mt, lt = torch.from_numpy(mask), torch.from_numpy(label)
      ht = torch.ones(batch, dtype=torch.bool)

      def torch_step():
        tmodel.zero_grad()
        logits, aux = tmodel(xt, return_attention=True)
        torch_dsan.dsan_loss(logits, aux["attention"], mt, lt, ht).backward()

      fns["torch"] = torch_step
  for fn in fns.values():
    fn()
  times = timing.interleave(fns, reps)
  return ({name: statistics.median(t) for name, t in times.items()},
          {name: min(t) for name, t in times.items()}, flops)


def _print_bench(size, batch, results, impls=IMPLS):
  both = set(impls) == {"xla", "folded"}
  print(f"\ninput {size[0]}x{size[1]}x{size[2]}, batch {batch}; median seconds and GFLOP/s "
        f"(FLOPs of the xla program)")
  head = (f"{'layer':9s} {'x shape':>22s} {'k':>1s} {'s':>1s} {'n':>2s} | "
          + " | ".join(f"{impl:>6s} fwd s  GF/s  f+b s  GF/s" for impl in impls)
          + (" | fold speedup fwd  f+b" if both else ""))
  print(head)
  tot = {impl: [0.0, 0.0] for impl in impls}
  for prob, res in results:
    cells = []
    for impl in impls:
      r = res[impl]
      cells.append(f"{r['fwd_s']:12.4f} {r['fwd_gflops']:5.0f} {r['bwd_s']:6.3f} "
                   f"{r['bwd_gflops']:5.0f}")
      tot[impl][0] += r["fwd_s"] * prob["count"]
      tot[impl][1] += r["bwd_s"] * prob["count"]
    speedup = ""
    if both:
      speedup = (f" | {res['xla']['fwd_s'] / res['folded']['fwd_s']:13.2f} "
                 f"{res['xla']['bwd_s'] / res['folded']['bwd_s']:5.2f}")
    print(f"{prob['name']:9s} {str(prob['x_shape']):>22s} {prob['k']} {prob['s']} "
          f"{prob['count']:2d} | " + " | ".join(cells) + speedup)
  print("sum over the network's 36 convolutions (time x count): "
        + ", ".join(f"{impl}: fwd {t[0]:.3f} s, f+b {t[1]:.3f} s" for impl, t in tot.items()))


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--size", default="48,96,96", help="D,H,W of the input volume")
  parser.add_argument("--batch", type=int, default=2)
  parser.add_argument("--reps", type=int, default=5)
  parser.add_argument("--layers", default="", help="comma-separated subset of layer names")
  parser.add_argument("--impls", default=",".join(IMPLS), help="comma-separated impls")
  parser.add_argument("--numerics", action="store_true",
                      help="print fp32 errors vs float64 instead of timings")
  parser.add_argument("--compare_flag", action="store_true",
                      help="run every layer with and without the YNNPACK flag (subprocesses)")
  parser.add_argument("--network", action="store_true",
                      help="time the whole DSAN forward+backward per impl (and PyTorch)")
  parser.add_argument("--no_torch", action="store_true", help="with --network: skip PyTorch")
  parser.add_argument("--json", action="store_true", help="(internal) print one JSON line")
  args = parser.parse_args()
  size = tuple(int(v) for v in args.size.split(","))
  layers = [l for l in LAYERS if not args.layers or l[0] in args.layers.split(",")]
  impls = tuple(args.impls.split(","))

  if args.compare_flag:
    from dsan_jax.runtime import YNN_CONV_FLAG, xla_flag_supported  # pylint: disable=g-import-not-at-top
    if not xla_flag_supported(YNN_CONV_FLAG):
      print(f"{YNN_CONV_FLAG} is not supported by this jaxlib; nothing to compare.")
      return
    base = os.environ.get("XLA_FLAGS", "")
    for layer in layers:
      for label, flags in (("default", base), ("ynn_flag", f"{base} {YNN_CONV_FLAG}".strip())):
        cmd = [sys.executable, os.path.abspath(__file__), "--size", args.size, "--batch",
               str(args.batch), "--reps", str(args.reps), "--layers", layer[0], "--impls",
               args.impls, "--json"]
        if args.numerics:
          cmd.append("--numerics")
        env = dict(os.environ, XLA_FLAGS=flags)
        out = subprocess.run(cmd, env=env, capture_output=True, text=True, check=True).stdout
        res = json.loads(out.strip().splitlines()[-1])
        print(f"{label:9s} {layer[0]:9s} " + "  ".join(
            f"{impl}: " + " ".join(f"{k}={v:.3g}" for k, v in r.items())
            for impl, r in res.items()), flush=True)
    return

  import jax  # pylint: disable=g-import-not-at-top
  if not args.json:
    print(f"jax {jax.__version__}, backend {jax.default_backend()}, {os.cpu_count()} CPUs, "
          f"XLA_FLAGS={os.environ.get('XLA_FLAGS', '')!r}")
  if args.network:
    med, best, flops = bench_network(size, args.batch, args.reps, impls, not args.no_torch)
    print(f"DSAN (ResNet34) forward+backward, input {args.size}, batch {args.batch}, median (min) "
          f"of {args.reps}; xla program {flops / 1e9:.0f} GFLOP")
    for name, t in med.items():
      ratio = (f", {t / med['torch']:.2f}x ({best[name] / best['torch']:.2f}x) PyTorch"
               if "torch" in med else "")
      print(f"  {name:7s} {t:7.3f} s ({best[name]:.3f})  {args.batch / t:6.2f} volumes/s  "
            f"{flops / t / 1e9:6.0f} GFLOP/s{ratio}")
    return
  results = []
  for layer in layers:
    prob = _layer_problem(layer, size, args.batch)
    res = numerics_layer(prob, impls) if args.numerics else bench_layer(prob, args.reps, impls)
    if args.json:
      print(json.dumps(res))
      return
    if args.numerics:
      print(f"{prob['name']:9s} {str(prob['x_shape']):>22s} " + "  ".join(
          f"{impl}: " + " ".join(f"{k}={v:.1e}" for k, v in r.items()) for impl, r in res.items()),
          flush=True)
    else:
      print(f"  measured {prob['name']}", file=sys.stderr, flush=True)
    results.append((prob, res))
  if not args.numerics:
    _print_bench(size, args.batch, results, impls)


if __name__ == "__main__":
  main()
