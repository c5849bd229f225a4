"""Shared test fixtures."""

import pathlib

import pytest

from dsan_jax import runtime

# Tests run with the same XLA:CPU flags as train.py (set before JAX starts its backend).
runtime.configure_xla_flags()

REPO_ROOT = pathlib.Path(__file__).resolve().parents[1]
REAL_CT_DIR = REPO_ROOT.parent / "shared" / "data" / "ct"


@pytest.fixture(scope="session")
def repo_root() -> pathlib.Path:
  return REPO_ROOT


@pytest.fixture(scope="session")
def real_ct_dir() -> pathlib.Path:
  """The two real chest CTs; tests using them skip where the folder is absent."""
  if not (REAL_CT_DIR / "P002.nii.gz").exists():
    pytest.skip(f"real CT volumes not found at {REAL_CT_DIR}")
  return REAL_CT_DIR
