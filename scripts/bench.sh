#!/usr/bin/env bash
# File-system benchmark: the same workloads, in one run, on the same disk,
# over a plain ext4 directory, gocryptfs, cryfs and lsvfs. Prints a table
# and lsvfs's speed relative to each peer (higher is better for lsvfs).
#
#   scripts/bench.sh [WORKDIR] [SEQ_MIB] [RAND_SECONDS]
#
# Defaults: target/fsbench, 1024 MiB sequential, 20 s random (and 10 s
# per mixed-load row, BENCH_MIX_SECONDS; 15 s of dbench, BENCH_DBENCH_SECONDS);
# BENCH_FS
# selects file systems (default "ext4 gocryptfs cryfs lsvfs"). LSVFS_BASE
# names another lsvfs binary (an earlier build) to measure as "lsvfs-base"
# in the same run, beside this tree's: before/after a change. BENCH_ROUNDS
# (default 1) repeats the whole set, the file systems taking turns in each
# round, and the table shows each figure's median: on a noisy VM one round
# can move a peer's figure by half. Run as root (it drops the page cache
# before reads and mounts FUSE file systems). lsvfs mounts with its default
# transport, FUSE over io_uring where the kernel has it: the script turns
# the fuse module's enable_uring on for the run (BENCH_URING=0 leaves it
# off) and puts it back at the end; LSVFS_TRANSPORT=dev forces /dev/fuse.
set -euo pipefail
cd "$(dirname "$0")/.."
root=$(realpath -m "${1:-target/fsbench}")
seq_mib=${2:-1024}
rand_s=${3:-20}
mix_s=${BENCH_MIX_SECONDS:-10}
dbench_s=${BENCH_DBENCH_SECONDS:-15}
rounds=${BENCH_ROUNDS:-1}
scripts/setup.sh bench
# The first CPU this script may run on, for the row that holds its reader
# there (python3 comes with the set-up).
one_cpu=$(python3 -c 'import os; print(min(os.sched_getaffinity(0)))')
cargo build --release --quiet
lsvfs=$(pwd)/target/release/lsvfs
rm -rf "$root"; mkdir -p "$root"
uring=/sys/module/fuse/parameters/enable_uring
uring_was=""
if [ -w "$uring" ] && [ "${BENCH_URING:-1}" = 1 ]; then
  uring_was=$(cat "$uring")
  echo 1 >"$uring"
fi
echo "fuse.enable_uring: $(cat "$uring" 2>/dev/null || echo "not in this kernel")"
cleanup() {
  for m in "$root"/*/mnt; do fusermount3 -uz "$m" 2>/dev/null || true; done
  if [ -n "$uring_was" ]; then
    if [ "$uring_was" = Y ]; then echo 1 >"$uring"; else echo 0 >"$uring"; fi
  fi
}
trap cleanup EXIT

drop() { sync; echo 3 >/proc/sys/vm/drop_caches; }
now() { date +%s.%N; }
results="$root/results.tsv"
: >"$results"
record() { printf '%s\t%s\t%s\t%s\n' "$1" "$2" "$3" "$4" | tee -a "$results"; }

setup() { # name -> prints the directory to test in
  local name=$1 dir=$root/$1
  mkdir -p "$dir/mnt"
  case $name in
    ext4) echo "$dir/mnt" ;;
    gocryptfs)
      mkdir -p "$dir/cipher"
      gocryptfs -q -init -extpass "echo benchpass" -scryptn 10 "$dir/cipher" >/dev/null
      gocryptfs -q -extpass "echo benchpass" "$dir/cipher" "$dir/mnt"
      echo "$dir/mnt" ;;
    cryfs)
      mkdir -p "$dir/base"
      # The same path held another cryfs in an earlier run; cryfs refuses
      # that (Error 20) unless told it is expected.
      echo benchpass | CRYFS_FRONTEND=noninteractive CRYFS_NO_UPDATE_CHECK=true \
        cryfs --cipher aes-256-gcm --allow-replaced-filesystem "$dir/base" "$dir/mnt" >"$dir/cryfs.log" 2>&1 ||
        { echo "!! cryfs failed:" >&2; tail -5 "$dir/cryfs.log" >&2; }
      echo "$dir/mnt" ;;
    lsvfs|lsvfs-base)
      local bin=$lsvfs
      [ "$name" = lsvfs-base ] && bin=${LSVFS_BASE:?set LSVFS_BASE to an lsvfs binary}
      "$bin" keygen "$dir/key" >/dev/null
      "$bin" create "$dir/v.vol" --size 16G --key-file "$dir/key" >/dev/null
      "$bin" mount "$dir/v.vol" "$dir/mnt" --key-file "$dir/key" >/dev/null
      echo "$dir/mnt" ;;
  esac
}

teardown() {
  local name=$1 dir=$root/$1
  case $name in
    ext4) ;;
    lsvfs) "$lsvfs" unmount "$dir/mnt" >/dev/null ;;
    lsvfs-base) "$LSVFS_BASE" unmount "$dir/mnt" >/dev/null ;;
    *) fusermount3 -u "$dir/mnt" || fusermount3 -uz "$dir/mnt" || true ;;
  esac
  rm -rf "$dir"
}

fio_mbs() { # fio args... -> MB/s (or IOPS with --iops)
  local kind=$1; shift
  local out
  out=$(fio --output-format=terse --terse-version=3 "$@")
  case $kind in
    write-mbs) echo "$out" | awk -F';' '{printf "%.1f", $48 * 1024 / 1e6}' ;;
    read-mbs) echo "$out" | awk -F';' '{printf "%.1f", $7 * 1024 / 1e6}' ;;
    write-iops) echo "$out" | awk -F';' '{printf "%.0f", $49}' ;;
    read-iops) echo "$out" | awk -F';' '{printf "%.0f", $8}' ;;
  esac
}

dir_ops() { # directory, other stressor options -> the dir stressor's ops/s
  local out
  out=$(cd "$1" && stress-ng --dir 1 $2 -t "$mix_s" --metrics-brief 2>&1)
  echo "$out" | awk '$4 == "dir" {print $9}'
}

run_all() {
  local name=$1 d
  d=$(setup "$name")
  # cryfs (and gocryptfs) may finish mounting after their command returns.
  for _ in $(seq 50); do [ "$name" = ext4 ] || mountpoint -q "$d" && break; sleep 0.2; done
  if [ "$name" != ext4 ] && ! mountpoint -q "$d"; then
    echo "!! $name did not mount on $d; its column stays empty" >&2
    rm -rf "${root:?}/$name"
    return
  fi
  record "$name" "seq write ${seq_mib} MiB (MB/s)" "$(fio_mbs write-mbs --name=w --directory="$d" --filename=seq --rw=write --bs=1M --size=${seq_mib}M --ioengine=psync --end_fsync=1)" up
  drop
  record "$name" "seq read ${seq_mib} MiB (MB/s)" "$(fio_mbs read-mbs --name=r --directory="$d" --filename=seq --rw=read --bs=1M --size=${seq_mib}M --ioengine=psync)" up
  rm -f "$d/seq"
  record "$name" "rand 4k write (IOPS)" "$(fio_mbs write-iops --name=rw --directory="$d" --filename=rnd --rw=randwrite --bs=4k --size=256M --ioengine=psync --time_based --runtime=$rand_s)" up
  record "$name" "rand 4k read (IOPS)" "$(fio_mbs read-iops --name=rr --directory="$d" --filename=rnd --rw=randread --bs=4k --size=256M --ioengine=psync --time_based --runtime=$rand_s)" up
  # The same reads from a reader held on one CPU. fio's default job (a
  # forked process that calls setsid, so with the kernel's autogroups it
  # is in a scheduling group of its own, as most readers of a mount are)
  # is woken on the other, idle CPU at each reply over FUSE io_uring, and
  # each hop costs about as much as the read; gocryptfs, served on other
  # CPUs anyway, hardly moves. See docs/PERFORMANCE.md.
  record "$name" "rand 4k read, on one CPU (IOPS)" "$(fio_mbs read-iops --name=rr --directory="$d" --filename=rnd --rw=randread --bs=4k --size=256M --ioengine=psync --cpus_allowed="$one_cpu" --time_based --runtime=$rand_s)" up
  rm -f "$d/rnd"
  # fsync after every write: one job, then eight at once (group commit).
  record "$name" "rand 4k write+fsync, 1 job (IOPS)" "$(fio_mbs write-iops --name=fs1 --directory="$d" --rw=randwrite --bs=4k --size=64M --ioengine=psync --fsync=1 --time_based --runtime=$rand_s)" up
  record "$name" "rand 4k write+fsync, 8 jobs (IOPS)" "$(fio_mbs write-iops --name=fs8 --directory="$d" --rw=randwrite --bs=4k --size=16M --ioengine=psync --fsync=1 --numjobs=8 --group_reporting --time_based --runtime=$rand_s)" up
  rm -f "$d"/fs1.* "$d"/fs8.*
  # A metadata workload alone, then beside a process that fallocates,
  # sync_file_ranges and fsyncs (stress-ng's sync-file stressor), then
  # beside one that fallocates and truncates 1 GiB (its fallocate one).
  local solo beside
  solo=$(dir_ops "$d" "")
  record "$name" "mkdir/rmdir alone (ops/s)" "$solo" up
  for other in sync-file fallocate; do
    beside=$(dir_ops "$d" "--$other 1")
    record "$name" "mkdir/rmdir beside $other (ops/s)" "$beside" up
    record "$name" "  kept beside $other (% of alone)" "$(echo "scale=1; 100 * $beside / $solo" | bc)" up
  done
  # Many clients at once (dbench's file-server load: creates, writes,
  # renames, fsyncs, directory scans, 4 processes): the rate, and the
  # slowest single operation, which shows one process held up by
  # another's slow work.
  local db
  db=$(dbench -D "$d" -t "$dbench_s" 4 2>/dev/null | grep '^Throughput')
  record "$name" "dbench, 4 clients (MB/s)" "$(echo "$db" | awk '{print $2}')" up
  record "$name" "dbench, slowest operation (ms)" "$(echo "$db" | sed -n 's/.*max_latency=\([0-9.]*\) ms.*/\1/p')" down
  rm -rf "$d/clients"
  local t0 t1
  t0=$(now)
  python3 scripts/small-files.py "$d/small"
  sync
  t1=$(now); record "$name" "create 10,000 4 KiB files (s)" "$(echo "$t1 - $t0" | bc)" down
  t0=$(now); ls -lR "$d/small" >/dev/null; t1=$(now)
  record "$name" "ls -lR (s)" "$(echo "$t1 - $t0" | bc)" down
  t0=$(now); rm -rf "$d/small"; sync; t1=$(now)
  record "$name" "rm -rf (s)" "$(echo "$t1 - $t0" | bc)" down
  t0=$(now); cp -a /usr/include "$d/include"; sync; t1=$(now)
  record "$name" "cp -a /usr/include (s)" "$(echo "$t1 - $t0" | bc)" down
  drop
  t0=$(now); tar -C "$d" -cf - include | cat >/dev/null; t1=$(now)
  record "$name" "tar c of it (s)" "$(echo "$t1 - $t0" | bc)" down
  teardown "$name"
}

for round in $(seq "$rounds"); do
  for fs in ${BENCH_FS:-ext4 gocryptfs cryfs lsvfs}; do
    echo "== $fs (round $round of $rounds)"
    run_all "$fs"
  done
done

echo
echo "== lsvfs relative to each peer (>1: lsvfs is faster)"
python3 - "$results" "$rounds" <<'PY'
import sys, collections, statistics
rows = [l.rstrip("\n").split("\t") for l in open(sys.argv[1]) if l.strip()]
if int(sys.argv[2]) > 1:
    print(f"(median of {sys.argv[2]} rounds)")
runs = collections.defaultdict(lambda: collections.defaultdict(list))
better = {}
for fs, metric, v, way in rows:
    better[metric] = way
    if not v:
        # The tool failed on this file system (its error went to the log).
        print(f"no figure: {fs}, {metric}", file=sys.stderr)
        continue
    runs[metric][fs].append(float(v))
val = {m: {fs: statistics.median(vs) for fs, vs in by.items()} for m, by in runs.items()}
peers = [p for p in ["ext4", "gocryptfs", "cryfs", "lsvfs-base"] if any(p in by for by in val.values())]
print(f"{'workload':34} {'lsvfs':>10} " + " ".join(f"{p:>10} {'ratio':>6}" for p in peers))
for metric, by in val.items():
    l = by.get("lsvfs")
    cells = []
    for p in peers:
        v = by.get(p)
        if v is None or l is None or v == 0 or l == 0:
            cells.append(f"{'-':>10} {'-':>6}")
            continue
        r = l / v if better[metric] == "up" else v / l
        cells.append(f"{v:>10.1f} {r:>6.2f}")
    shown = f"{l:>10.1f}" if l is not None else f"{'-':>10}"
    print(f"{metric:34} {shown} " + " ".join(cells))
PY
