#!/usr/bin/env bash
# Two lsvfs builds side by side, in turns, on fresh volumes: what a change
# did to the daemon's own work, where bench.sh's medians are too coarse.
# Each run of each build, on a new 16 GiB volume and mount:
#  1. 10,000 4 KiB files in 100 directories (scripts/small-files.py, as
#     bench.sh makes them), sync;
#  2. `ls -lR` of them; 3. `rm -rf` of them, sync;
#  4. `cp -a /usr/include`, sync;
#  5. fio 1 MiB sequential write of SEQ_MIB with a final fsync, then the
#     page cache dropped and the file read back;
# and the CPU ticks the daemon used over all of it (/proc/PID/stat).
# Usage: scripts/bench-ab.sh BUILD_A BUILD_B [RUNS] [SEQ_MIB] [WORKDIR]
#   (default 3 runs, 256 MiB, /tmp/lsvfs-ab). The order alternates (A B,
#   then B A) so that neither build always follows the other.
# Needs root, fuse3 and fio (scripts/setup.sh bench installs them).
set -euo pipefail
[ $# -ge 2 ] || { sed -n '2,15p' "$0" | sed 's/^# \{0,1\}//'; exit 2; }
a=$(realpath "$1")
b=$(realpath "$2")
runs=${3:-3}
seq_mib=${4:-256}
work=${5:-/tmp/lsvfs-ab}
here=$(dirname "$(realpath "$0")")
. "$here/bench-lib.sh"
bench_workdir "$work"
"$a" keygen "$work/key" >/dev/null
since() { echo "$(now) - $1" | bc; }

one() { # label build
  local bin=$2 t pid
  rm -f "$work/v.vol"
  "$bin" create "$work/v.vol" --size 16G --key-file "$work/key" >/dev/null
  "$bin" mount "$work/v.vol" "$work/m" --key-file "$work/key" >/dev/null
  pid=$(pgrep -f -- "mount $work/v.vol" | head -1)
  t=$(now)
  python3 "$here/small-files.py" "$work/m/small"
  sync
  local create ls rm cp w r ticks
  create=$(since "$t")
  t=$(now); ls -lR "$work/m/small" >/dev/null; ls=$(since "$t")
  t=$(now); rm -rf "$work/m/small"; sync; rm=$(since "$t")
  t=$(now); cp -a /usr/include "$work/m/include"; sync; cp=$(since "$t")
  w=$(fio --name=w --directory="$work/m" --filename=seq --rw=write --bs=1M \
    --size="${seq_mib}M" --ioengine=psync --end_fsync=1 --output-format=terse |
    awk -F';' '{print int($48 / 1024)}')
  sync
  echo 3 >/proc/sys/vm/drop_caches
  r=$(fio --name=r --directory="$work/m" --filename=seq --rw=read --bs=1M \
    --size="${seq_mib}M" --ioengine=psync --output-format=terse |
    awk -F';' '{print int($7 / 1024)}')
  ticks=$(awk '{print $14 + $15}' "/proc/$pid/stat")
  fusermount3 -u "$work/m"
  while pgrep -f -- "mount $work/v.vol" >/dev/null; do sleep 0.1; done
  printf '%s\t%.2f\t%.2f\t%.2f\t%.2f\t%s\t%s\t%s\n' "$1" "$create" "$ls" "$rm" "$cp" "$w" "$r" "$ticks"
}

printf 'build\tcreate s\tls -lR s\trm -rf s\tcp -a s\twrite MiB/s\tread MiB/s\tdaemon ticks\n'
for ((i = 0; i < runs; i++)); do
  if ((i % 2 == 0)); then one A "$a"; one B "$b"; else one B "$b"; one A "$a"; fi
done
