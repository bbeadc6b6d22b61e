#!/usr/bin/env bash
# Another process's metadata requests beside a large sequential writer,
# one or more lsvfs builds in turns: how long a mkdir+rmdir pair waits
# while fio writes a 3 GiB file in 1 MiB writes. Each run of each build,
# on a fresh 16 GiB volume and mount, SECONDS each:
#  1. the mkdir+rmdir loop alone;
#  2. beside fio writing a preallocated file (fio's default: fallocate,
#     then overwrites);
#  3. beside fio appending (`--fallocate=none`).
# Prints the loop's pairs, their median, 99th and 99.9th percentile and
# slowest (ms), and the writer's rate. With BESIDE_LOOP=files, each pair
# of the loop is instead a 16 KiB file written, closed and removed (its
# removal frees data blocks while the writer appends).
# Usage: scripts/bench-beside-writer.sh BUILD... [-- RUNS SECONDS WORKDIR]
#   (default 2 runs, 5 s, /tmp/lsvfs-beside).
# Needs root, fuse3, fio and python3 (scripts/setup.sh bench installs them).
set -euo pipefail
builds=()
while [ $# -gt 0 ] && [ "$1" != -- ]; do builds+=("$(realpath "$1")"); shift; done
[ ${#builds[@]} -ge 1 ] || { sed -n '2,14p' "$0" | sed 's/^# \{0,1\}//'; exit 2; }
[ "${1:-}" = -- ] && shift
runs=${1:-2}
secs=${2:-5}
work=${3:-/tmp/lsvfs-beside}
here=$(dirname "$(realpath "$0")")
. "$here/bench-lib.sh"
bench_workdir "$work"
"${builds[0]}" keygen "$work/key" >/dev/null

pairs() { # directory seconds -> "pairs p50 p99 p999 max" (ms)
  python3 - "$1" "$2" "${BESIDE_LOOP:-dirs}" <<'EOF'
import os, sys, time
d, secs, loop = sys.argv[1], float(sys.argv[2]), sys.argv[3]
os.makedirs(d, exist_ok=True)
data = os.urandom(16384)
lat, end, i = [], time.monotonic() + secs, 0
while time.monotonic() < end:
    p = f"{d}/x{i % 50}"
    t = time.perf_counter()
    if loop == "files":
        fd = os.open(p, os.O_CREAT | os.O_WRONLY | os.O_TRUNC, 0o644)
        os.write(fd, data)
        os.close(fd)
        os.unlink(p)
    else:
        os.mkdir(p)
        os.rmdir(p)
    lat.append((time.perf_counter() - t) * 1e3)
    i += 1
lat.sort()
n = len(lat)
print(n, *(f"{lat[min(n - 1, int(n * q))]:.2f}" for q in (0.5, 0.99, 0.999)), f"{lat[-1]:.1f}")
EOF
}

writer() { # fio's --fallocate -> MB/s, in the background into $work/w.out
  fio --name=w --directory="$work/m" --filename=big --rw=write --bs=1M --size=3G \
    --ioengine=psync --fallocate="$1" --output-format=terse |
    awk -F';' '{print int($48 * 1024 / 1e6)}' >"$work/w.out"
}

echo "build run load: pairs, p50 p99 p99.9 max (ms); writer MB/s"
for run in $(seq "$runs"); do
  for bin in "${builds[@]}"; do
    for load in alone native none; do
      rm -f "$work/v.vol"
      "$bin" create "$work/v.vol" --size 16G --key-file "$work/key" >/dev/null
      "$bin" mount "$work/v.vol" "$work/m" --key-file "$work/key" >/dev/null
      w=-
      if [ "$load" = alone ]; then
        r=$(pairs "$work/m/d" "$secs")
      else
        writer "$load" &
        sleep 0.3
        r=$(pairs "$work/m/d" "$secs")
        wait
        w=$(cat "$work/w.out")
      fi
      "$bin" unmount "$work/m" >/dev/null
      case $load in
        alone) what="alone" ;;
        native) what="beside a writer (preallocated)" ;;
        none) what="beside a writer (appending)" ;;
      esac
      echo "$bin run $run $what: $r; writer $w"
    done
  done
done
