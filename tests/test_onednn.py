"""The oneDNN convolution path (dsan_jax/kernels/onednn/): build, numerics, network, refusals.

Per-convolution numerics against float64 for every network geometry run in tests/test_conv.py
(which loops over ``runtime.available_conv_impls()``); here: that it is available where it should
be, the whole network against the plain path, the dtype and device rules of "auto", and the
errors when oneDNN or the compiler is missing.
"""

import importlib.metadata
import os
import pathlib
import platform
import subprocess
import sys
import textwrap

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dsan_jax import runtime
from dsan_jax.kernels import onednn
from dsan_jax.models import DSAN
from dsan_jax.models import conv
from tests import reduction_order

ROOT = pathlib.Path(__file__).resolve().parents[1]


def _wheel_installed() -> bool:
  try:
    importlib.metadata.distribution("onednn-devel-cpu-gomp")
  except importlib.metadata.PackageNotFoundError:
    return False
  return True


needs_onednn = pytest.mark.skipif(not onednn.available(),
                                  reason=f"oneDNN unavailable: {onednn.unavailable_reason()}")


def test_available_where_the_dependency_is_installed():
  """On Linux x86-64 the wheel is a dependency, so a silent fallback would be a bug."""
  if not (sys.platform.startswith("linux") and platform.machine() == "x86_64"
          and _wheel_installed()):
    pytest.skip("not Linux x86-64 with onednn-devel-cpu-gomp installed")
  assert onednn.available(), onednn.unavailable_reason()
  assert onednn.version().startswith("3.")
  assert "onednn" in runtime.available_conv_impls()
  assert runtime.resolve_conv_impl("auto", "cpu") == "onednn"


@needs_onednn
def test_network_matches_the_plain_convolutions():
  """DSAN (ResNet18, width 8, attention on) in train mode: logits, CAM, loss gradients.

  oneDNN computes in float32 only, so it is compared with XLA's float64 result from the same
  inputs, and must be about as accurate as XLA's own float32 convolutions
  (tests/reduction_order.py): a fixed float32 tolerance between the two would depend on the CPU.
  """
  x = np.random.default_rng(0).random((2, 16, 32, 32, 1)).astype(np.float32)
  model = lambda impl, dtype=jnp.float32: DSAN(depth=18, width=8, conv_impl=impl,
                                               stem_conv_impl=impl, dtype=dtype,
                                               param_dtype=dtype)
  variables = jax.device_get(model("xla").init(jax.random.key(0), jnp.asarray(x)))

  def run(impl, variables=variables, x=x, dtype=jnp.float32):
    m = model(impl, dtype)

    def loss(params, variables, x):
      (logits, aux), _ = m.apply({**variables, "params": params}, x, train=True,
                                 return_attention=True, mutable=["batch_stats"])
      return jnp.sum(jnp.sin(logits)) + jnp.sum(aux["attention"] ** 2), (logits, aux["cam"])

    (v, (logits, cam)), g = jax.jit(jax.value_and_grad(loss, has_aux=True))(
        variables["params"], variables, x)
    return jax.device_get((dict(value=v, logits=logits, cam=cam), g))

  with jax.enable_x64(True):
    exact = run("xla", reduction_order.to_float64(variables), x.astype(np.float64), jnp.float64)
  ref, got = run("xla"), run("onednn")
  for i, what in enumerate(("outputs", "gradients")):
    reduction_order.assert_as_accurate(got[i], ref[i], exact[i], f"onednn vs xla, {what}")
  # And close in absolute terms (float32 through a well-scaled network: a few 1e-5).
  reduction_order.assert_leaves_close(got[0], exact[0], 1e-3, "onednn outputs vs float64")


@needs_onednn
def test_stem_input_gradient_is_not_computed():
  """The image is not differentiated: XLA drops the stem's input-gradient call."""
  x = jnp.ones((1, 8, 16, 16, 1))
  w = jnp.ones((7, 7, 7, 1, 4))
  grad = jax.jit(jax.grad(lambda w, x: jnp.sum(conv.conv3d(x, w, (2, 2, 2), [(3, 3)] * 3,
                                                           "onednn") ** 2)))
  hlo = grad.lower(w, x).compile().as_text()
  assert "dsan_onednn_conv3d_bwd_weights" in hlo
  assert "dsan_onednn_conv3d_bwd_data" not in hlo


@needs_onednn
def test_dtype_rules():
  x, w = jnp.ones((1, 4, 4, 4, 2), jnp.bfloat16), jnp.ones((3, 3, 3, 2, 2), jnp.bfloat16)
  with pytest.raises(ValueError, match="float32 only"):
    conv.conv3d(x, w, (1, 1, 1), [(1, 1)] * 3, "onednn")
  assert runtime.resolve_conv_impl("auto", "cpu", jnp.bfloat16) == "folded"
  model = DSAN(depth=10, width=4, dtype=jnp.bfloat16)  # "auto" picks folded for bf16 compute.
  v = model.init(jax.random.key(0), jnp.ones((1, 16, 32, 32, 1)))
  logits, _ = model.apply(v, jnp.ones((1, 16, 32, 32, 1)))
  assert logits.dtype == jnp.float32 and bool(jnp.all(jnp.isfinite(logits)))


@needs_onednn
def test_vmap_on_one_device():
  rng = np.random.default_rng(0)
  x = jnp.asarray(rng.standard_normal((3, 1, 5, 6, 7, 2)), jnp.float32)
  w = jnp.asarray(rng.standard_normal((3, 3, 3, 2, 4)), jnp.float32)
  fn = lambda impl: (lambda x: conv.conv3d(x, w, (1, 2, 1), [(1, 1)] * 3, impl))
  chex.assert_trees_all_close(jax.vmap(fn("onednn"))(x), jax.vmap(fn("xla"))(x),
                              rtol=1e-5, atol=1e-5)


@needs_onednn
def test_batch_parallel_on_eight_devices():
  """With 8 CPU devices and the batch sharded, an explicit "onednn": each device convolves its own
  slice (no gather), the kernel gradient is all-reduced, and values and gradients equal XLA's
  convolution. ("auto" stays "folded" with several devices: see conv.py.)"""
  code = textwrap.dedent("""
      import jax, jax.numpy as jnp, numpy as np
      from dsan_jax import runtime
      from dsan_jax.training import sharding
      from dsan_jax.kernels import onednn
      from dsan_jax.models import conv
      assert jax.device_count() == 8
      print("AUTO", runtime.resolve_conv_impl("auto"))
      onednn.load()  # An explicit "onednn": its start-up step (runtime.resolve_config does it).
      mesh = sharding.make_mesh()
      rng = np.random.default_rng(0)
      x = jax.device_put(jnp.asarray(rng.standard_normal((8, 4, 6, 6, 3)), jnp.float32),
                         sharding.batch_sharding(mesh))
      w = jnp.asarray(rng.standard_normal((3, 3, 3, 3, 5)), jnp.float32)
      # partitioned: what model_from_config passes with the runtime's 8 devices.
      f = lambda impl: jax.jit(jax.value_and_grad(lambda w, x: jnp.sum(
          conv.conv3d(x, w, (1, 2, 1), [(1, 1)] * 3, impl, partitioned=True) ** 2),
          argnums=(0, 1)))
      (v, (gw, gx)), (v0, (gw0, gx0)) = f("onednn")(w, x), f("xla")(w, x)
      rel = lambda a, b: float(jnp.max(jnp.abs(a - b)) / jnp.max(jnp.abs(b)))
      print("ERR", max(rel(v, v0), rel(gw, gw0), rel(gx, gx0)))
      hlo = f("onednn").lower(w, x).compile().as_text()
      calls = [l for l in hlo.splitlines() if 'custom_call_target="dsan_onednn' in l]
      print("LOCAL", all("f32[1," in l.split("=")[1] or "bwd_weights" in l for l in calls),
            len(calls))
      print("GATHER", "all-gather" in hlo)
      """)
  env = dict(os.environ, JAX_PLATFORMS="cpu",
             XLA_FLAGS="--xla_force_host_platform_device_count=8")
  proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True,
                        text=True, timeout=300, check=False)
  assert proc.returncode == 0, proc.stderr[-3000:]
  out = proc.stdout
  assert "AUTO folded" in out
  assert float(out.split("ERR")[1].split()[0]) < 1e-5
  assert "LOCAL True 3" in out  # Forward and input gradient on the local batch of 1.
  assert "GATHER False" in out


def test_missing_onednn_is_named(monkeypatch, tmp_path):
  monkeypatch.setenv("DSAN_ONEDNN_ROOT", str(tmp_path / "nowhere"))
  with pytest.raises(onednn.OnednnUnavailableError, match="nowhere.*dnnl.hpp"):
    onednn.find_onednn()


@needs_onednn
def test_compiler_failure_leaves_nothing_behind(monkeypatch, tmp_path):
  monkeypatch.setenv("DSAN_JAX_CACHE", str(tmp_path / "cache"))
  monkeypatch.setenv("CXX", "false")  # Exists, exits 1.
  with pytest.raises(onednn.OnednnUnavailableError, match="compiling onednn_conv3d.cc failed"):
    onednn.build()
  assert not [p for p in (tmp_path / "cache").rglob("*") if p.is_file()]
  monkeypatch.setenv("CXX", "no-such-compiler-dsan")
  with pytest.raises(onednn.OnednnUnavailableError, match="no C.. compiler"):
    onednn.build()


@needs_onednn
def test_build_is_cached(monkeypatch, tmp_path):
  monkeypatch.setenv("DSAN_JAX_CACHE", str(tmp_path))
  first = onednn.build()
  assert first.is_file() and first.is_relative_to(tmp_path)
  mtime = first.stat().st_mtime_ns
  assert onednn.build() == first and first.stat().st_mtime_ns == mtime


@needs_onednn
def test_handler_errors_reach_python():
  """Bad geometry or ranks become Python exceptions with the handler's message, not crashes."""
  x, w = jnp.ones((1, 4, 4, 4, 2)), jnp.ones((3, 3, 3, 2, 2))
  with pytest.raises(Exception, match="must have 3 entries"):
    jax.block_until_ready(onednn.ops._call("dsan_onednn_conv3d_fwd", (1, 4, 4, 4, 2), x, w,
                                       strides=(1, 1), padding=((1, 1), (1, 1))))
  with pytest.raises(Exception, match="(?i)rank"):
    jax.block_until_ready(onednn.ops._call("dsan_onednn_conv3d_fwd", (1, 4, 4, 2), x[0], w,
                                       strides=(1, 1, 1), padding=((1, 1),) * 3))


def test_auto_falls_back_with_a_warning(monkeypatch, caplog):
  monkeypatch.setattr(onednn, "available", lambda: False)
  monkeypatch.setattr(onednn, "unavailable_reason", lambda: "no C++ compiler (test)")
  runtime._notice_no_onednn.cache_clear()
  with caplog.at_level("WARNING"):
    assert runtime.resolve_conv_impl("auto", "cpu") == "folded"
    assert runtime.resolve_stem_conv_impl("auto", "cpu") == "folded"
  assert [r for r in caplog.records if "no C++ compiler (test)" in r.getMessage()]
  runtime._notice_no_onednn.cache_clear()


# What the installed ``dsan-onednn-check`` command runs.
_CHECK = [sys.executable, "-c",
          "from dsan_jax.kernels import onednn; raise SystemExit(onednn.main())"]


def test_status_command(tmp_path):
  env = dict(os.environ, JAX_PLATFORMS="cpu", DSAN_ONEDNN_ROOT=str(tmp_path))
  proc = subprocess.run(_CHECK, cwd=ROOT, env=env,
                        capture_output=True, text=True, timeout=120, check=False)
  assert proc.returncode == 1 and "unavailable" in proc.stdout and str(tmp_path) in proc.stdout
  if onednn.available():
    env.pop("DSAN_ONEDNN_ROOT")
    proc = subprocess.run(_CHECK, cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=120, check=False)
    assert proc.returncode == 0 and "convolutions ready" in proc.stdout, proc.stdout + proc.stderr
