"""Multi-process data parallelism on CPU: 2 processes x 2 devices against 1 process x 4 devices.

Each process of the 2-process run is started with ``jax.distributed.initialize`` on a free local
port (CPU collectives over gloo: jax 0.10.2's default ``jax_cpu_collectives_implementation``,
set explicitly so the test does not depend on that default), feeds only its own contiguous block
of every global batch through ``sharding.shard_batch`` (``jax.make_array_from_process_local_data``), and
runs a few train steps of a tiny DSAN, in float64 and in float32 from the same initial values.

What is compared, and why these tolerances:

* **float64, one step and three steps** (the equality guarantee): the gradients (the SGD
  momentum trace after step 1 *is* the gradient), the BatchNorm statistics (after step 1 they are
  ``0.9 * init + 0.1 * batch moment``, so they carry the global batch's mean and variance), the loss,
  and the whole state after three steps. The two runs sum the same terms in different orders
  (gloo across processes vs. in-process), which in float64 moves a sum of n terms by at most about
  ``n * 2**-53`` of its absolute sum (n <= 131,072 here: ~1.5e-11). ``F64_RTOL = 1e-10`` is
  above that bound; measured agreement is ~6e-15 after one step and ~2e-14 after three. A bug
  (per-process BatchNorm statistics, a missing or doubled gradient all-reduce, a wrong batch
  block) moves these numbers by 1e-3 or more.
* **float32, one step**, the dtype training uses: the network is badly conditioned on purpose
  (``T = sigmoid(100 (A - 0.4))`` and BatchNorm over 8 cases cancel heavily), so float32
  reduction-order noise reaches ~3e-4 of a gradient leaf's size, and three SGD steps at lr 0.1
  amplify it to ~7 % (measured; the float64 run shows that this is rounding, not a bug). So the
  float32 runs are not compared with each other at a fixed tolerance; each is compared with the
  float64 result from the same start, and the 2-process run must be about as accurate as the
  1-process run (``tests/reduction_order.py``).
* **both processes** hold bitwise identical states (same program, same all-reduced values), and
  the **Orbax checkpoint** the 2-process run saved restores bitwise in a 1-device process.

The optimiser is SGD with momentum (see the worker for why not Adam), and the workers compile at
XLA optimisation level 0 to keep the test near a minute on 2 cores.
"""

import json
import os
import pathlib
import socket
import subprocess
import sys
import textwrap

import numpy as np
import pytest

from tests.reduction_order import F64_RTOL, assert_as_accurate, assert_leaves_close, relative_error

pytestmark = pytest.mark.slow

NUM_STEPS = 3
GLOBAL_BATCH = 8
F64_RTOL_3_STEPS = 1e-8  # Three steps may amplify step 1's differences (float32: ~200x).

# Modes: "multi" (argv: out_dir, process_id, port), "single" (out_dir), "restore" (out_dir,
# checkpoint run dir). Every mode writes <out_dir>/<name>.npz with the flattened
# {f32,f64}/{step1,step3}/{params,batch_stats,opt_state} and a JSON line on stdout.
WORKER = textwrap.dedent("""
    import json, sys
    import jax
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    mode, out_dir = sys.argv[1], sys.argv[2]
    if mode == "multi":
      pid, port = int(sys.argv[3]), int(sys.argv[4])
      jax.distributed.initialize(coordinator_address=f"localhost:{port}", num_processes=2,
                                 process_id=pid, initialization_timeout=120)
    import jax.numpy as jnp
    import numpy as np
    import optax
    from jax.experimental import multihost_utils
    from dsan_jax.training import checkpoints, sharding, steps
    from dsan_jax.models import DSAN
    from tests.test_training import TINY, make_batch

    NUM_STEPS, GLOBAL_BATCH, SHAPE = %(steps)d, %(batch)d, (16, 32, 32)

    def flat(state, prefix):
      tree = jax.device_get(dict(params=state.params, batch_stats=state.batch_stats,
                                 opt_state=state.opt_state))
      leaves = jax.tree_util.tree_flatten_with_path(tree)[0]
      return {prefix + jax.tree_util.keystr(p): np.asarray(v) for p, v in leaves}

    def model_for(dtype):
      # XLA's convolutions (the folded 2D form) run in float64 on CPU; oneDNN is float32 only.
      return DSAN(**TINY, dtype=dtype, param_dtype=dtype, conv_impl="folded",
                  stem_conv_impl="folded")

    # SGD with momentum, not Adam: Adam's first steps move every weight by about +-lr whatever
    # the gradient's size, so a weight whose gradient is rounding noise would flip sign between
    # two reduction orders and hide real differences behind a loose tolerance. Momentum keeps
    # an optimiser state for the checkpoint to carry, and after step 1 it equals the gradient.
    tx = optax.sgd(0.1, momentum=0.9)
    mesh = sharding.make_mesh()
    input_shape = (GLOBAL_BATCH, *SHAPE)
    info = dict(mode=mode, process_index=jax.process_index(), process_count=jax.process_count(),
                device_count=jax.device_count(), local_device_count=jax.local_device_count())

    if mode == "restore":
      ckpts = checkpoints.RunCheckpoints(sys.argv[3])
      abstract = steps.abstract_train_state(model_for(jnp.float32), tx, 0, input_shape)
      state, data_state, meta = ckpts.restore("latest", abstract, mesh)
      ckpts.close()
      info.update(step=int(state.step), data_state=data_state, meta=meta)
      np.savez(f"{out_dir}/restore.npz", **flat(state, "f32/step3"))
      print("RESULT", json.dumps(info), flush=True)
      sys.exit(0)

    sharding.check_batch_divisible(GLOBAL_BATCH, mesh)
    p, n = jax.process_index(), jax.process_count()
    local = GLOBAL_BATCH // n

    def batches(dtype):
      for i in range(NUM_STEPS):
        full = make_batch(b=GLOBAL_BATCH, shape=SHAPE, seed=100 + i)
        full["image"] = full["image"].astype(dtype)
        # This process's contiguous block of the global batch, as
        # pipeline.make_train_iterator yields it for process p of n.
        yield full, sharding.shard_batch(
            {k: v[p * local:(p + 1) * local] for k, v in full.items()}, mesh)

    def run(state, dtype, prefix):
      step = steps.make_train_step(model_for(dtype), mesh, attention_weight=0.5)
      out, losses, batch_ok = {}, [], True
      for i, (full, batch) in enumerate(batches(dtype)):
        assert batch["image"].shape == (GLOBAL_BATCH, *SHAPE), batch["image"].shape
        assert len(batch["image"].sharding.device_set) == jax.device_count()
        gathered = multihost_utils.process_allgather(batch["image"], tiled=True) if n > 1 \\
            else np.asarray(batch["image"])
        batch_ok &= bool(np.array_equal(gathered, full["image"]))
        state, metrics = step(state, batch)
        losses.append(float(metrics["loss"]))
        if i in (0, NUM_STEPS - 1):
          out.update(flat(state, f"{prefix}/step{i + 1}"))
      return state, out, losses, batch_ok

    state32 = sharding.replicate(
        steps.create_train_state(model_for(jnp.float32), tx, 0, input_shape), mesh)
    with jax.enable_x64(True):
      # The float64 run starts from the float32 initial values exactly.
      state64 = sharding.replicate(jax.tree_util.tree_map(
          lambda v: v.astype(jnp.float64) if jnp.issubdtype(v.dtype, jnp.floating) else v,
          jax.device_get(state32)), mesh)
      _, out64, losses64, ok64 = run(state64, np.float64, "f64")
    if mode == "single":
      np.savez(f"{out_dir}/init.npz", **flat(state32, "init"))
    state32, out32, losses32, ok32 = run(state32, np.float32, "f32")
    info.update(losses32=losses32, losses64=losses64, batch_ok=ok32 and ok64,
                step=int(state32.step))
    np.savez(f"{out_dir}/{mode}{p}.npz", **out32, **out64)
    if mode == "multi":
      # Every process takes part in the save (Orbax synchronises them); only the primary writes.
      ckpts = checkpoints.RunCheckpoints(f"{out_dir}/run")
      ckpts.save_latest(int(state32.step), state32, dict(step=int(state32.step)),
                        dict(epoch=0, note="multihost"))
      ckpts.close()
    print("RESULT", json.dumps(info), flush=True)
""") % dict(steps=NUM_STEPS, batch=GLOBAL_BATCH)


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("localhost", 0))
    return s.getsockname()[1]


def _env(devices: int) -> dict:
  # Optimisation level 0: compiling the tiny network's init and train step drops from ~25 to
  # ~3 CPU-seconds per process; every run below uses the same flags, so the comparisons hold.
  env = dict(os.environ, JAX_PLATFORMS="cpu",
             XLA_FLAGS=f"--xla_force_host_platform_device_count={devices} "
                       "--xla_backend_optimization_level=0")
  env.pop("JAX_NUM_CPU_DEVICES", None)
  return env


def _start(repo_root, devices: int, *args) -> subprocess.Popen:
  return subprocess.Popen([sys.executable, "-c", WORKER, *map(str, args)], cwd=repo_root,
                          env=_env(devices), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                          text=True)


def _finish(proc: subprocess.Popen, timeout: float = 240) -> dict:
  try:
    out, err = proc.communicate(timeout=timeout)
  except subprocess.TimeoutExpired:
    proc.kill()
    out, err = proc.communicate()
    pytest.fail(f"worker timed out\n{out}\n{err[-4000:]}")
  assert proc.returncode == 0, f"worker failed ({proc.returncode})\n{out}\n{err[-4000:]}"
  line = [l for l in out.splitlines() if l.startswith("RESULT ")][-1]
  return json.loads(line[len("RESULT "):])


def _load(path: pathlib.Path) -> dict[str, np.ndarray]:
  with np.load(path) as f:
    return {k: f[k] for k in f.files}


def _select(d: dict, prefix: str) -> dict:
  return {k[len(prefix):]: v for k, v in d.items() if k.startswith(prefix)}


@pytest.fixture(scope="module")
def runs(repo_root, tmp_path_factory):
  """Runs the 2-process job, the 4-device reference and the 1-device restore once."""
  out = tmp_path_factory.mktemp("multihost")
  port = _free_port()
  procs = [_start(repo_root, 2, "multi", out, pid, port) for pid in range(2)]
  try:
    multi = [_finish(p) for p in procs]
  finally:  # A failed process leaves its peer waiting in a collective: stop it.
    for p in procs:
      if p.poll() is None:
        p.kill()
        p.communicate()
  single = _finish(_start(repo_root, 4, "single", out))
  restore = _finish(_start(repo_root, 1, "restore", out, out / "run"))
  return out, multi, single, restore


def test_two_processes_see_the_global_mesh(runs):
  _, multi, single, restore = runs
  for pid, info in enumerate(multi):
    assert (info["process_index"], info["process_count"]) == (pid, 2)
    assert (info["device_count"], info["local_device_count"]) == (4, 2)
    assert info["batch_ok"], "assembled global batch differs from the true global batch"
    assert info["step"] == NUM_STEPS
  assert (single["process_count"], single["device_count"]) == (1, 4) and single["batch_ok"]
  assert (restore["process_count"], restore["device_count"]) == (1, 1)


def test_both_processes_hold_identical_state(runs):
  out, multi, _, _ = runs
  p0, p1 = _load(out / "multi0.npz"), _load(out / "multi1.npz")
  assert p0.keys() == p1.keys()
  for k in p0:
    np.testing.assert_array_equal(p0[k], p1[k], err_msg=f"process 0 vs process 1: {k}")
  assert multi[0]["losses32"] == multi[1]["losses32"]
  assert multi[0]["losses64"] == multi[1]["losses64"]


def test_float64_one_step_gradients_statistics_and_loss_agree(runs):
  out, multi, single, _ = runs
  got, want = _load(out / "multi0.npz"), _load(out / "single0.npz")
  # After one SGD-momentum step from a zero trace the trace is the gradient itself.
  grads = lambda d: _select(d, "f64/step1['opt_state']")
  stats = lambda d: _select(d, "f64/step1['batch_stats']")
  assert len(grads(want)) > 20 and len(stats(want)) > 10
  assert_leaves_close(grads(got), grads(want), F64_RTOL, "float64 gradients, 2 vs 1 process")
  assert_leaves_close(stats(got), stats(want), F64_RTOL,
                       "float64 BatchNorm statistics, 2 vs 1 process")
  np.testing.assert_allclose(multi[0]["losses64"][0], single["losses64"][0], rtol=F64_RTOL)
  loss_rel = abs(multi[0]["losses64"][0] - single["losses64"][0]) / abs(single["losses64"][0])
  grad_rel = relative_error(grads(got), grads(want))
  print(f"\nfloat64, one step, 2 processes vs 1: gradients {grad_rel:.2g}, "
        f"BatchNorm statistics {relative_error(stats(got), stats(want)):.2g}, loss {loss_rel:.2g} "
        f"(relative to each tensor's largest entry; bound {F64_RTOL:g})")


def test_float64_three_steps_agree(runs):
  out, multi, single, _ = runs
  got, want = _load(out / "multi0.npz"), _load(out / "single0.npz")
  init = _select(_load(out / "init.npz"), "init")
  final = _select(want, "f64/step3")
  # Every parameter moved far beyond the tolerance (smallest move ~1e-2 of its scale), so this
  # is not a comparison of two copies of the initial state.
  for k, v in init.items():
    if k.startswith("['params']"):
      assert np.max(np.abs(final[k] - v)) > 1e3 * F64_RTOL_3_STEPS * np.max(np.abs(v)), k
  assert_leaves_close(_select(got, "f64/step3"), final, F64_RTOL_3_STEPS,
                       "float64 state after 3 steps, 2 vs 1 process")
  np.testing.assert_allclose(multi[0]["losses64"], single["losses64"], rtol=F64_RTOL_3_STEPS)


def test_float32_step_is_as_accurate_as_one_process(runs):
  out, multi, single, _ = runs
  got, want = _load(out / "multi0.npz"), _load(out / "single0.npz")
  for part in ("['opt_state']", "['batch_stats']", "['params']"):
    assert_as_accurate(_select(got, f"f32/step1{part}"), _select(want, f"f32/step1{part}"),
                       _select(want, f"f64/step1{part}"), f"2 vs 1 process, float32 {part}")
  exact = {"loss": np.float64(single["losses64"][0])}
  assert_as_accurate({"loss": np.float64(multi[0]["losses32"][0])},
                     {"loss": np.float64(single["losses32"][0])}, exact, "float32 loss")


def test_checkpoint_from_two_processes_restores_on_one_device(runs):
  out, _, _, restore = runs
  assert restore["step"] == NUM_STEPS
  assert restore["data_state"] == {"step": NUM_STEPS}
  assert restore["meta"]["note"] == "multihost"
  want = _select(_load(out / "multi0.npz"), "f32/step3")
  got = _select(_load(out / "restore.npz"), "f32/step3")
  assert got.keys() == want.keys()
  for k in want:
    np.testing.assert_array_equal(got[k], want[k], err_msg=f"restored vs written: {k}")
  steps = sorted(p.name for p in (out / "run" / "checkpoints" / "latest").iterdir())
  assert steps == [str(NUM_STEPS)], steps
