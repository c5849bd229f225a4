"""Model FLOP counting (dsan_jax/models/flops.py) against hand counts and XLA's cost analysis."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dsan_jax.models import flops
from dsan_jax.models import DSAN
from dsan_jax import runtime
from dsan_jax.kernels import onednn

DN = ("NDHWC", "DHWIO", "NDHWC")


def _conv(stride, pad):
  return lambda x, k: jax.lax.conv_general_dilated(x, k, stride, pad, dimension_numbers=DN)


def test_conv_forward_is_two_times_multiply_adds():
  x = jax.ShapeDtypeStruct((2, 8, 16, 16, 4), jnp.float32)
  k = jax.ShapeDtypeStruct((3, 3, 3, 4, 8), jnp.float32)
  # Output [2, 4, 8, 8, 8]; each output element: 27 taps x 4 input channels.
  got = flops.count_flops(_conv((2, 2, 2), [(1, 1)] * 3), x, k)
  assert got == {"conv": 2.0 * (2 * 4 * 8 * 8 * 8) * 27 * 4, "dot": 0.0,
                 "total": 2.0 * (2 * 4 * 8 * 8 * 8) * 27 * 4}


@pytest.mark.parametrize("stride", [1, 2])
def test_conv_backward_counts_two_more_forwards(stride):
  """dX and dW each cost one forward; inserted zeros of the strided dX are not counted."""
  x = jax.ShapeDtypeStruct((2, 8, 16, 16, 4), jnp.float32)
  k = jax.ShapeDtypeStruct((3, 3, 3, 4, 8), jnp.float32)
  conv = _conv((stride,) * 3, [(1, 1)] * 3)
  fwd = flops.count_flops(conv, x, k)["conv"]
  # A non-linear loss needs the forward's output (for sum(conv) it would be dead code).
  both = flops.count_flops(jax.grad(lambda x, k: jnp.sum(conv(x, k)**2), argnums=(0, 1)), x, k)
  only_w = flops.count_flops(jax.grad(lambda k, x: jnp.sum(conv(x, k)**2)), k, x)
  assert both["conv"] == pytest.approx(3 * fwd, rel=0.02)
  assert only_w["conv"] == pytest.approx(2 * fwd, rel=0.02)


def test_dot_and_scan():
  a = jax.ShapeDtypeStruct((5, 7), jnp.float32)
  b = jax.ShapeDtypeStruct((7, 3), jnp.float32)
  assert flops.count_flops(jnp.matmul, a, b)["dot"] == 2.0 * 5 * 3 * 7

  def looped(a, b):
    return jax.lax.scan(lambda c, _: (c, c @ b), a, None, length=4)[1]

  assert flops.count_flops(looped, a, b)["dot"] == 4 * 2.0 * 5 * 3 * 7


def test_network_forward_matches_the_paper_scale_and_xla():
  """ResNet34 at 138x256x256 costs ~0.64 TFLOP per forward (issue 5); XLA agrees on a small input."""
  # XLA's CPU count of the folded program (it cannot count oneDNN's library calls).
  model = DSAN(conv_impl="folded", stem_conv_impl="folded")
  v = jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros((1, 16, 32, 32, 1))))
  full = flops.count_flops(lambda v, x: model.apply(v, x), v,
                           jax.ShapeDtypeStruct((1, 138, 256, 256, 1), jnp.float32))
  assert 0.6e12 < full["total"] < 0.67e12
  small = jax.ShapeDtypeStruct((1, 32, 64, 64, 1), jnp.float32)
  ours = flops.count_flops(lambda v, x: model.apply(v, x), v, small)["total"]
  xla = jax.jit(lambda v, x: model.apply(v, x)).lower(v, small).cost_analysis()["flops"]
  # XLA skips taps on zero padding, which we count: ours is a little larger, never smaller.
  assert xla <= ours * 1.001
  assert ours == pytest.approx(xla, rel=0.2)


def test_dead_code_is_not_counted():
  """XLA removes results nothing uses; so does the count (a linear loss needs no forward)."""
  x = jax.ShapeDtypeStruct((2, 8, 16, 16, 4), jnp.float32)
  k = jax.ShapeDtypeStruct((3, 3, 3, 4, 8), jnp.float32)
  conv = _conv((1, 1, 1), [(1, 1)] * 3)
  fwd = flops.count_flops(conv, x, k)["conv"]
  assert flops.count_flops(lambda x, k: (conv(x, k), conv(x, k))[1], x, k)["conv"] == fwd
  linear = flops.count_flops(jax.grad(lambda k, x: jnp.sum(conv(x, k))), k, x)
  assert linear["conv"] == fwd  # dW only.


def test_conv_impls_count_the_same_work():
  """The folded path writes 1x1x1 convolutions as matrix products, the oneDNN one calls a
  library: same totals, forward and for the training gradient (whose stem input gradient is
  dead code: the image is not differentiated)."""
  x = jax.ShapeDtypeStruct((1, 16, 32, 32, 1), jnp.float32)
  impls = runtime.available_conv_impls()
  assert "onednn" in impls or not onednn.available()
  counts, grad_counts = [], []
  for impl in impls:
    model = DSAN(depth=10, width=8, conv_impl=impl)
    v = jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros((1, 16, 32, 32, 1))))
    counts.append(flops.count_flops(lambda v, x: model.apply(v, x), v, x)["total"])
    loss = lambda p, v, x: jnp.sum(model.apply({**v, "params": p}, x, train=True,
                                              mutable=["batch_stats"])[0][0]**2)
    grad_counts.append(flops.count_flops(jax.grad(loss), v["params"], v, x)["total"])
  for c, g in zip(counts[1:], grad_counts[1:]):
    assert c == pytest.approx(counts[0], rel=0.01)
    assert g == pytest.approx(grad_counts[0], rel=0.02)
  assert np.isfinite(counts[0]) and counts[0] > 0
