#!/usr/bin/env bash
# Boot storm and k-of-n unlock latency, one command (issue 16, part 2):
#   1. 4,000 hosts unlock at once against one key server, ROUNDS times;
#   2. 4,000 hosts against 3 servers with a threshold of 2, the third killed
#      (SIGKILL) KILL_MS into the storm: every host must still unlock;
#   3. one host unlocking SEQ times in a row with 3 of 3 servers up, then with
#      one black-holed (SIGSTOP: it accepts and never answers), alternating.
# Every key server is a real `lsvfs-keyserver` process on 127.0.0.1 with real
# TLS. The load generator (4,000 client threads) shares the machine's cores
# with the servers, so its throughput line is a floor; the CPU line gives
# what the server alone spends per unlock.
#
#   scripts/bench-storm.sh [HOSTS]      (env: ROUNDS=3 KILL_MS=1000 SEQ=300)
set -euo pipefail
cd "$(dirname "$0")/.."
hosts=${1:-4000}
rounds=${ROUNDS:-3}
cargo build --release -q -p lsvfs-keyserver --bins --examples
storm=target/release/examples/bootstorm
pause() { sleep 5; }   # let TIME_WAIT sockets and the page cache settle

echo "== one key server, $hosts hosts at once ($rounds rounds)"
for r in $(seq "$rounds"); do
  $storm --hosts "$hosts" | grep -E "throughput|latency|CPU|errors"
  pause
done

echo "== three key servers, threshold 2, the third killed ${KILL_MS:-1000} ms into the storm"
$storm --hosts "$hosts" --servers 3 --threshold 2 --kill-after-ms "${KILL_MS:-1000}" \
  | grep -E "killed|throughput|latency|CPU|errors"
pause

echo "== one unlock at a time, 3 servers, threshold 2: all up vs one black-holed"
for r in 1 2; do
  for bh in "" --black-hole; do
    echo "-- ${bh:-all up}"
    $storm --servers 3 --threshold 2 --sequential "${SEQ:-300}" $bh | grep -E "latency|errors"
  done
done
