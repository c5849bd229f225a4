"""benchmarks/bench_gpu.py: its kernel classes, and a CPU smoke run (its GPU numbers are in docs)."""

import importlib.util
import json
import os
import subprocess
import sys

import pytest

from tests.test_end_to_end import FAST_COMPILE

_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_SCRIPT = os.path.join(_ROOT, "benchmarks", "bench_gpu.py")


def _module():
  spec = importlib.util.spec_from_file_location("bench_gpu", _SCRIPT)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


@pytest.mark.parametrize("name, category", [
    # Kernel names from the H200 profile in docs/gpu/h200_run2.md and h200_run3.md.
    ("void implicit_convolveNd_sgemm<__nv_bfloat16, 3, 1024, 5, 5, 3, 3, 3, 1, false>", "conv, other"),
    ("sm80_xmma_wgrad_implicit_gemm_indexed_bf16bf16_bf16f32_f32_nhwckrsc_nhwc",
     "conv kernel gradient (wgrad)"),
    ("sm90_xmma_fprop_implicit_gemm_bf16bf16_bf16f32_f32_nhwckrsc_nhwc_tilesize128x64x32",
     "conv forward (fprop)"),
    ("sm90_xmma_dgrad_implicit_gemm_bf16bf16_bf16f32_f32_nhwckrsc_nhwc", "conv input gradient (dgrad)"),
    ("void cutlass__5x_cudnn::Kernel<cutlass_tensorop_bf16_s16816fprop_optimized_bf16_256x64>",
     "conv forward (fprop)"),
    ("input_reduce_fusion_36", "XLA reduction fusion"),
    ("loop_transpose_fusion_1", "transpose"),
    ("loop_add_select_fusion", "XLA elementwise / other fusion"),
])
def test_kernel_category(name, category):
  assert _module()._kernel_category(name) == category  # pylint: disable=protected-access


def test_refuses_cpu_without_flag():
  proc = subprocess.run([sys.executable, _SCRIPT], capture_output=True, text=True, timeout=300,
                        env={**os.environ, "JAX_PLATFORMS": "cpu"}, check=False)
  assert proc.returncode == 2
  assert "only the CPU" in proc.stderr


# The smoke run checks that every section runs and reports, not speed or values: XLA compiles
# at optimisation level 0 (the full-width network's bf16 and fp32 programs compile several times
# faster; a section that fails or prints no row fails the same way).
_SMOKE_ENV = {**os.environ, "JAX_PLATFORMS": "cpu", **FAST_COMPILE}


@pytest.mark.slow
def test_cpu_smoke_run(tmp_path):
  """Tiny sizes on CPU: every requested section prints its rows and JSON lines."""
  jsonl = tmp_path / "out.jsonl"
  proc = subprocess.run(
      [sys.executable, _SCRIPT, "--allow_cpu", "--shape", "8,16,16", "--big_batch", "2",
       "--matmul", "64", "--reps", "1", "--sections", "ceiling,train,infer",
       "--jsonl", str(jsonl)],
      capture_output=True, text=True, timeout=900, env=_SMOKE_ENV, check=False)
  assert proc.returncode == 0, proc.stderr[-2000:]
  rows = [json.loads(line) for line in jsonl.read_text().splitlines()]
  sections = [r["section"] for r in rows]
  assert sections.count("train") == 1 and sections.count("infer") == 2
  train = next(r for r in rows if r["section"] == "train")
  assert train["batch"] == 2 and train["flops"] > 0 and train["median_s"] > 0
  assert "failed" not in proc.stdout
