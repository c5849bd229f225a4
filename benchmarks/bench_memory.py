"""Compiled memory of the DSAN train step at full size, without allocating anything.

For each variant the jitted train step (``steps.make_train_step``: state donated, batch sharded
over a 1-device mesh) is lowered with ``jax.ShapeDtypeStruct`` inputs (the state from
``jax.eval_shape``) and compiled; ``compiled.memory_analysis()`` gives XLA's buffer assignment:

  argument  bytes of the inputs (train state + batch)
  output    bytes of the outputs (new state + metrics)
  alias     bytes of outputs written into donated inputs (counted once)
  temp      the peak of the step's temporaries (activations kept for the backward, workspace)
  total     argument + output - alias + temp: what the device must hold during the step

Run (one variant per line, prints a Markdown table; a full-size compile takes 1-5 min on 2 cores):

  python benchmarks/bench_memory.py      # the default set: 24 compiles, ~40-60 min on 2 cores
  python benchmarks/bench_memory.py --variants fp32 --batches 1,20
  python benchmarks/bench_memory.py --shape 48,64,64 --batches 8   # quick check

Variants: ``fp32``, ``bf16`` (``DSAN(dtype=jnp.bfloat16)``, fp32 parameters), ``bf16+remat=stem``,
``bf16+remat=blocks``, ``bf16+remat=all``, the same with ``fp32+remat=...``, and gradient
accumulation ``...+accum=K`` (the global batch in K micro-batches). Caveat: XLA:CPU converts bf16
convolutions back to fp32 internally, so bf16 rows compiled on CPU do not show what a GPU needs.
"""

import argparse
import dataclasses
import json
import os
import pathlib
import sys
import time

import jax
import jax.numpy as jnp

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))  # For configs/.
from configs import default as default_config  # noqa: E402
from dsan_jax.training import optim, sharding, steps
from dsan_jax.models import DSAN
from dsan_jax import runtime

# Variants run by default (at every --batches), then DEFAULT_ACCUM at the largest batch.
DEFAULT_VARIANTS = ("fp32", "bf16", "bf16+remat=stem", "bf16+remat=blocks", "bf16+remat=all",
                    "fp32+remat=stem", "fp32+remat=all")
DEFAULT_ACCUM = ("fp32+accum=4", "fp32+accum=20", "fp32+remat=all+accum=20")
GB = 1e9


@dataclasses.dataclass
class Variant:
  name: str
  dtype: str = "float32"
  remat: str = ""
  accum: int = 1

  @classmethod
  def parse(cls, name: str) -> "Variant":
    parts = name.split("+")
    if parts[0] not in ("fp32", "bf16"):
      raise ValueError(f"variant must start with fp32 or bf16: {name!r}")
    v = cls(name=name, dtype="float32" if parts[0] == "fp32" else "bfloat16")
    for p in parts[1:]:
      key, _, value = p.partition("=")
      if key == "remat":
        v.remat = value
      elif key == "accum":
        v.accum = int(value)
      else:
        raise ValueError(f"unknown part {p!r} in {name!r}")
    return v


def memory_of_train_step(variant: Variant, batch: int, shape: tuple[int, int, int],
                         conv_impl: str = "auto", width: int = 64, depth: int = 34
                         ) -> dict[str, float]:
  """Compiles the train step for abstract inputs and returns its memory analysis.

  Args:
    variant: dtype / remat / accumulation.
    batch: global batch size B (micro-batch B / accum).
    shape: volume (D, H, W).
    conv_impl: convolution implementation of the model.
    width, depth: the network (paper: ResNet34, width 64).

  Returns:
    dict with bytes ``argument``, ``output``, ``alias``, ``temp``, ``total`` and seconds
    ``lower_s``, ``compile_s``.
  """
  impl = runtime.resolve_conv_impl(conv_impl, dtype=variant.dtype)
  model = DSAN(depth=depth, width=width, dtype=jnp.dtype(variant.dtype), remat=variant.remat,
               conv_impl=impl, stem_conv_impl=impl)
  tx = optim.make_optimizer(_optim_config(), steps_per_epoch=1)
  state = steps.abstract_train_state(model, tx, 0, (batch, *shape))
  vol = (batch, *shape)
  abstract_batch = dict(
      image=jax.ShapeDtypeStruct(vol, jnp.float32),
      infection_mask=jax.ShapeDtypeStruct(vol, jnp.uint8),
      has_mask=jax.ShapeDtypeStruct((batch,), jnp.bool_),
      label=jax.ShapeDtypeStruct((batch,), jnp.int32),
      ratio=jax.ShapeDtypeStruct((batch,), jnp.float32),
      index=jax.ShapeDtypeStruct((batch,), jnp.int32),
      weight=jax.ShapeDtypeStruct((batch,), jnp.float32))
  mesh = sharding.make_mesh(jax.devices()[:1])
  step = steps.make_train_step(model, mesh, attention_weight=0.5,
                               grad_accum_steps=variant.accum)
  t0 = time.perf_counter()
  lowered = step.lower(state, abstract_batch)
  t1 = time.perf_counter()
  compiled = lowered.compile()
  t2 = time.perf_counter()
  m = compiled.memory_analysis()
  out = dict(argument=m.argument_size_in_bytes, output=m.output_size_in_bytes,
             alias=m.alias_size_in_bytes, temp=m.temp_size_in_bytes)
  out["total"] = out["argument"] + out["output"] - out["alias"] + out["temp"]
  out.update(lower_s=t1 - t0, compile_s=t2 - t1)
  return out


def _optim_config():
  return default_config.get_config().optim


def main(argv=None) -> int:
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
  p.add_argument("--shape", default="138,256,256", help="D,H,W of the input volume")
  p.add_argument("--batches", default="1,5,20", help="global batch sizes")
  p.add_argument("--variants", default=",".join(DEFAULT_VARIANTS),
                 help="comma-separated variant names (module docstring)")
  p.add_argument("--accum_variants", default=",".join(DEFAULT_ACCUM),
                 help="variants with accumulation, run at the largest batch only")
  p.add_argument("--conv_impl", default="auto")
  p.add_argument("--width", type=int, default=64)
  p.add_argument("--depth", type=int, default=34)
  p.add_argument("--budget_gb", type=float, default=24.0, help="marks rows that fit")
  p.add_argument("--jsonl", default="", help="append one JSON line per row to this file")
  args = p.parse_args(argv)
  runtime.configure_xla_flags()  # As train.py does; before any computation.
  shape = tuple(int(s) for s in args.shape.split(","))
  batches = [int(b) for b in args.batches.split(",") if b]
  jobs = [(Variant.parse(v), b) for v in args.variants.split(",") if v for b in batches]
  jobs += [(Variant.parse(v), max(batches)) for v in args.accum_variants.split(",") if v]
  impl = runtime.resolve_conv_impl(args.conv_impl)
  print(f"# train-step memory, input {shape}, ResNet{args.depth} width {args.width}, conv_impl "
        f"{impl}, jax {jax.__version__}, backend {jax.default_backend()}, "
        f"XLA_FLAGS={os.environ.get('XLA_FLAGS', '')!r}")
  if jax.default_backend() == "cpu":
    print("# CPU: XLA:CPU computes bf16 convolutions in fp32, so bf16 rows are not what a GPU "
          "would need.")
  print("| variant | batch | micro-batch | temp GB | argument GB | output GB | alias GB | "
        f"total GB | <= {args.budget_gb:g} GB | compile s |")
  print("| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | --- | ---: |", flush=True)
  for v, b in jobs:
    if b % v.accum:
      continue
    try:
      r = memory_of_train_step(v, b, shape, args.conv_impl, args.width, args.depth)
    except Exception as e:  # Keep the table going; report the failure in its row.
      print(f"| {v.name} | {b} | {b // v.accum} | failed: {type(e).__name__}: {e} |", flush=True)
      continue
    fits = "yes" if r["total"] <= args.budget_gb * GB else "no"
    print(f"| {v.name} | {b} | {b // v.accum} | {r['temp'] / GB:.2f} | {r['argument'] / GB:.3f} "
          f"| {r['output'] / GB:.3f} | {r['alias'] / GB:.3f} | {r['total'] / GB:.2f} | {fits} | "
          f"{r['compile_s']:.0f} |", flush=True)
    if args.jsonl:
      with open(args.jsonl, "a") as f:
        f.write(json.dumps(dict(variant=v.name, batch=b, shape=shape, conv_impl=impl,
                                backend=jax.default_backend(), **r)) + "\n")
  return 0


if __name__ == "__main__":
  sys.exit(main())
