"""Shapes, presets, dtypes and remat of the 3D ResNet and DSAN."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dsan_jax.models import DSAN, ResNet3DTiny, resnet3d

TINY = dict(width=4, stage_sizes=(1, 1, 1, 1))


def _ceil16(n):
  return -(-n // 16)


class ShapeTest(chex.TestCase):

  @chex.variants(with_jit=True, without_jit=True)
  def test_shapes_for_odd_and_even_sizes(self):
    model = DSAN(**TINY)
    for shape in [(2, 35, 64, 64), (1, 17, 33, 31), (3, 16, 32, 48)]:
      x = jnp.ones((*shape, 1), jnp.float32)
      variables = model.init(jax.random.key(0), x)
      fwd = self.variant(lambda v, x: model.apply(v, x, train=False, return_attention=True))
      logits, aux = fwd(variables, x)
      b, d, h, w = shape
      chex.assert_shape(logits, (b,))
      chex.assert_shape(aux["cam"], (b, _ceil16(d), _ceil16(h), _ceil16(w)))
      chex.assert_shape(aux["attention"], shape)
      chex.assert_tree_all_finite((logits, aux))
      assert float(jnp.min(aux["cam"])) >= 0.0  # ReLU.

  def test_paper_example(self):
    # Shapes only: traced (jax.eval_shape), not computed; the values are checked above.
    model = DSAN(**TINY)
    x = jax.ShapeDtypeStruct((2, 35, 64, 64, 1), jnp.float32)
    variables = jax.eval_shape(model.init, jax.random.key(0), x)
    _, aux = jax.eval_shape(lambda v, x: model.apply(v, x, return_attention=True), variables, x)
    chex.assert_shape(aux["cam"], (2, 3, 4, 4))
    chex.assert_shape(aux["attention"], (2, 35, 64, 64))


def _count_resnet34_params(c_in=1, width=64):
  """Independent count of 3D ResNet34's parameters (convs without bias, BN scale+bias)."""
  n = 7 ** 3 * c_in * width + 2 * width  # Stem conv + BN.
  c = width
  for i, blocks in enumerate((3, 4, 6, 3)):
    out = width * 2 ** i
    for j in range(blocks):
      n += 27 * c * out + 2 * out + 27 * out * out + 2 * out
      if c != out or (j == 0 and i in (1, 2)):
        n += c * out + 2 * out
      c = out
  return n + c + 1  # Dense(1).


def test_default_is_the_papers_network():
  model = DSAN()
  assert model.depth == 34 and model.attention and model.stage_strides == (1, 2, 2, 1)
  shapes = jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, 32, 32, 32, 1)))
  n = sum(int(np.prod(x.shape)) for x in jax.tree_util.tree_leaves(shapes["params"]))
  assert n == _count_resnet34_params()
  # Stages: 3, 4, 6, 3 blocks.
  names = shapes["params"]["backbone"].keys()
  for stage, blocks in zip(range(1, 5), (3, 4, 6, 3)):
    assert sum(k.startswith(f"stage{stage}_") for k in names) == blocks


def test_feature_stride_is_16_with_last_stage_stride_1():
  x = jnp.zeros((1, 64, 64, 64, 1))
  f = jax.eval_shape(lambda: ResNet3DTiny().init_with_output(jax.random.key(0), x)[0])
  chex.assert_shape(f, (1, 4, 4, 4, 32))
  f32 = jax.eval_shape(
      lambda: ResNet3DTiny(stage_strides=(1, 2, 2, 2)).init_with_output(jax.random.key(0), x)[0])
  chex.assert_shape(f32, (1, 2, 2, 2, 32))


def test_bottleneck_preset_shapes():
  x = jnp.zeros((1, 32, 32, 32, 1))
  f = jax.eval_shape(lambda: resnet3d.ResNet3D50(width=4).init_with_output(
      jax.random.key(0), x)[0])
  chex.assert_shape(f, (1, 2, 2, 2, 4 * 8 * 4))


def test_bf16_compute_keeps_fp32_params_and_logits():
  x = jax.random.uniform(jax.random.key(1), (2, 16, 32, 32, 1))
  m32, m16 = DSAN(**TINY), DSAN(**TINY, dtype=jnp.bfloat16)
  v = m32.init(jax.random.key(0), x)
  v16 = m16.init(jax.random.key(0), x)
  chex.assert_trees_all_equal_dtypes(v, v16)
  assert all(p.dtype == jnp.float32 for p in jax.tree_util.tree_leaves(v16))
  l32, aux32 = m32.apply(v, x, return_attention=True)
  l16, aux16 = m16.apply(v, x, return_attention=True)
  assert l16.dtype == jnp.float32 and aux16["attention"].dtype == jnp.float32
  np.testing.assert_allclose(l16, l32, atol=0.1)


@pytest.mark.parametrize("remat", ["stem", "blocks", "all"])
def test_remat_gives_same_loss_and_grads(remat):
  x = jax.random.uniform(jax.random.key(1), (2, 16, 32, 32, 1))
  base, rem = DSAN(**TINY), DSAN(**TINY, remat=remat)
  v = base.init(jax.random.key(0), x)

  def loss(model, params):
    (logits, aux), _ = model.apply({"params": params, "batch_stats": v["batch_stats"]}, x,
                                   train=True, return_attention=True, mutable=["batch_stats"])
    return jnp.sum(logits) + jnp.sum(aux["attention"])

  g0 = jax.grad(lambda p: loss(base, p))(v["params"])
  g1 = jax.grad(lambda p: loss(rem, p))(v["params"])
  chex.assert_trees_all_close(g0, g1, rtol=1e-5, atol=1e-6)


def test_bad_arguments_raise():
  x = jnp.zeros((1, 16, 16, 16, 1))
  with pytest.raises(ValueError, match="depth"):
    DSAN(depth=7).init(jax.random.key(0), x)
  with pytest.raises(ValueError, match="remat"):
    DSAN(**TINY, remat="everything").init(jax.random.key(0), x)
  with pytest.raises(AssertionError):
    DSAN(**TINY).init(jax.random.key(0), jnp.zeros((16, 16, 16, 1)))
