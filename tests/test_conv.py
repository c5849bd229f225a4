"""Tests of dsan_jax.models.conv: every implementation equals the plain 3D convolution.

References: ``lax.conv_general_dilated`` in float64 (an independent XLA code path from the folded
2D convolution and the 1x1x1 matmul) and, for one configuration, a direct NumPy loop.
"""

import functools
import os
import subprocess
import sys

from absl.testing import absltest
from absl.testing import parameterized
import chex
import jax
import jax.numpy as jnp
from jax import lax
import numpy as np

from dsan_jax import runtime
from dsan_jax.kernels import onednn
from dsan_jax.models import conv

# The network's convolutions: (name, C, O, kernel, stride, x shape [B, D, H, W]). Odd, distinct
# sizes so axis mix-ups and off-by-ones show; "tiny_plane" shapes (output H' * W' <= 16) take the
# folded implementation's im2col branch, the others its 2D-convolution branch.
X_SHAPE = (2, 9, 10, 11)
CONFIGS = (
    ("stem_k7_s2", 1, 5, 7, 2, X_SHAPE),
    ("k3_s1", 3, 4, 3, 1, X_SHAPE),
    ("k3_s2", 3, 5, 3, 2, X_SHAPE),
    ("proj_k1_s2", 3, 5, 1, 2, X_SHAPE),
    ("proj_k1_s1", 3, 5, 1, 1, X_SHAPE),
    ("stem_k7_s2_tiny_plane", 1, 5, 7, 2, (2, 9, 7, 8)),
    ("k3_s1_tiny_plane", 3, 4, 3, 1, (2, 5, 3, 4)),
    ("k3_s2_tiny_plane", 3, 5, 3, 2, (2, 7, 7, 6)),
)
# fp32 results of different summation orders. Elementwise tolerances for O(1) outputs (inputs
# ~N(0, 1), kernels scaled by 1/sqrt(fan_in)); gradients are sums over many positions, so they
# are compared by max|error| / max|reference| (measured ~5e-7, benchmarks/README.md).
RTOL, ATOL = 1e-5, 1e-5
GRAD_REL_TOL = 1e-5


def _assert_rel_close(got, want, tol, msg=""):
  got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
  assert got.shape == want.shape, (msg, got.shape, want.shape)
  err = np.max(np.abs(got - want)) / np.max(np.abs(want))
  assert err <= tol, f"{msg}: relative max error {err:.2e} > {tol:.0e}"


def _problem(c, o, k, shape=X_SHAPE, seed=0):
  rng = np.random.default_rng(seed)
  x = rng.standard_normal((*shape, c))
  w = rng.standard_normal((k, k, k, c, o)) / np.sqrt(k**3 * c)
  return x, w


def _reference(x, w, s):
  """Float64 3D convolution by lax (numpy in, numpy out)."""
  k = w.shape[0]
  with jax.enable_x64(True):
    y = lax.conv_general_dilated(jnp.asarray(x, jnp.float64), jnp.asarray(w, jnp.float64),
                                 (s,) * 3, [(k // 2, k // 2)] * 3,
                                 dimension_numbers=("NDHWC", "DHWIO", "NDHWC"))
    return np.asarray(y)


def _reference_grads(x, w, s, g):
  k = w.shape[0]

  def loss(x, w):
    y = lax.conv_general_dilated(x, w, (s,) * 3, [(k // 2, k // 2)] * 3,
                                 dimension_numbers=("NDHWC", "DHWIO", "NDHWC"))
    return jnp.sum(y * g)

  with jax.enable_x64(True):
    gx, gw = jax.grad(loss, (0, 1))(jnp.asarray(x, jnp.float64), jnp.asarray(w, jnp.float64))
    return np.asarray(gx), np.asarray(gw)


class Conv3DImplTest(parameterized.TestCase):

  def test_numpy_loop_reference(self):
    # Anchors the float64 lax reference itself to an explicit sum (stride 2, padding 1).
    x, w = _problem(2, 3, 3)
    x = x[:1, :5, :6, :7]
    s, p = 2, 1
    xp = np.pad(x, ((0, 0), (p, p), (p, p), (p, p), (0, 0)))
    d_out, h_out, w_out = ((n + 2 * p - 3) // s + 1 for n in x.shape[1:4])
    want = np.zeros((1, d_out, h_out, w_out, 3))
    for i in range(d_out):
      for j in range(h_out):
        for l in range(w_out):
          patch = xp[0, i * s:i * s + 3, j * s:j * s + 3, l * s:l * s + 3]  # [3, 3, 3, C]
          want[0, i, j, l] = np.einsum("dhwc,dhwco->o", patch, w)
    got = np.asarray(conv.conv3d(jnp.asarray(x, jnp.float32), jnp.asarray(w, jnp.float32),
                                 (s, s, s), [(p, p)] * 3, "folded"))
    np.testing.assert_allclose(got, want, rtol=RTOL, atol=ATOL)
    np.testing.assert_allclose(_reference(x, w, s), want, rtol=1e-12, atol=1e-12)

  @chex.variants(with_jit=True, without_jit=True)
  @parameterized.named_parameters(*CONFIGS)
  def test_forward_matches_reference(self, c, o, k, s, shape):
    x, w = _problem(c, o, k, shape)
    want = _reference(x, w, s)
    for impl in runtime.available_conv_impls():
      fn = self.variant(functools.partial(conv.conv3d, strides=(s, s, s),
                                          padding=[(k // 2, k // 2)] * 3, impl=impl))
      got = fn(jnp.asarray(x, jnp.float32), jnp.asarray(w, jnp.float32))
      chex.assert_shape(got, want.shape)
      np.testing.assert_allclose(np.asarray(got), want, rtol=RTOL, atol=ATOL, err_msg=impl)

  @chex.variants(with_jit=True)  # Eager gradients are covered by the float64 test below.
  @parameterized.named_parameters(*CONFIGS)
  def test_gradients_match_reference(self, c, o, k, s, shape):
    x, w = _problem(c, o, k, shape)
    g = np.random.default_rng(1).standard_normal(_reference(x, w, s).shape)
    want_gx, want_gw = _reference_grads(x, w, s, g)
    for impl in runtime.available_conv_impls():

      def loss(x, w, impl=impl):
        y = conv.conv3d(x, w, (s, s, s), [(k // 2, k // 2)] * 3, impl)
        return jnp.sum(y * jnp.asarray(g, jnp.float32))

      gx, gw = self.variant(jax.grad(loss, (0, 1)))(jnp.asarray(x, jnp.float32),
                                                     jnp.asarray(w, jnp.float32))
      _assert_rel_close(gx, want_gx, GRAD_REL_TOL, f"{impl} dx")
      _assert_rel_close(gw, want_gw, GRAD_REL_TOL, f"{impl} dw")

  @parameterized.named_parameters(CONFIGS[0], CONFIGS[-2])  # 2D-conv and im2col branches.
  def test_folded_float64_exact(self, c, o, k, s, shape):
    # In float64 the folded path equals the 3D convolution to rounding, forward and backward.
    x, w = _problem(c, o, k, shape)
    g = np.random.default_rng(1).standard_normal(_reference(x, w, s).shape)
    want_gx, want_gw = _reference_grads(x, w, s, g)
    with jax.enable_x64(True):

      def loss(x, w):
        return jnp.sum(conv.conv3d(x, w, (s, s, s), [(k // 2, k // 2)] * 3, "folded") * g)

      y = conv.conv3d(jnp.asarray(x), jnp.asarray(w), (s, s, s), [(k // 2, k // 2)] * 3,
                      "folded")
      gx, gw = jax.grad(loss, (0, 1))(jnp.asarray(x), jnp.asarray(w))
      self.assertEqual(y.dtype, jnp.float64)
    np.testing.assert_allclose(np.asarray(y), _reference(x, w, s), rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(np.asarray(gx), want_gx, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(np.asarray(gw), want_gw, rtol=1e-12, atol=1e-12)

  @parameterized.product(shape=(X_SHAPE, (2, 6, 3, 5), (2, 7, 12, 13)), c=(2, 64),
                         impl=("folded", "onednn"))
  def test_asymmetric_padding_and_mixed_strides(self, shape, c, impl):
    # Forward and both gradients against float64 (folded: im2col on tiny planes and 2D-conv
    # branches; oneDNN: its padding and stride arguments).
    if impl not in runtime.available_conv_impls():
      self.skipTest(f"oneDNN unavailable: {onednn.unavailable_reason()}")
    x, w = _problem(c, 3, 3, shape)
    strides, padding = (2, 1, 2), [(0, 2), (1, 0), (2, 1)]

    def conv_fn(x, w, impl=impl):
      return conv.conv3d(x, w, strides, padding, impl)

    with jax.enable_x64(True):
      x64, w64 = jnp.asarray(x), jnp.asarray(w)
      want = conv_fn(x64, w64, "xla")
      g = np.random.default_rng(1).standard_normal(want.shape)
      want_gx, want_gw = jax.grad(lambda x, w: jnp.sum(conv_fn(x, w, "xla") * g), (0, 1))(
          x64, w64)
    x32, w32 = jnp.asarray(x, jnp.float32), jnp.asarray(w, jnp.float32)
    got = jax.jit(conv_fn)(x32, w32)
    gx, gw = jax.jit(jax.grad(lambda x, w: jnp.sum(conv_fn(x, w) * jnp.asarray(g, jnp.float32)),
                              (0, 1)))(x32, w32)
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=RTOL, atol=ATOL)
    _assert_rel_close(gx, want_gx, GRAD_REL_TOL, f"{impl} dx")
    _assert_rel_close(gw, want_gw, GRAD_REL_TOL, f"{impl} dw")

  def test_branches(self):
    # The folded path is a 2D convolution on normal planes, a matmul on tiny planes and 1x1x1.
    def prims(shape, k, s):
      x = jnp.ones((*shape, 2))
      jaxpr = jax.make_jaxpr(lambda x, w: conv.conv3d(x, w, (s,) * 3, [(k // 2, k // 2)] * 3,
                                                      "folded"))(x, jnp.ones((k, k, k, 2, 3)))
      return {str(e.primitive) for e in jaxpr.jaxpr.eqns}

    self.assertIn("conv_general_dilated", prims(X_SHAPE, 3, 1))
    for shape, k, s in (((2, 5, 3, 4), 3, 1), (X_SHAPE, 1, 2)):
      got = prims(shape, k, s)
      self.assertNotIn("conv_general_dilated", got)
      self.assertIn("dot_general", got)

  def test_module_params_identical_across_impls(self):
    x = jnp.asarray(np.random.default_rng(0).standard_normal((1, 5, 6, 7, 3)), jnp.float32)
    outs = {}
    for impl in runtime.available_conv_impls():
      for k, s in ((7, 2), (3, 1), (1, 2)):
        module = conv.Conv3D(4, (k,) * 3, (s,) * 3, impl=impl, use_bias=True)
        variables = module.init(jax.random.key(0), x)
        chex.assert_trees_all_equal_shapes(
            variables, {"params": {"kernel": jnp.zeros((k, k, k, 3, 4)), "bias": jnp.zeros(4)}})
        outs[impl, k] = module.apply(variables, x)
    for k in (7, 3, 1):
      for impl in runtime.available_conv_impls():
        chex.assert_trees_all_close(outs["xla", k], outs[impl, k], rtol=RTOL, atol=ATOL)

  def test_module_bf16_compute(self):
    x = jnp.asarray(_problem(3, 4, 3)[0], jnp.float32)
    module = conv.Conv3D(4, impl="folded", dtype=jnp.bfloat16)
    variables = module.init(jax.random.key(0), x)
    self.assertEqual(variables["params"]["kernel"].dtype, jnp.float32)
    y = module.apply(variables, x)
    self.assertEqual(y.dtype, jnp.bfloat16)
    want = conv.Conv3D(4, impl="xla").apply(variables, x)
    np.testing.assert_allclose(np.asarray(y, np.float32), np.asarray(want), rtol=0.05, atol=0.05)

  def test_resolve(self):
    cpu = "onednn" if onednn.available() and jax.device_count() == 1 else "folded"
    self.assertEqual(runtime.resolve_conv_impl("auto", "cpu"), cpu)
    self.assertEqual(runtime.resolve_stem_conv_impl("auto", "cpu"), cpu)
    self.assertEqual(runtime.resolve_conv_impl("auto", "cpu", jnp.bfloat16), "folded")
    self.assertEqual(runtime.resolve_conv_impl("auto", "gpu"), "folded")
    self.assertEqual(runtime.resolve_conv_impl("auto", "tpu"), "xla")
    self.assertIn(runtime.resolve_conv_impl("auto"), conv.CONV_IMPLS)
    self.assertEqual(runtime.resolve_stem_conv_impl("auto", "gpu"), "folded")
    self.assertEqual(runtime.resolve_stem_conv_impl("auto", "tpu"), "xla")
    self.assertEqual(runtime.resolve_stem_conv_impl("xla", "gpu"), "xla")
    for impl in conv.CONV_IMPLS:
      self.assertEqual(runtime.resolve_conv_impl(impl), impl)
    with self.assertRaisesRegex(ValueError, "Unknown conv_impl 'winograd'"):
      runtime.resolve_conv_impl("winograd")
    with self.assertRaisesRegex(ValueError, "Unknown conv_impl"):
      conv.Conv3D(2, impl="nope").init(jax.random.key(0), jnp.ones((1, 3, 3, 3, 1)))

  def test_bad_shapes_raise(self):
    with self.assertRaisesRegex(ValueError, "kernel"):
      conv.conv3d(jnp.ones((1, 3, 3, 3, 2)), jnp.ones((3, 3, 3, 4, 5)), (1, 1, 1),
                  [(1, 1)] * 3, "folded")

  def test_xla_flag_detection(self):
    runtime.xla_flag_supported.cache_clear()
    self.assertFalse(runtime.xla_flag_supported("--xla_this_flag_does_not_exist=1"))
    # This jaxlib (0.10.x) has YNNPACK fusion types; other versions may not, and then the
    # recommendation must be empty rather than a flag that aborts the process.
    supported = runtime.xla_flag_supported(runtime.YNN_CONV_FLAG)
    self.assertEqual(runtime.recommended_cpu_xla_flags(), runtime.YNN_CONV_FLAG if supported else "")

  def test_apply_flags_in_fresh_process(self):
    code = ("import os; os.environ.pop('XLA_FLAGS', None); "
            "from dsan_jax import runtime; added = runtime.configure_xla_flags(); "
            "import jax.numpy as jnp; jnp.ones(2).sum().block_until_ready(); "
            "assert os.environ.get('XLA_FLAGS', '') == added, os.environ.get('XLA_FLAGS'); "
            "print(repr(added))")
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = dict(os.environ, PYTHONPATH=root, JAX_PLATFORMS="cpu")
    env.pop("DSAN_NO_XLA_FLAGS", None)
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                         check=False, timeout=300)
    self.assertEqual(out.returncode, 0, out.stderr)
    self.assertEqual(out.stdout.strip(), repr(runtime.recommended_cpu_xla_flags()))

  def test_apply_flags_after_backend_start_warns(self):
    jnp.ones(1).block_until_ready()  # This process's backend is initialised.
    saved = os.environ.get("XLA_FLAGS")
    os.environ.pop("XLA_FLAGS", None)
    try:
      with self.assertWarnsRegex(RuntimeWarning, "after the first JAX computation"):
        self.assertEqual(runtime.configure_xla_flags(), "")
      self.assertNotIn("XLA_FLAGS", os.environ)
    finally:
      if saved is not None:
        os.environ["XLA_FLAGS"] = saved


if __name__ == "__main__":
  absltest.main()
