"""Data layer: NIfTI and DICOM reading, manifests, the paper's preprocessing, lung masks, cache,
phantoms, folds, samplers and the grain pipeline (see docs/data.md).

Submodules are imported explicitly (``from dsan_jax.data import preprocess``); this package
file stays light so that importing one part does not pull in the others.
"""
