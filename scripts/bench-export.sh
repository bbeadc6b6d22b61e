#!/usr/bin/env bash
# Export benchmark, lsvfs beside restic (Debian's package), one run, same
# disk, same data (issue: portable exports):
#  1. a volume holding GIB GiB of real files (copies of /usr, cut to size),
#     mounted; `lsvfs check` of it (every block read and authenticated: the
#     engine's sequential read rate, the export's ceiling);
#  2. full export of a snapshot to a local file, against `restic backup` of
#     the same mounted snapshot into a local repository;
#  3. 1% of the files changed: the incremental export against restic's
#     incremental backup of the same tree;
#  4. restoring the chain into a new volume against `restic restore` of the
#     same snapshot;
#  5. the peak RSS of export and restore (GNU time).
# Usage: scripts/bench-export.sh [WORKDIR] [GIB]     (default /tmp/lsvfs-exportbench, 2)
# LSVFS_BASE=path/to/lsvfs also times that build's export to a pipe, in turns
# with this one's.
# Needs root, fuse3, restic and GNU time (scripts/setup.sh bench installs them).
set -euo pipefail
cd "$(dirname "$0")/.."
work=${1:-/tmp/lsvfs-exportbench}
gib=${2:-2}
scripts/setup.sh bench
cargo build --release --benches --quiet
lsvfs=$PWD/target/release/lsvfs
rm -rf "$work"
mkdir -p "$work/m" "$work/rm"
cleanup() {
  fusermount3 -uz "$work/m" 2>/dev/null || true
  fusermount3 -uz "$work/rm" 2>/dev/null || true
  rm -rf "$work"
}
trap cleanup EXIT
export RESTIC_PASSWORD=lsvfs-bench RESTIC_CACHE_DIR="$work/restic-cache"
"$lsvfs" keygen "$work/k" >/dev/null

now() { date +%s.%N; }
since() { echo "$(now) - $1" | bc -l | xargs printf '%.2f'; }
rate() { echo "$1 / 1048576 / $2" | bc -l | xargs printf '%.0f'; } # bytes seconds -> MiB/s
rss() { awk -F': ' '/Maximum resident set size/ {printf "%.0f", $2/1024}' "$1"; }
drop_caches() { sync; echo 3 >/proc/sys/vm/drop_caches; }
# The most dirty page cache (MiB, /proc/meminfo) seen while process $1 runs.
dirty_peak() {
  local most=0 d
  while kill -0 "$1" 2>/dev/null; do
    d=$(awk '/^Dirty:/ {print $2}' /proc/meminfo)
    [ "$d" -gt "$most" ] && most=$d
    sleep 0.05
  done
  echo $((most / 1024))
}

echo "== a volume with $gib GiB of /usr's files"
"$lsvfs" create "$work/v.vol" --size "$((gib * 3))G" --key-file "$work/k" >/dev/null
"$lsvfs" mount "$work/v.vol" "$work/m" --key-file "$work/k" >/dev/null
i=0
while [ "$(du -sm "$work/m" | cut -f1)" -lt $((gib * 1024)) ]; do
  i=$((i + 1))
  mkdir "$work/m/usr$i"
  # Copy until the budget is met (tar stops at the first error: a full copy
  # of /usr may be larger than what is left).
  left=$((gib * 1024 - $(du -sm "$work/m" | cut -f1)))
  (cd /usr && find . -type f -size -64M -print0 | head -z -n 1000000 \
    | tar --null -T - -cf - 2>/dev/null) | head -c "$((left * 1048576))" \
    | tar -xf - -C "$work/m/usr$i" 2>/dev/null || true
done
files=$(find "$work/m" -type f | wc -l)
bytes=$(du -sb "$work/m" | cut -f1)
echo "files: $files, $(echo "$bytes / 1048576" | bc) MiB"
"$lsvfs" snapshot create "$work/m" full >/dev/null
"$lsvfs" unmount "$work/m" >/dev/null

drop_caches
s=$(now)
"$lsvfs" check "$work/v.vol" --key-file "$work/k" >/dev/null
t_check=$(since "$s")
echo "lsvfs check of this volume (every block read and authenticated, the file system walked): ${t_check} s, $(rate "$bytes" "$t_check") MiB/s of file data"
# The engine's own sequential read rate (1 MiB reads, cold cache), this disk.
eng=$(cargo bench --quiet --bench volume -- --dir "$work/eng" --mib 1024 --seconds 1 2>/dev/null \
  | grep "engine seq read 1 MiB (cold cache)" || true)
rm -rf "$work/eng"
echo "${eng:-engine seq read: not measured}"

echo "== full export to a pipe (counted by wc -c): the export's own rate, apart from the output disk"
pipe_export() { # BINARY LABEL: one cold export to a pipe
  drop_caches
  s=$(now)
  pipe_size=$("$1" snapshot export "$work/v.vol" full --key-file "$work/k" -o - 2>/dev/null | wc -c)
  t_pipe=$(since "$s")
  echo "$2 export to a pipe: ${t_pipe} s, $(rate "$pipe_size" "$t_pipe") MiB/s of export"
}
if [ -n "${LSVFS_BASE:-}" ]; then
  # Another build (LSVFS_BASE=path), alternating with this one, three each.
  for _ in 1 2 3; do
    pipe_export "$LSVFS_BASE" lsvfs-base
    pipe_export "$lsvfs" lsvfs
  done
else
  pipe_export "$lsvfs" lsvfs
fi
# What a durable local copy of that many bytes costs on this disk alone.
drop_caches
s=$(now)
dd if=/dev/zero of="$work/dd.out" bs=1M count=2048 conv=fdatasync status=none
t_dd=$(since "$s")
rm -f "$work/dd.out"
echo "this disk's durable write rate (dd 2 GiB conv=fdatasync): $(rate $((2048 * 1048576)) "$t_dd") MiB/s"

echo "== full: lsvfs export (unmounted volume, to a local file) vs restic backup (of the same tree, mounted)"
drop_caches
s=$(now)
/usr/bin/time -v -o "$work/time-export" \
  "$lsvfs" snapshot export "$work/v.vol" full --key-file "$work/k" -o "$work/full.lsx" 2>/dev/null &
dirty=$(dirty_peak $!)
wait $!
t_full=$(since "$s")
full_size=$(stat -c %s "$work/full.lsx")
echo "dirty page cache at most ${dirty} MiB during the export to a file (its write-behind)"
echo "lsvfs export:  ${t_full} s, $(rate "$full_size" "$t_full") MiB/s of export, $(rate "$bytes" "$t_full") MiB/s of file data, $(echo "$full_size / 1048576" | bc) MiB, peak RSS $(rss "$work/time-export") MiB"
"$lsvfs" mount "$work/v.vol" "$work/m" --key-file "$work/k" >/dev/null
restic init --repo "$work/repo" >/dev/null 2>&1
drop_caches
s=$(now)
# The live tree, which is still the snapshot (restic finds its parent
# snapshot by path, so both backups name the same one).
restic backup --repo "$work/repo" --host bench --tag full "$work/m" >/dev/null 2>&1
t_rfull=$(since "$s")
echo "restic backup: ${t_rfull} s"
echo "ratio restic / lsvfs: $(echo "$t_rfull / $t_full" | bc -l | xargs printf '%.2f')x"

echo "== 1% of the files changed: incremental export vs restic's incremental backup"
find "$work/m" -path "$work/m/.snapshots" -prune -o -type f -print | awk 'NR % 100 == 0' \
  | while read -r f; do printf 'changed %s\n' "$RANDOM" >>"$f"; done
"$lsvfs" snapshot create "$work/m" inc >/dev/null
"$lsvfs" unmount "$work/m" >/dev/null
drop_caches
s=$(now)
"$lsvfs" snapshot export "$work/v.vol" inc --since full --key-file "$work/k" -o "$work/inc.lsx" 2>/dev/null
t_inc=$(since "$s")
echo "lsvfs incremental export: ${t_inc} s, $(echo "$(stat -c %s "$work/inc.lsx") / 1048576" | bc) MiB ($(echo "$t_inc * 100 / $t_full" | bc -l | xargs printf '%.1f')% of the full export's time)"
"$lsvfs" mount "$work/v.vol" "$work/m" --key-file "$work/k" >/dev/null
drop_caches
s=$(now)
restic backup --repo "$work/repo" --host bench --tag inc "$work/m" >/dev/null 2>&1
t_rinc=$(since "$s")
echo "restic incremental backup: ${t_rinc} s"
echo "ratio restic / lsvfs: $(echo "$t_rinc / $t_inc" | bc -l | xargs printf '%.2f')x"
"$lsvfs" unmount "$work/m" >/dev/null

echo "== restore: the chain into a new volume vs restic restore of the same snapshot"
drop_caches
s=$(now)
/usr/bin/time -v -o "$work/time-restore" \
  "$lsvfs" restore "$work/full.lsx" "$work/inc.lsx" --to "$work/r.vol" --key-file "$work/k" 2>/dev/null
t_rest=$(since "$s")
echo "lsvfs restore:  ${t_rest} s, peak RSS $(rss "$work/time-restore") MiB"
drop_caches
s=$(now)
restic restore --repo "$work/repo" latest --tag inc --target "$work/restic-out" >/dev/null 2>&1
t_rrest=$(since "$s")
echo "restic restore: ${t_rrest} s (into a plain directory, no encryption at rest)"
echo "ratio restic / lsvfs: $(echo "$t_rrest / $t_rest" | bc -l | xargs printf '%.2f')x"
"$lsvfs" mount "$work/r.vol" "$work/rm" --key-file "$work/k" >/dev/null
out=$(find "$work/restic-out" -type d -name usr1 -print -quit)
if [ -n "$out" ] && diff -rq "$work/rm" "$(dirname "$out")" >/dev/null 2>&1; then
  echo "check: the restored volume's tree equals restic's restore"
else
  echo "check: the restored trees DIFFER" >&2
  exit 1
fi
"$lsvfs" unmount "$work/rm" >/dev/null
