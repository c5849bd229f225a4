#!/bin/bash
# One ablation of the quick start (docs/testbed.md, "Ablations (session 6)"): fold 0, data seed
# 0, configs/quickstart.py with the given config flags, over a phantom folder and a cache that
# several runs share. Logs CPU user+sys, wall and the load average before and after.
#
# usage: benchmarks/ablate_quickstart.sh NAME PHANTOM_DIR CACHE_DIR [--config.x=y ...]
#   root of the runs and logs: $ABL_ROOT (default /tmp/dsan_ablate); the run is $ABL_ROOT/runs/NAME.
set -u
name=$1; phantoms=$2; cache=$3; shift 3
root=${ABL_ROOT:-/tmp/dsan_ablate}
repo=$(cd "$(dirname "$0")/.." && pwd)
py=${PYTHON:-$repo/.venv/bin/python}
mkdir -p "$root/logs" "$root/runs"
cd "$repo"
load0=$(cut -d' ' -f1-3 /proc/loadavg)
start=$(date +%s)
nice -n 15 /usr/bin/time -f "%e s wall %U user %S sys" "$py" train.py \
  --config configs/quickstart.py --fold 0 --workdir "$root/runs/$name" --noprogress \
  --config.data.synthetic.out_dir="$phantoms" --config.data.cache_dir="$cache" "$@" \
  > "$root/logs/$name.log" 2>&1
rc=$?
echo "$name rc=$rc $(( $(date +%s) - start )) s; load $load0 -> $(cut -d' ' -f1-3 /proc/loadavg);" \
  "$(tail -1 "$root/logs/$name.log"); flags: $*" >> "$root/logs/summary.txt"
exit $rc
