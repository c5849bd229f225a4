"""Synthetic chest-CT phantoms with COVID-like and CAP-like lesions, masks and a manifest.

``generate(out_dir, num_cases, seed)`` writes, under ``out_dir``::

  images/syn00000.nii.gz            int16 CT (HU, or HU + 1024 with scl_inter = -1024)
  lung_masks/syn00000.nii.gz        uint8 {0, 1}
  infection_masks/syn00000.nii.gz   uint8 {0, 1}, inside the lung mask
  manifest.csv                      case_id, patient_id, label, image, lung_mask,
                                    infection_mask, infection_ratio, split

Every parameter and distribution is documented in docs/synthetic.md; the module constants
below are the ones that document refers to. Everything is a deterministic function of the
seed (one PCG64 stream plans the cases, each case renders from its own seed), independent of
the number of worker processes.

CLI::

  python -m dsan_jax.data.synthetic --out DIR --cases N --seed S [--size-scale F]
      [--workers W] [--preview montage.png]
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import dataclasses
import json
import logging
import math
import multiprocessing
import os
from pathlib import Path
import time
from typing import Sequence

import nibabel as nib
import numpy as np

from dsan_jax import files, run_lock

log = logging.getLogger("dsan_jax")

# ------------------------------------------------------------------ plan (docs/synthetic.md).
COVID_FRACTION = 0.5  # P(label = COVID) per patient (the paper's TV set is ~50/50).
REPEAT_FRACTION = 0.15  # P(a patient has two scans: baseline + follow-up).
# log10(r) ~ Normal(mu, sigma), truncated to [log10 R_MIN, log10 R_MAX] by redrawing.
# COVID: P(r < 0.005) ~ 0.12, P(r < 0.030) ~ 0.43 after truncation (paper Table III: 0.14, 0.43).
COVID_LOG10_RATIO = (-1.30, 0.80)
# CAP: P(r <= 0.001) ~ 0.60 (weight ~1.5, Section III-C), P(r < 0.005) ~ 0.80, P(r < 0.03) ~ 0.93.
CAP_LOG10_RATIO = (-3.30, 1.20)
R_MIN, R_MAX = 1e-5, 0.6
FOLLOWUP_LOG_SIGMA = 0.5  # Follow-up ratio = baseline * exp(N(0, sigma)) (progression/regression).
# ------------------------------------------------------------------------- grid and header.
DEPTH_RANGE = (48, 80)  # Slices at size_scale = 1.
WIDTH_RANGE = (96, 128)  # x voxels at size_scale = 1; y is W - U{0..24}, at least 96 * scale.
INPLANE_SPACING_MM = (0.6, 0.9)
SLICE_SPACING_MM = (1.0, 2.5)
ORIENTATIONS = ("RAS", "LAS", "LPS")  # Stored axis codes, drawn uniformly per patient.
INTERCEPT_FRACTION = 0.5  # Fraction stored as HU + 1024 with scl_inter = -1024.
# ---------------------------------------------------------------------------- intensities.
HU = dict(air=-1000.0, fat=-100.0, soft=40.0, blood=45.0, liver=55.0, bone_marrow=350.0,
          bone_cortex=950.0, parenchyma=-850.0, vessel=30.0)
NOISE_HU = (8.0, 20.0)  # Std of the additive white noise, uniform per scan.
COVID_GGO_HU = (-650.0, -350.0)
COVID_CONSOLIDATION_HU = (-100.0, 30.0)
CAP_CONSOLIDATION_HU = (-100.0, 40.0)
CAP_GGO_HU = (-550.0, -300.0)
VESSEL_OPAQUE = 0.5  # Splatted vessel density at which a voxel is fully vessel (HU["vessel"]).
VESSEL_ROOTS = 12  # Trees per lung at size_scale = 1 (scaled by size_scale**2).


@dataclasses.dataclass(frozen=True)
class CaseSpec:
  """Everything needed to render one scan (drawn by ``plan_cases``)."""
  case_id: str
  patient_id: str
  label: int  # 1 = COVID, 0 = CAP.
  target_ratio: float
  anatomy_seed: int  # Shared by the scans of one patient.
  grid_seed: int  # Shared by the scans of one patient: grid size, spacing, orientation.
  case_seed: int  # Per scan: noise and lesions.
  split: str
  size_scale: float


def _truncated_log10_normal(rng: np.random.Generator, mu: float, sigma: float) -> float:
  lo, hi = math.log10(R_MIN), math.log10(R_MAX)
  while True:
    x = rng.normal(mu, sigma)
    if lo <= x <= hi:
      return float(10.0**x)


def plan_cases(num_cases: int, seed: int, size_scale: float = 1.0,
               covid_fraction: float = COVID_FRACTION, repeat_fraction: float = REPEAT_FRACTION,
               test_fraction: float = 0.0) -> list[CaseSpec]:
  """Draws patients, labels, target infection ratios and per-scan seeds (no rendering).

  Args:
    num_cases: number of scans.
    seed: master seed.
    size_scale: multiplies the voxel counts (spacing unchanged).
    covid_fraction: P(COVID) per patient.
    repeat_fraction: P(two scans) per patient (the last patient may get one if ``num_cases``
      runs out).
    test_fraction: P(a patient's scans are marked split "test"); the rest are "train".

  Returns:
    ``num_cases`` specs, patients in order.
  """
  if num_cases < 1:
    raise ValueError(f"num_cases must be >= 1, got {num_cases}")
  rng = np.random.default_rng([seed, 0x5E1])
  specs: list[CaseSpec] = []
  patient = 0
  while len(specs) < num_cases:
    label = int(rng.random() < covid_fraction)
    mu, sigma = COVID_LOG10_RATIO if label else CAP_LOG10_RATIO
    ratio = _truncated_log10_normal(rng, mu, sigma)
    anatomy_seed, grid_seed = (int(s) for s in rng.integers(0, 2**62, size=2))
    n_scans = 2 if rng.random() < repeat_fraction else 1
    split = "test" if rng.random() < test_fraction else "train"
    for k in range(min(n_scans, num_cases - len(specs))):
      if k:
        ratio = float(np.clip(ratio * math.exp(rng.normal(0.0, FOLLOWUP_LOG_SIGMA)), R_MIN, R_MAX))
      specs.append(CaseSpec(case_id=f"syn{len(specs):05d}", patient_id=f"P{patient:05d}",
                            label=label, target_ratio=ratio, anatomy_seed=anatomy_seed,
                            grid_seed=grid_seed, case_seed=int(rng.integers(0, 2**62)),
                            split=split, size_scale=float(size_scale)))
    patient += 1
  return specs


# ----------------------------------------------------------------------------- rendering.
def _interp_matrix(n_out: int, n_in: int) -> np.ndarray:
  """[n_out, n_in] Gaussian-kernel upsampling of white noise to unit-variance smooth noise."""
  pos = np.linspace(0.0, n_in - 1.0, n_out)
  w = np.exp(-0.5 * ((pos[:, None] - np.arange(n_in)[None, :]) / 0.7)**2)
  return (w / np.sqrt((w**2).sum(axis=1, keepdims=True))).astype(np.float32)


def smooth_noise(rng: np.random.Generator, shape: Sequence[int], cells: Sequence[int],
                 channels: int = 1) -> np.ndarray:
  """Smooth, roughly unit-variance noise: white noise on a coarse grid, upsampled separably.

  Args:
    rng: generator.
    shape: (D, H, W) output shape.
    cells: coarse grid size per axis (more cells = finer texture).
    channels: independent fields to draw at once.

  Returns:
    float32 [channels, D, H, W].
  """
  coarse = rng.standard_normal((channels, *cells), dtype=np.float32)
  mz, my, mx = (_interp_matrix(n, c) for n, c in zip(shape, cells))
  out = coarse @ mx.T  # [c, d, h, W]
  out = my @ out  # [c, d, H, W] (batched matmul over c, d)
  c, d = out.shape[:2]
  out = mz @ out.reshape(c, d, -1)  # [c, D, H * W]
  return out.reshape(channels, *shape)


@dataclasses.dataclass
class _Grid:
  shape: tuple[int, int, int]  # (D, H, W)
  spacing: tuple[float, float, float]  # (x, y, z) mm
  orientation: str
  intercept: bool


def _draw_grid(spec: CaseSpec) -> _Grid:
  rng = np.random.default_rng([spec.grid_seed, 1])
  s = spec.size_scale
  w = int(round(rng.integers(WIDTH_RANGE[0], WIDTH_RANGE[1] + 1) * s))
  h = max(int(round(WIDTH_RANGE[0] * s)), w - int(round(rng.integers(0, 25) * s)))
  d = int(round(rng.integers(DEPTH_RANGE[0], DEPTH_RANGE[1] + 1) * s))
  w, h, d = max(w, 12), max(h, 12), max(d, 8)
  sxy = float(np.round(rng.uniform(*INPLANE_SPACING_MM), 4))
  sz = float(np.round(rng.uniform(*SLICE_SPACING_MM), 3))
  orientation = ORIENTATIONS[int(rng.integers(len(ORIENTATIONS)))]
  return _Grid((d, h, w), (sxy, sxy, sz), orientation, bool(rng.random() < INTERCEPT_FRACTION))


def _ellipse(u, v, cu, cv, au, av):
  return ((u - cu) / au)**2 + ((v - cv) / av)**2


def _vessel_points(rng: np.random.Generator, side: float, lung_c: tuple[float, float],
                   lung_axes: tuple[float, float], w_half: float, step: float,
                   num_roots: int = 12, generations: int = 6
                   ) -> tuple[np.ndarray, np.ndarray]:
  """Branching trees from the hilum of one lung, in normalised (u, v, w) coordinates.

  Every branch splits in two (angles 20-40 degrees, length x 0.7-0.9, amplitude x 0.85), one
  generation at a time, vectorised over the branches of a generation.

  Returns:
    points float32 [P, 3] (u, v, w) and amplitudes float32 [P] (large near the hilum).
  """
  hilum = np.array([lung_c[0] - side * 0.55 * lung_axes[0], lung_c[1], 0.0], np.float32)
  # Roots fan out laterally, up, down, forwards and backwards from the hilum.
  d = rng.normal(0.0, 1.0, (num_roots, 3)).astype(np.float32)
  d[:, 0] = side * np.abs(d[:, 0]) + side * 0.6
  d[:, 2] *= 2.5 * w_half / max(lung_axes[1], 1e-3)
  d /= np.linalg.norm(d, axis=1, keepdims=True)
  p0 = np.repeat(hilum[None], num_roots, 0)
  length = np.full(num_roots, 0.45 * lung_axes[0], np.float32)
  amp = np.full(num_roots, 1.0, np.float32)
  pts, amps = [], []
  for gen in range(generations + 1):
    m = max(2, int(math.ceil(float(length.max()) / step)))
    tt = np.linspace(0.0, 1.0, m, dtype=np.float32)[None, :, None]
    seg = p0[:, None, :] + tt * (length[:, None, None] * d[:, None, :])  # [n, m, 3]
    pts.append(seg.reshape(-1, 3))
    amps.append(np.repeat(amp, m))
    if gen == generations:
      break
    n = d.shape[0]
    perp = rng.normal(0.0, 1.0, (2 * n, 3)).astype(np.float32)
    dd = np.repeat(d, 2, 0)
    perp -= (perp * dd).sum(1, keepdims=True) * dd
    perp /= np.linalg.norm(perp, axis=1, keepdims=True) + 1e-6
    angle = rng.uniform(0.35, 0.7, 2 * n).astype(np.float32)[:, None]
    d = np.cos(angle) * dd + np.sin(angle) * perp
    d /= np.linalg.norm(d, axis=1, keepdims=True)
    p0 = np.repeat(seg[:, -1, :], 2, 0)
    length = np.repeat(length, 2) * rng.uniform(0.7, 0.9, 2 * n).astype(np.float32)
    amp = np.repeat(amp, 2) * 0.85
  return np.concatenate(pts), np.concatenate(amps)


def _splat(shape: tuple[int, int, int], zyx: np.ndarray, amp: np.ndarray,
           z_blur: float = 0.25) -> np.ndarray:
  """Points summed into their nearest voxels, then a separable [w, 1 - 2w, w] blur per axis.

  Args:
    shape: (D, H, W).
    zyx: float [P, 3] voxel coordinates.
    amp: float [P] amplitudes.
    z_blur: w of the z blur (0.25 in-plane; less when slices are thicker than pixels).

  Returns:
    float32 [D, H, W].
  """
  idx = np.rint(zyx).astype(np.int64)
  ok = np.all((idx >= 0) & (idx < np.asarray(shape)), axis=1)
  flat = np.ravel_multi_index(tuple(idx[ok].T), shape)
  f = np.bincount(flat, weights=amp[ok], minlength=int(np.prod(shape))).astype(np.float32)
  f = f.reshape(shape)
  for axis, wgt in ((0, z_blur), (1, 0.25), (2, 0.25)):
    g = f * (1.0 - 2.0 * wgt)
    lo = [slice(None)] * 3
    hi = [slice(None)] * 3
    lo[axis], hi[axis] = slice(1, None), slice(None, -1)
    g[tuple(lo)] += wgt * f[tuple(hi)]
    g[tuple(hi)] += wgt * f[tuple(lo)]
    f = g
  return f


def render_case(spec: CaseSpec) -> dict:
  """Renders one phantom in canonical RAS+ layout.

  BLAS is limited to one thread: the matrices are small and cases already run in parallel
  processes; multi-threaded OpenBLAS on a busy machine was 20-40x slower here.

  Returns:
    dict with ``hu`` int16 [D, H, W] (z, y, x; x to the patient's right, y anterior, z
    superior), ``lung`` / ``infection`` uint8 [D, H, W], ``spacing`` (x, y, z) mm, ``grid``
    (orientation and intercept of the stored file), ``ratio`` (from the masks).
  """
  from threadpoolctl import threadpool_limits  # scikit-learn dependency.

  with threadpool_limits(1, user_api="blas"):
    return _render_case(spec)


def _render_case(spec: CaseSpec) -> dict:
  grid = _draw_grid(spec)
  d, h, w = grid.shape
  sxy, _, sz = grid.spacing
  arng = np.random.default_rng([spec.anatomy_seed, 2])  # Patient anatomy.
  crng = np.random.default_rng([spec.case_seed, 3])  # This scan: noise, lesions, pose.

  # Normalised coordinates: u (x, +right) and v (y, +anterior) in units of W / 2; w (z) in the
  # same physical unit, so shapes are undistorted by anisotropic spacing; t = z / (D - 1).
  half = w / 2.0
  u = ((np.arange(w, dtype=np.float32) - (w - 1) / 2.0) / half)[None, None, :]
  v = ((np.arange(h, dtype=np.float32) - (h - 1) / 2.0) / half)[None, :, None]
  zz = np.arange(d, dtype=np.float32)
  wz = ((zz - (d - 1) / 2.0) * sz / (sxy * half))[:, None, None]
  t = (zz / max(d - 1, 1))[:, None, None]

  # Patient anatomy (shared by both scans of a patient), with a small per-scan pose shift.
  hv = (h / w) * 0.93  # Body must fit the (possibly shorter) y extent.
  body_a = arng.uniform(0.80, 0.92)
  body_b = min(arng.uniform(0.58, 0.72), hv)
  fat = arng.uniform(0.05, 0.13)  # Subcutaneous fat thickness, fraction of the body radius.
  shift_u, shift_v = crng.normal(0, 0.015, 2)
  uu, vv = u - shift_u, v - shift_v

  noise = smooth_noise(crng, (d, h, w), (max(4, d // 5), max(4, h // 5), max(4, w // 5)), 2)
  coarse = smooth_noise(arng, (d, h, w), (4, 5, 5), 1)[0]  # Smooth boundary wobble.

  e_body = _ellipse(uu, vv, 0.0, 0.0, body_a, body_b) + 0.03 * coarse
  cav_k = 1.0 - fat - 0.10
  ca, cb = body_a * cav_k, body_b * cav_k
  e_cav = _ellipse(uu, vv, 0.0, -0.02, ca, cb)

  vol = np.full((d, h, w), HU["air"], np.float32)
  np.copyto(vol, HU["fat"], where=e_body < 1.0)
  np.copyto(vol, HU["soft"], where=e_body < (1.0 - fat)**2)

  # Ribs: oblique bands at the cavity wall (bone where a z-phase pattern, shifted with the
  # angle, is high), absent near the anterior midline (costal cartilage).
  # Evaluated on the ring's pixels only ([D, pixels]), since the ring is the same every slice.
  angle = np.arctan2(vv, uu)[0]  # [H, W]
  n_ribs = arng.uniform(5.0, 7.0)
  ring = (e_cav[0] > 1.0) & (e_cav[0] < 1.17) & ~(np.abs(angle - np.pi / 2) < 0.5)
  ys, xs = np.nonzero(ring)
  phase = 0.35 * np.abs(np.cos(angle[ys, xs] / 2))
  rib_band = np.sin(2 * np.pi * (t[:, 0, 0, None] * n_ribs + phase[None, :])) > 0.35
  vol[:, ys, xs] = np.where(rib_band, HU["bone_cortex"] - 300.0, vol[:, ys, xs])

  # Spine (vertebral body with a cortical rim, canal) and sternum.
  spine_v = -cb * 1.02
  e_vert = _ellipse(uu, vv, 0.0, spine_v, 0.13, 0.11)
  np.copyto(vol, HU["bone_cortex"], where=e_vert < 1.0)
  np.copyto(vol, HU["bone_marrow"], where=e_vert < 0.6)
  np.copyto(vol, 20.0,
            where=(_ellipse(uu, vv, 0.0, spine_v - 0.15, 0.045, 0.045) < 1.0) & (e_body < 1.0))
  np.copyto(vol, HU["bone_marrow"],
            where=(_ellipse(uu, vv, 0.0, cb * 1.05, 0.09, 0.035) < 1.0) & (t < 0.85))

  # Inside the cavity: soft tissue; lungs are carved out of it below.
  inside = e_cav < 1.0
  np.copyto(vol, HU["soft"], where=inside)

  # Lungs: per side an ellipse hugging the cavity, scaled down towards the apex, above a
  # diaphragm dome (right dome higher: liver), minus mediastinum and heart.
  lung = np.zeros((d, h, w), bool)
  lung_e = np.full((d, h, w), 9.0, np.float32)  # Normalised radius inside its lung (periphery ~1).
  t_c = arng.uniform(0.4, 0.55)
  apex = arng.uniform(0.93, 0.99)
  scale_t = np.sqrt(np.clip(1 - ((t - t_c) / (apex - t_c))**2, 0, 1))
  scale_t = np.where(t < t_c, 1.0, scale_t)
  heart_c = (-0.15 * ca, 0.28 * cb)
  heart_ax = (0.42 * ca, 0.55 * cb)
  heart_t = np.clip(1 - ((t - 0.25) / 0.35)**2, 0, 1)  # Heart in the lower half.
  e_heart = _ellipse(uu, vv, heart_c[0], heart_c[1], heart_ax[0] * np.sqrt(heart_t) + 1e-3,
                     heart_ax[1] * np.sqrt(heart_t) + 1e-3)
  mediastinum = (np.abs(uu) < 0.16 * ca + 0.05 * coarse) & (vv > spine_v - 0.05)
  lung_info = []
  for side in (1.0, -1.0):  # +1 = right lung (x to the right in RAS).
    lc = (side * 0.52 * ca, -0.04 * cb)
    la, lb = 0.52 * ca, 0.98 * cb
    dome0 = arng.uniform(0.02, 0.08) + (0.04 if side > 0 else 0.0)
    dome_h = arng.uniform(0.15, 0.25)
    e_l = _ellipse(uu, vv, lc[0], lc[1], la * scale_t + 1e-3, lb * scale_t + 1e-3)
    dome = dome0 + dome_h * np.clip(1 - _ellipse(uu, vv, lc[0], lc[1] - 0.2 * lb, la, lb), 0, 1)
    this = ((e_l + 0.12 * coarse) < 1.0) & (e_cav < 0.97) & (t > dome) & (t < apex)
    this &= ~mediastinum & ~(e_heart < 1.15)
    lung |= this
    lung_e = np.where(this, np.sqrt(np.maximum(e_l, 0)), lung_e)
    lung_info.append((side, lc, (la, lb)))
    # Below the dome: liver (right) or spleen/stomach (left) instead of soft tissue.
    below = inside & (t <= dome) & (e_l < 1.0)
    np.copyto(vol, HU["liver"] if side > 0 else HU["soft"], where=below)
    if side < 0 and arng.random() < 0.5:  # Stomach gas bubble under the left dome.
      bubble = _ellipse(uu, vv, lc[0] + 0.1 * la, lc[1] + 0.3 * lb, 0.25 * la, 0.2 * lb) + (
          (t - dome0 * 0.5) / 0.06)**2
      np.copyto(vol, HU["air"], where=below & (bubble < 1.0))

  # Heart, aorta (ascending arch in the upper third, descending beside the spine).
  np.copyto(vol, HU["blood"], where=e_heart < 1.0)
  np.copyto(vol, HU["fat"] + 40.0, where=mediastinum & inside & ~lung & (e_heart >= 1.0))
  desc = _ellipse(uu, vv, -0.14, spine_v + 0.13, 0.08, 0.08) < 1.0
  np.copyto(vol, HU["blood"], where=desc & inside)
  arch = (_ellipse(uu, vv, -0.03, 0.1, 0.09, 0.09) < 1.0) & (t > 0.55) & (t < 0.8)
  np.copyto(vol, HU["blood"], where=arch)

  # Trachea above the carina, two main bronchi just below: air outside the lung mask.
  carina = arng.uniform(0.55, 0.65)
  trachea = (_ellipse(uu, vv, 0.0, 0.0, 0.07, 0.06) < 1.0) & (t > carina)
  bronchi = np.zeros_like(trachea)
  for side in (1.0, -1.0):
    bronchi |= (_ellipse(uu, vv, side * 0.11, -0.02, 0.045, 0.04) < 1.0) & (t > carina - 0.1) & (
        t <= carina)
  airway = (trachea | bronchi) & ~lung
  np.copyto(vol, HU["air"], where=airway)

  # Parenchyma: -850 HU with smooth texture and a gravity-dependent gradient (posterior denser).
  paren = HU["parenchyma"] + 18.0 * noise[0] + 35.0 * np.clip(-(vv / cb), -1, 1)
  np.copyto(vol, paren, where=lung)

  # Lesions.
  lung_idx = np.flatnonzero(lung)
  n_lung = lung_idx.size
  infection = np.zeros(d * h * w, bool)
  if n_lung:
    zi, yi, xi = np.unravel_index(lung_idx, (d, h, w))
    pu = u.reshape(-1)[xi]
    pv = v.reshape(-1)[yi]
    pw = wz.reshape(-1)[zi]
    pe = lung_e.reshape(-1)[lung_idx]
    lesion_field, cons_frac, ggo_hu, cons_hu = _lesions(crng, spec, half, pu, pv, pw, pe, n_lung,
                                                        noise[1].reshape(-1)[lung_idx])
    n_target = max(max(1, int(round(8 * spec.size_scale**3))),
                   int(round(spec.target_ratio * n_lung)))
    n_target = min(n_target, n_lung)
    thr = np.partition(lesion_field, n_lung - n_target)[n_lung - n_target]
    inf_local = lesion_field >= thr
    infection[lung_idx[inf_local]] = True
    # Blurry edges: opacity weight 0.5 at the mask boundary, 1 well inside, fading outside.
    rel = np.log(np.maximum(lesion_field, 1e-30) / max(thr, 1e-30))
    op = np.clip(0.5 + rel / 0.6, 0.0, 1.0)
    cons = np.clip((rel - cons_frac) / 0.3, 0.0, 1.0)
    les_hu = ggo_hu * (1 - cons) + cons_hu * cons
    flat = vol.reshape(-1)
    flat[lung_idx] = flat[lung_idx] * (1 - op) + les_hu * op
  infection = infection.reshape(d, h, w)

  # Vessels: branching trees splatted as small Gaussians, drawn only inside the lungs.
  vessel = np.zeros((d, h, w), np.float32)
  step = 0.7 / half
  for side, lc, axes in lung_info:
    # Vessel volume fraction ~ roots * length * cross-section / volume ~ roots / scale^2 (in
    # voxels), so the root count scales with scale^2 to keep it the same at every size.
    roots = max(1, int(round(VESSEL_ROOTS * spec.size_scale**2)))
    pts, amps = _vessel_points(arng, side, lc, axes, float(wz.max()), step, num_roots=roots)
    zyx = np.stack([pts[:, 2] * sxy * half / sz + (d - 1) / 2.0,
                    pts[:, 1] * half + (h - 1) / 2.0,
                    pts[:, 0] * half + (w - 1) / 2.0], -1)
    vessel += _splat((d, h, w), zyx, amps, z_blur=0.25 * min(1.0, sxy / sz))
  vs = np.clip(vessel / VESSEL_OPAQUE, 0.0, 1.0) * lung
  vol = vol * (1 - vs) + HU["vessel"] * vs

  # Scanner noise.
  vol += crng.standard_normal((d, h, w), dtype=np.float32) * crng.uniform(*NOISE_HU)
  hu = np.clip(np.rint(vol), -1024, 3071).astype(np.int16)
  lung_u8 = lung.astype(np.uint8)
  inf_u8 = infection.astype(np.uint8)
  ratio = float(inf_u8.sum(dtype=np.int64)) / float(max(lung_u8.sum(dtype=np.int64), 1))
  return dict(hu=hu, lung=lung_u8, infection=inf_u8, spacing=grid.spacing, grid=grid,
              ratio=ratio)


def _lesions(rng: np.random.Generator, spec: CaseSpec, half: float, pu, pv, pw, pe, n_lung, tex):
  """Lesion potential over lung voxels; thresholding it at a quantile gives the target volume.

  COVID: multifocal (count grows with the ratio), bilateral, foci centred in the subpleural
  shell (lung radius > 0.75), ground glass with consolidated cores. CAP: one or two foci, one
  lung (85 %), centred in the inner lung (radius < 0.65), elongated (segmental), consolidation
  with a ground-glass rim.

  Returns:
    (field float32 [n_lung], consolidation log-threshold, GGO HU, consolidation HU).
  """
  r = spec.target_ratio
  covid = spec.label == 1
  if covid:
    k = 1 + int(rng.poisson(1.5 + 5.0 * np.clip(math.log10(r / 1e-3) / 2.5, 0, 1)))
    k = min(k, 8)
    shell = pe > 0.75
    bilateral = rng.random() < 0.9
  else:
    k = 1 + int(rng.poisson(0.4))
    shell = pe < 0.65
    bilateral = rng.random() < 0.15
  if not shell.any():
    shell = np.ones_like(shell)
  sides = np.where(pu > 0, 1, -1)
  first_side = 1 if rng.random() < 0.5 else -1
  vol_per_focus = max(r * n_lung / k, 1.0)
  field = np.zeros(n_lung, np.float32)
  for j in range(k):
    side = first_side if (not bilateral or j % 2 == 0) else -first_side
    cand = np.flatnonzero(shell & (sides == side))
    if cand.size == 0:
      cand = np.flatnonzero(shell)
    c = cand[int(rng.integers(cand.size))]
    # Sigma in normalised units from the focus volume (a voxel is 1 / half units wide).
    rad = (vol_per_focus * 3 / (4 * math.pi))**(1 / 3) / half
    sig = rad * rng.uniform(0.7, 1.3, 3)
    if not covid:
      sig[int(rng.integers(3))] *= 1.8  # Segmental: elongated along one axis.
    d2 = ((pu - pu[c]) / sig[0])**2 + ((pv - pv[c]) / sig[1])**2 + ((pw - pw[c]) / sig[2])**2
    field = np.maximum(field, rng.uniform(0.8, 1.2) * np.exp(-0.5 * d2))
  field = field * np.exp(0.35 * tex)  # Irregular margins.
  if covid:
    return field, rng.uniform(0.6, 1.5), rng.uniform(*COVID_GGO_HU), rng.uniform(
        *COVID_CONSOLIDATION_HU)
  return field, rng.uniform(0.05, 0.3), rng.uniform(*CAP_GGO_HU), rng.uniform(
      *CAP_CONSOLIDATION_HU)


# ------------------------------------------------------------------------------- writing.
def _affine_and_data(arr_zyx: np.ndarray, grid: _Grid) -> tuple[np.ndarray, np.ndarray]:
  """Canonical [D, H, W] array -> NIfTI (i, j, k) data and affine in ``grid.orientation``."""
  data = np.ascontiguousarray(arr_zyx.transpose(2, 1, 0))  # (x, y, z), RAS+.
  nx, ny, nz = data.shape
  sx, sy, sz = grid.spacing
  ras = np.diag([sx, sy, sz, 1.0])
  ras[:3, 3] = [-(nx - 1) / 2 * sx, -(ny - 1) / 2 * sy, -(nz - 1) / 2 * sz]
  flip = np.eye(4)
  for axis, (code, pos) in enumerate(zip(grid.orientation, "RAS")):
    if code != pos:  # Stored axis runs the other way: reverse data, negate the axis column.
      data = np.flip(data, axis)
      flip[axis, axis] = -1.0
      flip[axis, 3] = data.shape[axis] - 1
  return np.ascontiguousarray(data), ras @ flip


def _save(path: Path, arr_zyx: np.ndarray, grid: _Grid, intercept: bool) -> None:
  data, affine = _affine_and_data(arr_zyx, grid)
  if intercept:
    data = (data.astype(np.int32) + 1024).astype(np.int16)
  img = nib.Nifti1Image(data, affine)
  img.header.set_xyzt_units("mm", "sec")
  img.set_qform(affine, code=1)
  img.set_sform(affine, code=1)
  if intercept:
    img.header.set_slope_inter(1.0, -1024.0)
  with files.atomic_path(path, suffix=".nii.gz") as tmp:  # Unique: generators may run at once.
    img.to_filename(str(tmp))


def _write_case(args: tuple[CaseSpec, str]) -> dict:
  spec, out_dir = args
  out = Path(out_dir)
  case = render_case(spec)
  name = f"{spec.case_id}.nii.gz"
  grid = case["grid"]
  _save(out / "images" / name, case["hu"], grid, grid.intercept)
  _save(out / "lung_masks" / name, case["lung"], grid, False)
  _save(out / "infection_masks" / name, case["infection"], grid, False)
  return dict(case_id=spec.case_id, patient_id=spec.patient_id,
              label="covid" if spec.label else "cap", image=f"images/{name}",
              lung_mask=f"lung_masks/{name}", infection_mask=f"infection_masks/{name}",
              infection_ratio=repr(case["ratio"]), split=spec.split)


MANIFEST_COLUMNS = ("case_id", "patient_id", "label", "image", "lung_mask", "infection_mask",
                    "infection_ratio", "split")


def generate(out_dir: str | os.PathLike, num_cases: int, seed: int, size_scale: float = 1.0,
             *, covid_fraction: float = COVID_FRACTION, repeat_fraction: float = REPEAT_FRACTION,
             test_fraction: float = 0.0, num_workers: int | None = None,
             progress: bool = True) -> Path:
  """Writes ``num_cases`` phantoms, their masks and ``manifest.csv`` under ``out_dir``.

  Args:
    out_dir: output folder (created).
    num_cases: number of scans.
    seed: master seed; same seed -> identical files.
    size_scale: multiplies the voxel counts (1.0: 48-80 x 96-128 x 96-128).
    covid_fraction: P(COVID) per patient.
    repeat_fraction: P(a patient has two scans).
    test_fraction: P(a patient is in the independent test split).
    num_workers: processes; None -> ``os.cpu_count()``; 0 or 1 = in process.
    progress: show a tqdm bar.

  Several processes may call this on one ``out_dir`` at once: the first writes the set while
  holding ``out_dir/.generate.lock``; the others wait, then keep its set when their parameters
  are the same (``.generate.json``) and write it again otherwise. Every file is written under a
  temporary name of its own and renamed.

  Returns:
    Path of the manifest CSV.
  """
  out = Path(out_dir)
  for sub in ("images", "lung_masks", "infection_masks"):
    (out / sub).mkdir(parents=True, exist_ok=True)
  params = dict(num_cases=num_cases, seed=seed, size_scale=size_scale,
                covid_fraction=covid_fraction, repeat_fraction=repeat_fraction,
                test_fraction=test_fraction)
  with _generation(out, params) as finished:
    if finished:
      return out / "manifest.csv"
    specs = plan_cases(num_cases, seed, size_scale, covid_fraction, repeat_fraction,
                       test_fraction)
    rows = _write_cases(specs, out, num_workers, progress)
    files.write_text(out / PARAMS_FILE, json.dumps(params, sort_keys=True))
    return _write_manifest(out, rows)


PARAMS_FILE = ".generate.json"  # The parameters of the set, written just before the manifest.


@contextlib.contextmanager
def _generation(out: Path, params: dict):
  """Holds ``out/.generate.lock`` (``dsan_jax.run_lock``) while the set is written.

  Yields True when another process held it and has meanwhile finished the same set (same
  parameters): that set is kept instead of being written again.
  """
  lock, waited = run_lock.OwnerLock(out / ".generate.lock"), []

  def on_wait(owner):
    waited.append(owner)
    log.info("waiting for %s, which is generating the phantoms in %s",
             owner.describe() if owner else "another process", out)

  lock.acquire(wait=True, on_wait=on_wait)
  try:
    try:
      same = waited and (out / "manifest.csv").exists() and json.loads(
          (out / PARAMS_FILE).read_text()) == json.loads(json.dumps(params, sort_keys=True))
    except (OSError, ValueError):
      same = False
    yield bool(same)
  finally:
    lock.release()


def _write_cases(specs, out: Path, num_workers: int | None, progress: bool) -> list[dict]:
  jobs = [(s, str(out)) for s in specs]
  workers = (os.cpu_count() or 1) if num_workers is None else num_workers
  workers = max(1, min(workers, len(jobs)))
  from tqdm import tqdm  # Deferred: only the writer needs it.

  bar = tqdm(total=len(jobs), desc="phantoms", unit="case", disable=not progress)
  rows = []
  if workers == 1:
    for job in jobs:
      rows.append(_write_case(job))
      bar.update()
  else:
    # spawn, not fork: callers (train.py) may hold JAX threads, which fork copies broken.
    with multiprocessing.get_context("spawn").Pool(workers) as pool:
      for row in pool.imap(_write_case, jobs, chunksize=4):
        rows.append(row)
        bar.update()
  bar.close()
  return rows


def _write_manifest(out: Path, rows: list[dict]) -> Path:
  manifest = out / "manifest.csv"
  with files.atomic_path(manifest) as tmp, open(tmp, "w", newline="") as f:
    writer = csv.DictWriter(f, fieldnames=MANIFEST_COLUMNS)
    writer.writeheader()
    writer.writerows(rows)
  return manifest


def read_canonical(path: str | os.PathLike) -> tuple[np.ndarray, np.ndarray]:
  """Reads a NIfTI in canonical RAS+ [D, H, W] layout (HU with slope/intercept applied).

  A small reader of its own keeps this module independent of ``dsan_jax.data.io``.

  Returns:
    (array float32 or stored-dtype [D, H, W], spacing (x, y, z) mm float64 [3]).
  """
  img = nib.as_closest_canonical(nib.load(str(path)))
  data = np.asanyarray(img.dataobj)
  return np.ascontiguousarray(data.transpose(2, 1, 0)), np.asarray(img.header.get_zooms()[:3],
                                                                   np.float64)


def preview(manifest: str | os.PathLike, png: str | os.PathLike, max_cases: int = 8) -> Path:
  """Montage of the first cases: axial slice through the most infected level, and coronal.

  Lung boundary in green, infection boundary in red, CT window [-1350, 150] HU.
  """
  import matplotlib  # Deferred: plotting is optional.

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  manifest = Path(manifest)
  with open(manifest, newline="") as f:
    rows = list(csv.DictReader(f))[:max_cases]
  fig, axes = plt.subplots(2, len(rows), figsize=(2.6 * len(rows), 5.4), squeeze=False)
  for j, row in enumerate(rows):
    img, sp = read_canonical(manifest.parent / row["image"])
    lung, _ = read_canonical(manifest.parent / row["lung_mask"])
    inf, _ = read_canonical(manifest.parent / row["infection_mask"])
    z = int(np.argmax(inf.sum(axis=(1, 2)))) if inf.any() else img.shape[0] // 2
    y = int(np.argmax(inf.sum(axis=(0, 2)))) if inf.any() else img.shape[1] // 2
    for i, (im, lm, fm, aspect, title) in enumerate((
        (img[z], lung[z], inf[z], 1.0, f"z={z}"),
        (img[:, y], lung[:, y], inf[:, y], sp[2] / sp[0], f"y={y}"))):
      ax = axes[i, j]
      # Axial: anterior up, patient's right on the image left (radiological convention).
      if i == 0:
        im, lm, fm = im[::-1, ::-1], lm[::-1, ::-1], fm[::-1, ::-1]
      else:
        im, lm, fm = im[::-1, ::-1], lm[::-1, ::-1], fm[::-1, ::-1]
      ax.imshow(np.clip((im + 1350.0) / 1500.0, 0, 1), cmap="gray", aspect=aspect,
                interpolation="nearest")
      if lm.any():
        ax.contour(lm, levels=[0.5], colors="lime", linewidths=0.5)
      if fm.any():
        ax.contour(fm, levels=[0.5], colors="red", linewidths=0.6)
      ax.set_xticks([])
      ax.set_yticks([])
      if i == 0:
        ax.set_title(f"{row['case_id']} {row['label']}\nr={float(row['infection_ratio']):.4f}",
                     fontsize=8)
      else:
        ax.set_title(title, fontsize=7)
  fig.tight_layout()
  png = Path(png)
  fig.savefig(png, dpi=90)
  plt.close(fig)
  return png


def main(argv: Sequence[str] | None = None) -> int:
  parser = argparse.ArgumentParser(
      prog="python -m dsan_jax.data.synthetic",
      description="Write synthetic chest-CT phantoms (NIfTI) with lung/infection masks and a "
                  "manifest.csv.")
  parser.add_argument("--out", required=True, help="output folder")
  parser.add_argument("--cases", type=int, default=200, help="number of scans")
  parser.add_argument("--seed", type=int, default=0)
  parser.add_argument("--size-scale", type=float, default=1.0,
                      help="multiplies voxel counts (1.0: 48-80 x 96-128 x 96-128)")
  parser.add_argument("--covid-fraction", type=float, default=COVID_FRACTION)
  parser.add_argument("--repeat-fraction", type=float, default=REPEAT_FRACTION)
  parser.add_argument("--test-fraction", type=float, default=0.0)
  parser.add_argument("--workers", type=int, default=None, help="processes (default: all CPUs)")
  parser.add_argument("--preview", default=None, metavar="PNG",
                      help="also write a montage of the first 8 cases")
  args = parser.parse_args(argv)
  t0 = time.perf_counter()
  manifest = generate(args.out, args.cases, args.seed, args.size_scale,
                      covid_fraction=args.covid_fraction, repeat_fraction=args.repeat_fraction,
                      test_fraction=args.test_fraction, num_workers=args.workers)
  print(f"wrote {args.cases} cases and {manifest} in {time.perf_counter() - t0:.1f} s")
  if args.preview:
    print(f"preview: {preview(manifest, args.preview)}")
  return 0


if __name__ == "__main__":
  raise SystemExit(main())
