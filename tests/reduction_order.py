"""Comparing two computations that sum the same terms in different orders.

Two correct implementations of one step (1 vs 8 devices, 2 processes vs 1, a scan over
micro-batches vs separate calls, oneDNN vs XLA's convolutions) differ only by rounding. How large
that rounding gets depends on the conditioning of what is compared, and this network is badly
conditioned on purpose: ``T = sigmoid(100 (A - 0.4))`` and BatchNorm over a few cases cancel
heavily, so float32 noise reaches ~3e-4 of a gradient leaf's size after one step and ~7 % of a
parameter after three SGD steps (measured in tests/test_multihost.py). A fixed float32 tolerance
tuned on one CPU therefore fails on another CPU (with or without AVX-512) for no defect.

So the comparisons here are of two kinds:

* **In float64** (XLA's and the folded convolutions run in float64 on CPU), two orders of a sum
  of n terms differ by at most about ``n * 2**-53`` of its absolute sum; the tensors compared
  here have n <= ~1.3e5 terms per sum (1.5e-11), so ``F64_RTOL = 1e-10`` per leaf, relative to the
  leaf's largest entry, can only be exceeded by a real difference. Real defects (statistics over
  the wrong rows, a missing all-reduce, a wrong micro-batch split) move these numbers by 1e-4 or
  more.
* **In float32**, against the float64 result from the same start: the implementation under test
  must be about as accurate as the reference implementation, ``err_test <= F32_ACCURACY_RATIO *
  err_ref + F32_FLOOR``. Both errors are rounding of the same magnitude, whatever the CPU.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

F64_RTOL = 1e-10
F32_ACCURACY_RATIO = 10.0
F32_FLOOR = 1e-6  # ~8 float32 ulps of 1: a single rounding's error floor.


def flatten(tree, prefix: str = "") -> dict[str, np.ndarray]:
  """``{prefix + keystr(path): array}`` for every leaf (host arrays)."""
  leaves = jax.tree_util.tree_flatten_with_path(jax.device_get(tree))[0]
  return {prefix + jax.tree_util.keystr(p): np.asarray(v) for p, v in leaves}


def to_float64(tree):
  """Every floating leaf cast to float64 (call inside ``jax.enable_x64(True)``)."""
  return jax.tree_util.tree_map(
      lambda v: jnp.asarray(v, jnp.float64) if jnp.issubdtype(jnp.asarray(v).dtype, jnp.floating)
      else v, tree)


def leaf_errors(got, want) -> dict[str, tuple[float, float]]:
  """``{leaf: (max|got - want|, max|want|)}`` for two pytrees of the same structure."""
  got, want = flatten(got), flatten(want)
  assert got.keys() == want.keys() and want, "different leaves"
  return {k: (float(np.max(np.abs(got[k].astype(np.float64) - want[k]), initial=0.0)),
              float(np.max(np.abs(want[k]), initial=0.0))) for k in want}


def assert_leaves_close(got, want, rtol: float, what: str) -> None:
  """Every leaf: ``max|got - want| <= rtol * max|want|`` (relative to the leaf's scale, so that
  near-zero entries are not held to a relative bound their rounding cannot meet)."""
  for k, (err, scale) in leaf_errors(got, want).items():
    assert err <= rtol * scale, f"{what}: {k}: max |diff| {err:.3g} > {rtol:g} x {scale:.3g}"


def relative_error(got, exact) -> float:
  """Worst leaf's ``max|got - exact| / max|exact|`` (leaves with a non-zero scale)."""
  return max(err / scale for err, scale in leaf_errors(got, exact).values() if scale > 0)


def assert_as_accurate(got, ref, exact, what: str) -> None:
  """float32 ``got`` is about as close to the float64 ``exact`` as float32 ``ref`` is."""
  err_got, err_ref = relative_error(got, exact), relative_error(ref, exact)
  assert err_got <= F32_ACCURACY_RATIO * err_ref + F32_FLOOR, (
      f"{what}: error {err_got:.3g} vs the reference implementation's {err_ref:.3g} "
      "(both against float64)")
