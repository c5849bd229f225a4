"""grain pipeline: batch contract, epochs, resumption, host sharding, eval padding, Orbax."""

import json

import numpy as np
import pytest

from configs.default import get_config
from dsan_jax.data import pipeline, sampling
from dsan_jax.errors import ConfigError

SHAPE = (3, 4, 5)  # [D, H, W] of the toy volumes


def _dataset(n=10, seed=0):
  rng = np.random.default_rng(seed)
  images = rng.random((n, *SHAPE), dtype=np.float32)
  masks = (rng.random((n, *SHAPE)) > 0.7).astype(np.uint8)
  has_mask = np.arange(n) % 3 != 0
  ratios = np.linspace(0.0, 0.06, n).astype(np.float32)
  ratios[4] = np.nan
  return pipeline.ArrayDataset(images, np.arange(n) % 2, ratios, masks, has_mask,
                               patient_ids=[f"p{i // 2}" for i in range(n)])


def _config(sampling_name="uniform"):
  config = get_config()
  config.data.sampling = sampling_name
  return config


def _take(it, n):
  return [next(it) for _ in range(n)]


def test_array_dataset_matches_cached_dataset_interface():
  ds = _dataset()
  r = ds[3]
  assert set(r) == {"image", "infection_mask", "has_mask", "label", "ratio", "index", "case_id"}
  assert r["image"].dtype == np.float32 and r["image"].shape == SHAPE
  assert r["infection_mask"].dtype == np.uint8 and r["index"] == 3 and r["label"] == 1
  assert ds.labels.dtype == np.int32 and ds.ratios.dtype == np.float32
  assert len(ds.patient_ids) == len(ds) == 10
  with pytest.raises(IndexError):
    ds[10]


def test_train_batch_contract_and_epoch_structure():
  ds = _dataset(10)
  train = np.array([0, 1, 2, 3, 5, 6, 7, 8, 9])  # 9 cases, B = 4 -> 2 steps per epoch
  it = pipeline.make_train_iterator(ds, train, _config(), seed=5, global_batch_size=4)
  assert it.steps_per_epoch == 2
  batches = _take(it, 6)
  b = batches[0]
  assert set(b) == set(pipeline.BATCH_KEYS)
  assert b["image"].shape == (4, *SHAPE) and b["image"].dtype == np.float32
  assert b["infection_mask"].dtype == np.uint8 and b["has_mask"].dtype == bool
  assert b["label"].dtype == np.int32 and b["ratio"].dtype == np.float32
  assert b["index"].dtype == np.int32 and b["weight"].dtype == np.float32
  np.testing.assert_array_equal(b["weight"], 1.0)
  sampler = sampling.UniformSampler(train, seed=5)
  for step, batch in enumerate(batches):
    epoch, s = divmod(step, 2)
    expected = sampler.epoch_indices(epoch)[4 * s:4 * s + 4]
    np.testing.assert_array_equal(batch["index"], expected)
    np.testing.assert_array_equal(batch["image"], ds.images[expected])
    np.testing.assert_array_equal(batch["label"], ds.labels[expected])
    np.testing.assert_array_equal(batch["ratio"], ds.ratios[expected])
    np.testing.assert_array_equal(batch["has_mask"], ds.has_mask[expected])
    masks = ds.infection_masks[expected] * ds.has_mask[expected][:, None, None, None]
    np.testing.assert_array_equal(batch["infection_mask"], masks)
  for epoch in range(3):  # drop_remainder per epoch: 8 distinct training cases per epoch
    seen = np.concatenate([batches[2 * epoch]["index"], batches[2 * epoch + 1]["index"]])
    assert np.unique(seen).size == 8 and set(seen.tolist()) <= set(train.tolist())
  assert it.get_state()["step"] == 6 and it.epoch == 3


def test_uniform_iterator_covers_every_case_once_per_epoch():
  ds = _dataset(12)
  it = pipeline.make_train_iterator(ds, np.arange(12), _config(), seed=0, global_batch_size=4)
  epochs = [np.concatenate([b["index"] for b in _take(it, 3)]) for _ in range(3)]
  for e in epochs:
    np.testing.assert_array_equal(np.sort(e), np.arange(12))
  assert not np.array_equal(epochs[0], epochs[1])


def test_size_balanced_iterator_follows_its_sampler():
  ds = _dataset(10)
  it = pipeline.make_train_iterator(ds, np.arange(10), _config("size_balanced"), seed=2,
                                    global_batch_size=5)
  sampler = sampling.SizeBalancedSampler(np.arange(10), ds.labels, ds.ratios, seed=2)
  got = np.concatenate([b["index"] for b in _take(it, 4)])
  expected = np.concatenate([sampler.epoch_indices(e) for e in range(2)])
  np.testing.assert_array_equal(got, expected)


@pytest.mark.parametrize("sampling_name", ["uniform", "size_balanced"])
def test_resume_from_saved_state_is_exact(sampling_name):
  ds, config = _dataset(10), _config(sampling_name)
  make = lambda: pipeline.make_train_iterator(ds, np.arange(10), config, seed=11,
                                              global_batch_size=4)
  reference = _take(make(), 9)
  first = make()
  _take(first, 4)
  state = json.loads(json.dumps(first.get_state()))  # must survive JSON
  resumed = make()
  _take(resumed, 1)  # a used iterator is rewound by set_state too
  resumed.set_state(state)
  for want, got in zip(reference[4:], _take(resumed, 5)):
    for key in pipeline.BATCH_KEYS:
      np.testing.assert_array_equal(got[key], want[key])
  # start_step gives the same stream without a state dict.
  started = pipeline.make_train_iterator(ds, np.arange(10), config, seed=11,
                                         global_batch_size=4, start_step=4)
  np.testing.assert_array_equal(next(started)["index"], reference[4]["index"])


def test_state_at_resumes_behind_a_read_ahead_consumer():
  ds = _dataset(10)
  make = lambda: pipeline.make_train_iterator(ds, np.arange(10), _config(), seed=8,
                                              global_batch_size=3)
  reference = [b["index"] for b in _take(make(), 7)]
  it = make()
  _take(it, 5)  # a prefetcher pulled 5 batches, the model trained on 3
  state = it.state_at(3)
  assert state == dict(it.get_state(), step=3)
  resumed = make()
  resumed.set_state(state)
  for want in reference[3:]:
    np.testing.assert_array_equal(next(resumed)["index"], want)


def test_set_state_refuses_a_different_stream():
  ds = _dataset(10)
  a = pipeline.make_train_iterator(ds, np.arange(10), _config(), seed=1, global_batch_size=4)
  b = pipeline.make_train_iterator(ds, np.arange(10), _config(), seed=2, global_batch_size=4)
  with pytest.raises(ConfigError, match="seed"):
    b.set_state(a.get_state())


def test_two_host_shards_are_disjoint_and_cover_the_global_batch():
  ds = _dataset(12)
  kw = dict(seed=3, global_batch_size=6)
  whole = pipeline.make_train_iterator(ds, np.arange(12), _config(), **kw)
  shards = [pipeline.make_train_iterator(ds, np.arange(12), _config(), process_index=p,
                                         process_count=2, **kw) for p in range(2)]
  for _ in range(4):  # two epochs
    g = next(whole)
    s0, s1 = next(shards[0]), next(shards[1])
    assert s0["image"].shape[0] == s1["image"].shape[0] == 3
    assert not set(s0["index"].tolist()) & set(s1["index"].tolist())
    for key in pipeline.BATCH_KEYS:
      np.testing.assert_array_equal(np.concatenate([s0[key], s1[key]]), g[key])


def test_bad_batch_sizes_raise_config_error():
  ds = _dataset(10)
  with pytest.raises(ConfigError, match="multiple"):
    pipeline.make_train_iterator(ds, np.arange(10), _config(), seed=0, global_batch_size=5,
                                 process_count=2)
  with pytest.raises(ConfigError, match="exceeds"):
    pipeline.make_train_iterator(ds, np.arange(4), _config(), seed=0, global_batch_size=5)
  with pytest.raises(ConfigError, match="sampling"):
    pipeline.make_train_iterator(ds, np.arange(10), _config("weighted"), seed=0,
                                 global_batch_size=2)


def test_eval_iterator_pads_last_batch():
  ds = _dataset(10)
  idx = np.array([9, 0, 4, 7, 2, 5, 1])
  ev = pipeline.make_eval_iterator(ds, idx, batch_size=4)
  batches = list(ev)
  assert len(ev) == len(batches) == 2
  last = batches[1]
  np.testing.assert_array_equal(batches[0]["index"], [9, 0, 4, 7])
  np.testing.assert_array_equal(last["index"], [2, 5, 1, -1])
  np.testing.assert_array_equal(last["weight"], [1, 1, 1, 0])
  assert last["image"].shape == (4, *SHAPE)
  np.testing.assert_array_equal(last["image"][:3], ds.images[[2, 5, 1]])
  assert not last["image"][3].any() and not last["infection_mask"][3].any()
  assert not last["has_mask"][3] and last["label"][3] == 0 and np.isnan(last["ratio"][3])
  assert len(list(ev)) == 2  # re-iterable


def test_eval_iterator_two_hosts_padding_only_shard():
  ds = _dataset(10)
  idx = np.array([3, 8, 1, 6, 0])
  shards = [list(pipeline.make_eval_iterator(ds, idx, batch_size=4, process_index=p,
                                             process_count=2)) for p in range(2)]
  # Global batches [3 8 | 1 6], [0 -1 | -1 -1]: process 1's last batch is all padding.
  np.testing.assert_array_equal(shards[0][1]["index"], [0, -1])
  np.testing.assert_array_equal(shards[1][1]["index"], [-1, -1])
  np.testing.assert_array_equal(shards[1][1]["weight"], [0, 0])
  assert shards[1][1]["image"].shape == (2, *SHAPE)
  got = np.concatenate([np.concatenate([shards[0][b]["index"], shards[1][b]["index"]])
                        for b in range(2)])
  np.testing.assert_array_equal(got[got >= 0], idx)


def test_orbax_checkpoint_round_trip(tmp_path):
  ocp = pytest.importorskip("orbax.checkpoint")
  ds = _dataset(10)
  make = lambda: pipeline.make_train_iterator(ds, np.arange(10), _config(), seed=4,
                                              global_batch_size=2)
  reference = [b["index"] for b in _take(make(), 8)]
  it = make()
  _take(it, 5)
  with ocp.CheckpointManager(tmp_path / "ckpt") as mngr:
    mngr.save(5, args=ocp.args.Composite(data_iter=pipeline.checkpoint_args(it)))
    mngr.wait_until_finished()
  with ocp.CheckpointManager(tmp_path / "ckpt") as mngr:
    restored = mngr.restore(5, args=ocp.args.Composite(data_iter=pipeline.restore_args()))
  fresh = make()
  fresh.set_state(restored.data_iter)
  for want in reference[5:]:
    np.testing.assert_array_equal(next(fresh)["index"], want)


@pytest.mark.slow
def test_worker_processes_give_the_same_stream_and_resume():
  ds, config = _dataset(10), _config("size_balanced")
  kw = dict(seed=9, global_batch_size=4, num_steps=7)
  ref = [b["index"] for b in pipeline.make_train_iterator(ds, np.arange(10), config,
                                                           num_workers=0, **kw)]
  it = pipeline.make_train_iterator(ds, np.arange(10), config, num_workers=2, **kw)
  got = [next(it)["index"] for _ in range(3)]
  state = it.get_state()
  it.close()
  it2 = pipeline.make_train_iterator(ds, np.arange(10), config, num_workers=2, **kw)
  it2.set_state(state)
  got += [b["index"] for b in it2]
  assert len(got) == 7
  for a, b in zip(ref, got):
    np.testing.assert_array_equal(a, b)
  ev = pipeline.make_eval_iterator(ds, np.arange(7), batch_size=4, num_workers=2)
  np.testing.assert_array_equal(np.concatenate([b["index"] for b in ev]),
                                [0, 1, 2, 3, 4, 5, 6, -1])
