#!/usr/bin/env bash
# Rekey benchmark (issue: key lifecycle), one run, one disk:
#  1. the engine's sequential write and read rates (benches/volume.rs), the
#     ceiling a rekey (which reads, opens, seals and writes every block) is
#     measured against;
#  2. a mounted volume holding GIB GiB of file data, rekeyed while idle
#     (`lsvfs rekey MOUNTPOINT --wait`): its rate, data per second;
#  3. a fio writer (random 64 KiB writes, fsync every 16) on the same mount,
#     alone and then while a second rekey runs: write rate and p99 latency,
#     and whether the rekey was still running when fio ended.
# Usage: scripts/bench-rekey.sh [WORKDIR] [GIB]     (default /tmp/lsvfs-rekeybench, 4)
# Needs root, fuse3, fio and jq (scripts/setup.sh bench installs them).
set -euo pipefail
cd "$(dirname "$0")/.."
work=${1:-/tmp/lsvfs-rekeybench}
gib=${2:-4}
secs=6
scripts/setup.sh bench
cargo build --release --benches --quiet
lsvfs=$PWD/target/release/lsvfs
. scripts/bench-lib.sh
bench_workdir "$work"

since() { echo "$(now) - $1" | bc -l | xargs printf '%.2f'; }
drop_caches() { sync; echo 3 >/proc/sys/vm/drop_caches; }

echo "== the engine's sequential rates (1 GiB, 1 MiB transactions)"
eng=$(cargo bench --quiet --bench volume -- --dir "$work/eng" --mib 1024 --seconds 1 2>/dev/null \
  | grep -E "engine seq (write|read)" || true)
rm -rf "$work/eng"
echo "$eng"
eng_write=$(echo "$eng" | awk '/engine seq write/ {print $(NF-1)}')
eng_read=$(echo "$eng" | awk '/engine seq read/ {print $(NF-1)}')

echo "== a mounted volume with $gib GiB of file data"
"$lsvfs" keygen "$work/k" >/dev/null
"$lsvfs" create "$work/v.vol" --size "$((gib * 2 + 2))G" --key-file "$work/k" >/dev/null
"$lsvfs" mount "$work/v.vol" "$work/m" --key-file "$work/k" >/dev/null
for i in $(seq 1 "$((gib * 4))"); do
  head -c 256M /dev/urandom >"$work/m/data$i"
done
mkdir "$work/m/fio"
sync
bytes=$(du -sb "$work/m" | cut -f1)
echo "data: $((bytes / 1048576)) MiB"

status() { "$lsvfs" rekey "$work/m" --status --json; }

echo "== rekey of the idle mount"
drop_caches
s=$(now)
"$lsvfs" rekey "$work/m" --key-file "$work/k" --wait >/dev/null
t_idle=$(since "$s")
rate=$(echo "$bytes / 1000000 / $t_idle" | bc -l | xargs printf '%.0f')
echo "rekey (idle): ${t_idle} s, ${rate} MB/s of data; $(echo "100 * $rate / $eng_write" | bc)% of the engine's sequential write rate (${eng_write} MB/s), $(echo "100 * $rate / $eng_read" | bc)% of its read rate (${eng_read} MB/s)"

fio_run() {
  fio --name=w --directory="$work/m/fio" --rw=randwrite --bs=64k --size=256M \
    --ioengine=psync --fsync=16 --time_based --runtime="$secs" --output-format=json 2>/dev/null \
    | jq -r '.jobs[0] | "\(.write.bw_bytes) \(.write.clat_ns.percentile["99.000000"]) \(.sync.lat_ns.percentile["99.000000"])"'
}

echo "== fio writer (random 64 KiB writes, fsync every 16), ${secs} s, alone"
read -r bw_alone p99_alone sync_alone < <(fio_run)
echo "alone:        $((bw_alone / 1000000)) MB/s, write p99 $((p99_alone / 1000)) us, fsync p99 $((sync_alone / 1000)) us"

echo "== the same fio writer while a second rekey runs"
"$lsvfs" rekey "$work/m" --key-file "$work/k" >/dev/null
read -r bw_busy p99_busy sync_busy < <(fio_run)
running=$(status | jq -r '.running')
echo "beside rekey: $((bw_busy / 1000000)) MB/s, write p99 $((p99_busy / 1000)) us, fsync p99 $((sync_busy / 1000)) us; rekey still running at fio's end: $running"
echo "writer keeps $((100 * bw_busy / bw_alone))% of its rate beside the rekey"
s=$(now)
while [ "$(status | jq -r '.generations | length')" -gt 1 ]; do sleep 0.2; done
echo "the second rekey then finished $(since "$s") s later"
"$lsvfs" unmount "$work/m" >/dev/null
