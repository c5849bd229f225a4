"""Training state and the pure, jitted train and eval steps.

``train_step(state, batch) -> (state, metrics)`` is a pure function of the state and a batch
(see the batch contract in ``dsan_jax/data/pipeline.py``). ``make_train_step`` jits it once over a
``('data',)`` mesh with the state donated. A step whose loss or gradients are not finite leaves the
state unchanged (parameters, optimiser moments and BatchNorm statistics) and is counted in
``state.skipped_steps``/``state.consecutive_skipped``; the host loop decides when to stop.
"""

import functools
from typing import Any, Callable

import chex
import jax
import jax.numpy as jnp
import optax
from flax import struct

from dsan_jax.models.dsan import DSAN
from dsan_jax.training import losses
from dsan_jax.training import sharding as sharding_lib


class TrainState(struct.PyTreeNode):
  """Everything that changes during training; all leaves are arrays (checkpointable)."""
  step: jax.Array
  params: Any
  batch_stats: Any
  opt_state: Any
  rng: jax.Array  # uint32 key data of the run's base key; step keys are fold_in(key, step).
  skipped_steps: jax.Array  # Non-finite steps skipped in total.
  consecutive_skipped: jax.Array  # ... and in a row up to now.
  tx: optax.GradientTransformation = struct.field(pytree_node=False)


# XLA:CPU spends seconds per parameter shape optimising the threefry random-bit kernels with
# LLVM (2-7 s each for a 3x3x3 kernel's draw, jaxlib 0.10.2 on a 2-core EPYC); unoptimised they
# compile in ~0.3 s and run in a millisecond. So on CPU the initialisation is one jitted program
# compiled without backend (LLVM) optimisation: ~5 s instead of ~35 s of CPU for the quick start's
# network. The values are the same draws up to float rounding (the erfinv of the truncated
# normal may round differently, ~1 ulp); the forward pass that init traces is dead code and
# removed by XLA.
_CPU_INIT_COMPILER_OPTIONS = {"xla_backend_optimization_level": 0}


def init_variables(model: DSAN, rng: jax.Array, input_shape: tuple[int, ...]) -> dict:
  """Initialises ``{'params', 'batch_stats'}`` for inputs of shape ``[B, D, H, W]``."""
  x = jnp.zeros((1, *input_shape[1:], 1), jnp.float32)
  init = functools.partial(model.init, train=False)
  if isinstance(rng, jax.core.Tracer):  # Inside an outer trace (eval_shape, jit): it compiles.
    return dict(init(rng, x))
  options = _CPU_INIT_COMPILER_OPTIONS if jax.default_backend() == "cpu" else None
  return dict(jax.jit(init, compiler_options=options)(rng, x))


def create_train_state(model: DSAN, tx: optax.GradientTransformation, seed: int,
                       input_shape: tuple[int, ...]) -> TrainState:
  """Fresh state. ``input_shape`` is ``[B, D, H, W]`` (B is ignored)."""
  key = jax.random.key(seed)
  init_key, run_key = jax.random.split(key)
  variables = init_variables(model, init_key, input_shape)
  params = variables["params"]
  # Flax creates BatchNorm's running statistics in float32 whatever the model's dtypes; keep them
  # at least as wide as the parameters, or a float64 model would change their dtype at step 1.
  batch_stats = jax.tree_util.tree_map(
      lambda s: s.astype(jnp.promote_types(s.dtype, model.param_dtype)),
      variables.get("batch_stats", {}))
  return TrainState(
      step=jnp.zeros((), jnp.int32), params=params,
      batch_stats=batch_stats, opt_state=tx.init(params),
      rng=jax.random.key_data(run_key), skipped_steps=jnp.zeros((), jnp.int32),
      consecutive_skipped=jnp.zeros((), jnp.int32), tx=tx)


def abstract_train_state(model: DSAN, tx: optax.GradientTransformation, seed: int,
                         input_shape: tuple[int, ...]) -> TrainState:
  """The state's shapes and dtypes without allocating it (for restoring and parameter counts)."""
  return jax.eval_shape(functools.partial(create_train_state, model, tx, seed, input_shape))


def _forward_loss(model: DSAN, attention_weight: float, params, batch_stats,
                  batch: dict[str, jax.Array]):
  x = batch["image"][..., None]
  (logits, aux), new_vars = model.apply(
      {"params": params, "batch_stats": batch_stats}, x, train=True,
      return_attention=model.attention, mutable=["batch_stats"])
  loss, terms = losses.dsan_loss(
      logits, aux.get("attention"), batch["label"], batch.get("infection_mask"),
      batch["has_mask"], batch["weight"], attention_weight)
  correct = ((logits > 0).astype(jnp.int32) == batch["label"]).astype(jnp.float32)
  terms["accuracy"] = jnp.sum(correct * batch["weight"]) / jnp.maximum(jnp.sum(batch["weight"]), 1)
  return loss, (new_vars["batch_stats"], terms)


def train_step(state: TrainState, batch: dict[str, jax.Array], *, model: DSAN,
               attention_weight: float, grad_accum_steps: int = 1
               ) -> tuple[TrainState, dict[str, jax.Array]]:
  """One optimiser step on a global batch.

  Args:
    state: the train state.
    batch: dict with ``image [B, D, H, W]``, ``infection_mask [B, D, H, W]``, ``label [B]``,
      ``has_mask [B]``, ``weight [B]`` (other keys ignored).
    model: the network (static).
    attention_weight: lambda of Eq. 4 (static).
    grad_accum_steps: micro-batches per step. BatchNorm then normalises each micro-batch with its
      own statistics and updates its running averages once per micro-batch, so the result equals
      one large batch only for the gradient average, not for BatchNorm (documented caveat).

  Returns:
    (new state, dict of scalar metrics: loss, cls_loss, att_loss, att_cases, accuracy, grad_norm,
    learning_rate, skipped).
  """
  chex.assert_rank(batch["image"], 4)
  batch = {k: batch[k] for k in ("image", "infection_mask", "label", "has_mask", "weight")}
  grad_fn = jax.value_and_grad(functools.partial(_forward_loss, model, attention_weight),
                               has_aux=True)
  grads, batch_stats, terms = _gradients(grad_fn, state, batch, grad_accum_steps)
  # The state's dtypes never change (donation, checkpoints): BatchNorm's update promotes the
  # running statistics to the compute dtype.
  batch_stats = jax.tree_util.tree_map(lambda new, old: new.astype(old.dtype), batch_stats,
                                       state.batch_stats)
  return _apply_if_finite(state, grads, batch_stats, terms)


def _gradients(grad_fn, state: TrainState, batch: dict[str, jax.Array], grad_accum_steps: int):
  """(gradients, new BatchNorm statistics, loss terms) of the batch, over its micro-batches."""
  if grad_accum_steps == 1:
    (_, (batch_stats, terms)), grads = grad_fn(state.params, state.batch_stats, batch)
    return grads, batch_stats, terms
  a = grad_accum_steps
  # Micro-batch i takes rows i, a + i, 2a + i, ...: each keeps rows from every device, so the
  # leading-axis sharding survives the reshape when a divides the per-device batch.
  micro = jax.tree_util.tree_map(
      lambda v: jnp.swapaxes(v.reshape(v.shape[0] // a, a, *v.shape[1:]), 0, 1), batch)

  def body(carry, mb):
    grads_acc, stats = carry
    (_, (stats, terms)), g = grad_fn(state.params, stats, mb)
    return (jax.tree_util.tree_map(jnp.add, grads_acc, g), stats), terms

  zeros = jax.tree_util.tree_map(jnp.zeros_like, state.params)
  (grads, batch_stats), terms = jax.lax.scan(body, (zeros, state.batch_stats), micro)
  grads = jax.tree_util.tree_map(lambda g: g / a, grads)
  terms = jax.tree_util.tree_map(jnp.mean, terms)
  return grads, batch_stats, terms


def _apply_if_finite(state: TrainState, grads, batch_stats, terms: dict[str, jax.Array]
                     ) -> tuple[TrainState, dict[str, jax.Array]]:
  """The optimiser update when the loss and gradients are finite, else the state unchanged."""
  # One reduction over the gradients serves both the metric and the guard: a NaN or Inf anywhere
  # makes the sum of squares non-finite (so does a finite gradient whose square overflows
  # float32, |g| > 1.8e19, which is no usable step either).
  grad_norm = optax.global_norm(grads)
  finite = jnp.isfinite(terms["loss"]) & jnp.isfinite(grad_norm)

  def apply_update(_):
    updates, opt_state = state.tx.update(grads, state.opt_state, state.params)
    return optax.apply_updates(state.params, updates), opt_state, batch_stats

  def keep_state(_):
    return state.params, state.opt_state, state.batch_stats

  # A conditional rather than a per-array select: the skipped branch does no work, and XLA updates
  # the donated parameters and Adam moments in place (a select kept both versions alive, which
  # cost one copy of every moment and split the update into several passes over memory).
  params, opt_state, batch_stats = jax.lax.cond(finite, apply_update, keep_state, None)
  skipped = (~finite).astype(jnp.int32)
  new_state = state.replace(
      step=state.step + 1,
      params=params,
      batch_stats=batch_stats,
      opt_state=opt_state,
      skipped_steps=state.skipped_steps + skipped,
      consecutive_skipped=jnp.where(finite, 0, state.consecutive_skipped + 1))
  terms["grad_norm"] = grad_norm
  terms["skipped"] = skipped.astype(jnp.float32)
  return new_state, terms


def eval_step(state: TrainState, batch: dict[str, jax.Array], *, model: DSAN,
              attention_weight: float) -> dict[str, jax.Array]:
  """Predictions and loss terms on a batch, BatchNorm in inference mode.

  Returns:
    dict with ``logit [B]``, ``prob [B]`` and per-case ``cls_loss [B]``, ``att_loss [B]``
    (0 where not eligible).
  """
  x = batch["image"][..., None]
  logits, aux = model.apply({"params": state.params, "batch_stats": state.batch_stats}, x,
                            train=False, return_attention=model.attention)
  out = {"logit": logits, "prob": jax.nn.sigmoid(logits),
         "cls_loss": losses.classification_loss(logits, batch["label"])}
  if model.attention:
    eligible = (batch["label"] == 1) & batch["has_mask"].astype(bool)
    out["att_loss"] = jnp.where(
        eligible, losses.attention_loss(aux["attention"], batch["infection_mask"]), 0.0)
  return out


def make_train_step(model: DSAN, mesh, attention_weight: float, grad_accum_steps: int = 1
                    ) -> Callable[[TrainState, dict], tuple[TrainState, dict]]:
  """``train_step`` jitted over ``mesh``: batch sharded on ``data``, state replicated, donated."""
  fn = functools.partial(train_step, model=model, attention_weight=attention_weight,
                         grad_accum_steps=grad_accum_steps)
  rep = sharding_lib.replicated(mesh)
  return jax.jit(fn, in_shardings=(rep, sharding_lib.batch_sharding(mesh)),
                 out_shardings=(rep, rep), donate_argnums=0)


def make_eval_step(model: DSAN, mesh, attention_weight: float
                   ) -> Callable[[TrainState, dict], dict]:
  """``eval_step`` jitted over ``mesh``; outputs stay sharded on the batch axis."""
  fn = functools.partial(eval_step, model=model, attention_weight=attention_weight)
  return jax.jit(fn, in_shardings=(sharding_lib.replicated(mesh),
                                   sharding_lib.batch_sharding(mesh)),
                 out_shardings=sharding_lib.batch_sharding(mesh))


def step_key(state: TrainState) -> jax.Array:
  """The step's PRNG key, ``fold_in(run_key, step)`` (for augmentation or dropout)."""
  return jax.random.fold_in(jax.random.wrap_key_data(state.rng), state.step)
