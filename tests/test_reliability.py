"""Reliability (issues 6 and 15): kill -9, numerical faults, reproducibility, resource and input
errors, one owner per run folder, concurrent builders, a disk that fills up mid-run.

The slow tests drive ``train.py`` as a real child process (``subprocess.Popen``) and kill it with
SIGKILL. Every run of the module shares one synthetic set, one preprocessing cache and one JAX
persistent compilation cache, so only the first training run compiles (about a minute and a half
on 2 busy cores) and the others start in about 20 s. See docs/reliability.md for the figures.
"""

from __future__ import annotations

import collections
import csv
import fcntl
import json
import os
import pathlib
import re
import shutil
import signal
import socket
import subprocess
import sys
import time

import chex
import jax
import jax.numpy as jnp
import nibabel as nib
import numpy as np
import pytest

from configs import smoke
from dsan_jax import errors
from dsan_jax.data import prepare
from dsan_jax import run_lock
from dsan_jax.training import checkpoints, loop, run_folder, sharding
from dsan_jax.data import cache as cache_lib
from dsan_jax.data import pipeline

REPO = pathlib.Path(__file__).resolve().parents[1]
TIMING_KEYS = ("eval_seconds", "epoch_seconds")  # The only metrics.jsonl fields allowed to differ.
RUN_TIMEOUT_S = 420
KILL_SEED = 20260
_DiskUsage = collections.namedtuple("_DiskUsage", "total used free")

# ------------------------------------------------------------------------------ shared set-up.


def _config(shared):
  config = smoke.get_config()
  config.data.synthetic.num_cases = 16
  config.data.preprocess_workers = 0
  config.train.num_epochs = 2
  config.data.synthetic.out_dir = str(shared["syn"])
  config.data.cache_dir = str(shared["cache"])
  return config


@pytest.fixture(scope="module")
def shared(tmp_path_factory):
  """Synthetic set + cache built once (in process); the runs below only read them."""
  root = tmp_path_factory.mktemp("reliability")
  shared = dict(root=root, syn=root / "syn", cache=root / "cache", jaxcache=root / "jaxcache")
  prepare.prepare_data(_config(shared), root, progress=False)
  return shared


def _env(shared) -> dict[str, str]:
  env = dict(os.environ)
  env.update(JAX_PLATFORMS="cpu", JAX_COMPILATION_CACHE_DIR=str(shared["jaxcache"]),
             JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0", PYTHONUNBUFFERED="1")
  return env


def _train_cmd(shared, workdir, *extra) -> list[str]:
  return [sys.executable, "train.py", "--config", "configs/smoke.py", "--fold", "0",
          "--workdir", str(workdir), "--config.data.synthetic.num_cases=16",
          "--config.train.num_epochs=2", "--config.data.preprocess_workers=0",
          "--config.train.checkpoint_every_steps=1",
          f"--config.data.synthetic.out_dir={shared['syn']}",
          f"--config.data.cache_dir={shared['cache']}", "--noprogress", *extra]


def _run(shared, cmd, timeout=RUN_TIMEOUT_S) -> subprocess.CompletedProcess:
  return subprocess.run(cmd, cwd=REPO, env=_env(shared), capture_output=True, text=True,
                        timeout=timeout)


def _rd(workdir) -> pathlib.Path:
  return run_folder.run_dir(workdir, "att_rn34_us", 0)


def _ckpt_entries(rd: pathlib.Path) -> dict[str, set[str]]:
  out = {}
  for which in ("latest", "best"):
    try:
      out[which] = set(os.listdir(rd / "checkpoints" / which))
    except FileNotFoundError:
      out[which] = set()
  return out


def _committed(names: set[str]) -> list[int]:
  return sorted(int(n) for n in names if n.isdigit())


class _Monitor:
  """Runs a command, polls the run folder every ~2 ms and optionally SIGKILLs it on a trigger.

  ``trigger(entries, launch_entries) -> bool`` sees the checkpoint folder listings now and at
  launch. ``events`` records when each checkpoint entry and run file first appeared.
  """

  def __init__(self, shared, cmd, rd: pathlib.Path):
    self.shared, self.cmd, self.rd = shared, cmd, rd

  def run(self, trigger=None, delay_s: float = 0.0, timeout=RUN_TIMEOUT_S) -> dict:
    launch = _ckpt_entries(self.rd)
    t0 = time.perf_counter()
    proc = subprocess.Popen(self.cmd, cwd=REPO, env=_env(self.shared), stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    events, fired_at, seen = {}, None, set()
    try:
      while proc.poll() is None:
        now = time.perf_counter() - t0
        if now > timeout:
          raise TimeoutError(f"{self.cmd} ran for more than {timeout} s")
        entries = _ckpt_entries(self.rd)
        for which, names in entries.items():
          for n in names - seen:
            events.setdefault(f"{which}/{n}", now)
          seen |= {n for n in names}
        for name in ("val_predictions.csv", "done.json"):
          if name not in events and (self.rd / name).exists():
            events[name] = now
        if trigger is not None and fired_at is None and trigger(entries, launch):
          fired_at = now
        if fired_at is not None and now >= fired_at + delay_s:
          proc.send_signal(signal.SIGKILL)
          proc.wait()
          break
        time.sleep(0.002)
    finally:
      if proc.poll() is None:
        proc.kill()
      output = proc.stdout.read()
      proc.stdout.close()
    return dict(rc=proc.returncode, seconds=time.perf_counter() - t0, events=events,
                fired_at=fired_at, delay_s=delay_s, output=output,
                after=_ckpt_entries(self.rd), launch=launch)


def _metrics_rows(rd):
  return [json.loads(l) for l in (rd / "metrics.jsonl").read_text().splitlines() if l.strip()]


def _assert_same_metrics(rows_a, rows_b, rtol=1e-6):
  assert [r["epoch"] for r in rows_a] == [r["epoch"] for r in rows_b]
  for a, b in zip(rows_a, rows_b):
    assert set(a) == set(b)
    for k in a:
      if k in TIMING_KEYS:
        continue
      if isinstance(a[k], float) or isinstance(b[k], float):
        np.testing.assert_allclose(a[k], b[k], rtol=rtol, atol=1e-9, err_msg=k)
      else:
        assert a[k] == b[k], k


def _final_state(rd):
  trained = run_folder.load_trained(rd, which="latest")
  s = trained.state
  return jax.device_get(dict(params=s.params, batch_stats=s.batch_stats, opt_state=s.opt_state,
                             step=s.step, rng=s.rng, skipped=s.skipped_steps))


def _bitwise_equal(a, b) -> bool:
  la, lb = jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b)
  return len(la) == len(lb) and all(np.array_equal(x, y) for x, y in zip(la, lb))


@pytest.fixture(scope="module")
def reference(shared):
  """One uninterrupted run of the command (compiles and fills the JAX compilation cache)."""
  workdir = shared["root"] / "reference"
  res = _Monitor(shared, _train_cmd(shared, workdir), _rd(workdir)).run()
  assert res["rc"] == 0, res["output"][-3000:]
  print(f"\nreference run: {res['seconds']:.1f} s, events "
        f"{ {k: round(v, 2) for k, v in sorted(res['events'].items(), key=lambda kv: kv[1])} }")
  return dict(rd=_rd(workdir), run=res)


# ------------------------------------------------------------------- 1. kill -9 and resume.


def _new_tmp(which):
  """Trigger: a checkpoint of ``which`` starts being written (its tmp folder appears)."""
  def trigger(entries, launch):
    return any(".orbax-checkpoint-tmp" in n for n in entries[which] - launch[which])
  return trigger


def _new_commit(which, offset=1):
  """Trigger: ``which`` gets a committed step beyond the one present at launch."""
  def trigger(entries, launch):
    before = _committed(launch[which])
    target = (before[-1] if before else 0) + offset
    return any(s >= target for s in _committed(entries[which]))
  return trigger


@pytest.mark.slow
def test_kill_9_at_random_moments_then_rerun_equals_uninterrupted(shared, reference):
  """SIGKILL at chosen and random moments; rerunning the same command ends identical."""
  rng = np.random.default_rng(KILL_SEED)
  # (name, trigger, delay): each run of the same command is killed once; then it runs to the end.
  # Kills 1-3 wait for saves that every run makes, so they always fire; 4-5 may come too late
  # (the run finished first), which ends the chain early.
  plan = [
      ("mid-save of latest (its tmp folder just appeared)", _new_tmp("latest"), 0.0),
      ("after the best save of an epoch end, before the latest save", _new_commit("best"), 0.0),
      ("mid-save of best (its tmp folder just appeared)", _new_tmp("best"), 0.0),
      ("random moment after a latest commit: next step / evaluation / saves",
       _new_commit("latest"), float(rng.uniform(0.0, 0.5))),
      ("random moment after a latest commit", _new_commit("latest"),
       float(rng.uniform(0.0, 0.5))),
  ]
  workdir = shared["root"] / "killed"
  rd = _rd(workdir)
  mon = _Monitor(shared, _train_cmd(shared, workdir), rd)
  kills, log = 0, []
  for name, trigger, delay in plan:
    res = mon.run(trigger, delay)
    entry = dict(plan=name, rc=res["rc"], fired_at=res["fired_at"], delay=round(delay, 3),
                 latest=sorted(res["after"]["latest"]), best=sorted(res["after"]["best"]),
                 launch_latest=_committed(res["launch"]["latest"]))
    log.append(entry)
    if res["rc"] == 0:  # Finished before its trigger: nothing left to kill.
      break
    assert res["rc"] == -signal.SIGKILL, res["output"][-3000:]
    # What a kill may leave: committed step folders are complete (Orbax renames a finished tmp
    # folder), tmp folders are never listed as checkpoints, metrics.jsonl is whole JSON lines.
    ckpts = checkpoints.RunCheckpoints(rd)
    try:
      for which, mngr in (("latest", ckpts.latest), ("best", ckpts.best)):
        listed = list(mngr.all_steps())
        assert listed == _committed(res["after"][which]), (which, listed, res["after"])
        for s in listed:
          assert (rd / "checkpoints" / which / str(s) / "commit_success.txt").exists()
    finally:
      ckpts.close()
    if (rd / "metrics.jsonl").exists():
      _metrics_rows(rd)
    if (rd / "done.json").exists():
      # The kill landed after done.json (written last, atomically): the run was complete and
      # only the process exit was left, as a delayed kill can do on a loaded machine. Nothing
      # left to interrupt; the rerun below must see a complete run equal to the reference.
      entry["after_done"] = True
      break
    kills += 1
  print("\nkills:", json.dumps(log, indent=1))
  assert kills >= 3, log

  final = mon.run()
  assert final["rc"] == 0, final["output"][-3000:]
  assert "done:" in final["output"] or "already complete:" in final["output"]
  # No half-written checkpoint survives the final run.
  leftover = [n for names in _ckpt_entries(rd).values() for n in names if "tmp" in n]
  assert not leftover, leftover

  _assert_equals_reference(rd, reference["rd"])


def _tiny_state():
  return dict(w=jnp.arange(6, dtype=jnp.float32).reshape(2, 3), step=jnp.int32(3))


def test_half_written_checkpoint_is_ignored_and_replaced(tmp_path):
  """A tmp folder (what a kill mid-save leaves) is never restored and is replaced on re-save."""
  state = _tiny_state()
  abstract = jax.eval_shape(lambda: state)
  mesh = sharding.make_mesh()
  ckpts = checkpoints.RunCheckpoints(tmp_path)
  ckpts.save_latest(1, state, {"step": 1}, {"epoch": 0})
  ckpts.close()
  latest = tmp_path / "checkpoints" / "latest"
  # A save of step 2 killed half-way: a copy of a real checkpoint under the tmp name, with a
  # truncated array file and without its commit marker.
  half = latest / "2.orbax-checkpoint-tmp"
  shutil.copytree(latest / "1", half)
  (half / "commit_success.txt").unlink()
  for f in (half / "state").rglob("*"):
    if f.is_file() and f.stat().st_size > 16:
      f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])
  ckpts = checkpoints.RunCheckpoints(tmp_path)
  assert ckpts.latest_step() == 1
  restored, data_state, meta = ckpts.restore("latest", abstract, mesh)
  chex.assert_trees_all_equal(jax.device_get(restored), jax.device_get(state))
  assert data_state == {"step": 1} and meta == {"epoch": 0}
  new = dict(w=state["w"] + 1, step=jnp.int32(4))
  ckpts.save_latest(2, new, {"step": 2}, {"epoch": 1})
  assert sorted(os.listdir(latest)) == ["2"]  # tmp folder replaced, step 1 rotated out.
  restored, _, _ = ckpts.restore("latest", abstract, mesh)
  chex.assert_trees_all_equal(jax.device_get(restored), jax.device_get(new))
  ckpts.close()


def test_resaving_a_step_that_a_killed_run_already_saved(tmp_path):
  """Killed after ``best/N`` was saved but before ``latest/N``: the resumed run saves best/N again.

  Orbax refuses to save an existing step (StepAlreadyExistsError); the run must replace it.
  """
  state = _tiny_state()
  abstract = jax.eval_shape(lambda: state)
  ckpts = checkpoints.RunCheckpoints(tmp_path)
  ckpts.save_best(2, state, {"step": 2}, {"epoch": 1, "who": "killed run"})
  ckpts.close()
  ckpts = checkpoints.RunCheckpoints(tmp_path)  # The rerun.
  new = dict(w=state["w"] * 2, step=jnp.int32(2))
  ckpts.save_best(2, new, {"step": 2}, {"epoch": 1, "who": "rerun"})
  restored, _, meta = ckpts.restore("best", abstract, sharding.make_mesh())
  chex.assert_trees_all_equal(jax.device_get(restored), jax.device_get(new))
  assert meta["who"] == "rerun"
  assert sorted(os.listdir(tmp_path / "checkpoints" / "best")) == ["2"]
  ckpts.close()


# ----------------------------------------------------------------------- 3. reproducibility.


@pytest.mark.slow
def test_same_command_same_seed_gives_identical_results(shared, reference):
  workdir = shared["root"] / "repeat"
  res = _run(shared, _train_cmd(shared, workdir))
  assert res.returncode == 0, res.stderr[-3000:]
  _assert_same_metrics(_metrics_rows(reference["rd"]), _metrics_rows(_rd(workdir)), rtol=0)
  a, b = _final_state(reference["rd"]), _final_state(_rd(workdir))
  assert _bitwise_equal(a, b)


def test_seed_sets_the_data_order():
  """Same seed: the same batches (also after resuming); another seed: another order."""
  n = 20
  ds = pipeline.ArrayDataset(np.zeros((n, 2, 2, 2), np.float32), np.arange(n) % 2)
  config = smoke.get_config()
  train_idx = np.arange(n)

  def order(seed, start=0):
    it = pipeline.make_train_iterator(ds, train_idx, config, seed=seed, global_batch_size=4,
                                      start_step=start, num_steps=10)
    return np.stack([it.batch_indices(s) for s in range(start, 10)])

  a, b, c = order(0), order(0), order(1000)
  np.testing.assert_array_equal(a, b)
  assert not np.array_equal(a, c)
  np.testing.assert_array_equal(order(0, start=7), a[7:])
  for o in (a, c):  # Uniform sampling: every case once per 5-step epoch.
    assert sorted(o[:5].ravel()) == list(range(n)) == sorted(o[5:].ravel())


# ------------------------------------------------------------------------ 2. numerical faults.

_NAN_SCRIPT = r"""
import json, pathlib, sys
from dsan_jax import runtime
runtime.configure_xla_flags()  # Same XLA flags as train.py: compilation cache hits.
import jax
import numpy as np
from configs import smoke
from dsan_jax.data import prepare
from dsan_jax.training import loop, run_folder
from dsan_jax.data.pipeline import ArrayDataset

root = pathlib.Path(sys.argv[1])
rng = np.random.default_rng(0)
n = 12
images = rng.uniform(0, 1, (n, 16, 32, 32)).astype(np.float32)
labels = np.arange(n) % 2
# Fold 0 = 4 validation cases; 8 training cases = 2 steps of 4 per epoch, each case once.
folds = np.array([0] * 4 + [1] * 8)
NAN_CASE = 5

def data(imgs):
  return prepare.Data(dataset=ArrayDataset(imgs, labels), folds=folds,
                      manifest_path=pathlib.Path("in-memory"), synthetic=True)

out = {}
one_nan = images.copy()
one_nan[NAN_CASE, 3, 4, 5] = np.nan
cfg = smoke.get_config()
cfg.train.max_nonfinite_fraction = 0.75
res = loop.train_and_evaluate(cfg, root / "a", 0, data=data(one_nan), progress=False)
rd = run_folder.run_dir(root / "a", cfg.variant, 0)
rows = [json.loads(l) for l in (rd / "metrics.jsonl").read_text().splitlines()]
t = run_folder.load_trained(rd, which="latest")
leaves = jax.tree_util.tree_leaves(jax.device_get((t.state.params, t.state.batch_stats,
                                                    t.state.opt_state)))
out["a"] = dict(status=res["status"], skipped_per_epoch=[r["train_skipped_steps"] for r in rows],
                train_loss=[r["train_loss"] for r in rows], val_auc=[r["val_auc"] for r in rows],
                state_skipped=int(t.state.skipped_steps), step=int(t.state.step),
                all_finite=bool(all(np.isfinite(x).all() for x in leaves)))

for name, cfg_b, imgs in (("b", smoke.get_config(), one_nan), ("c", None, None)):
  if name == "c":
    cfg_b = smoke.get_config()
    cfg_b.train.max_consecutive_nonfinite = 2
    imgs = images.copy()
    imgs[folds == 1] = np.nan
  try:
    loop.train_and_evaluate(cfg_b, root / name, 0, data=data(imgs), progress=False)
    out[name] = dict(raised=None)
  except loop.TrainingError as e:
    rd = run_folder.run_dir(root / name, cfg_b.variant, 0)
    out[name] = dict(raised=str(e), done=(rd / "done.json").exists(),
                     rows=len((rd / "metrics.jsonl").read_text().splitlines()))
print("RESULT " + json.dumps(out))
"""


@pytest.mark.slow
def test_nan_case_steps_skipped_counted_and_repeated_faults_stop_the_run(shared, tmp_path,
                                                                        reference):
  """Run level (the unit level is tests/test_training.py): a NaN image in the training data.

  Runs in a child process sharing the module's compilation cache (``reference`` fills it).
  (a) one NaN case among 8 training cases: its step is skipped once per epoch, counted in
  metrics.jsonl and in the state, the parameters stay finite and the run completes;
  (b) the default ``max_nonfinite_fraction`` (10 %) stops the run after epoch 1 (50 % skipped);
  (c) every training image NaN, ``max_consecutive_nonfinite=2``: stops at step 2.
  """
  res = _run(shared, [sys.executable, "-c", _NAN_SCRIPT, str(tmp_path)])
  assert res.returncode == 0, res.stderr[-3000:]
  out = json.loads(res.stdout.split("RESULT ", 1)[1])
  a = out["a"]
  assert a["status"] == "complete" and a["step"] == 4
  assert a["skipped_per_epoch"] == [1, 1] and a["state_skipped"] == 2
  assert a["all_finite"] and all(np.isfinite(a["train_loss"]))
  assert all(0.0 <= v <= 1.0 for v in a["val_auc"])
  b = out["b"]
  assert b["raised"] is not None and not b["done"] and b["rows"] == 0
  assert "50% of the steps of epoch 1 were skipped for non-finite values" in b["raised"]
  assert "\n" not in b["raised"]
  c = out["c"]
  assert c["raised"] is not None and not c["done"]
  assert "2 consecutive training steps had a non-finite loss or gradient (up to step 2)" \
      in c["raised"]


# ---------------------------------------------------------------------- 4. resource errors.


def test_disk_too_full_for_checkpoints_fails_before_anything_is_written(shared, tmp_path,
                                                                       monkeypatch):
  free = 1 << 20
  monkeypatch.setattr(shutil, "disk_usage", lambda p: _DiskUsage(1 << 40, 0, free))
  workdir = tmp_path / "work"
  with pytest.raises(errors.ResourceError, match=r"work.*only 0.00 GiB free, the run needs"):
    loop.train_and_evaluate(_config(shared), workdir, 0, progress=False)
  assert list(workdir.rglob("*")) == []  # Not even the run folder.


def test_disk_too_full_for_the_cache_fails_before_preprocessing(shared, tmp_path, monkeypatch):
  monkeypatch.setattr(shutil, "disk_usage",
                      lambda p: _DiskUsage(1 << 40, 0, 50 << 20))
  config = _config(shared)
  config.data.cache_dir = str(tmp_path / "cache")
  with pytest.raises(errors.ResourceError,
                     match=r"cache: not enough free disk space for the cache: 16 entries"):
    prepare.prepare_data(config, tmp_path, progress=False)
  assert list((tmp_path / "cache").glob("*")) == []


def _stderr_error_lines(stderr: str) -> list[str]:
  return [l for l in stderr.splitlines() if l.startswith("error: ")]


@pytest.mark.slow
def test_cli_unwritable_workdir_and_missing_manifest(shared, tmp_path):
  """One line ``error: <path>: <cause>``, exit status 2, no traceback, nothing written."""
  blocker = tmp_path / "a_file"
  blocker.write_text("not a folder")  # Root ignores chmod; a path under a file is unwritable.
  res = _run(shared, _train_cmd(shared, blocker / "runs"))
  assert res.returncode == 2 and "Traceback" not in res.stderr + res.stdout
  assert _stderr_error_lines(res.stderr) == [
      f"error: {blocker / 'runs'}: work directory is not writable (Not a directory)"]
  assert res.stderr.rstrip().splitlines()[-1].startswith("error: ")

  missing = tmp_path / "nowhere" / "manifest.csv"
  workdir = tmp_path / "w"
  res = _run(shared, _train_cmd(shared, workdir, f"--config.data.manifest={missing}"))
  assert res.returncode == 2 and "Traceback" not in res.stderr + res.stdout
  # A single manifest problem is reported on one line, like every other error.
  err = res.stderr.splitlines()
  assert err[-1] == f"error: {missing}: manifest file not found"
  assert [p for p in workdir.rglob("*")] == []


# ------------------------------------------------------- 5. bad input at the command line.


def _bad_manifest(shared, tmp_path) -> tuple[pathlib.Path, dict[str, str]]:
  """The 16 good synthetic rows (absolute paths, so the cache is reused) + 7 bad rows.

  Returns:
    (manifest path, {bad case id: expected words of its reason}).
  """
  with open(shared["syn"] / "manifest.csv") as f:
    good = list(csv.DictReader(f))
  for r in good:
    for k in ("image", "lung_mask", "infection_mask"):
      if r[k]:
        r[k] = str((shared["syn"] / r[k]).resolve())
  img0 = good[0]["image"]
  (tmp_path / "junk.nii.gz").write_bytes(b"this is not a NIfTI file" * 20)
  nib.save(nib.Nifti1Image(np.zeros((32, 32, 1), np.int16), np.eye(4)), tmp_path / "flat.nii.gz")
  vol = np.full((24, 24, 16), -800, np.int16).astype(np.float32)
  vol[3, 4, 5] = np.nan
  nib.save(nib.Nifti1Image(vol, np.eye(4)), tmp_path / "nan.nii.gz")
  bad = [
      dict(case_id="bad_missing", patient_id="pb1", label="covid",
           image=str(tmp_path / "missing.nii.gz")),
      dict(case_id="bad_label", patient_id="pb2", label="flu", image=img0),
      dict(case_id=good[1]["case_id"], patient_id="pb3", label="cap", image=img0),
      dict(case_id="bad_notnifti", patient_id="pb4", label="covid",
           image=str(tmp_path / "junk.nii.gz")),
      dict(case_id="bad_ratio", patient_id="pb5", label="cap", image=img0, infection_ratio="1.5"),
      dict(case_id="bad_2d", patient_id="pb6", label="covid", image=str(tmp_path / "flat.nii.gz")),
      dict(case_id="bad_nan", patient_id="pb7", label="covid", image=str(tmp_path / "nan.nii.gz")),
  ]
  reasons = {"bad_missing": "image file not found", "bad_label": "unknown label 'flu'",
             good[1]["case_id"]: "duplicate", "bad_notnifti": "not a readable NIfTI",
             "bad_ratio": "infection_ratio", "bad_2d": "2D",
             "bad_nan": "NaN or Inf voxels"}
  path = tmp_path / "manifest.csv"
  with open(path, "w", newline="") as f:
    w = csv.DictWriter(f, fieldnames=list(good[0]))
    w.writeheader()
    for r in good + bad:
      w.writerow({k: r.get(k, "") for k in good[0]} | {"split": r.get("split", "train")})
  return path, reasons


@pytest.mark.slow
def test_cli_manifest_with_many_bad_rows_lists_all_before_any_work(shared, tmp_path):
  manifest, reasons = _bad_manifest(shared, tmp_path)
  workdir = tmp_path / "w"
  res = _run(shared, _train_cmd(shared, workdir, f"--config.data.manifest={manifest}",
                                f"--config.data.cache_dir={workdir / 'cache'}"))
  assert res.returncode == 2 and "Traceback" not in res.stderr + res.stdout
  assert _stderr_error_lines(res.stderr) == [f"error: {manifest}: 6 problems found:"]
  problems = [l for l in res.stderr.splitlines() if l.startswith("  - row ")]
  assert len(problems) == 6
  # Header-level problems are all listed at once; the NaN voxels are only visible when reading
  # the voxels (cache build), which never starts here.
  for case_id, words in reasons.items():
    hits = [p for p in problems if f"({case_id})" in p and words in p]
    assert len(hits) == (0 if case_id == "bad_nan" else 1), (case_id, problems)
  assert list(workdir.rglob("*")) == []  # No cache, no run folder, no checkpoint.


@pytest.mark.slow
def test_cli_skip_bad_skips_and_reports_every_bad_case(shared, tmp_path):
  manifest, reasons = _bad_manifest(shared, tmp_path)
  workdir = tmp_path / "w"
  res = _run(shared, _train_cmd(shared, workdir, f"--config.data.manifest={manifest}",
                                "--config.data.skip_bad=True", "--config.train.num_epochs=1"))
  assert res.returncode == 0, res.stderr[-3000:]
  skipped = [l for l in res.stderr.splitlines() if "] skipped " in l]
  assert len(skipped) == 7, skipped
  for case_id, words in reasons.items():
    assert any(f"skipped {case_id}:" in l and words in l for l in skipped), (case_id, skipped)
  assert (_rd(workdir) / "done.json").exists()
  cached = sorted(p.name for p in shared["cache"].glob("*.json"))
  assert len(cached) == 16  # The good cases reused the shared cache (same files, same keys).


def test_corrupt_cache_entries_are_detected_and_rebuilt_on_rerun(shared, tmp_path):
  """A truncated array and a garbled sidecar: the rerun rebuilds exactly those two entries."""
  cache = tmp_path / "cache"
  shutil.copytree(shared["cache"], cache)
  config = _config(shared)
  config.data.cache_dir = str(cache)
  ds = prepare.prepare_data(config, tmp_path, progress=False).dataset
  p0 = cache_lib.entry_paths(cache, ds.keys[0])
  p1 = cache_lib.entry_paths(cache, ds.keys[1])
  originals = {p: p.read_bytes() for p in (p0["image"], p1["image"], p1["meta"])}
  untouched = cache_lib.entry_paths(cache, ds.keys[2])["image"]
  mtime = untouched.stat().st_mtime_ns
  p0["image"].write_bytes(originals[p0["image"]][:1000])
  p1["meta"].write_text("{ truncated")
  with pytest.raises(errors.DataError, match=r"unreadable cache entry of case .*rebuild"):
    ds[0]  # Read by a running job: a clear error naming the file.
  ds = prepare.prepare_data(config, tmp_path, progress=False).dataset
  assert p0["image"].read_bytes() == originals[p0["image"]]
  assert p1["image"].read_bytes() == originals[p1["image"]]
  assert json.loads(p1["meta"].read_text())["case_id"] == ds.case_ids[1]
  assert untouched.stat().st_mtime_ns == mtime  # Only the damaged entries were rebuilt.
  assert not [p for p in cache.iterdir() if ".tmp-" in p.name]


# ------------------------------------------- 7. concurrent commands and a full disk (issue 15).


def _owner_pid(rd: pathlib.Path) -> int | None:
  try:
    return json.loads((rd / run_lock.RUN_LOCK_NAME).read_text())["pid"]
  except (FileNotFoundError, ValueError, KeyError):
    return None


def _wait_until(condition, proc: subprocess.Popen, what: str, timeout: float = RUN_TIMEOUT_S):
  """Polls ``condition()`` every 2 ms while ``proc`` runs; fails if it exits first."""
  t0 = time.perf_counter()
  while not condition():
    if proc.poll() is not None:
      raise AssertionError(f"{what}: the process ended first (rc {proc.returncode}):\n"
                           + proc.stdout.read()[-3000:])
    if time.perf_counter() - t0 > timeout:
      raise TimeoutError(what)
    time.sleep(0.002)


def _committed_step(rd: pathlib.Path, which: str, step: int):
  return lambda: step in _committed(_ckpt_entries(rd)[which])


def _stopped(pid: int) -> bool:
  """Whether the process is stopped by a signal (state T in /proc/<pid>/stat)."""
  stat = pathlib.Path(f"/proc/{pid}/stat").read_text()
  return stat[stat.rindex(")") + 2] in "Tt"


def _stop_outside_checkpoint_writes(proc: subprocess.Popen, rd: pathlib.Path) -> None:
  """SIGSTOPs ``proc`` at a moment it does not hold the checkpoint writer lock."""
  fd = os.open(rd / "checkpoints" / checkpoints.LOCK_NAME, os.O_RDONLY)
  try:
    while True:
      proc.send_signal(signal.SIGSTOP)
      # SIGSTOP is delivered asynchronously: until the process has stopped it may still take
      # the lock after the check below, and a reader would then wait on a stopped process.
      _wait_until(lambda: _stopped(proc.pid), proc, "SIGSTOP delivered")
      try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)  # Free: the save has returned.
        fcntl.flock(fd, fcntl.LOCK_UN)
        return
      except BlockingIOError:
        proc.send_signal(signal.SIGCONT)
        time.sleep(0.01)
  finally:
    os.close(fd)


def _assert_equals_reference(rd: pathlib.Path, ref: pathlib.Path) -> None:
  """Final state, metrics, validation predictions and done.json as the uninterrupted run's."""
  _assert_same_metrics(_metrics_rows(ref), _metrics_rows(rd))
  s_ref, s_run = _final_state(ref), _final_state(rd)
  chex.assert_trees_all_close(s_ref, s_run, rtol=1e-6, atol=1e-7)
  print("final state bitwise equal to the uninterrupted run:", _bitwise_equal(s_ref, s_run))
  p_ref = run_folder.read_predictions(ref / "val_predictions.csv")
  p_run = run_folder.read_predictions(rd / "val_predictions.csv")
  assert [p["case_id"] for p in p_ref] == [p["case_id"] for p in p_run]
  np.testing.assert_allclose([p["prob"] for p in p_ref], [p["prob"] for p in p_run], rtol=1e-6)
  d_ref, d_run = (json.loads((r / "done.json").read_text()) for r in (ref, rd))
  assert d_ref == d_run


def test_owner_lock_dies_with_its_process(tmp_path):
  """A real holder process: the lock is refused while it lives, taken over after kill -9."""
  path = tmp_path / ".owner.lock"
  code = ("import sys, time; from dsan_jax import run_lock; "
          f"l = run_lock.OwnerLock({str(path)!r}); assert l.acquire(); print('held', flush=True); "
          "time.sleep(120)")
  proc = subprocess.Popen([sys.executable, "-c", code], cwd=REPO, stdout=subprocess.PIPE,
                          text=True)
  try:
    assert proc.stdout.readline().strip() == "held"
    owner = run_lock.holder(path)
    assert owner is not None and owner.pid == proc.pid and owner.host == socket.gethostname()
    mine = run_lock.OwnerLock(path)
    t0 = time.perf_counter()
    assert not mine.acquire(retry_s=0.2)
    assert time.perf_counter() - t0 >= 0.2
  finally:
    proc.kill()
    proc.wait()
    proc.stdout.close()
  assert run_lock.holder(path) is None  # Its record is still there, its lock is gone.
  assert mine.acquire(retry_s=0) and mine.previous.pid == proc.pid
  assert run_lock.holder(path).pid == os.getpid()
  mine.release()
  assert path.read_text() == "" and run_lock.holder(path) is None


@pytest.mark.slow
def test_second_train_py_refused_then_kill_9_of_the_owner_is_taken_over(shared, reference):
  """Two ``train.py`` on one run: one trains, the other stops with one line (exit 75). Readers
  use complete checkpoints while it trains; the owner is SIGKILLed; the next command takes the
  run over and ends identical to the uninterrupted run."""
  workdir = shared["root"] / "owned"
  rd = _rd(workdir)
  cmd = _train_cmd(shared, workdir)
  owner = subprocess.Popen(cmd, cwd=REPO, env=_env(shared), stdout=subprocess.PIPE,
                           stderr=subprocess.STDOUT, text=True)
  try:
    _wait_until(lambda: _owner_pid(rd) == owner.pid, owner, "owner lock taken")
    # Held still while the second command runs: with a warm compilation cache the owner could
    # otherwise finish its four steps before the second command has even started up.
    owner.send_signal(signal.SIGSTOP)
    _wait_until(lambda: _stopped(owner.pid), owner, "owner stopped")
    t0 = time.perf_counter()
    try:
      second = _run(shared, cmd)
    finally:
      owner.send_signal(signal.SIGCONT)
    seconds = time.perf_counter() - t0
    print(f"\nsecond train.py stopped after {seconds:.1f} s (rc {second.returncode})")
    assert second.returncode == 75, second.stderr[-3000:]
    assert "Traceback" not in second.stderr + second.stdout
    errors_ = _stderr_error_lines(second.stderr)
    assert len(errors_) == 1 and second.stderr.rstrip().splitlines()[-1] == errors_[0]
    assert re.fullmatch(
        rf"error: {re.escape(str(rd))}: run in progress, owned by pid {owner.pid} on host "
        rf"{re.escape(socket.gethostname())} since \d{{4}}-\d\d-\d\d \d\d:\d\d:\d\d UTC; wait "
        r"for it to finish, or stop it and rerun this command to resume", errors_[0]), errors_
    assert "train /" not in second.stdout  # Stopped before the data and the training.

    # Readers while it trains: only complete checkpoints, never one being written or removed.
    _wait_until(_committed_step(rd, "latest", 1), owner, "latest/1")
    reads = []
    while 2 not in _committed(_ckpt_entries(rd)["latest"]) and owner.poll() is None:
      reads.append(int(run_folder.load_trained(rd, which="latest").state.step))
    _wait_until(_committed_step(rd, "latest", 2), owner, "latest/2")
    _stop_outside_checkpoint_writes(owner, rd)
    note = run_folder.incomplete_note("att_rn34_us", 0, rd)
    assert note.startswith(f"att_rn34_us fold 0 is still being trained (pid {owner.pid} "), note
    best = run_folder.load_trained(rd, which="best")
    print(f"reads of latest while it trained: {len(reads)} (steps {sorted(set(reads))}); "
          f"best read while stopped: epoch {best.meta['best_epoch']}; note: {note}")
    assert reads and set(reads) <= {1, 2} and best.meta["best_epoch"] == 0
    owner.send_signal(signal.SIGKILL)
    owner.wait()
  finally:
    if owner.poll() is None:
      owner.kill()
      owner.wait()
    owner.stdout.close()
  assert owner.returncode == -signal.SIGKILL
  assert _owner_pid(rd) == owner.pid and run_lock.run_owner(rd) is None  # Stale, free.
  assert run_folder.run_status(rd) == "interrupted"

  final = _run(shared, cmd)
  assert final.returncode == 0, final.stderr[-3000:]
  assert f"taking over from a previous owner that is gone (pid {owner.pid} " in final.stderr
  assert "Resuming" in final.stderr and "done:" in final.stdout
  assert (rd / run_lock.RUN_LOCK_NAME).read_text() == ""  # Released on a clean exit.
  _assert_equals_reference(rd, reference["rd"])


@pytest.fixture
def small_disk(tmp_path):
  """A 80 MiB tmpfs mounted for the test (root only; skipped where mounting is not allowed)."""
  mnt = tmp_path / "disk"
  mnt.mkdir()
  res = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=80m", "tmpfs", str(mnt)],
                       capture_output=True, text=True)
  if res.returncode != 0:
    pytest.skip(f"cannot mount a tmpfs here: {res.stderr.strip() or res.returncode}")
  try:
    yield mnt
  finally:
    subprocess.run(["umount", "-l", str(mnt)], check=False)


def _fill(folder: pathlib.Path, leave_bytes: int) -> pathlib.Path:
  filler = folder / "filler"
  with open(filler, "wb") as f:
    chunk = b"\0" * (1 << 20)
    while (free := shutil.disk_usage(folder).free) > leave_bytes:
      try:
        f.write(chunk[: min(len(chunk), free - leave_bytes)])
        f.flush()
      except OSError:
        break
  return filler


@pytest.mark.slow
def test_disk_full_mid_run_one_line_then_resume_equals_uninterrupted(shared, reference,
                                                                      small_disk):
  """The disk fills (another writer) while the run trains: one line naming the path and the
  cause, no traceback, the last complete checkpoint valid; after freeing space the same command
  resumes and ends identical to the uninterrupted run."""
  workdir = small_disk / "runs"
  rd = _rd(workdir)
  cmd = _train_cmd(shared, workdir)
  proc = subprocess.Popen(cmd, cwd=REPO, env=_env(shared), stdout=subprocess.PIPE,
                          stderr=subprocess.PIPE, text=True)
  try:
    _wait_until(_committed_step(rd, "latest", 1), proc, "latest/1")
    _stop_outside_checkpoint_writes(proc, rd)
    # Room for the small files of the epoch end, not for the next checkpoint (~0.8 MB).
    filler = _fill(small_disk, leave_bytes=200_000)
    proc.send_signal(signal.SIGCONT)
    out, err = proc.communicate(timeout=RUN_TIMEOUT_S)
  finally:
    if proc.poll() is None:
      proc.kill()
      proc.wait()
  print(f"\nfilled to {shutil.disk_usage(small_disk).free} bytes free; stderr tail: "
        f"{err.rstrip().splitlines()[-1]}")
  assert proc.returncode == 2, err[-3000:]
  assert "Traceback" not in out + err, err[-6000:]
  lines = _stderr_error_lines(err)
  assert len(lines) == 1 and err.rstrip().splitlines()[-1] == lines[0]
  assert re.fullmatch(
      rf"error: {re.escape(str(rd))}/\S+: no space left on device \(while \S.*\); the last "
      r"complete checkpoint.* is intact: free some space and rerun the same command to resume",
      lines[0]), lines
  # The last complete checkpoint is valid, nothing half-written is left to take the space.
  entries = _ckpt_entries(rd)
  assert _committed(entries["latest"]) == [1] and not [
      n for names in entries.values() for n in names if "tmp" in n], entries
  assert int(run_folder.load_trained(rd, which="latest").state.step) == 1
  assert not list(rd.glob(".*.tmp-*")) and not (rd / "done.json").exists()

  filler.unlink()
  res = _run(shared, cmd)
  assert res.returncode == 0, res.stderr[-3000:]
  assert "Resuming" in res.stderr
  _assert_equals_reference(rd, reference["rd"])


_BUILD_CHILD = """
import json, pathlib, sys, time, logging
logging.basicConfig(level=logging.INFO, format="%(message)s")
from configs import smoke
from dsan_jax.data import prepare
from dsan_jax.training import loop, run_folder
root, go = pathlib.Path(sys.argv[1]), pathlib.Path(sys.argv[2])
config = smoke.get_config()
config.data.synthetic.num_cases = 16
config.data.preprocess_workers = 0
config.data.synthetic.out_dir = str(root / "syn")
config.data.cache_dir = str(root / "cache")
(root / f"ready-{sys.argv[3]}").touch()
while not go.exists():
  time.sleep(0.002)
t0 = time.time()
data = prepare.prepare_data(config, root, progress=False)
print(json.dumps(dict(t0=t0, t1=time.time(), n=len(data.dataset))))
"""


@pytest.mark.slow
def test_two_processes_build_one_phantom_set_and_cache_at_once(shared, tmp_path):
  """Two real processes prepare the same synthetic set and cache at the same moment: one writes
  the phantoms while the other waits and keeps them; every phantom and cache entry is valid and
  identical to a single build (``shared``).

  The test holds the set's generation lock until both children are waiting on it, so that both
  reach the lock whatever the machine's load (without it, a child scheduled late finds the
  finished manifest and never waits).
  """
  go, syn = tmp_path / "go", tmp_path / "syn"
  syn.mkdir()
  gate = run_lock.OwnerLock(syn / ".generate.lock")
  assert gate.acquire()
  errs = [tmp_path / f"child-{i}.err" for i in range(2)]
  procs = [subprocess.Popen([sys.executable, "-c", _BUILD_CHILD, str(tmp_path), str(go), str(i)],
                            cwd=REPO, env=_env(shared), stdout=subprocess.PIPE,
                            stderr=errs[i].open("w"), text=True) for i in range(2)]
  try:
    for i, p in enumerate(procs):
      _wait_until(lambda i=i: (tmp_path / f"ready-{i}").exists(), p, f"child {i} ready", 120)
    go.touch()
    for i, p in enumerate(procs):
      _wait_until(lambda i=i: "waiting for" in errs[i].read_text(), p, f"child {i} waits", 120)
    gate.release()
    outs = [p.communicate(timeout=RUN_TIMEOUT_S)[0] for p in procs]
  finally:
    gate.release()
    for p in procs:
      if p.poll() is None:
        p.kill()
        p.wait()
  err_texts = [e.read_text() for e in errs]
  for p, err in zip(procs, err_texts):
    assert p.returncode == 0, err[-3000:]
  times = [json.loads(out.strip().splitlines()[-1]) for out in outs]
  windows = [(round(t["t0"] - times[0]["t0"], 2), round(t["t1"] - times[0]["t0"], 2))
             for t in times]
  kept = [err for err in err_texts if "kept the phantom set" in err]
  print(f"\nbuild windows (s after go): {windows}; {len(kept)} of 2 kept the other's phantoms")
  assert all(t["n"] == 16 for t in times)
  assert max(t["t0"] for t in times) < min(t["t1"] for t in times)  # They overlapped.
  assert len(kept) == 1  # One wrote the phantoms, the other waited and kept them.

  # Phantoms: byte-identical to a single generation (the set is a function of the seed).
  single, both = shared["syn"], syn
  names = sorted(p.relative_to(single).as_posix() for p in single.rglob("*.nii.gz"))
  assert len(names) == 48 and names == sorted(
      p.relative_to(both).as_posix() for p in both.rglob("*.nii.gz"))
  assert (both / "manifest.csv").read_bytes() == (single / "manifest.csv").read_bytes()
  for n in names:
    assert (both / n).read_bytes() == (single / n).read_bytes(), n
  # Cache: every entry complete (checksums) and identical to the single build's.
  config = _config(shared)
  ds_single = prepare.prepare_data(config, shared["root"], progress=False).dataset
  config.data.synthetic.out_dir, config.data.cache_dir = str(both), str(tmp_path / "cache")
  ds_both = prepare.prepare_data(config, tmp_path, progress=False).dataset
  assert ds_both.case_ids == ds_single.case_ids
  for k_both, k_single in zip(ds_both.keys, ds_single.keys):
    meta = cache_lib.check_entry(tmp_path / "cache", k_both, verify="checksum")
    assert meta is not None
    a = cache_lib.entry_paths(tmp_path / "cache", k_both)
    b = cache_lib.entry_paths(shared["cache"], k_single)
    for part in ("image", "mask"):
      assert a[part].exists() == b[part].exists()
      if b[part].exists():
        assert a[part].read_bytes() == b[part].read_bytes()
    other = json.loads(b["meta"].read_text())
    assert {k: v for k, v in meta.items() if k != "sources"} == {
        k: v for k, v in other.items() if k != "sources"}
  for folder in (both, both / "images", tmp_path / "cache"):
    assert not [p.name for p in folder.iterdir() if ".tmp" in p.name]
