"""Runs every benchmark as a subprocess and collects their tables into one markdown file.

Benchmarks (each prints markdown on stdout; progress goes to stderr):

  train       bench_train.py       train step / inference, JAX vs PyTorch (the identical network)
  preprocess  bench_preprocess.py  preprocessing of a real CT (skips cleanly without the data)
  pipeline    bench_pipeline.py    input pipeline vs step (when present)
  memory      bench_memory.py      compiled memory at full size (when present)
  conv        bench_conv.py        per-layer 3D convolution implementations

One at a time (the machine has 2 cores; running them together would only measure contention).
A benchmark that is missing, fails or times out gets a line saying so in the output; the others
still run. Exit status 1 if any selected benchmark failed.

Usage:
  python benchmarks/run_all.py --out docs/benchmarks_latest.md          # full (~15 min, 2 cores)
  python benchmarks/run_all.py --quick --out /tmp/bench_quick.md        # small sizes (~3-4 min)
  python benchmarks/run_all.py --only train,preprocess
  python benchmarks/run_all.py --skip conv --timeout 900
"""

import argparse
import datetime
import os
import platform
import subprocess
import sys
import time

_HERE = os.path.dirname(os.path.abspath(__file__))
_ROOT = os.path.dirname(_HERE)

# name -> (script, full arguments, --quick arguments). bench_memory.py / bench_pipeline.py belong
# to another module; their quick arguments are their own small-size options. A "--quick" in
# these lists is passed only when the script's --help mentions it.
BENCHMARKS = {
    "train": ("bench_train.py", ["--bf16-inference"],
              ["--sizes", "32x64x64", "--infer_sizes", "none", "--reps", "2"]),
    "preprocess": ("bench_preprocess.py", ["--reps", "3"], ["--reps", "1"]),
    "pipeline": ("bench_pipeline.py", [],
                 ["--num_cases", "24", "--batches", "5", "--warmup", "1", "--step_reps", "2"]),
    "memory": ("bench_memory.py", [],
               ["--shape", "48,64,64", "--batches", "1", "--variants", "fp32,bf16",
                "--accum_variants", ""]),
    "conv": ("bench_conv.py", ["--size", "48,96,96", "--reps", "3"],
             ["--size", "32,64,64", "--reps", "2", "--layers", "stem,l1,l2_down"]),
}


def _supports(script: str, flag: str) -> bool:
  """Whether ``script --help`` mentions ``flag`` (for the other benchmarks' optional --quick)."""
  try:
    out = subprocess.run([sys.executable, script, "--help"], capture_output=True, text=True,
                         timeout=120, cwd=_ROOT, check=False)
  except (OSError, subprocess.TimeoutExpired):
    return False
  return flag in out.stdout


def _as_markdown(name: str, script: str, out: str) -> str:
  """A benchmark's stdout as a markdown section under its own ``##`` heading.

  Markdown output (starting with "## ") is kept; output with tables whose comment lines start
  with "# " gets those lines as bullets; anything else goes into a code block.
  """
  out = out.strip()
  if out.startswith("## "):
    return out
  head = f"## {name} (`{script}`)\n\n"
  if "| ---" in out:
    lines = []
    for line in out.splitlines():
      if line.startswith("# "):
        line = f"- {line[2:].strip()}"
      if line.startswith("|") and lines and lines[-1] and not lines[-1].startswith("|"):
        lines.append("")  # A table needs a blank line before it.
      lines.append(line)
    return head + "\n".join(lines)
  return head + f"```\n{out}\n```"


def run_one(name: str, quick: bool, timeout: float, env: dict) -> tuple[str, bool]:
  """Runs one benchmark; returns (markdown section, ok)."""
  script, full_args, quick_args = BENCHMARKS[name]
  path = os.path.join(_HERE, script)
  if not os.path.exists(path):
    return f"## {name} (`{script}`)\n\n- not run: `benchmarks/{script}` does not exist.\n", True
  args = list(quick_args if quick else full_args)
  if quick and "--quick" in args and not _supports(path, "--quick"):
    args.remove("--quick")
  cmd = [sys.executable, path, *args]
  shown = f"python benchmarks/{script} {' '.join(args)}".strip()
  print(f"[run_all] {shown}", file=sys.stderr, flush=True)
  t0 = time.perf_counter()
  try:
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, cwd=_ROOT,
                          check=False, env=env)
  except subprocess.TimeoutExpired as e:
    out = e.stdout.decode() if isinstance(e.stdout, bytes) else (e.stdout or "")
    return (f"## {name}\n\n- **timed out** after {timeout:.0f} s: `{shown}`\n\n"
            f"Partial output:\n\n{out}\n", False)
  wall = time.perf_counter() - t0
  body = _as_markdown(name, script, proc.stdout)
  section = f"{body}\n\n- `{shown}`: {wall:.0f} s wall, exit status {proc.returncode}\n"
  if proc.returncode != 0:
    tail = "\n".join(proc.stderr.strip().splitlines()[-15:])
    section += f"\n**failed**; last lines of stderr:\n\n```\n{tail}\n```\n"
  return section, proc.returncode == 0


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--only", default="", help=f"comma-separated subset of {list(BENCHMARKS)}")
  parser.add_argument("--skip", default="", help="comma-separated benchmarks to leave out")
  parser.add_argument("--quick", action="store_true", help="small sizes, few repetitions")
  parser.add_argument("--out", default="", help="markdown file to write (also printed)")
  parser.add_argument("--timeout", type=float, default=1200, help="seconds per benchmark")
  parser.add_argument("--no-flags", "--no_flags", dest="no_flags", action="store_true",
                      help="do not put the recommended XLA:CPU flags into the benchmarks' "
                           "XLA_FLAGS (bench_conv.py does not add them itself)")
  args = parser.parse_args(argv)
  names = [n for n in (args.only.split(",") if args.only else BENCHMARKS) if n]
  unknown = [n for n in names + [s for s in args.skip.split(",") if s] if n not in BENCHMARKS]
  if unknown:
    parser.error(f"unknown benchmarks {unknown}; choose from {list(BENCHMARKS)}")
  names = [n for n in names if n not in args.skip.split(",")]

  env = dict(os.environ)
  if args.no_flags:
    env["DSAN_NO_XLA_FLAGS"] = "1"
  else:
    sys.path.insert(0, _ROOT)
    from dsan_jax import runtime  # pylint: disable=g-import-not-at-top
    flags = runtime.recommended_cpu_xla_flags()  # Checked in a subprocess; no JAX here.
    if flags and "xla_cpu_experimental_ynn_fusion_type" not in env.get("XLA_FLAGS", ""):
      env["XLA_FLAGS"] = f"{env.get('XLA_FLAGS', '')} {flags}".strip()
  load0 = os.getloadavg()
  try:
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True,
                            text=True, cwd=_ROOT, check=False).stdout.strip() or "?"
  except OSError:
    commit = "?"
  header = [
      f"# Benchmark run {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC"
      + (" (quick)" if args.quick else ""),
      "",
      f"- machine: {platform.machine()}, {os.cpu_count()} CPUs, {platform.platform()}; "
      f"commit {commit} (plus uncommitted changes, if any)",
      f"- command: `python benchmarks/run_all.py {' '.join(sys.argv[1:] if argv is None else argv)}`",
      f"- XLA_FLAGS given to every benchmark: `{env.get('XLA_FLAGS', '') or '(none)'}`",
      f"- load average before: {load0[0]:.1f} / {load0[1]:.1f} / {load0[2]:.1f}",
      "",
  ]
  sections, failed = [], []
  t0 = time.perf_counter()
  for name in names:
    section, ok = run_one(name, args.quick, args.timeout, env)
    sections.append(section)
    print(section, flush=True)
    if not ok:
      failed.append(name)
  load1 = os.getloadavg()
  footer = [f"- load average after: {load1[0]:.1f} / {load1[1]:.1f} / {load1[2]:.1f}; "
            f"total {time.perf_counter() - t0:.0f} s"
            + (f"; failed: {', '.join(failed)}" if failed else "")]
  text = "\n".join(header) + "\n" + "\n".join(sections) + "\n" + "\n".join(footer) + "\n"
  if args.out:
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w") as f:
      f.write(text)
    print(f"[run_all] wrote {args.out}", file=sys.stderr)
  return 1 if failed else 0


if __name__ == "__main__":
  sys.exit(main())
