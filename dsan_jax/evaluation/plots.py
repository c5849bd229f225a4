"""Figures of the evaluation: ROC curves (Fig. 4), attention maps (Fig. 5), training curves.

Uses matplotlib's object API with the Agg canvas (``matplotlib.figure.Figure``), not pyplot, so
importing this module neither changes the global backend nor needs a display, and figures are
freed when the function returns.

Display orientation of [D, H, W] = (z, y, x) volumes in RAS+ (the data layer's convention):
radiological, as in the paper's Fig. 5: axial slices with anterior up and the patient's right on
the image's left; coronal slices with superior up and the patient's right on the left.
"""

from __future__ import annotations

import math
from typing import Any, Mapping, Sequence

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from scipy import ndimage

RocCurve = tuple[np.ndarray, np.ndarray, float]  # (fpr [K], tpr [K], auc)


def _new_figure(width: float, height: float) -> Figure:
  fig = Figure(figsize=(width, height), dpi=100, layout="constrained")
  FigureCanvasAgg(fig)
  return fig


def _save(fig: Figure, path) -> None:
  fig.savefig(str(path), dpi=100)


def plot_roc(curves_by_fold: Mapping[Any, Mapping[str, RocCurve]],
             pooled: Mapping[str, RocCurve] | None, path, title: str = "") -> None:
  """ROC curves, one panel per fold and one for the pooled predictions, one line per model.

  Args:
    curves_by_fold: {fold: {model name: (fpr, tpr, auc)}}, panels in the mapping's order.
    pooled: {model name: (fpr, tpr, auc)} for the pooled panel, or None to omit it.
    path: output PNG path.
    title: figure title (e.g. "validation folds" or "test set, one model per fold").
  """
  panels = [(f"fold {k}", c) for k, c in curves_by_fold.items()]
  if pooled:
    panels.insert(0, ("pooled", pooled))
  if not panels:
    raise ValueError("plot_roc: nothing to plot")
  cols = min(3, len(panels))
  rows = math.ceil(len(panels) / cols)
  fig = _new_figure(4.0 * cols, 4.0 * rows)
  models = list(dict.fromkeys(m for _, c in panels for m in c))
  colors = {m: f"C{i}" for i, m in enumerate(models)}
  for i, (name, curves) in enumerate(panels):
    ax = fig.add_subplot(rows, cols, i + 1)
    ax.plot([0, 1], [0, 1], color="0.7", lw=0.8, ls="--")
    for model, (fpr, tpr, auc) in curves.items():
      ax.plot(fpr, tpr, color=colors[model], lw=1.5, label=f"{model} (AUC {auc:.3f})")
    ax.set_xlim(-0.01, 1.01)
    ax.set_ylim(-0.01, 1.01)
    ax.set_aspect("equal")
    ax.set_title(name)
    ax.set_xlabel("1 - specificity")
    ax.set_ylabel("sensitivity")
    ax.legend(loc="lower right", fontsize=7)
  if title:
    fig.suptitle(title)
  _save(fig, path)


def resize_to(volume: np.ndarray, shape: Sequence[int], order: int = 1) -> np.ndarray:
  """Resamples a [d, h, w] map to ``shape`` [D, H, W] (trilinear by default; identity if equal)."""
  volume = np.asarray(volume, dtype=np.float32)
  if volume.shape == tuple(shape):
    return volume
  if volume.ndim != len(shape):
    raise ValueError(f"cannot resize {volume.shape} to {tuple(shape)}")
  zoom = [t / s for t, s in zip(shape, volume.shape)]
  out = ndimage.zoom(volume, zoom, order=order, mode="nearest", grid_mode=True)
  return out[tuple(slice(0, t) for t in shape)]


def default_slice_index(infection_mask: np.ndarray | None, lung_mask: np.ndarray | None,
                        shape: Sequence[int]) -> tuple[int, int, int]:
  """(z, y, x) of the infection's centre of mass, else the lung's, else the volume's centre."""
  for m in (infection_mask, lung_mask):
    if m is not None and np.any(m):
      return tuple(int(round(c)) for c in ndimage.center_of_mass(np.asarray(m) > 0))
  return tuple(s // 2 for s in shape)


def _axial(v: np.ndarray, z: int) -> np.ndarray:
  return v[z][:, ::-1]  # (y, x); x flipped so the patient's right is on the left.


def _coronal(v: np.ndarray, y: int) -> np.ndarray:
  return v[:, y, :][:, ::-1]  # (z, x).


def plot_attention_figure(ct: np.ndarray, lung_mask: np.ndarray | None,
                          infection_mask: np.ndarray | None, maps: Mapping[str, np.ndarray],
                          path, slice_index: int | tuple[int, int] | None = None,
                          spacing: Sequence[float] = (1.0, 1.0, 1.0), title: str = "") -> None:
  """A Fig. 5-like panel: CT, lung mask, infection mask and attention maps, axial and coronal.

  Columns: the CT; the CT with the lung mask; the CT with the infection mask; then one column per
  map (e.g. "RN34 + US Grad-CAM", "Att. RN34 + US T(A)"), each scaled to [0, 1] by its maximum
  and overlaid as a heat map. Rows: axial, coronal.

  Args:
    ct: [D, H, W] CT (windowed to [0, 1] or in HU; shown with its own min/max).
    lung_mask: [D, H, W] binary, or None.
    infection_mask: [D, H, W] binary, or None.
    maps: {name: [d, h, w] non-negative map}; maps of another shape are resampled (trilinear)
      to the CT's shape for display.
    path: output PNG path.
    slice_index: axial index z, or (z, y) for the axial and coronal slices; None -> the centre
      of mass of the infection mask (else of the lung mask, else the volume's centre).
    spacing: voxel size (dz, dy, dx) in mm, for the aspect ratio.
    title: figure title.
  """
  ct = np.asarray(ct, dtype=np.float32)
  if ct.ndim != 3:
    raise ValueError(f"ct must be [D, H, W], got {ct.shape}")
  for name, m in (("lung_mask", lung_mask), ("infection_mask", infection_mask)):
    if m is not None and np.shape(m) != ct.shape:
      raise ValueError(f"{name} shape {np.shape(m)} != ct shape {ct.shape}")
  cz, cy = _slice_pair(slice_index, infection_mask, lung_mask, ct.shape)
  dz, dy, dx = (float(s) for s in spacing)
  columns = _figure_columns(lung_mask, infection_mask, maps, ct.shape)
  ncol = len(columns)
  fig = _new_figure(2.4 * ncol, 2.4 * 2 * max(1.0, ct.shape[0] * dz / (ct.shape[1] * dy)) ** 0.5)
  lo, hi = float(ct.min()), float(ct.max())
  views = [("axial z=%d" % cz, lambda v: _axial(v, cz), dy / dx),
           ("coronal y=%d" % cy, lambda v: _coronal(v, cy), dz / dx)]
  im = None
  for r, (view_name, take, aspect) in enumerate(views):
    base = take(ct)
    for c, (name, overlay, kind) in enumerate(columns):
      ax = fig.add_subplot(2, ncol, r * ncol + c + 1)
      ax.imshow(base, cmap="gray", vmin=lo, vmax=hi, origin="lower", aspect=aspect,
                interpolation="nearest")
      im = _overlay(ax, name, overlay, kind, take, aspect) or im
      ax.set_xticks([])
      ax.set_yticks([])
      if r == 0:
        ax.set_title(name, fontsize=8)
      if c == 0:
        ax.set_ylabel(view_name, fontsize=8)
  if any(kind == "map" for _, _, kind in columns):
    fig.colorbar(im, ax=fig.axes, shrink=0.6, label="map / max")
  if title:
    fig.suptitle(title, fontsize=9)
  _save(fig, path)


def _figure_columns(lung_mask, infection_mask, maps: Mapping[str, np.ndarray], shape
                    ) -> list[tuple[str, np.ndarray | None, str]]:
  """(title, overlay, kind) per column: the CT, the two masks, each map scaled by its maximum."""
  columns: list[tuple[str, np.ndarray | None, str]] = [("CT", None, "")]
  columns.append(("lung mask", lung_mask, "mask"))
  columns.append(("infection mask", infection_mask, "mask"))
  for name, m in maps.items():
    m = resize_to(np.asarray(m, np.float32), shape)
    peak = float(m.max()) if m.size else 0.0
    columns.append((name, m / peak if peak > 0 else m, "map"))
  return columns


def _slice_pair(slice_index, infection_mask, lung_mask, shape) -> tuple[int, int]:
  """(z, y) of the axial and coronal slices (``plot_attention_figure``'s ``slice_index``)."""
  cz, cy, _ = default_slice_index(infection_mask, lung_mask, shape)
  if slice_index is not None:
    if isinstance(slice_index, (tuple, list)):
      cz, cy = (int(s) for s in slice_index)
    else:
      cz = int(slice_index)
  return int(np.clip(cz, 0, shape[0] - 1)), int(np.clip(cy, 0, shape[1] - 1))


def _overlay(ax, name: str, overlay: np.ndarray | None, kind: str, take, aspect: float):
  """Draws a mask ("mask") or a heat map ("map") over a panel; returns the map's image."""
  if kind == "mask" and overlay is not None:
    sl = take(np.asarray(overlay)).astype(bool)
    color = (0.1, 0.6, 1.0) if name.startswith("lung") else (1.0, 0.2, 0.1)
    rgba = np.zeros(sl.shape + (4,), np.float32)
    rgba[sl] = (*color, 0.45)
    ax.imshow(rgba, origin="lower", aspect=aspect, interpolation="nearest")
  elif kind == "mask":
    ax.text(0.5, 0.5, "no mask", color="w", ha="center", va="center", transform=ax.transAxes)
  elif kind == "map":
    return ax.imshow(take(overlay), cmap="jet", vmin=0.0, vmax=1.0, alpha=0.45,
                     origin="lower", aspect=aspect, interpolation="bilinear")
  return None


def plot_training_curves(metrics_rows: Sequence[Mapping[str, Any]], path,
                         x_key: str = "epoch", title: str = "") -> None:
  """Per-epoch curves: losses in the left panel, every other numeric metric on the right.

  Args:
    metrics_rows: one dict per epoch (e.g. the rows of the training metrics JSONL), with an
      ``x_key`` entry and any numeric entries; keys containing "loss" go to the left panel.
      Non-numeric entries and "step"/"time"-like keys are ignored.
    path: output PNG path.
    x_key: the x-axis key.
    title: figure title.
  """
  if not metrics_rows:
    raise ValueError("plot_training_curves: no rows")
  skip = {x_key, "step", "epoch", "time", "wall_time", "fold", "lr", "learning_rate"}
  keys = []
  for row in metrics_rows:
    for k, v in row.items():
      if k not in skip and k not in keys and isinstance(v, (int, float, np.number)) \
          and not isinstance(v, bool):
        keys.append(k)
  xs = [row.get(x_key, i) for i, row in enumerate(metrics_rows)]
  fig = _new_figure(10, 4)
  panels = [("loss", [k for k in keys if "loss" in k]),
            ("metrics", [k for k in keys if "loss" not in k])]
  for i, (name, ks) in enumerate(panels):
    ax = fig.add_subplot(1, 2, i + 1)
    for k in ks:
      pts = [(x, r[k]) for x, r in zip(xs, metrics_rows)
             if isinstance(r.get(k), (int, float, np.number)) and np.isfinite(r[k])]
      if pts:
        ax.plot(*zip(*pts), marker="o", ms=3, label=k)
    ax.set_xlabel(x_key)
    ax.set_title(name)
    ax.grid(alpha=0.3)
    if ks:
      ax.legend(fontsize=7)
  if title:
    fig.suptitle(title)
  _save(fig, path)


def plot_clinical_overview(ct: np.ndarray, lung_mask: np.ndarray | None, attention: np.ndarray,
                           path, spacing: Sequence[float] = (1.0, 1.0, 1.0),
                           lines: Sequence[str] = (), title: str = "",
                           map_name: str = "T(A)") -> tuple[int, int, int]:
  """One glanceable picture: axial and coronal slices through the attention maximum.

  Each view shows the CT in its window (grey), the lung contour (cyan) and the attention map
  as a heat overlay (scaled by its maximum, hidden below 0.2 of it), with a cross at the
  maximum; a text column lists ``lines`` (probability, lung volume, ratio...).

  Args:
    ct: [D, H, W] CT windowed to [0, 1] (0 = -1350 HU, 1 = 150 HU) or in HU.
    lung_mask: [D, H, W] binary, or None.
    attention: [d, h, w] non-negative map (resampled to the CT's shape for display).
    path: output PNG path.
    spacing: (dz, dy, dx) mm, for the aspect ratio.
    lines: text shown beside the images.
    title: figure title.
    map_name: the overlay's name in the colour bar.

  Returns:
    (z, y, x) of the attention maximum on the CT's grid.
  """
  ct = np.asarray(ct, np.float32)
  att = resize_to(np.asarray(attention, np.float32), ct.shape)
  peak = float(att.max())
  att = att / peak if peak > 0 else att
  cz, cy, cx = (int(i) for i in np.unravel_index(int(np.argmax(att)), att.shape))
  dz, dy, dx = (float(s) for s in spacing)
  fig = _new_figure(13, 5.2)
  grid = fig.add_gridspec(1, 3, width_ratios=(1, 1, 0.75))
  lo, hi = float(ct.min()), float(ct.max())
  views = (("axial", _axial, cz, dy / dx, (ct.shape[2] - 1 - cx, cy)),
           ("coronal", _coronal, cy, dz / dx, (ct.shape[2] - 1 - cx, cz)))
  for i, (name, take, index, aspect, mark) in enumerate(views):
    ax = fig.add_subplot(grid[0, i])
    ax.imshow(take(ct, index), cmap="gray", vmin=lo, vmax=hi, origin="lower", aspect=aspect,
              interpolation="bilinear")
    heat = np.ma.masked_less(take(att, index), 0.2)
    im = ax.imshow(heat, cmap="jet", vmin=0.0, vmax=1.0, alpha=0.45, origin="lower",
                   aspect=aspect, interpolation="bilinear")
    if lung_mask is not None and np.any(take(np.asarray(lung_mask), index)):
      ax.contour(take(np.asarray(lung_mask, np.float32), index), levels=[0.5], colors="cyan",
                 linewidths=0.8)
    ax.plot(*mark, marker="+", color="white", ms=12, mew=1.5)
    ax.set_title(f"{name} through the {map_name} maximum ({'z' if i == 0 else 'y'}={index})",
                 fontsize=9)
    ax.set_xlabel("patient's right <-  -> left", fontsize=8)
    ax.set_xticks([])
    ax.set_yticks([])
  fig.colorbar(im, ax=fig.axes[:2], shrink=0.7, label=f"{map_name} / max")
  text = fig.add_subplot(grid[0, 2])
  text.axis("off")
  text.text(0.0, 1.0, "\n".join(lines), va="top", ha="left", fontsize=8.5, family="monospace",
            transform=text.transAxes, wrap=True)
  if title:
    fig.suptitle(title, fontsize=10)
  _save(fig, path)
  return cz, cy, cx
