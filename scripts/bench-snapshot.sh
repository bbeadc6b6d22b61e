#!/usr/bin/env bash
# Snapshot benchmark, through a real mount:
#  1. time of `lsvfs snapshot create` with 1 GiB and with 8 GiB of data
#     (median of 5, each after 64 MiB of fresh writes so it has work to do);
#  2. the longest write stall of a concurrent fio writer while a snapshot
#     is created every second, against the same writer with no snapshots
#     (same run, same mount).
# Usage: scripts/bench-snapshot.sh [WORKDIR] [SECONDS]
# Needs root, fuse3, fio and jq.
set -euo pipefail
cd "$(dirname "$0")/.."
work=${1:-/tmp/lsvfs-snapbench}
secs=${2:-20}
scripts/setup.sh bench
cargo build --release --quiet
lsvfs=$PWD/target/release/lsvfs
rm -rf "$work"
mkdir -p "$work/m"
cleanup() { fusermount3 -uz "$work/m" 2>/dev/null || true; rm -rf "$work"; }
trap cleanup EXIT
"$lsvfs" keygen "$work/k" >/dev/null

ms() { python3 -c 'import sys,time; print(f"{(time.time()-float(sys.argv[1]))*1000:.1f}")' "$1"; }
median() { sort -n | awk '{a[NR]=$1} END {print a[int((NR+1)/2)]}'; }

create_times() { # data-GiB
  local gib=$1
  "$lsvfs" create "$work/v.vol" --size "$((gib * 2))G" --key-file "$work/k" >/dev/null
  "$lsvfs" mount "$work/v.vol" "$work/m" --key-file "$work/k" >/dev/null
  fio --name=fill --directory="$work/m" --rw=write --bs=1M --size="${gib}G" --numjobs=1 \
    --end_fsync=1 --output-format=terse >/dev/null
  local t=()
  for i in 1 2 3 4 5; do
    head -c 67108864 /dev/urandom >"$work/m/fresh$i"
    local s
    s=$(date +%s.%N)
    "$lsvfs" snapshot create "$work/m" "s$i" >/dev/null
    t+=("$(ms "$s")")
  done
  printf '%s\n' "${t[@]}" | median
  "$lsvfs" unmount "$work/m" >/dev/null
  rm -f "$work/v.vol"
}

echo "== snapshot create time (median of 5; includes syncfs of 64 MiB written just before)"
t1=$(create_times 1)
echo "1 GiB of data: ${t1} ms"
t8=$(create_times 8)
echo "8 GiB of data: ${t8} ms"

echo "== write stall of a concurrent fio writer (direct 64 KiB writes, ${secs} s each)"
"$lsvfs" create "$work/v.vol" --size 8G --key-file "$work/k" >/dev/null
"$lsvfs" mount "$work/v.vol" "$work/m" --key-file "$work/k" >/dev/null
writer() {
  fio --name=w --directory="$work/m" --filename=w --rw=randwrite --bs=64k --size=1G \
    --direct=1 --ioengine=psync --time_based --runtime="$secs" --output-format=json \
    | jq -r '.jobs[0].write | "\(.iops|floor) IOPS, latency max \(.clat_ns.max/1e6|.*10|floor/10) ms, p99.9 \(.clat_ns.percentile["99.900000"]/1e6|.*10|floor/10) ms, p50 \(.clat_ns.percentile["50.000000"]/1e6|.*100|floor/100) ms"'
}
echo "without snapshots: $(writer)"
(
  i=0
  end=$(($(date +%s) + secs))
  while [ "$(date +%s)" -lt "$end" ]; do
    s=$(date +%s.%N)
    "$lsvfs" snapshot create "$work/m" "t$i" >/dev/null
    echo "$(ms "$s")" >>"$work/create-ms"
    i=$((i + 1))
    sleep 1
  done
) &
snapper=$!
echo "with a snapshot every second: $(writer)"
wait "$snapper"
n=$(wc -l <"$work/create-ms")
echo "snapshots taken meanwhile: $n; create time median $(median <"$work/create-ms") ms, max $(sort -n "$work/create-ms" | tail -1) ms"
"$lsvfs" snapshot list "$work/m" | tail -3
"$lsvfs" unmount "$work/m" >/dev/null
