"""Model FLOPs of a JAX function, counted from its jaxpr: backend-independent, for TFLOP/s and MFU.

XLA's cost analysis depends on the backend: on GPU the compiled program's convolutions are
vendor-library calls that it does not count, and the numbers it gives change with fusion. Counting
the convolutions and matrix products of the traced program instead gives the same number on every
backend and for every ``conv_impl`` that computes the same convolutions.

Convention: 2 FLOPs per multiply-add of a convolution or ``dot_general``; multiplications with
the zeros that a transposed convolution inserts between input elements (``lhs_dilation``, which
is how autodiff writes the input gradient of a strided convolution) are not counted, as no
library kernel performs them; taps on zero padding are counted (the usual convention). Element-
wise work (BatchNorm, activations, the optimiser) is not counted: it is memory-bound and small
in FLOPs. The oneDNN convolution calls of ``conv_impl="onednn"`` (``ffi_call``s that XLA cannot
look into) are counted like the convolutions they compute. ``scan`` bodies count ``length``
times; ``cond`` counts its most expensive branch; results nothing uses are not counted (XLA
removes them).
"""

from typing import Any, Callable

import jax
import numpy as np


def _conv_flops(eqn) -> float:
  """2 * multiply-adds of a ``conv_general_dilated`` equation."""
  out_shape = eqn.outvars[0].aval.shape
  rhs_shape = eqn.invars[1].aval.shape
  dn = eqn.params["dimension_numbers"]
  rhs_spec = dn.rhs_spec  # (out feature dim, in feature dim, spatial dims...)
  in_features = rhs_shape[rhs_spec[1]]  # Already divided by feature_group_count.
  kernel_taps = np.prod([rhs_shape[d] for d in rhs_spec[2:]], dtype=np.float64)
  lhs_dilation = np.prod(eqn.params.get("lhs_dilation") or (1,), dtype=np.float64)
  return 2.0 * np.prod(out_shape, dtype=np.float64) * in_features * kernel_taps / lhs_dilation


def _dot_flops(eqn) -> float:
  """2 * multiply-adds of a ``dot_general`` equation."""
  (lhs_contract, _), _ = eqn.params["dimension_numbers"]
  lhs_shape = eqn.invars[0].aval.shape
  contracted = np.prod([lhs_shape[d] for d in lhs_contract], dtype=np.float64)
  return 2.0 * np.prod(eqn.outvars[0].aval.shape, dtype=np.float64) * contracted


def _onednn_conv_flops(eqn) -> float:
  """2 * multiply-adds of one of ``dsan_jax.kernels.onednn``'s convolution calls.

  Forward, input gradient and kernel gradient of a convolution each do the forward's
  multiply-adds: 2 * |y| * C * kd * kh * kw, with y [B, D', H', W', O] the convolution's output
  (the call's result for the forward, its cotangent input ``dy`` for both gradients).
  """
  target = eqn.params["target_name"]
  if target.endswith("_fwd"):
    (_, kernel), y = [v.aval.shape for v in eqn.invars], eqn.outvars[0].aval.shape
  elif target.endswith("_bwd_data"):
    y, kernel = [v.aval.shape for v in eqn.invars]
  else:  # Kernel gradient: (x, dy) -> dw.
    y, kernel = eqn.invars[1].aval.shape, eqn.outvars[0].aval.shape
  return 2.0 * np.prod(y, dtype=np.float64) * np.prod(kernel[:4], dtype=np.float64)


def _sub_jaxprs(value) -> list[Any]:
  """Jaxprs held in an equation parameter (ClosedJaxpr, Jaxpr, or tuples of them)."""
  if isinstance(value, jax.extend.core.ClosedJaxpr):
    return [value.jaxpr]
  if isinstance(value, jax.extend.core.Jaxpr):
    return [value]
  if isinstance(value, (tuple, list)):
    return [j for v in value for j in _sub_jaxprs(v)]
  return []


def _live_eqns(jaxpr) -> list[Any]:
  """The equations whose results are used (XLA removes the others before running anything).

  A custom VJP computes every input's cotangent; where an input is not differentiated (the
  image entering the stem) its cotangent is discarded, and the call that made it is dead.
  """
  used = {v for v in jaxpr.outvars if isinstance(v, jax.extend.core.Var)}
  live = []
  for eqn in reversed(jaxpr.eqns):
    if eqn.effects or any(v in used for v in eqn.outvars):
      live.append(eqn)
      used.update(v for v in eqn.invars if isinstance(v, jax.extend.core.Var))
  return live[::-1]


def _count(jaxpr, totals: dict[str, float], scale: float) -> None:
  for eqn in _live_eqns(jaxpr):
    name = eqn.primitive.name
    if name == "conv_general_dilated":
      totals["conv"] += scale * _conv_flops(eqn)
    elif name == "dot_general":
      totals["dot"] += scale * _dot_flops(eqn)
    elif name == "ffi_call" and str(eqn.params.get("target_name", "")).startswith(
        "dsan_onednn_conv3d"):
      totals["conv"] += scale * _onednn_conv_flops(eqn)
    elif name == "cond":
      branches = []
      for branch in eqn.params["branches"]:
        sub = {"conv": 0.0, "dot": 0.0}
        _count(branch.jaxpr, sub, scale)
        branches.append(sub)
      best = max(branches, key=lambda b: b["conv"] + b["dot"])
      totals["conv"] += best["conv"]
      totals["dot"] += best["dot"]
    else:
      inner = scale * (eqn.params["length"] if name == "scan" else 1)
      for value in eqn.params.values():
        for sub in _sub_jaxprs(value):
          _count(sub, totals, inner)


def count_flops(fn: Callable[..., Any], *args, **kwargs) -> dict[str, float]:
  """Counts the convolution and matrix-product FLOPs of ``fn(*args, **kwargs)``.

  Nothing is computed: ``fn`` is traced with ``jax.make_jaxpr`` (``args`` may be
  ``jax.ShapeDtypeStruct``). Differentiated or jitted functions are counted as traced, backward
  convolutions included.

  Args:
    fn: a JAX-traceable function.
    *args, **kwargs: its arguments (arrays or ``jax.ShapeDtypeStruct``).

  Returns:
    ``{'conv': ..., 'dot': ..., 'total': ...}`` in FLOPs (floats).
  """
  closed = jax.make_jaxpr(fn)(*args, **kwargs)
  totals = {"conv": 0.0, "dot": 0.0}
  _count(closed.jaxpr, totals, 1.0)
  totals = {k: float(v) for k, v in totals.items()}
  totals["total"] = totals["conv"] + totals["dot"]
  return totals
