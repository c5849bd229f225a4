"""grain input pipeline: sampled, sharded, resumable training batches and padded eval batches.

Design. The global training stream is a pure function of the step: global step ``s`` of an
epoch-structured stream covers positions ``[s * B, (s + 1) * B)`` of the sampler's epoch
``s // steps_per_epoch`` (``steps_per_epoch = N // B``: the last ``N % B`` draws of each epoch
are dropped, a different remainder every epoch since the order is reshuffled). Process ``p`` of
``P`` reads the contiguous block ``[p * B / P, (p + 1) * B / P)`` of every global batch, which
is the layout ``jax.make_array_from_process_local_data`` expects for a batch sharded on a 1-D
``('data',)`` mesh. The shards are disjoint and their concatenation is the global batch.

grain runs it as ``MapDataset.range(start_step, stop_step).map(load_batch)`` (an element is a
whole local batch, so the batch composition is independent of the number of workers), then
``to_iter_dataset`` (thread prefetch) and ``mp_prefetch`` when ``num_workers > 0``. Resuming
rebuilds that dataset from the saved step; the iterator state is a small JSON dict.

Saving the iterator with Orbax beside the model::

  mngr.save(step, args=ocp.args.Composite(
      state=ocp.args.StandardSave(train_state),
      data_iter=ocp.args.JsonSave(train_iter.state_at(step))))  # step = steps trained
  ...
  restored = mngr.restore(step, args=ocp.args.Composite(
      state=ocp.args.StandardRestore(abstract_state),
      data_iter=ocp.args.JsonRestore()))
  train_iter.set_state(restored.data_iter)

The state is the same on every process (it holds the global step), so ``JsonSave`` writing it
once from the primary process is enough. ``checkpoint_args`` / ``restore_args`` wrap this.

Dataset duck type (``dsan_jax.data.cache.CachedDataset`` and ``ArrayDataset`` below):
``len(ds)``, ``ds[i] -> dict(image float32 [D, H, W], infection_mask uint8 [D, H, W],
has_mask bool, label int, ratio float, index int, case_id str)``, attributes ``labels`` int32
[N], ``ratios`` float32 [N], ``patient_ids`` list[str].
"""

from __future__ import annotations

import math
from typing import Any, Iterator, Mapping, Sequence

import grain
import numpy as np

from dsan_jax.errors import ConfigError
from dsan_jax.data import sampling

BATCH_KEYS = ("image", "infection_mask", "has_mask", "label", "ratio", "index", "weight")
_STATE_VERSION = 1


class ArrayDataset:
  """In-memory dataset with the ``CachedDataset`` interface (tests, synthetic experiments).

  Args:
    images: float32 [N, D, H, W] preprocessed images.
    labels: [N] 1 = COVID, 0 = CAP.
    ratios: [N] infection ratios (NaN = unknown); default all NaN.
    infection_masks: uint8 [N, D, H, W] or None (zeros, has_mask False).
    has_mask: bool [N]; default: True where ``infection_masks`` is given.
    patient_ids: [N] strings; default one patient per case.
    case_ids: [N] strings; default "case{i}".
  """

  def __init__(self, images: np.ndarray, labels: Sequence[int] | np.ndarray,
               ratios: Sequence[float] | np.ndarray | None = None,
               infection_masks: np.ndarray | None = None,
               has_mask: Sequence[bool] | np.ndarray | None = None,
               patient_ids: Sequence[str] | None = None,
               case_ids: Sequence[str] | None = None):
    self.images = np.asarray(images, np.float32)
    n = self.images.shape[0]
    if self.images.ndim != 4:
      raise ValueError(f"images must be [N, D, H, W], got {self.images.shape}")
    self.labels = np.asarray(labels, np.int32).reshape(-1)
    self.ratios = (np.full(n, np.nan, np.float32) if ratios is None
                   else np.asarray(ratios, np.float32).reshape(-1))
    if infection_masks is None:
      self.infection_masks = None
      self.has_mask = np.zeros(n, bool) if has_mask is None else np.asarray(has_mask, bool)
    else:
      self.infection_masks = np.asarray(infection_masks, np.uint8)
      if self.infection_masks.shape != self.images.shape:
        raise ValueError(f"infection_masks {self.infection_masks.shape} != images "
                         f"{self.images.shape}")
      self.has_mask = np.ones(n, bool) if has_mask is None else np.asarray(has_mask, bool)
    self.patient_ids = ([f"patient{i}" for i in range(n)] if patient_ids is None
                        else [str(p) for p in patient_ids])
    self.case_ids = ([f"case{i}" for i in range(n)] if case_ids is None
                     else [str(c) for c in case_ids])
    for name, v in (("labels", self.labels), ("ratios", self.ratios),
                    ("has_mask", self.has_mask), ("patient_ids", self.patient_ids),
                    ("case_ids", self.case_ids)):
      if len(v) != n:
        raise ValueError(f"{name} has {len(v)} entries for {n} images")

  def __len__(self) -> int:
    return self.images.shape[0]

  def __getitem__(self, i: int) -> dict[str, Any]:
    i = int(i)
    if not 0 <= i < len(self):
      raise IndexError(i)
    mask = (np.zeros(self.images.shape[1:], np.uint8) if self.infection_masks is None
            else self.infection_masks[i])
    return dict(image=self.images[i], infection_mask=mask, has_mask=bool(self.has_mask[i]),
                label=int(self.labels[i]), ratio=float(self.ratios[i]), index=i,
                case_id=self.case_ids[i])


def collate(records: Sequence[Mapping[str, Any] | None], example: Mapping[str, Any]
            ) -> dict[str, np.ndarray]:
  """Stacks records into the batch contract; ``None`` rows become padding (weight 0).

  Args:
    records: B records from the dataset, or None for padding rows.
    example: one real record, giving the volume shape of padding rows.

  Returns:
    dict with the keys of ``BATCH_KEYS`` (see the batch contract in the module docstring).
  """
  shape = np.shape(example["image"])
  n = len(records)
  image = np.zeros((n, *shape), np.float32)
  mask = np.zeros((n, *shape), np.uint8)
  has_mask = np.zeros(n, bool)
  label = np.zeros(n, np.int32)
  ratio = np.full(n, np.nan, np.float32)
  index = np.full(n, -1, np.int32)
  weight = np.zeros(n, np.float32)
  for b, r in enumerate(records):
    if r is None:
      continue
    image[b] = r["image"]
    if r["has_mask"]:
      mask[b] = r["infection_mask"]
    has_mask[b] = r["has_mask"]
    label[b] = r["label"]
    ratio[b] = r["ratio"]
    index[b] = r["index"]
    weight[b] = 1.0
  return dict(image=image, infection_mask=mask, has_mask=has_mask, label=label, ratio=ratio,
              index=index, weight=weight)


def _local_block(global_batch_size: int, process_index: int, process_count: int
                 ) -> tuple[int, int]:
  if process_count < 1 or not 0 <= process_index < process_count:
    raise ConfigError(f"process_index {process_index} out of range for {process_count} "
                      "process(es)")
  if global_batch_size < 1 or global_batch_size % process_count:
    raise ConfigError(f"global batch size {global_batch_size} must be a positive multiple of "
                      f"the process count {process_count}")
  local = global_batch_size // process_count
  return process_index * local, (process_index + 1) * local


class _TrainBatchLoader:
  """Picklable ``step -> local batch`` function (runs in grain workers)."""

  def __init__(self, dataset, sampler, global_batch_size: int, process_index: int,
               process_count: int):
    self.dataset = dataset
    self.sampler = sampler
    self.global_batch_size = global_batch_size
    self.lo, self.hi = _local_block(global_batch_size, process_index, process_count)
    self.steps_per_epoch = sampler.epoch_length // global_batch_size

  def indices(self, step: int) -> np.ndarray:
    """Dataset indices of the local batch of global step ``step``, int64 [B / P]."""
    epoch, s = divmod(int(step), self.steps_per_epoch)
    start = s * self.global_batch_size
    return self.sampler.epoch_indices(epoch)[start + self.lo:start + self.hi]

  def __call__(self, step: int) -> dict[str, np.ndarray]:
    records = [self.dataset[int(i)] for i in self.indices(step)]
    return collate(records, records[0])


class _EvalBatchLoader:
  """Picklable ``batch number -> local padded batch`` function."""

  def __init__(self, dataset, indices: np.ndarray, global_batch_size: int, process_index: int,
               process_count: int):
    self.dataset = dataset
    self.lo, self.hi = _local_block(global_batch_size, process_index, process_count)
    self.global_batch_size = global_batch_size
    n_batches = max(1, math.ceil(indices.size / global_batch_size))
    self.padded = np.full(n_batches * global_batch_size, -1, np.int64)
    self.padded[:indices.size] = indices
    self.example_index = int(indices[0])
    self._example = None

  def __call__(self, b: int) -> dict[str, np.ndarray]:
    start = int(b) * self.global_batch_size
    rows = self.padded[start + self.lo:start + self.hi]
    records = [None if i < 0 else self.dataset[int(i)] for i in rows]
    example = next((r for r in records if r is not None), None)
    if example is None:  # A shard made only of padding still needs the volume shape.
      if self._example is None:
        self._example = self.dataset[self.example_index]
      example = self._example
    return collate(records, example)


def _grain_iter(loader, start: int, stop: int, num_workers: int, prefetch: int,
                num_threads: int):
  ds = grain.MapDataset.range(start, stop).map(loader)
  # Bounded prefetch: grain's default (500 elements) would hold hundreds of full batches.
  ds = ds.to_iter_dataset(grain.ReadOptions(num_threads=max(1, num_threads),
                                            prefetch_buffer_size=max(1, prefetch)))
  if num_workers > 0:
    from absl import flags  # grain's worker pool reads absl flags; fine if never parsed.

    if not flags.FLAGS.is_parsed():
      flags.FLAGS.mark_as_parsed()
    ds = ds.mp_prefetch(grain.MultiprocessingOptions(num_workers=num_workers,
                                                     per_worker_buffer_size=max(1, prefetch)))
  return iter(ds)


def _close(it) -> None:
  if it is not None and hasattr(it, "close"):
    it.close()


class TrainIterator:
  """Infinite (or ``num_steps``-long) iterator of local training batches with a saveable state.

  Use ``make_train_iterator`` to build one. ``get_state()`` -> JSON dict; ``set_state(d)``
  rewinds/forwards to the step saved in ``d`` (the next batch is that step's batch).
  """

  def __init__(self, loader: _TrainBatchLoader, *, sampler_name: str, seed: int,
               start_step: int = 0, num_steps: int | None = None, num_workers: int = 0,
               prefetch: int = 2, num_threads: int = 1):
    self._loader = loader
    self._sampler_name = sampler_name
    self._seed = int(seed)
    self._step = int(start_step)
    self._stop = (2**62 if num_steps is None else int(num_steps))
    self._num_workers = int(num_workers)
    self._prefetch = int(prefetch)
    self._num_threads = int(num_threads)
    self._it = None

  @property
  def step(self) -> int:
    """Global step of the next batch."""
    return self._step

  @property
  def steps_per_epoch(self) -> int:
    return self._loader.steps_per_epoch

  @property
  def epoch(self) -> int:
    """Epoch of the next batch."""
    return self._step // self.steps_per_epoch

  def batch_indices(self, step: int) -> np.ndarray:
    """This process's dataset indices at global step ``step`` (no loading)."""
    return self._loader.indices(step)

  def __iter__(self) -> Iterator[dict[str, np.ndarray]]:
    return self

  def __next__(self) -> dict[str, np.ndarray]:
    if self._step >= self._stop:
      self.close()
      raise StopIteration
    if self._it is None:
      self._it = _grain_iter(self._loader, self._step, self._stop, self._num_workers,
                             self._prefetch, self._num_threads)
    batch = next(self._it)
    self._step += 1
    return batch

  def _fingerprint(self) -> dict[str, Any]:
    return dict(sampler=self._sampler_name, seed=self._seed,
                global_batch_size=self._loader.global_batch_size,
                num_records=self._loader.sampler.epoch_length)

  def get_state(self) -> dict[str, Any]:
    """JSON-serialisable state: the next global step and what the stream depends on.

    ``step`` counts batches handed out by this iterator. A consumer that reads ahead (e.g. a
    device prefetch queue) should save ``state_at(trained_steps)`` instead.
    """
    return self.state_at(self._step)

  def state_at(self, step: int) -> dict[str, Any]:
    """The state whose next batch is global step ``step`` (the stream is a function of it).

    Use it to checkpoint the number of steps the model has actually trained on when batches
    are prefetched ahead of training: ``ckpt.save(..., train_iter.state_at(int(state.step)))``.
    """
    return dict(version=_STATE_VERSION, step=int(step), **self._fingerprint())

  def set_state(self, state: Mapping[str, Any]) -> None:
    """Continues from a state of ``get_state`` (of this or an identically configured iterator).

    Raises:
      ConfigError: the state belongs to a stream with another sampler, seed, batch size or
        training-set size (resuming it would silently change the data order).
    """
    expected = self._fingerprint()
    diff = {k: (state.get(k), v) for k, v in expected.items() if state.get(k) != v}
    if diff:
      raise ConfigError("data iterator state does not match this pipeline (saved, current): "
                        + ", ".join(f"{k}={a!r} vs {b!r}" for k, (a, b) in diff.items()))
    self.close()
    self._step = int(state["step"])

  def start_prefetch(self) -> None:
    """Compatibility with grain's Orbax handler; prefetching starts on the first ``next``."""

  def close(self) -> None:
    """Stops worker processes/threads (they are restarted lazily)."""
    it, self._it = self._it, None
    _close(it)

  def __del__(self):
    try:
      self.close()
    except Exception:  # pylint: disable=broad-except
      pass  # Interpreter shutdown: modules may already be torn down.


class EvalIterable:
  """Re-iterable, finite sequence of padded eval batches (``len`` = number of batches)."""

  def __init__(self, loader: _EvalBatchLoader, num_workers: int, prefetch: int,
               num_threads: int):
    self._loader = loader
    self._num_workers = num_workers
    self._prefetch = prefetch
    self._num_threads = num_threads

  def __len__(self) -> int:
    return self._loader.padded.size // self._loader.global_batch_size

  def __iter__(self) -> Iterator[dict[str, np.ndarray]]:
    it = _grain_iter(self._loader, 0, len(self), self._num_workers, self._prefetch,
                     self._num_threads)
    try:
      yield from it
    finally:
      _close(it)


def make_sampler(dataset, train_indices: Sequence[int] | np.ndarray, config, seed: int,
                 sampling_name: str | None = None):
  """The sampler named by ``sampling_name`` or ``config.data.sampling``.

  Args:
    dataset: gives ``labels`` and ``ratios`` (size-balanced groups).
    train_indices: [N] training-fold indices.
    config: reads ``data.sampling``, ``data.covid_small_ratio``, ``data.cap_small_ratio``.
    seed: sampler seed.
    sampling_name: "uniform" or "size_balanced"; None -> ``config.data.sampling``.

  Returns:
    ``UniformSampler`` or ``SizeBalancedSampler``.
  """
  name = config.data.sampling if sampling_name is None else sampling_name
  if name == "uniform":
    return sampling.UniformSampler(train_indices, seed)
  if name == "size_balanced":
    return sampling.SizeBalancedSampler(
        train_indices, dataset.labels, dataset.ratios, seed,
        covid_small=config.data.covid_small_ratio, cap_small=config.data.cap_small_ratio)
  raise ConfigError(f"config.data.sampling must be 'uniform' or 'size_balanced', got {name!r}")


def make_train_iterator(dataset, train_indices: Sequence[int] | np.ndarray, config, *,
                        seed: int, global_batch_size: int, process_index: int = 0,
                        process_count: int = 1, num_workers: int | None = None,
                        start_step: int = 0, num_steps: int | None = None,
                        prefetch: int = 2, num_threads: int = 1,
                        sampling_name: str | None = None) -> TrainIterator:
  """Training batches of this process, ``drop_remainder`` per epoch.

  Args:
    dataset: random-access dataset (see module docstring).
    train_indices: [N] dataset indices of the training fold.
    config: the ConfigDict; reads ``data.sampling``, ``data.covid_small_ratio``,
      ``data.cap_small_ratio``, ``data.num_workers``.
    seed: sampler seed (e.g. ``config.seed`` folded with the fold number).
    global_batch_size: B over all processes; must be a multiple of ``process_count`` and
      at most N.
    process_index: this process (``jax.process_index()``).
    process_count: number of processes (``jax.process_count()``).
    num_workers: grain worker processes; None -> ``config.data.num_workers``; 0 = in process.
    start_step: global step of the first batch (resumption without a state dict).
    num_steps: stop before this global step; None = infinite.
    prefetch: batches buffered ahead (per worker with workers).
    num_threads: loader threads per process/worker.
    sampling_name: "uniform" or "size_balanced"; None -> ``config.data.sampling``.

  Returns:
    A ``TrainIterator`` yielding dicts with ``BATCH_KEYS``: image float32 [B/P, D, H, W],
    infection_mask uint8 [B/P, D, H, W], has_mask bool [B/P], label int32 [B/P],
    ratio float32 [B/P], index int32 [B/P], weight float32 [B/P] (all ones).
  """
  sampler = make_sampler(dataset, train_indices, config, seed, sampling_name)
  if global_batch_size > sampler.epoch_length:
    raise ConfigError(f"global batch size {global_batch_size} exceeds the {sampler.epoch_length}"
                      " training cases (drop_remainder would leave no batch)")
  loader = _TrainBatchLoader(dataset, sampler, global_batch_size, process_index, process_count)
  if num_workers is None:
    num_workers = config.data.num_workers
  return TrainIterator(loader, sampler_name=type(sampler).__name__, seed=seed,
                       start_step=start_step, num_steps=num_steps, num_workers=num_workers,
                       prefetch=prefetch, num_threads=num_threads)


def make_eval_iterator(dataset, indices: Sequence[int] | np.ndarray, batch_size: int, *,
                       process_index: int = 0, process_count: int = 1, num_workers: int = 0,
                       prefetch: int = 2, num_threads: int = 1) -> EvalIterable:
  """Every case of ``indices`` once, in order; the last global batch padded to full size.

  Padding rows have weight 0, index -1, label 0, ratio NaN, zero image and mask, so a jitted,
  sharded eval step always sees ``[batch_size / process_count, D, H, W]``.

  Args:
    dataset: random-access dataset.
    indices: [M] dataset indices to evaluate (M >= 1).
    batch_size: global eval batch size (multiple of ``process_count``).
    process_index: this process.
    process_count: number of processes.
    num_workers: grain worker processes (0 = in process).
    prefetch: batches buffered ahead.
    num_threads: loader threads.

  Returns:
    A re-iterable ``EvalIterable`` of ``ceil(M / batch_size)`` local batches.
  """
  indices = np.asarray(indices, np.int64).reshape(-1)
  if indices.size == 0:
    raise ValueError("make_eval_iterator needs at least one index")
  loader = _EvalBatchLoader(dataset, indices, batch_size, process_index, process_count)
  return EvalIterable(loader, num_workers, prefetch, num_threads)


def checkpoint_args(iterator: TrainIterator, step: int | None = None):
  """``ocp.args.JsonSave`` of the iterator state, for an ``ocp.args.Composite`` entry.

  Args:
    iterator: the training iterator.
    step: steps the model has trained on (``state_at(step)``); None -> ``get_state()``.
  """
  import orbax.checkpoint as ocp  # Deferred: orbax is heavy and only needed when saving.

  return ocp.args.JsonSave(iterator.get_state() if step is None else iterator.state_at(step))


def restore_args():
  """``ocp.args.JsonRestore()`` matching ``checkpoint_args``."""
  import orbax.checkpoint as ocp  # Deferred, as above.

  return ocp.args.JsonRestore()
