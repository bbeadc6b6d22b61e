#!/usr/bin/env bash
# What a command asks of FUSE file systems: the kernel's fuse tracepoints
# count every request sent to any FUSE daemon while COMMAND runs, by
# opcode, with the time from send to reply (the daemon's wake-up, its work
# and the reply; not the caller's own wake-up, which comes after).
#
#   scripts/fuse-requests.sh COMMAND [ARGS...]
#
# Example (one file created through the mount):
#   scripts/fuse-requests.sh sh -c 'echo x > /mnt/point/f'
#
# Run as root. Needs tracefs (mounted here if it is not) and a kernel with
# the fuse:fuse_request_send and fuse:fuse_request_end events (6.6+).
set -euo pipefail
[ $# -gt 0 ] || { sed -n '2,10p' "$0" | sed 's/^# \{0,1\}//'; exit 2; }
t=/sys/kernel/tracing
if [ ! -d "$t/events" ]; then
  mount -t tracefs tracefs "$t" 2>/dev/null || {
    echo "fuse-requests: no tracefs at $t (run as root)" >&2
    exit 1
  }
fi
for e in fuse_request_send fuse_request_end; do
  [ -e "$t/events/fuse/$e/enable" ] || {
    echo "fuse-requests: this kernel has no fuse:$e tracepoint (needs 6.6 or later)" >&2
    exit 1
  }
done
was_on=$(cat "$t/tracing_on")
was_kb=$(awk '{print $1}' "$t/buffer_size_kb")
off() {
  echo 0 >"$t/tracing_on"
  echo 0 >"$t/events/fuse/fuse_request_send/enable"
  echo 0 >"$t/events/fuse/fuse_request_end/enable"
}
restore() {
  off
  echo >"$t/trace"
  echo "$was_kb" >"$t/buffer_size_kb"
  echo "$was_on" >"$t/tracing_on"
}
trap restore EXIT
off
echo >"$t/trace"
echo 131072 >"$t/buffer_size_kb"
echo 1 >"$t/events/fuse/fuse_request_send/enable"
echo 1 >"$t/events/fuse/fuse_request_end/enable"
echo 1 >"$t/tracing_on"
start=$(date +%s.%N)
status=0
"$@" || status=$?
end=$(date +%s.%N)
off
python3 - "$t/trace" "$start" "$end" <<'PY'
import collections, re, sys
pat = re.compile(r" (\d+\.\d+): fuse_request_(send|end): connection \d+ req (\d+)(?: opcode \d+ \((\w+)\))?")
sent, lat = {}, collections.defaultdict(list)
lost = 0
for line in open(sys.argv[1]):
    if "LOST" in line:
        lost += 1
    m = pat.search(line)
    if not m:
        continue
    t, kind, req = float(m.group(1)), m.group(2), m.group(3)
    if kind == "send":
        sent[req] = (t, m.group(4))
    elif req in sent:
        t0, op = sent.pop(req)
        lat[op].append(t - t0)
wall = float(sys.argv[3]) - float(sys.argv[2])
total = sum(len(v) for v in lat.values())
busy = sum(sum(v) for v in lat.values())
def pct(v, q):
    return sorted(v)[min(len(v) - 1, int(q * len(v)))] * 1e6
print(f"{'request':22} {'count':>8} {'avg us':>8} {'p50 us':>8} {'p99 us':>8} {'max us':>8} {'total s':>8}")
for op, v in sorted(lat.items(), key=lambda kv: -sum(kv[1])):
    print(f"{op.removeprefix('FUSE_'):22} {len(v):>8} {sum(v) / len(v) * 1e6:>8.1f}"
          f" {pct(v, 0.5):>8.1f} {pct(v, 0.99):>8.1f} {max(v) * 1e6:>8.0f} {sum(v):>8.3f}")
print(f"{'all':22} {total:>8} {busy / max(total, 1) * 1e6:>8.1f} {'':>8} {'':>8} {'':>8} {busy:>8.3f}")
print(f"wall time {wall:.3f} s; {len(sent)} requests still unanswered at the end")
if lost:
    print("warning: the trace buffer overflowed; counts are low", file=sys.stderr)
PY
exit $status
