"""DSAN's objective (Section III-D): ``L_total = L_c + lambda * L_ex`` (Eq. 4).

Batch reduction: every term is computed per case and the total is the (weighted) mean over the
cases of the batch, ``mean_b [L_c(b) + lambda * e_b * L_ex(b)]``, with ``e_b = 1`` only for COVID
cases that have an infection mask. CAP cases and COVID cases without a mask add a zero attention
term but still count in the denominator. This is what a per-sample loss averaged over the batch
gives in the paper's PyTorch setting, and it keeps each case's attention gradient independent of
how many COVID cases happen to share its batch (averaging over eligible cases only would give the
single COVID case of a CAP-heavy batch many times the weight it has in a COVID-heavy one).
"""

import chex
import jax
import jax.numpy as jnp
import optax


def _at_least_f32(x: jax.Array) -> jnp.dtype:
  """float32 for float32/bf16/int inputs, float64 for float64 (losses never drop below float32)."""
  return jnp.promote_types(x.dtype, jnp.float32)


def classification_loss(logits: jax.Array, labels: jax.Array) -> jax.Array:
  """Binary cross-entropy ``L_c`` per case (COVID = 1 positive).

  Args:
    logits: [B] float logits.
    labels: [B] int or float labels in {0, 1}.

  Returns:
    [B] losses, float32 (float64 for float64 logits).
  """
  chex.assert_rank(logits, 1)
  chex.assert_equal_shape([logits, labels])
  dtype = _at_least_f32(logits)
  return optax.sigmoid_binary_cross_entropy(logits.astype(dtype), labels.astype(dtype))


def attention_loss(attention: jax.Array, mask: jax.Array) -> jax.Array:
  """Eq. 3 per volume: ``sum((T - M)^2) / (sum(T) + sum(M))``.

  Safe when both sums are 0 (returns 0 with zero gradient) instead of NaN.

  Args:
    attention: [B, D, H, W] ``T(A)`` in [0, 1].
    mask: [B, D, H, W] binary infection mask ``M``.

  Returns:
    [B] losses, float32 (float64 for float64 attention).
  """
  chex.assert_rank(attention, 4)
  chex.assert_equal_shape([attention, mask])
  dtype = _at_least_f32(attention)
  t = attention.astype(dtype)
  m = mask.astype(dtype)
  axes = (1, 2, 3)
  num = jnp.sum(jnp.square(t - m), axis=axes)
  den = jnp.sum(t, axis=axes) + jnp.sum(m, axis=axes)
  ok = den > 0
  return jnp.where(ok, num / jnp.where(ok, den, 1.0), 0.0)


def dsan_loss(logits: jax.Array, attention: jax.Array | None, labels: jax.Array,
              infection_mask: jax.Array | None, has_mask: jax.Array, weight: jax.Array,
              attention_weight: float) -> tuple[jax.Array, dict[str, jax.Array]]:
  """Total loss, Eq. 4, reduced over the batch as described in the module docstring.

  Args:
    logits: [B] logits.
    attention: [B, D, H, W] ``T(A)``, or None for the baseline without attention.
    labels: [B] 1 = COVID, 0 = CAP.
    infection_mask: [B, D, H, W] binary mask (ignored when ``attention`` is None).
    has_mask: [B] bool, the case has an infection mask.
    weight: [B] 1 for real cases, 0 for padding rows.
    attention_weight: ``lambda`` (0.5 in the paper).

  Returns:
    (scalar loss, dict of scalar terms: ``loss``, ``cls_loss``, ``att_loss`` (mean over eligible
    cases, for logging), ``att_cases`` (number of eligible cases)).
  """
  chex.assert_equal_shape([logits, labels, has_mask, weight])
  weight = weight.astype(_at_least_f32(logits))
  denom = jnp.maximum(jnp.sum(weight), 1.0)
  l_c = classification_loss(logits, labels)
  per_case = l_c
  eligible = (labels == 1) & has_mask.astype(bool) & (weight > 0)
  l_ex = jnp.zeros_like(l_c)
  if attention is not None:
    l_ex = jnp.where(eligible, attention_loss(attention, infection_mask), 0.0)
    per_case = per_case + attention_weight * l_ex
  n_att = jnp.sum(eligible.astype(weight.dtype))
  terms = {
      "cls_loss": jnp.sum(l_c * weight) / denom,
      "att_loss": jnp.sum(l_ex) / jnp.maximum(n_att, 1.0),
      "att_cases": n_att,
  }
  loss = jnp.sum(per_case * weight) / denom
  terms["loss"] = loss
  return loss, terms
