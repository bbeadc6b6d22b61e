#!/usr/bin/env bash
# Mixed load, one or more lsvfs builds in turns: a metadata workload alone
# and beside a process that does long data work, and that process's own
# rate (bench.sh's mixed rows report only the first). Each run of each
# build, on a fresh 4 GiB volume and mount, SECONDS each:
#  1. `stress-ng --dir 1` alone (mkdir/rmdir: every request takes the
#     metadata lock);
#  2. beside `stress-ng --sync-file 1` (fallocate 1 GiB, sync_file_range,
#     fsync, truncate, in a loop);
#  3. beside `stress-ng --fallocate 1`.
# Prints the dir stressor's ops/s, its share of the solo rate, and the
# other stressor's ops/s.
# Usage: scripts/bench-mixed.sh BUILD... [-- RUNS SECONDS WORKDIR]
#   (default 2 runs, 5 s, /tmp/lsvfs-mixed).
# Needs root, fuse3 and stress-ng (scripts/setup.sh bench installs them).
set -euo pipefail
builds=()
while [ $# -gt 0 ] && [ "$1" != -- ]; do builds+=("$(realpath "$1")"); shift; done
[ ${#builds[@]} -ge 1 ] || { sed -n '2,15p' "$0" | sed 's/^# \{0,1\}//'; exit 2; }
[ "${1:-}" = -- ] && shift
runs=${1:-2}
secs=${2:-5}
work=${3:-/tmp/lsvfs-mixed}
here=$(dirname "$(realpath "$0")")
. "$here/bench-lib.sh"
bench_workdir "$work"
"${builds[0]}" keygen "$work/key" >/dev/null

stress() { # other stressor's options -> "dir_ops other_ops"
  (cd "$work/m/t" && stress-ng --dir 1 $1 -t "$secs" --metrics-brief 2>&1) \
    | awk '$4 == "dir" {d = $9} $4 == "sync-file" || $4 == "fallocate" {o = $9}
           END {print d, (o == "" ? "-" : o)}'
}
pct() { echo "scale=1; 100 * $1 / $2" | bc; }

for run in $(seq "$runs"); do
  for bin in "${builds[@]}"; do
    rm -f "$work/v.vol"
    "$bin" create "$work/v.vol" --size 4G --key-file "$work/key" >/dev/null
    "$bin" mount "$work/v.vol" "$work/m" --key-file "$work/key" >/dev/null
    mkdir "$work/m/t"
    read -r alone _ < <(stress "")
    read -r sf sf_own < <(stress "--sync-file 1")
    read -r fa fa_own < <(stress "--fallocate 1")
    "$bin" unmount "$work/m" >/dev/null
    echo "run $run $bin: dir alone $alone ops/s; beside sync-file $sf ($(pct "$sf" "$alone")%), sync-file itself $sf_own ops/s; beside fallocate $fa ($(pct "$fa" "$alone")%), fallocate itself $fa_own ops/s"
  done
done
