"""The DSAN network in PyTorch, identical to ``dsan_jax.models.DSAN``, for benchmarks.

PyTorch is an optional extra (``pip install dsan_jax[benchmarks]``); nothing in the library
imports this file. The module tree mirrors the Flax parameter tree name for name, so
``load_flax_params`` copies a Flax ``variables`` dict into the PyTorch model generically:

  backbone.stem.conv_init / bn_init                       (conv 7x7x7 s2, BN, ReLU, max-pool 3 s2 p1)
  backbone.stage{i}_block{j}.conv1 / bn1 / conv2 / bn2 [/ proj_conv / proj_bn]
  classifier                                             (Linear(C, 1) after global average pooling)

Layouts: Flax conv kernels are DHWIO ``[kd, kh, kw, C, O]``, PyTorch's OIDHW; the Dense kernel
is ``[C, 1]``, PyTorch's Linear weight ``[1, C]``. BatchNorm: Flax ``scale, bias`` /
``mean, var`` are PyTorch's ``weight, bias`` / ``running_mean, running_var``; Flax momentum 0.9
equals PyTorch's momentum 0.1 and both normalise training batches by the biased variance
(PyTorch's *running* variance is updated with the unbiased one, a difference of N / (N - 1)
that only affects the running statistics).

Check (prints the differences, exits non-zero when over tolerance):
  python benchmarks/torch_dsan.py                # fp32, ResNet34 width 8, input [2, 35, 48, 40, 1]
  python benchmarks/torch_dsan.py --float64      # float64 backbones (the Flax head stays fp32)
"""

import argparse
import os
import sys
from typing import Any, Mapping

import numpy as np
import torch
from torch import nn
import torch.nn.functional as F

STAGE_SIZES = {10: (1, 1, 1, 1), 18: (2, 2, 2, 2), 34: (3, 4, 6, 3)}


class BasicBlock(nn.Module):
  """Two 3x3x3 convolutions and a residual; 1x1x1 projection + BN when the shape changes."""

  def __init__(self, in_ch: int, out_ch: int, stride: int):
    super().__init__()
    self.conv1 = nn.Conv3d(in_ch, out_ch, 3, stride, 1, bias=False)
    self.bn1 = nn.BatchNorm3d(out_ch, eps=1e-5, momentum=0.1)
    self.conv2 = nn.Conv3d(out_ch, out_ch, 3, 1, 1, bias=False)
    self.bn2 = nn.BatchNorm3d(out_ch, eps=1e-5, momentum=0.1)
    self.has_proj = stride != 1 or in_ch != out_ch
    if self.has_proj:
      self.proj_conv = nn.Conv3d(in_ch, out_ch, 1, stride, 0, bias=False)
      self.proj_bn = nn.BatchNorm3d(out_ch, eps=1e-5, momentum=0.1)

  def forward(self, x: torch.Tensor) -> torch.Tensor:
    y = F.relu(self.bn1(self.conv1(x)))
    y = self.bn2(self.conv2(y))
    if self.has_proj:
      x = self.proj_bn(self.proj_conv(x))
    return F.relu(x + y)


class Stem(nn.Module):
  """conv 7x7x7 stride 2 (padding 3) -> BN -> ReLU -> max-pool 3x3x3 stride 2 padding 1."""

  def __init__(self, width: int):
    super().__init__()
    self.conv_init = nn.Conv3d(1, width, 7, 2, 3, bias=False)
    self.bn_init = nn.BatchNorm3d(width, eps=1e-5, momentum=0.1)

  def forward(self, x: torch.Tensor) -> torch.Tensor:
    return F.max_pool3d(F.relu(self.bn_init(self.conv_init(x))), 3, 2, 1)


class ResNet3D(nn.Module):
  """3D ResNet backbone (BasicBlocks), NCDHW; returns the last stage's features."""

  def __init__(self, stage_sizes=STAGE_SIZES[34], width: int = 64,
               stage_strides=(1, 2, 2, 1)):
    super().__init__()
    self.stem = Stem(width)
    self.block_names = []
    in_ch = width
    for i, (size, stride) in enumerate(zip(stage_sizes, stage_strides)):
      out_ch = width * 2**i
      for j in range(size):
        name = f"stage{i + 1}_block{j + 1}"
        self.add_module(name, BasicBlock(in_ch, out_ch, stride if j == 0 else 1))
        self.block_names.append(name)
        in_ch = out_ch
    self.out_channels = in_ch

  def forward(self, x: torch.Tensor) -> torch.Tensor:
    x = self.stem(x)
    for name in self.block_names:
      x = getattr(self, name)(x)
    return x


class DSAN(nn.Module):
  """ResNet3D -> GAP -> Linear(C, 1), with the CAM and the attention ``T(A)`` of Eqs. 1-2.

  ``forward(x [B, 1, D, H, W], return_attention)`` returns ``(logits [B], aux)`` with
  ``aux['cam'] [B, d, h, w]`` and, if asked, ``aux['attention'] [B, D, H, W]``, as the JAX model.
  """

  def __init__(self, depth: int = 34, width: int = 64, stage_strides=(1, 2, 2, 1),
               attention_alpha: float = 100.0, attention_beta: float = 0.4,
               cam_use_bias: bool = False):
    super().__init__()
    self.backbone = ResNet3D(STAGE_SIZES[depth], width, stage_strides)
    self.classifier = nn.Linear(self.backbone.out_channels, 1)
    self.alpha, self.beta, self.cam_use_bias = attention_alpha, attention_beta, cam_use_bias

  def forward(self, x: torch.Tensor, return_attention: bool = False):
    f = self.backbone(x)  # [B, C, d, h, w]
    logits = self.classifier(f.mean(dim=(2, 3, 4)))[:, 0]
    w = self.classifier.weight.detach()[0]  # Frozen copy for the attention branch (Eq. 1).
    cam = torch.einsum("bcdhw,c->bdhw", f, w)
    if self.cam_use_bias:
      cam = cam + self.classifier.bias.detach()[0]
    cam = F.relu(cam)
    aux = {"cam": cam}
    if return_attention:
      up = F.interpolate(cam[:, None], size=x.shape[2:], mode="trilinear",
                         align_corners=False)[:, 0]
      lo = up.amin(dim=(1, 2, 3), keepdim=True)
      hi = up.amax(dim=(1, 2, 3), keepdim=True)
      span = hi - lo
      ok = span > 1e-8
      norm = torch.where(ok, (up - lo) / torch.where(ok, span, torch.ones_like(span)),
                         torch.zeros_like(up))
      aux["attention"] = torch.sigmoid(self.alpha * (norm - self.beta))
    return logits, aux


def dsan_loss(logits, attention, mask, label, has_mask, attention_weight=0.5):
  """``dsan_jax.training.losses.dsan_loss`` in PyTorch: ``mean_b [BCE_b + lambda * e_b * Eq. 3_b]``.

  The attention term counts for COVID cases with a mask (``e_b``) and is averaged over ALL cases
  of the batch, as in the library.

  Args:
    logits: [B]; attention, mask: [B, D, H, W]; label, has_mask: [B].
  """
  bce = F.binary_cross_entropy_with_logits(logits, label.to(logits.dtype), reduction="none")
  num = ((attention - mask) ** 2).sum(dim=(1, 2, 3))
  den = attention.sum(dim=(1, 2, 3)) + mask.sum(dim=(1, 2, 3))
  att = torch.where(den > 0, num / torch.clamp(den, min=1e-30), torch.zeros_like(num))
  eligible = (has_mask & (label == 1)).to(logits.dtype)
  return (bce + attention_weight * eligible * att).mean()


# ------------------------------------------------------------------ parameter conversion.

_BN_MAP = {"scale": "weight", "bias": "bias", "mean": "running_mean", "var": "running_var"}


def _flatten(tree: Mapping[str, Any], prefix=()):
  for k, v in tree.items():
    if isinstance(v, Mapping):
      yield from _flatten(v, prefix + (k,))
    else:
      yield prefix + (k,), v


def _to_torch_layout(module: nn.Module, leaf: str, value: np.ndarray) -> tuple[str, np.ndarray]:
  if isinstance(module, nn.Conv3d):
    if leaf == "kernel":
      return "weight", np.transpose(value, (4, 3, 0, 1, 2))  # DHWIO -> OIDHW
    return "bias", value
  if isinstance(module, nn.Linear):
    return ("weight", value.T) if leaf == "kernel" else ("bias", value)  # [C, O] -> [O, C]
  if isinstance(module, nn.BatchNorm3d):
    return _BN_MAP[leaf], value
  raise KeyError(f"no PyTorch counterpart for a {type(module).__name__}")


def load_flax_params(torch_model: nn.Module, variables: Mapping[str, Any]) -> nn.Module:
  """Copies Flax ``variables`` ({"params": ..., "batch_stats": ...}) into ``torch_model``.

  Every Flax leaf must land on a PyTorch tensor of the same (converted) shape and every PyTorch
  parameter/buffer (except BatchNorm's ``num_batches_tracked``) must be covered, else it raises.

  Args:
    torch_model: ``DSAN`` or ``ResNet3D`` of this file, built with the Flax model's sizes.
    variables: the Flax model's variables (``params`` and ``batch_stats`` collections).

  Returns:
    ``torch_model``, with its tensors overwritten in place (dtype kept).
  """
  state = torch_model.state_dict()
  covered = set()
  for collection in ("params", "batch_stats"):
    for path, value in _flatten(variables.get(collection, {})):
      module_path, leaf = ".".join(path[:-1]), path[-1]
      try:
        module = torch_model.get_submodule(module_path)
        name, array = _to_torch_layout(module, leaf, np.asarray(value))
      except (AttributeError, KeyError) as e:
        raise KeyError(f"Flax leaf {collection}/{'/'.join(path)}: {e}") from e
      key = f"{module_path}.{name}"
      if tuple(state[key].shape) != array.shape:
        raise ValueError(f"{key}: PyTorch shape {tuple(state[key].shape)} != converted Flax "
                         f"shape {array.shape}")
      with torch.no_grad():
        state[key].copy_(torch.from_numpy(np.array(array, copy=True)))
      covered.add(key)
  missing = [k for k in state if k not in covered and not k.endswith("num_batches_tracked")]
  if missing:
    raise KeyError(f"PyTorch tensors without a Flax counterpart: {missing}")
  return torch_model


def torch_grads_to_flax(torch_model: nn.Module, params: Mapping[str, Any]) -> dict:
  """The ``.grad`` of every PyTorch parameter, in the Flax ``params`` tree's layout (numpy)."""

  def convert(tree, prefix):
    out = {}
    for k, v in tree.items():
      if isinstance(v, Mapping):
        out[k] = convert(v, prefix + (k,))
        continue
      module = torch_model.get_submodule(".".join(prefix))
      name, _ = _to_torch_layout(module, k, np.zeros(np.shape(v)))
      g = getattr(module, name).grad.detach().cpu().numpy()
      if isinstance(module, nn.Conv3d) and k == "kernel":
        g = np.transpose(g, (2, 3, 4, 1, 0))  # OIDHW -> DHWIO
      elif isinstance(module, nn.Linear) and k == "kernel":
        g = g.T
      out[k] = g
    return out

  return convert(params, ())


# ---------------------------------------------------------------------------- the check.


def check(shape=(2, 35, 48, 40), width: int = 8, depth: int = 34, float64: bool = False,
          conv_impls=("xla", "folded"), seed: int = 0) -> dict:
  """Compares the Flax DSAN and this PyTorch DSAN on a random batch.

  Eval mode (running statistics, randomised so they matter): logits, cam and attention.
  Train mode (batch statistics): the DSAN loss (BCE + 0.5 * Eq. 3) and its gradient w.r.t. every
  parameter. Errors are max|a - b| / max|b| per array, the worst over the parameter tree.

  Returns:
    {conv_impl: {"logits": err, "cam": err, "attention_max_abs": err, "loss": err,
    "grad": worst err, "grad_leaf": its path}}.
  """
  sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
  import jax  # pylint: disable=g-import-not-at-top
  if float64:
    jax.config.update("jax_enable_x64", True)
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  from dsan_jax.training import losses as dsan_losses  # pylint: disable=g-import-not-at-top
  from dsan_jax.models import DSAN as FlaxDSAN  # pylint: disable=g-import-not-at-top

  dtype = np.float64 if float64 else np.float32
  torch.set_default_dtype(torch.float64 if float64 else torch.float32)
  rng = np.random.default_rng(seed)
  b = shape[0]
  x = rng.random((*shape, 1)).astype(dtype)
  mask = (rng.random(shape) < 0.2).astype(dtype)
  label = np.array([1, 0] * (b // 2) + [1] * (b % 2), np.int32)
  has_mask = np.ones(b, bool)

  def rel(a, ref):
    a, ref = np.asarray(a, np.float64), np.asarray(ref, np.float64)
    return float(np.max(np.abs(a - ref)) / max(np.max(np.abs(ref)), 1e-30))

  results = {}
  for impl in conv_impls:
    fmodel = FlaxDSAN(depth=depth, width=width, conv_impl=impl, stem_conv_impl=impl,
                      dtype=jnp.float64 if float64 else jnp.float32,
                      param_dtype=jnp.float64 if float64 else jnp.float32)
    variables = fmodel.init(jax.random.key(seed), jnp.asarray(x), train=False)
    # Non-trivial running statistics and BN affine parameters, so their mapping is tested.
    leaves, treedef = jax.tree.flatten(variables)
    keys = jax.random.split(jax.random.key(seed + 1), len(leaves))
    paths = [p for p, _ in jax.tree_util.tree_flatten_with_path(variables)[0]]
    new = []
    for p, leaf, k in zip(paths, leaves, keys):
      name = jax.tree_util.keystr(p)
      if "bn" in name or "proj_bn" in name:
        noise = jax.random.uniform(k, leaf.shape, leaf.dtype, 0.5, 1.5)
        leaf = noise if ("var" in name or "scale" in name) else leaf + noise - 1.0
      new.append(leaf)
    variables = jax.tree.unflatten(treedef, new)

    tmodel = DSAN(depth=depth, width=width)
    load_flax_params(tmodel, variables)
    xt = torch.from_numpy(np.ascontiguousarray(np.moveaxis(x, -1, 1)))

    # Eval mode.
    logits_j, aux_j = fmodel.apply(variables, jnp.asarray(x), train=False, return_attention=True)
    tmodel.eval()
    with torch.no_grad():
      logits_t, aux_t = tmodel(xt, return_attention=True)
    res = {"logits": rel(logits_j, logits_t.numpy()),
           "cam": rel(aux_j["cam"], aux_t["cam"].numpy()),
           "attention_max_abs": float(np.max(np.abs(np.asarray(aux_j["attention"])
                                                    - aux_t["attention"].numpy())))}

    # Train mode: loss and gradients.
    def loss_fn(params):
      (logits, aux), _ = fmodel.apply({"params": params, "batch_stats": variables["batch_stats"]},
                                      jnp.asarray(x), train=True, return_attention=True,
                                      mutable=["batch_stats"])
      loss, _ = dsan_losses.dsan_loss(logits, aux["attention"], jnp.asarray(label),
                                      jnp.asarray(mask), jnp.asarray(has_mask),
                                      jnp.ones(label.shape, logits.dtype), 0.5)
      return loss

    loss_j, grads_j = jax.value_and_grad(loss_fn)(variables["params"])
    tmodel.train()
    tmodel.zero_grad()
    logits_t, aux_t = tmodel(xt, return_attention=True)
    loss_t = dsan_loss(logits_t, aux_t["attention"], torch.from_numpy(mask),
                       torch.from_numpy(label), torch.from_numpy(has_mask))
    loss_t.backward()
    grads_t = torch_grads_to_flax(tmodel, variables["params"])
    res["loss"] = rel(loss_j, loss_t.detach().numpy())
    worst, worst_path = 0.0, ""
    for (path, gj), (_, gt) in zip(_flatten(jax.device_get(grads_j)), _flatten(grads_t)):
      e = rel(gj, gt)
      if e > worst:
        worst, worst_path = e, "/".join(path)
    res["grad"], res["grad_leaf"] = worst, worst_path
    results[impl] = res
  return results


def main():
  parser = argparse.ArgumentParser(description="Flax vs PyTorch DSAN equivalence check.")
  parser.add_argument("--float64", action="store_true")
  parser.add_argument("--shape", default="2,35,48,40", help="B,D,H,W")
  parser.add_argument("--width", type=int, default=8)
  parser.add_argument("--depth", type=int, default=34)
  args = parser.parse_args()
  shape = tuple(int(v) for v in args.shape.split(","))
  from dsan_jax import runtime  # pylint: disable=g-import-not-at-top
  # "onednn" computes in float32 only (available_conv_impls builds and loads it where it can).
  impls = [i for i in runtime.available_conv_impls() if not (args.float64 and i == "onednn")]
  results = check(shape, args.width, args.depth, args.float64, conv_impls=impls)
  # fp32: different summation orders; errors relative to the largest magnitude of each array.
  tol = {"logits": 1e-4, "cam": 1e-4, "attention_max_abs": 1e-3, "loss": 1e-5, "grad": 1e-3}
  if args.float64:
    # Not 1e-12: dsan_jax's DSAN computes its head (GAP, Dense, CAM, T(A)) in float32 whatever
    # ``dtype`` is, so float64 runs still carry float32 rounding there (measured ~1e-6).
    tol = {k: 1e-5 for k in tol}
  ok = True
  for impl, res in results.items():
    print(f"conv_impl={impl}: " + ", ".join(
        f"{k}={v:.2e}" if isinstance(v, float) else f"{k}={v}" for k, v in res.items()))
    ok &= all(res[k] <= t for k, t in tol.items())
  print("OK" if ok else f"FAILED (tolerances {tol})")
  sys.exit(0 if ok else 1)


if __name__ == "__main__":
  main()
