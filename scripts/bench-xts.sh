#!/usr/bin/env bash
# AES-256-XTS on one core, 4 KiB blocks, in one run: openssl's, and
# lsvfs's pipelined mode against xts-mode's loop, for the native build
# (target-cpu=native) and the portable one (baseline x86-64, as packaged).
#
#   scripts/bench-xts.sh [SECONDS]      (default 3 per measurement)
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh bench
secs=${1:-3}
echo "== openssl speed -evp aes-256-xts -bytes 4096 (1 thread)"
openssl speed -evp aes-256-xts -bytes 4096 -seconds "$secs" 2>/dev/null |
  awk '/^AES-256-XTS/ {printf "openssl aes-256-xts %.0f MB/s\n", $2 * 1000 / 1e6}'
echo "== native build"
cargo bench --quiet --bench xts -- --seconds "$secs"
echo "== portable build (as packaged)"
CARGO_TARGET_DIR=target/portable CARGO_TARGET_X86_64_UNKNOWN_LINUX_GNU_RUSTFLAGS="" \
  cargo bench --quiet --bench xts -- --seconds "$secs"
