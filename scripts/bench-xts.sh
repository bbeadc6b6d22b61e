#!/usr/bin/env bash
# AES-256-XTS on one core, 4 KiB blocks, in one run: openssl's, and
# lsvfs's pipelined mode against xts-mode's loop, for lsvfs's own build
# (portable: baseline x86-64, AES instructions found at run time) and for
# one tuned to this CPU (target-cpu=native), to show what tuning would add.
#
#   scripts/bench-xts.sh [SECONDS]      (default 3 per measurement)
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh bench
secs=${1:-3}
echo "== openssl speed -evp aes-256-xts -bytes 4096 (1 thread)"
openssl speed -evp aes-256-xts -bytes 4096 -seconds "$secs" 2>/dev/null |
  awk '/^AES-256-XTS/ {printf "openssl aes-256-xts %.0f MB/s\n", $2 * 1000 / 1e6}'
echo "== lsvfs's build (portable, as packaged)"
cargo bench --quiet --bench xts -- --seconds "$secs"
echo "== tuned to this CPU (target-cpu=native)"
CARGO_TARGET_DIR=target/native RUSTFLAGS="-C target-cpu=native" \
  cargo bench --quiet --bench xts -- --seconds "$secs"
