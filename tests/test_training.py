"""The optimiser, the pure train step (overfit, non-finite skipping, accumulation) and sharding."""

import os
import subprocess
import sys
import textwrap

import chex
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest

from dsan_jax import errors, runtime
from dsan_jax.training import optim, sharding, steps
from dsan_jax.models import DSAN
from tests import reduction_order

TINY = dict(width=4, stage_sizes=(1, 1, 1, 1))


def optim_config(**kw):
  c = ml_collections.ConfigDict(dict(learning_rate=2e-4, b1=0.9, b2=0.999, eps=1e-8,
                                     weight_decay=1e-4, lr_decay_factor=0.1,
                                     lr_decay_every_epochs=5))
  c.update(kw)
  return c


def make_batch(b=4, shape=(16, 32, 32), seed=0):
  rng = np.random.default_rng(seed)
  labels = np.arange(b) % 2
  image = rng.random((b, *shape), dtype=np.float32) * 0.3
  mask = np.zeros((b, *shape), np.uint8)
  mask[:, 4:10, 8:20, 8:20] = 1
  image = image + 0.7 * mask * labels[:, None, None, None]  # COVID cases: a bright lesion.
  return dict(image=image.astype(np.float32), infection_mask=mask,
              label=labels.astype(np.int32), has_mask=labels.astype(bool),
              weight=np.ones(b, np.float32), ratio=np.full(b, 0.1, np.float32),
              index=np.arange(b, dtype=np.int32))


def test_learning_rate_steps_down_by_10_every_5_epochs():
  sched = optim.learning_rate_schedule(optim_config(), steps_per_epoch=7)
  for step, want in [(0, 2e-4), (34, 2e-4), (35, 2e-5), (69, 2e-5), (70, 2e-6), (105, 2e-7)]:
    np.testing.assert_allclose(sched(step), want, rtol=1e-6)


def test_adam_with_l2_matches_pytorch_semantics():
  """Two steps against a NumPy transcription of torch.optim.Adam(weight_decay=...)."""
  cfg = optim_config(learning_rate=1e-2, weight_decay=0.1)
  tx = optim.make_optimizer(cfg, steps_per_epoch=100)
  p = np.array([1.0, -2.0, 0.5])
  grads = [np.array([0.1, 0.2, -0.3]), np.array([-0.05, 0.4, 0.1])]
  params, state = jnp.asarray(p, jnp.float32), tx.init(jnp.asarray(p, jnp.float32))
  m = v = np.zeros(3)
  for t, g in enumerate(grads, start=1):
    updates, state = tx.update(jnp.asarray(g, jnp.float32), state, params)
    params = optax.apply_updates(params, updates)
    g = g + cfg.weight_decay * p
    m = cfg.b1 * m + (1 - cfg.b1) * g
    v = cfg.b2 * v + (1 - cfg.b2) * g * g
    p = p - cfg.learning_rate * (m / (1 - cfg.b1 ** t)) / (np.sqrt(v / (1 - cfg.b2 ** t)) + cfg.eps)
  np.testing.assert_allclose(params, p, rtol=1e-5)


def _setup(batch_size=4, accum=1, model=None, tx=None):
  model = model or DSAN(**TINY)
  tx = tx or optim.make_optimizer(optim_config(learning_rate=3e-3), steps_per_epoch=100)
  state = steps.create_train_state(model, tx, seed=0, input_shape=(batch_size, 16, 32, 32))
  mesh = sharding.make_mesh(jax.devices()[:1])
  step = steps.make_train_step(model, mesh, attention_weight=0.5, grad_accum_steps=accum)
  return model, mesh, state, step


def test_overfits_a_tiny_fixed_batch():
  _, mesh, state, step = _setup()
  batch = sharding.shard_batch(make_batch(), mesh)
  losses = []
  for _ in range(25):
    state, metrics = step(state, batch)
    losses.append(float(metrics["loss"]))
  assert losses[-1] < 0.5 * losses[0], losses
  assert int(state.step) == 25 and int(state.skipped_steps) == 0


def test_non_finite_step_is_skipped_and_counted():
  _, mesh, state, step = _setup()
  good = make_batch()
  state, _ = step(state, sharding.shard_batch(good, mesh))
  before = jax.device_get(state)
  bad = dict(good, image=np.where(np.arange(4)[:, None, None, None] == 0, np.nan, good["image"]))
  state, metrics = step(state, sharding.shard_batch(bad, mesh))
  after = jax.device_get(state)
  assert float(metrics["skipped"]) == 1.0
  chex.assert_trees_all_equal((before.params, before.batch_stats, before.opt_state),
                              (after.params, after.batch_stats, after.opt_state))
  assert int(after.skipped_steps) == 1 and int(after.consecutive_skipped) == 1
  assert int(after.step) == int(before.step) + 1
  state, _ = step(state, sharding.shard_batch(good, mesh))
  assert int(state.consecutive_skipped) == 0 and int(state.skipped_steps) == 1


def test_gradient_accumulation_averages_micro_batch_gradients():
  """accum=2 equals: grads of the two interleaved micro-batches, averaged, BN stats chained."""
  # In float64 (tests/reduction_order.py): the scan and the separate calls fuse differently, a
  # rounding-level difference; splitting into contiguous micro-batches instead, or not chaining
  # the statistics, changes the result by 1e-2 or more. Plain SGD with lr 1 makes the update
  # the gradient itself (Adam's first step would turn tiny gradients into +-lr).
  with jax.enable_x64(True):
    model = DSAN(**TINY, dtype=jnp.float64, param_dtype=jnp.float64, conv_impl="folded",
                 stem_conv_impl="folded")
    _, mesh, state, step2 = _setup(accum=2, model=model, tx=optax.sgd(1.0))
    batch = make_batch(b=4)
    batch["image"] = batch["image"].astype(np.float64)
    new_state, _ = step2(state, sharding.shard_batch(batch, mesh))
    # Reference without scan: micro-batch i = rows i, i + 2.
    fresh = _setup(accum=2, model=model, tx=optax.sgd(1.0))[2]
    loss_fn = lambda p, s, mb: steps._forward_loss(model, 0.5, p, s, mb)
    grad_fn = jax.jit(jax.value_and_grad(loss_fn, has_aux=True))  # Eager: op by op, slow.
    keys = ("image", "infection_mask", "label", "has_mask", "weight")
    stats, gsum = fresh.batch_stats, None
    for i in range(2):
      mb = {k: jnp.asarray(batch[k][i::2]) for k in keys}
      (_, (stats, _)), g = grad_fn(fresh.params, stats, mb)
      gsum = g if gsum is None else jax.tree_util.tree_map(jnp.add, gsum, g)
    grads = jax.tree_util.tree_map(lambda g: g / 2, gsum)
    updates, _ = fresh.tx.update(grads, fresh.opt_state, fresh.params)
    want = optax.apply_updates(fresh.params, updates)
    assert new_state.params["classifier"]["kernel"].dtype == jnp.float64
    reduction_order.assert_leaves_close(new_state.params, want, reduction_order.F64_RTOL,
                                        "accumulated vs separate micro-batches, params")
    reduction_order.assert_leaves_close(new_state.batch_stats, stats, reduction_order.F64_RTOL,
                                        "accumulated vs separate micro-batches, statistics")


def test_baseline_without_attention_trains():
  _, mesh, state, step = _setup(model=DSAN(**TINY, attention=False))
  state, metrics = step(state, sharding.shard_batch(make_batch(), mesh))
  assert float(metrics["att_cases"]) == 2.0 and float(metrics["att_loss"]) == 0.0
  np.testing.assert_allclose(metrics["loss"], metrics["cls_loss"])


def test_eval_step_outputs():
  model, mesh, state, _ = _setup()
  ev = steps.make_eval_step(model, mesh, 0.5)
  out = ev(state, sharding.shard_batch(make_batch(), mesh))
  chex.assert_shape([out["prob"], out["logit"], out["cls_loss"], out["att_loss"]], (4,))
  np.testing.assert_allclose(out["prob"], jax.nn.sigmoid(out["logit"]), rtol=1e-6)
  assert np.all(np.asarray(out["att_loss"])[[0, 2]] == 0)  # CAP cases.


def test_batch_not_divisible_by_devices_is_a_clear_error():
  mesh = sharding.make_mesh(jax.devices()[:1])
  sharding.check_batch_divisible(20, mesh)

  class FakeMesh:
    class devices:
      size = 8
  with pytest.raises(errors.ConfigError, match="not divisible by the 8 devices"):
    sharding.check_batch_divisible(20, FakeMesh)


MULTI_DEVICE_SCRIPT = textwrap.dedent("""
    import jax, jax.numpy as jnp, numpy as np, optax
    from dsan_jax.training import sharding, steps
    from dsan_jax.models import DSAN
    from tests.test_training import make_batch, TINY
    from tests import reduction_order as ro
    assert jax.device_count() == 8, jax.devices()
    model = lambda dtype: DSAN(**TINY, dtype=dtype, param_dtype=dtype, conv_impl="folded",
                               stem_conv_impl="folded")
    # SGD, not Adam: Adam turns rounding-level gradient differences into +-lr steps. After step 1
    # the momentum trace is the gradient.
    tx = optax.sgd(0.01, momentum=0.9)
    init = steps.create_train_state(model(jnp.float32), tx, seed=0, input_shape=(8, 16, 32, 32))

    def run(state, dtype, devices, n_steps):
      mesh = sharding.make_mesh(devices)
      step = steps.make_train_step(model(dtype), mesh, attention_weight=0.5)
      state = sharding.replicate(jax.device_get(state), mesh)  # A fresh copy: steps donate it.
      for i in range(n_steps):
        batch = make_batch(b=8, seed=i)
        batch["image"] = batch["image"].astype(dtype)
        batch = sharding.shard_batch(batch, mesh)
        assert len(batch["image"].sharding.device_set) == len(devices)
        state, metrics = step(state, batch)
      return dict(state=(state.params, state.batch_stats, state.opt_state),
                  loss=np.float64(metrics["loss"]))

    one, eight = jax.devices()[:1], jax.devices()
    with jax.enable_x64(True):
      init64 = ro.to_float64(jax.device_get(init))
      # One step: three steps in float64 are compared in tests/test_multihost.py.
      f64 = {n: run(init64, jnp.float64, d, 1) for n, d in ((1, one), (8, eight))}
    f32 = {n: run(init, jnp.float32, d, 1) for n, d in ((1, one), (8, eight))}
    ro.assert_leaves_close(f64[8], f64[1], ro.F64_RTOL, "float64, 1 step, 8 vs 1 device")
    ro.assert_as_accurate(f32[8], f32[1], f64[1], "float32, 1 step, 8 vs 1 device")
    print("float64 max rel diff", ro.relative_error(f64[8], f64[1]),
          "float32 errors vs float64", ro.relative_error(f32[8], f64[1]),
          ro.relative_error(f32[1], f64[1]))
    print("OK")
""")


def test_one_device_and_eight_devices_give_the_same_step(repo_root):
  flags = "--xla_force_host_platform_device_count=8 " + runtime.recommended_cpu_xla_flags()
  env = dict(os.environ, XLA_FLAGS=flags.strip(), JAX_PLATFORMS="cpu")
  proc = subprocess.run([sys.executable, "-c", MULTI_DEVICE_SCRIPT], cwd=repo_root, env=env,
                        capture_output=True, text=True, timeout=600)
  assert proc.returncode == 0, proc.stdout + proc.stderr
  assert "OK" in proc.stdout, proc.stdout
