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

from absl import flags
import nibabel as nib
import numpy as np

from dsan_jax import cli_flags, files, run_lock

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
# Patient size in mm, per patient (docs/synthetic.md, "Grid and header"): adult chests.
BODY_HALF_WIDTH_MM = (145.0, 185.0)  # Half the transverse chest diameter (290-370 mm wide).
BODY_AP_RATIO = (0.66, 0.82)  # Half the AP diameter, as a fraction of the half-width.
LUNG_HEIGHT_MM = (195.0, 265.0)  # Posterior costophrenic recess to the apex.
FOV_MARGIN_MM = (15.0, 60.0)  # Reconstruction field of view = chest width + this (square).
# Voxel size at size_scale = 1 (divided by size_scale): coarse, a few times a clinical CT's.
INPLANE_SPACING_MM = (3.2, 4.2)
SLICE_SPACING_MM = (4.0, 6.0)
ORIENTATIONS = ("RAS", "LAS", "LPS")  # Stored axis codes, drawn uniformly per patient.
INTERCEPT_FRACTION = 0.5  # Fraction stored as HU + 1024 with scl_inter = -1024.
# ---------------------------------------------------------------------------- intensities.
HU = dict(air=-1000.0, fat=-100.0, soft=40.0, blood=45.0, liver=55.0, bone_marrow=350.0,
          bone_cortex=950.0, rib=650.0, csf=15.0, parenchyma=-865.0, vessel=40.0,
          bronchus=-1000.0)
NOISE_HU = (8.0, 20.0)  # Std of the additive white noise, uniform per scan.
# Lesion densities (HU of the opacified parenchyma, before vessels and bronchi are mixed in).
COVID_GGO_HU = (-720.0, -480.0)
COVID_CONSOLIDATION_HU = (-150.0, 0.0)
CRAZY_PAVING_HU = (80.0, 160.0)  # Added on thickened interlobular septa (period ~12 mm).
CAP_GGO_HU = (-650.0, -400.0)
CAP_CONSOLIDATION_HU = (-60.0, 40.0)
CAP_BRONCHOPNEUMONIA_FRACTION = 0.25  # CAP cases with patchy peribronchial foci, not lobar.
CAP_BILATERAL = 0.2  # P(a lobar CAP also involves a lobe of the other lung).
VESSEL_ROOTS = 8  # Arterial trees per lung (lobar/segmental arteries from the hilum).
VESSEL_GENERATIONS = 6  # Bifurcations: root diameter 8 mm -> ~1.8 mm at the periphery.
LOBES = ("", "RUL", "RML", "RLL", "LUL", "LLL")  # Lobe ids 1..5 (0 = not lung).


@dataclasses.dataclass(frozen=True)
class Diagnostic:
  """Contrast changes for ablations (docs/testbed.md, "Ablations (session 6)"): NOT the testbed.

  The defaults change nothing: a knob at 1.0 is skipped, so the committed phantoms stay
  byte-identical.
  """
  lesion_contrast: float = 1.0  # Multiplies the HU change of the lesion and its margin.
  vessel_contrast: float = 1.0  # Multiplies the vessels' volume fraction (0: no vessels).


@dataclasses.dataclass(frozen=True)
class CaseSpec:
  """Everything needed to render one scan (drawn by ``plan_cases``)."""
  case_id: str
  patient_id: str
  label: int  # 1 = COVID, 0 = CAP.
  target_ratio: float
  anatomy_seed: int  # Shared by the scans of one patient.
  grid_seed: int  # Shared by the scans of one patient: body size, grid, spacing, orientation.
  case_seed: int  # Per scan: noise, pose and lesions.
  split: str
  size_scale: float
  diagnostic: Diagnostic | None = None  # Ablations only; None = the testbed.


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
  body_mm: tuple[float, float] = (160.0, 110.0)  # Half-width A and half-depth B of the chest.
  lung_height_mm: float = 230.0
  z0_mm: float = -40.0  # z of the first slice; z = 0 is the lowest point of the lungs.


def _draw_grid(spec: CaseSpec) -> _Grid:
  """Patient size (mm) and the scan grid that covers it, from the patient's grid seed."""
  rng = np.random.default_rng([spec.grid_seed, 1])
  s = spec.size_scale
  a = float(rng.uniform(*BODY_HALF_WIDTH_MM))
  b = a * float(rng.uniform(*BODY_AP_RATIO))
  lung_h = float(rng.uniform(*LUNG_HEIGHT_MM))
  below, above = rng.uniform(25.0, 60.0), rng.uniform(15.0, 40.0)  # Scan range past the lungs.
  fov = 2 * a + rng.uniform(*FOV_MARGIN_MM)
  fov_y = max(2 * b + 30.0, fov - rng.uniform(0.0, 80.0))  # Rows may be cropped to the body.
  sxy = float(np.round(rng.uniform(*INPLANE_SPACING_MM) / s, 4))
  sz = float(np.round(rng.uniform(*SLICE_SPACING_MM) / s, 3))
  w = max(12, int(round(fov / sxy)))
  h = max(12, int(round(fov_y / sxy)))
  d = max(8, int(round((lung_h + below + above) / sz)) + 1)
  orientation = ORIENTATIONS[int(rng.integers(len(ORIENTATIONS)))]
  return _Grid((d, h, w), (sxy, sxy, sz), orientation, bool(rng.random() < INTERCEPT_FRACTION),
               (a, b), lung_h, float(-below))


def _vessel_tree(rng: np.random.Generator, hila: np.ndarray, step: float,
                 num_roots: int = VESSEL_ROOTS, generations: int = VESSEL_GENERATIONS
                 ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """Branching arterial trees from both hila, in mm (x, y, z), with their bronchi.

  ``num_roots`` trees per lung fan out laterally, up, down, forwards and back. Every branch
  splits in two (angles 20-40 degrees, length x 0.72-0.88, diameter x 0.78, about Murray's law
  2^(-1/3)); roots start 8 mm wide, spread along the hilum (SD 4, 8, 20 mm in x, y, z), one generation at a time, vectorised over all branches of a generation.

  Args:
    hila: float [2, 3] hilum of the right and the left lung.

  Returns:
    points float32 [P, 3] (x, y, z) mm, diameters float32 [P] mm, and unit vectors
    float32 [P, 3] perpendicular to each branch (the accompanying bronchus lies along it).
  """
  side = np.repeat(np.array([1.0, -1.0], np.float32), num_roots)
  d = rng.normal(0.0, 1.0, (2 * num_roots, 3)).astype(np.float32)
  d[:, 0] = side * (np.abs(d[:, 0]) + 0.4)
  d[:, 2] *= 1.5
  d /= np.linalg.norm(d, axis=1, keepdims=True)
  p0 = np.repeat(hila.astype(np.float32), num_roots, 0)  # Roots spread along the hilum.
  p0 += rng.normal(0.0, 1.0, p0.shape).astype(np.float32) * np.array([4.0, 8.0, 20.0], np.float32)
  length = np.full(2 * num_roots, 38.0, np.float32)
  diam = np.full(2 * num_roots, 8.0, np.float32)
  pts, diams, perps = [], [], []
  up = np.array([0.0, 0.0, 1.0], np.float32)
  for gen in range(generations + 1):
    m = max(2, int(math.ceil(float(length.max()) / step)))
    tt = np.linspace(0.0, 1.0, m, dtype=np.float32)[None, :, None]
    seg = p0[:, None, :] + tt * (length[:, None, None] * d[:, None, :])  # [n, m, 3]
    perp = np.cross(d, up) + np.array([0.0, 1e-3, 0.0], np.float32)
    perp /= np.sqrt((perp**2).sum(1, keepdims=True))
    pts.append(seg.reshape(-1, 3))
    diams.append(np.repeat(diam, m))
    perps.append(np.repeat(perp, m, 0))
    if gen == generations:
      break
    n = d.shape[0]
    rnd = rng.normal(0.0, 1.0, (2 * n, 3)).astype(np.float32)
    dd = np.repeat(d, 2, 0)
    rnd -= (rnd * dd).sum(1, keepdims=True) * dd
    rnd /= np.sqrt((rnd**2).sum(1, keepdims=True)) + 1e-6
    angle = rng.uniform(0.35, 0.7, 2 * n).astype(np.float32)[:, None]
    d = np.cos(angle) * dd + np.sin(angle) * rnd
    d /= np.sqrt((d**2).sum(1, keepdims=True))
    p0 = np.repeat(seg[:, -1, :], 2, 0)
    length = np.repeat(length, 2) * rng.uniform(0.72, 0.88, 2 * n).astype(np.float32)
    diam = np.repeat(diam, 2) * 0.78
  return np.concatenate(pts), np.concatenate(diams), np.concatenate(perps)


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
    superior), ``lung`` / ``infection`` uint8 [D, H, W], ``lobes`` uint8 [D, H, W] (ids of
    ``LOBES``, 0 outside the lungs), ``pleura_mm`` float32 [D, H, W] (distance to the costal
    or diaphragmatic pleura inside the lungs, 0 elsewhere), ``spacing`` (x, y, z) mm, ``grid``
    (orientation and intercept of the stored file), ``ratio`` (from the masks), ``pattern``
    ("covid", "lobar" or "bronchopneumonia").
  """
  from threadpoolctl import threadpool_limits  # scikit-learn dependency.

  with threadpool_limits(1, user_api="blas"):
    return _render_case(spec)


@dataclasses.dataclass
class _Frame:
  """Patient coordinates in mm (after the scan's pose shift), broadcastable to [D, H, W]."""
  x: np.ndarray  # [1, 1, W], + = patient's right.
  y: np.ndarray  # [1, H, 1], + = anterior.
  z: np.ndarray  # [D, 1, 1], + = superior, 0 = lowest lung point.
  shift: np.ndarray  # (x, y, z) mm pose shift.


def _frame(grid: _Grid, crng: np.random.Generator) -> _Frame:
  d, h, w = grid.shape
  sx, sy, sz = grid.spacing
  shift = np.array([*crng.normal(0.0, 4.0, 2), crng.normal(0.0, 6.0)], np.float32)
  x = ((np.arange(w, dtype=np.float32) - (w - 1) / 2.0) * sx - shift[0])[None, None, :]
  y = ((np.arange(h, dtype=np.float32) - (h - 1) / 2.0) * sy - shift[1])[None, :, None]
  z = (grid.z0_mm + np.arange(d, dtype=np.float32) * sz - shift[2])[:, None, None]
  return _Frame(x, y, z, shift)


def _chest_wall(vol: np.ndarray, f: _Frame, grid: _Grid, arng: np.random.Generator) -> dict:
  """Skin, subcutaneous fat, muscle, ribs, spine and sternum; returns the cavity geometry.

  Returns:
    dict: ``wall`` (mm of chest wall), ``depth`` [H, W] (mm inside the skin along the ray
    from the centre), ``cavity`` bool [H, W], ``ac``/``bc`` cavity half-axes, ``yv`` (y of
    the vertebral body's centre).
  """
  a, b = grid.body_mm
  x2, y2 = f.x[0], f.y[0]  # [1, W], [H, 1]
  wob = smooth_noise(arng, (1, *vol.shape[1:]), (1, 5, 5))[0, 0]
  bp = np.where(y2 < 0, 0.97 * b, b)  # Flatter back.
  rho = np.sqrt((x2 / a)**2 + (y2 / bp)**2) * (1.0 + 0.02 * wob)
  depth = np.hypot(x2, y2) * (1.0 / np.maximum(rho, 1e-3) - 1.0)
  fat_t, musc_t, rib_t = arng.uniform(4.0, 16.0), arng.uniform(5.0, 10.0), 8.0
  wall = fat_t + musc_t + rib_t + 2.0
  vol[:, depth >= 0] = HU["fat"]
  vol[:, depth >= fat_t] = HU["soft"]
  # Ribs: ~11 mm bands every 24-30 mm, sloping down anteriorly, absent at the costal cartilages.
  angle = np.arctan2(np.broadcast_to(y2, depth.shape), np.broadcast_to(x2, depth.shape))
  ring = (depth > fat_t + musc_t) & (depth < fat_t + musc_t + rib_t) & ~(
      np.abs(angle - np.pi / 2) < 0.45)
  ys, xs = np.nonzero(ring)
  period = arng.uniform(24.0, 30.0)
  phase = (f.z[:, 0, 0, None] + 40.0 * np.broadcast_to(y2, depth.shape)[ys, xs][None] / b) / period
  vol[:, ys, xs] = np.where(np.mod(phase, 1.0) < 11.0 / period, HU["rib"], vol[:, ys, xs])
  ac, bc = a - wall, b - wall
  yv = -(0.97 * b - wall) + 14.0
  vert = ((x2 / 21.0)**2 + ((y2 - yv) / 18.0)**2)
  vol[:, vert < 1.0] = HU["bone_cortex"]
  vol[:, vert < 0.6] = HU["bone_marrow"]
  vol[:, (x2**2 + (y2 - yv + 30.0)**2 < 64.0) & (depth > 0)] = HU["csf"]  # Spinal canal.
  vol[:, ((x2 / 10.0)**2 + ((y2 - yv + 50.0) / 14.0)**2 < 1.0) & (depth > 0)] = HU["bone_marrow"]
  sternum = ((x2 / 16.0)**2 + ((y2 - (b - fat_t - musc_t * 0.5 - 4.0)) / 6.0)**2) < 1.0
  st_y, st_x = np.nonzero(sternum)
  st_z = np.nonzero(f.z[:, 0, 0] > 40.0)[0]
  vol[st_z[:, None], st_y[None], st_x[None]] = HU["bone_marrow"]
  cavity = (depth > wall) & ~(vert < 1.3)
  vol[:, cavity] = HU["soft"]
  return dict(wall=wall, depth=depth.astype(np.float32), cavity=cavity, ac=ac, bc=bc, yv=yv)


def _mediastinum(f: _Frame, lung_h: float, bc: float, yv: float, m: float, left_dome: float,
                 arng: np.random.Generator) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """Heart (ellipsoid value, < 1 inside), aorta and airway masks, broadcast to [D, H, W]."""
  x, y, z = f.x, f.y, f.z
  dome_top = (None, left_dome)
  zh = dome_top[1] + arng.uniform(20.0, 35.0)  # Heart on the left dome, left-anterior.
  heart = (((x + arng.uniform(10.0, 25.0)) / arng.uniform(48.0, 60.0))**2 +
           ((y - arng.uniform(0.1, 0.3) * bc) / arng.uniform(38.0, 50.0))**2 +
           ((z - zh) / arng.uniform(42.0, 55.0))**2)
  arch_z, carina_z = 0.74 * lung_h, 0.62 * lung_h
  aorta = (((x + 22.0)**2 + (y - yv - 8.0)**2 < 169.0) & (z < arch_z) |
           ((x - 10.0)**2 + (y - 0.3 * bc)**2 < 225.0) & (z > zh + 20.0) & (z < arch_z) |
           (((x + 6.0) / 32.0)**2 + ((y - 0.1 * bc) / (0.35 * bc))**2 < 1.0) &
           (np.abs(z - arch_z) < 12.0))
  yt = yv + 45.0
  zb = np.clip((carina_z - z) / 25.0, 0.0, 1.0)  # Main bronchi run from the carina to the hila.
  airway = (x**2 + (y - yt)**2 < 81.0) & (z > carina_z)
  for side in (1.0, -1.0):
    airway |= ((x - side * (m + 10.0) * zb)**2 + (y - yt + 5.0 * zb)**2 < 36.0) & (
        z > carina_z - 25.0) & (z <= carina_z)
  return heart, aorta, airway


def _lungs(vol: np.ndarray, f: _Frame, grid: _Grid, cw: dict, arng: np.random.Generator
           ) -> dict:
  """Mediastinum, heart, great vessels, airways, diaphragm, liver and the two lungs.

  Returns:
    dict: ``lung`` bool [D, H, W], ``dome`` [2, H, W] diaphragm height per side (right,
    left) in mm, ``hila`` float32 [2, 3] (x, y, z) mm, ``m`` mediastinal half-width,
    ``ylc`` y of the lungs' centre.
  """
  lung_h = grid.lung_height_mm
  ac, bc, yv, cavity = cw["ac"], cw["bc"], cw["yv"], cw["cavity"]
  x, y, z = f.x, f.y, f.z
  coarse = smooth_noise(arng, vol.shape, (4, 5, 5), 1)[0]
  m = arng.uniform(28.0, 42.0)  # Mediastinal half-width.
  ylc = -0.05 * bc
  dome_top = (arng.uniform(55.0, 80.0), arng.uniform(40.0, 65.0))  # Right dome higher (liver).
  domes = []
  for k, side in enumerate((1.0, -1.0)):
    xl = side * x[0]
    dome = dome_top[k] * np.clip(1 - ((xl - 0.5 * ac) / (0.9 * ac))**2 -
                                 ((y[0] - 0.15 * bc) / (1.1 * bc))**2, 0, 1)
    domes.append(dome.astype(np.float32))
  dome = np.stack(domes)  # [2, H, W]
  # Abdomen under the domes: liver on the right (and across the midline), stomach on the left.
  below_r = cavity & (x[0] > -40.0)
  vol[(z <= dome[0]) & below_r] = HU["liver"]
  if arng.random() < 0.5:  # Stomach gas bubble under the left dome.
    bub = ((x + 0.45 * ac) / 35.0)**2 + ((y - 0.2 * bc) / 30.0)**2 + ((z - dome[1] + 25.0) / 18.0)**2
    vol[(bub < 1.0) & (z < dome[1]) & cavity] = HU["air"]
  heart, aorta, airway = _mediastinum(f, lung_h, bc, yv, m, dome_top[1], arng)
  inside = cavity[None] & (z > np.min(dome, 0) - 60.0)
  med = inside & (np.abs(x) < m + 4.0 * coarse) & (z > 0)
  vol[med] = HU["fat"] + 40.0
  vol[(heart < 1.0) & inside] = HU["blood"]
  vol[aorta & inside] = HU["blood"]
  vol[airway & inside] = HU["air"]
  lung = np.zeros(vol.shape, bool)
  zc = 0.45 * lung_h
  for k, side in enumerate((1.0, -1.0)):
    xl = side * x
    apex = lung_h + arng.uniform(-8.0, 8.0)
    taper = np.sqrt(np.clip(1 - ((z - zc) / (apex - zc))**2, 0, 1))
    taper = np.where(z < zc, 1.0, taper) + 1e-3
    half = 0.5 * (ac - m)  # A boxy (power-4) section fills the cavity; it shrinks to the apex.
    cone = ((xl - m - half) / (half * taper))**4 + ((y - ylc) / (bc * taper))**4 < 1.0
    lung |= (cavity[None] & (xl > m + 6.0 + 4.0 * coarse) & (z > dome[k]) & (z < apex) & cone &
             (heart > 1.1) & ~aorta & ~airway)
  vol[lung] = HU["parenchyma"]
  hila = np.array([[side * (m + 15.0), ylc + 0.1 * bc, 0.55 * lung_h] for side in (1.0, -1.0)],
                  np.float32)
  return dict(lung=lung, dome=dome, hila=hila, m=m, ylc=ylc, coarse=coarse)


def _lobes(px: np.ndarray, py: np.ndarray, pz: np.ndarray, coarse: np.ndarray, lung_h: float,
           ylc: float, bc: float) -> np.ndarray:
  """Lobe ids (``LOBES``) of lung voxels from the fissures.

  Oblique fissure: from about 3/4 of the lung height posteriorly down to the diaphragm
  anteriorly (lower lobe behind and below it); right horizontal fissure at ~0.56 of the height
  (middle lobe below it, in front of the oblique fissure).

  Args:
    px, py, pz: float [N] mm coordinates; coarse: float [N] smooth noise (fissure undulation).

  Returns:
    uint8 [N].
  """
  zn = pz / lung_h
  yn = (py - ylc) / bc
  lower = zn < 0.50 - 0.35 * yn + 0.03 * coarse
  right = px > 0
  lobe = np.where(right, np.where(lower, 3, np.where(zn < 0.60 + 0.02 * coarse, 2, 1)),
                  np.where(lower, 5, 4))
  return lobe.astype(np.uint8)


@dataclasses.dataclass
class _LungVoxels:
  """Per-lung-voxel geometry (all [N]) used to place lesions."""
  p: np.ndarray  # float32 [N, 3] (x, y, z) mm.
  side: np.ndarray  # int8: +1 right lung, -1 left lung.
  lobe: np.ndarray  # uint8 lobe ids (``LOBES``).
  pleura: np.ndarray  # float32 mm to the costal or diaphragmatic pleura.
  hilum: np.ndarray  # float32 mm to the hilum of its lung.
  gravity: np.ndarray  # float32 in [0, 1]: 1 = most dependent (posterior, supine).
  tex: np.ndarray  # float32 smooth unit noise (irregular margins).
  hila: np.ndarray  # float32 [2, 3] (right, left) hilum positions.
  voxel_mm3: float


def _top_n(score: np.ndarray, n: int) -> np.ndarray:
  """bool [N]: exactly the ``n`` largest entries (argpartition breaks ties)."""
  out = np.zeros(score.shape, bool)
  n = int(min(max(n, 0), score.size))
  if n:
    out[np.argpartition(-score, n - 1)[:n]] = True
  return out


def _foci_field(rng: np.random.Generator, lv: _LungVoxels, weight: np.ndarray,
                sides: np.ndarray, vol_per_focus: float) -> np.ndarray:
  """Max of Gaussian foci, one per entry of ``sides``, centred by ``weight`` in that lung.

  Returns:
    float32 [N] in [0, 1.2].
  """
  field = np.zeros(lv.side.shape, np.float32)
  for s in sides:
    w = weight * (lv.side == s)
    w = w if w.sum() > 0 else weight
    c = int(rng.choice(w.size, p=w / w.sum()))
    rad = (3.0 * vol_per_focus * rng.uniform(0.5, 1.5) / (4.0 * math.pi))**(1.0 / 3.0)
    sig = max(rad, 3.0) * rng.uniform(0.6, 1.4, 3).astype(np.float32)
    d2 = (((lv.p - lv.p[c]) / sig)**2).sum(1)
    field = np.maximum(field, rng.uniform(0.8, 1.2) * np.exp(-0.5 * d2))
  return field


def _segment_score(rng: np.random.Generator, lv: _LungVoxels, side: int) -> np.ndarray:
  """Lobar/segmental consolidation: a score whose ``n`` largest voxels are the lesion.

  The lesion grows from a juxtapleural seed in one lobe.

  The distance is measured in a cone from the hilum through the seed (a segment is a wedge
  with its apex at the hilum and its base on the pleura); the lobe fills before the region
  crosses a fissure into a neighbouring lobe, and the other lung only when this one is full.
  """
  on = lv.side == side
  lobes = (1, 2, 3) if side > 0 else (4, 5)
  pref = {1: 1.0, 2: 0.7, 3: 1.5, 4: 1.0, 5: 1.5}  # Lower lobes most often (aspiration, gravity).
  vols = np.array([pref[k] * np.count_nonzero(lv.lobe == k) for k in lobes], np.float64)
  lobe = lobes[int(rng.choice(len(lobes), p=vols / vols.sum()))] if vols.sum() else lobes[0]
  inl = lv.lobe == lobe
  w = inl * np.exp(-lv.pleura / 15.0)
  seed = int(rng.choice(w.size, p=w / w.sum())) if w.sum() > 0 else int(np.flatnonzero(on)[0])
  hil = lv.hila[0 if side > 0 else 1]
  u = lv.p[seed] - hil
  ru = max(float(np.linalg.norm(u)), 1.0)
  u = u / ru
  dv = lv.p - lv.p[seed]
  along = dv @ u
  perp = np.linalg.norm(dv - along[:, None] * u[None], axis=1)
  perp = perp * ru / np.maximum(np.linalg.norm(lv.p - hil, axis=1), 10.0)
  score = -np.sqrt((along / 1.6)**2 + perp**2) + 12.0 * lv.tex
  return (score - 1e5 * ~inl - 1e5 * ~on).astype(np.float32)


def _lesion(rng: np.random.Generator, lv: _LungVoxels, label: int, r: float, n: int) -> dict:
  """Where the infection is and how dense, by class (docs/synthetic.md, "Lesions").

  Returns:
    dict: ``mask`` bool [N] (exactly ``n`` voxels), ``field`` float32 [N] (higher = core),
    ``pattern``, ``cons_frac`` (fraction of the lesion consolidated), ``ggo_hu``,
    ``cons_hu``, ``crazy`` (crazy-paving amplitude, HU), ``halo`` (opacity of the margin).
  """
  lower = np.isin(lv.lobe, (3, 5))
  size = float(np.clip(math.log10(max(r, 1e-6) / 1e-3) / 2.5, 0.0, 1.0))  # 0 at 0.1 %, 1 at 30 %.
  if label == 1:  # COVID-19: multifocal, bilateral, subpleural, lower lobes, posterior.
    k = min(10, 1 + int(rng.poisson(0.3 + 5.0 * size)))
    weight = np.exp(-lv.pleura / 10.0) * (1.0 + lower) * (1.0 + lv.gravity)
    sides = np.where(rng.random(k) < 0.5, 1, -1)
    field = _foci_field(rng, lv, weight, sides, r * lv.side.size * lv.voxel_mm3 / k)
    field = field * np.exp(0.3 * lv.tex - lv.pleura / 40.0)
    cons = float(np.clip(rng.uniform(-0.1, 0.15) + 0.45 * np.clip(math.log10(max(r, 1e-6) / 3e-3)
                                                                  / 2, 0, 1), 0.0, 0.7))
    crazy = rng.uniform(*CRAZY_PAVING_HU) if rng.random() < 0.8 * size else 0.0
    return dict(mask=_top_n(field, n), field=field, pattern="covid", cons_frac=cons,
                ggo_hu=rng.uniform(*COVID_GGO_HU), cons_hu=rng.uniform(*COVID_CONSOLIDATION_HU),
                crazy=crazy, halo=0.35)
  primary = 1 if rng.random() < 0.55 else -1
  if rng.random() < CAP_BRONCHOPNEUMONIA_FRACTION:  # Patchy peribronchial foci.
    k = 1 + int(rng.poisson(0.5 + 2.0 * size))
    weight = np.exp(-lv.hilum / 70.0) * (1.0 + lower)
    sides = np.where(rng.random(k) < 0.75, primary, -primary)
    field = _foci_field(rng, lv, weight, sides, r * lv.side.size * lv.voxel_mm3 / k)
    field = field * np.exp(0.3 * lv.tex)
    mask, pattern, cons, halo = _top_n(field, n), "bronchopneumonia", 0.1 + 0.4 * size, 0.35
  else:  # Lobar / segmental consolidation, mostly one lung.
    n2 = int(round(n * rng.uniform(0.15, 0.4))) if rng.random() < CAP_BILATERAL else 0
    s1 = _segment_score(rng, lv, primary)
    m1 = _top_n(s1, n - n2)
    s2 = np.where(m1, -np.inf, _segment_score(rng, lv, -primary)) if n2 else s1
    m2 = _top_n(s2, n2)
    mask = m1 | m2
    field = np.where(m1, s1, np.where(m2, s2, -1e9)).astype(np.float32)
    cons = float(np.clip(0.15 + 0.7 * np.clip(math.log10(max(r, 1e-6) / 1e-4) / 3, 0, 1) +
                         rng.uniform(-0.15, 0.15), 0.0, 0.95))
    pattern, halo = "lobar", 0.2
  return dict(mask=mask, field=field, pattern=pattern, cons_frac=cons,
              ggo_hu=rng.uniform(*CAP_GGO_HU), cons_hu=rng.uniform(*CAP_CONSOLIDATION_HU),
              crazy=0.0, halo=halo)


def _septa(rng: np.random.Generator, p: np.ndarray) -> np.ndarray:
  """Thickened interlobular septa (crazy paving): three families of thin planes ~12 mm apart.

  Returns:
    float32 [N] in [0, 1], ~1 on a septum.
  """
  out = np.zeros(p.shape[0], np.float32)
  period = rng.uniform(10.0, 16.0)
  for _ in range(3):
    nrm = rng.normal(size=3)
    nrm /= np.linalg.norm(nrm)
    ph = np.pi * (p @ nrm.astype(np.float32)) / period + rng.uniform(0, np.pi)
    out = np.maximum(out, (1.0 - np.abs(np.sin(ph)))**6)
  return out


def _lesion_hu(rng: np.random.Generator, lv: _LungVoxels, les: dict) -> np.ndarray:
  """HU of the opacified parenchyma inside the lesion (consolidated core, ground-glass rest).

  Returns:
    float32 [M] for the M lesion voxels (in index order).
  """
  m = les["mask"]
  f = les["field"][m]
  q = np.empty(f.size, np.float32)
  q[np.argsort(f, kind="stable")] = (np.arange(f.size, dtype=np.float32) + 0.5) / max(f.size, 1)
  cw = np.clip((q - (1.0 - les["cons_frac"])) / 0.08, 0.0, 1.0)
  hu = les["ggo_hu"] * (1 - cw) + les["cons_hu"] * cw + 25.0 * lv.tex[m]
  if les["crazy"]:
    hu = hu + les["crazy"] * _septa(rng, lv.p[m]) * (1 - cw)
  return hu.astype(np.float32)


def _lung_voxels(lung_idx: np.ndarray, grid: _Grid, f: _Frame, cw: dict, an: dict,
                 tex: np.ndarray) -> _LungVoxels:
  """Geometry of the lung voxels ``lung_idx`` (flat indices) for placing lesions."""
  sx, sy, sz = grid.spacing
  zi, yi, xi = np.unravel_index(lung_idx, grid.shape)
  px, py, pz = f.x[0, 0, xi], f.y[0, yi, 0], f.z[zi, 0, 0]
  side = np.where(px > 0, 1, -1).astype(np.int8)
  dome = an["dome"][np.where(side > 0, 0, 1), yi, xi]
  pleura = np.maximum(np.minimum(cw["depth"][yi, xi] - cw["wall"], pz - dome), 0.0)
  p = np.stack([px, py, pz], 1).astype(np.float32)
  hila = an["hila"]
  gravity = np.clip(0.5 - (py - an["ylc"]) / (2 * cw["bc"]), 0, 1)**2
  return _LungVoxels(p=p, side=side, lobe=_lobes(px, py, pz, an["coarse"].reshape(-1)[lung_idx],
                                                 grid.lung_height_mm, an["ylc"], cw["bc"]),
                     pleura=pleura.astype(np.float32),
                     hilum=np.linalg.norm(p - hila[np.where(side > 0, 0, 1)], axis=1),
                     gravity=gravity.astype(np.float32), tex=tex, hila=hila,
                     voxel_mm3=sx * sy * sz)


def _render_case(spec: CaseSpec) -> dict:
  grid = _draw_grid(spec)
  d, h, w = grid.shape
  sx, sy, sz = grid.spacing
  arng = np.random.default_rng([spec.anatomy_seed, 2])  # Patient anatomy.
  crng = np.random.default_rng([spec.case_seed, 3])  # This scan: pose, noise, lesions.
  f = _frame(grid, crng)
  vol = np.full((d, h, w), HU["air"], np.float32)
  cw = _chest_wall(vol, f, grid, arng)
  an = _lungs(vol, f, grid, cw, arng)
  lung = an["lung"]
  lung_idx = np.flatnonzero(lung)
  tex = smooth_noise(crng, (d, h, w), tuple(max(4, int(n * s / 20.0)) for n, s in
                                             zip((d, h, w), (sz, sy, sx))), 2)
  lv = _lung_voxels(lung_idx, grid, f, cw, an, tex[1].reshape(-1)[lung_idx])
  # Parenchyma: -865 HU, smooth texture, denser in the dependent (posterior) lung.
  tissue = HU["parenchyma"] + 15.0 * tex[0].reshape(-1)[lung_idx] + 45.0 * lv.gravity
  n_lung = lung_idx.size
  n_target = min(max(1, int(round(spec.target_ratio * n_lung))), n_lung) if n_lung else 0
  les = _lesion(crng, lv, spec.label, spec.target_ratio, n_target) if n_lung else None
  infection = np.zeros(d * h * w, bool)
  parenchyma = tissue.copy() if spec.diagnostic else None
  if les is not None:
    m = les["mask"]
    infection[lung_idx[m]] = True
    tissue[m] = _lesion_hu(crng, lv, les)
    halo = _halo(infection.reshape(d, h, w), lung).reshape(-1)[lung_idx] & ~m
    if les["pattern"] == "lobar":  # Fissures stop lobar consolidation: no margin across them.
      halo &= np.isin(lv.lobe, np.unique(lv.lobe[m]))
    tissue[halo] += les["halo"] * (les["ggo_hu"] - tissue[halo])
  fv, fb = _vessels(grid, f, lv.hila, arng)
  fv, fb = fv.reshape(-1)[lung_idx], fb.reshape(-1)[lung_idx]
  if spec.diagnostic:
    tissue, fv = _apply_diagnostic(spec.diagnostic, parenchyma, tissue, fv)
  if les is not None and les["pattern"] == "covid":
    fv = np.where(les["mask"], 1.6 * fv, fv)  # Vascular enlargement inside COVID-19 opacities.
  tot = fv + fb
  k = np.where(tot > 0.95, 0.95 / np.maximum(tot, 1e-6), 1.0)
  fv, fb = fv * k, fb * k
  flat = vol.reshape(-1)
  flat[lung_idx] = tissue * (1 - fv - fb) + HU["vessel"] * fv + HU["bronchus"] * fb
  vol += crng.standard_normal((d, h, w), dtype=np.float32) * crng.uniform(*NOISE_HU)
  hu = np.clip(np.rint(vol), -1024, 3071).astype(np.int16)
  lung_u8 = lung.astype(np.uint8)
  inf_u8 = infection.reshape(d, h, w).astype(np.uint8)
  lobes = np.zeros(d * h * w, np.uint8)
  lobes[lung_idx] = lv.lobe
  pl = np.zeros(d * h * w, np.float32)
  pl[lung_idx] = lv.pleura
  ratio = float(inf_u8.sum(dtype=np.int64)) / float(max(lung_u8.sum(dtype=np.int64), 1))
  return dict(hu=hu, lung=lung_u8, infection=inf_u8, lobes=lobes.reshape(d, h, w),
              pleura_mm=pl.reshape(d, h, w), spacing=grid.spacing, grid=grid, ratio=ratio,
              pattern=les["pattern"] if les else "none")


def _apply_diagnostic(dg: Diagnostic, parenchyma: np.ndarray, tissue: np.ndarray,
                      fv: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  """Ablation contrasts (``Diagnostic``); a knob at its default 1.0 leaves its array as it is.

  Args:
    dg: the knobs.
    parenchyma: float32 [N] lung-voxel HU before the lesion was drawn.
    tissue: float32 [N] lung-voxel HU with the lesion and its margin.
    fv: float32 [N] vessel volume fraction of the lung voxels.

  Returns:
    (tissue float32 [N], fv float32 [N]).
  """
  if dg.lesion_contrast != 1.0:
    tissue = (parenchyma + np.float32(dg.lesion_contrast) * (tissue - parenchyma))
  if dg.vessel_contrast != 1.0:
    fv = fv * np.float32(dg.vessel_contrast)
  return tissue.astype(np.float32), fv.astype(np.float32)


def _halo(infection: np.ndarray, lung: np.ndarray) -> np.ndarray:
  """bool [D, H, W]: lung voxels face-adjacent to the infection (the lesion's margin)."""
  out = infection.copy()
  for axis in range(3):
    lo = [slice(None)] * 3
    hi = [slice(None)] * 3
    lo[axis], hi[axis] = slice(1, None), slice(None, -1)
    out[tuple(lo)] |= infection[tuple(hi)]
    out[tuple(hi)] |= infection[tuple(lo)]
  return out & lung & ~infection


def _vessels(grid: _Grid, f: _Frame, hila: np.ndarray, arng: np.random.Generator
             ) -> tuple[np.ndarray, np.ndarray]:
  """Volume fractions of pulmonary vessels and bronchial lumen per voxel (partial volume).

  Returns:
    (vessel float32 [D, H, W], bronchus float32 [D, H, W]), each clipped to [0, 1].
  """
  d, h, w = grid.shape
  sx, sy, sz = grid.spacing
  step = 0.5 * min(sx, sz)
  centre = np.array([(w - 1) / 2.0, (h - 1) / 2.0, 0.0])
  out = []
  pts, diam, perp = _vessel_tree(arng, hila, step)
  for pos, dia in ((pts, diam), (pts + perp * (0.5 * diam + 1.5)[:, None], 0.75 * diam)):
    ijk = (pos + f.shift) / np.array([sx, sy, sz]) + centre
    ijk[:, 2] -= grid.z0_mm / sz
    amp = (math.pi / 4.0) * dia**2 * step / (sx * sy * sz)
    out.append(np.clip(_splat((d, h, w), ijk[:, ::-1], amp, z_blur=0.25 * min(1.0, sx / sz)),
                       0.0, 1.0))
  return out[0], out[1]


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
             progress: bool = True, diagnostic: Diagnostic | None = None) -> Path:
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
    diagnostic: contrast changes for ablations (``Diagnostic``); None (default) = the testbed.

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
  if diagnostic is not None:  # Only then in the parameters: the testbed's stay as they were.
    params["diagnostic"] = dataclasses.asdict(diagnostic)
  with _generation(out, params) as finished:
    if finished:
      log.info("kept the phantom set that the other process wrote in %s", out)
      return out / "manifest.csv"
    specs = plan_cases(num_cases, seed, size_scale, covid_fraction, repeat_fraction,
                       test_fraction)
    specs = [dataclasses.replace(s, diagnostic=diagnostic) for s in specs]
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
  import matplotlib.pyplot as plt  # Deferred with matplotlib.

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


def _cli_flags() -> flags.FlagValues:
  """The command line's flags (a FlagValues of its own: see dsan_jax/cli_flags.py)."""
  fv = flags.FlagValues()
  flags.DEFINE_string("out", None, "output folder", flag_values=fv)
  flags.DEFINE_integer("cases", 200, "number of scans", flag_values=fv)
  flags.DEFINE_integer("seed", 0, "random seed", flag_values=fv)
  flags.DEFINE_float("size_scale", 1.0, "multiplies voxel counts (1.0: 48-80 x 96-128 x 96-128)",
                     flag_values=fv)
  flags.DEFINE_float("covid_fraction", COVID_FRACTION, "fraction of COVID scans", flag_values=fv)
  flags.DEFINE_float("repeat_fraction", REPEAT_FRACTION, "fraction of repeat scans",
                     flag_values=fv)
  flags.DEFINE_float("test_fraction", 0.0, "patients held out as the test split", flag_values=fv)
  flags.DEFINE_integer("workers", None, "processes (default: all CPUs)", flag_values=fv)
  flags.DEFINE_string("preview", None, "also write a montage of the first 8 cases to this PNG",
                      flag_values=fv)
  for name in ("size_scale", "covid_fraction", "repeat_fraction", "test_fraction"):
    cli_flags.dashed_alias(name, fv)
  flags.mark_flag_as_required("out", flag_values=fv)
  return fv


def main(argv: Sequence[str] | None = None) -> int:
  args = _cli_flags()
  status = cli_flags.parse(args, argv, "python -m dsan_jax.data.synthetic",
                           "Write synthetic chest-CT phantoms (NIfTI) with lung/infection masks "
                           "and a manifest.csv.")
  if status is not None:
    return status
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
