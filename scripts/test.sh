#!/usr/bin/env bash
# The whole test suite: formatting and lints, unit and integration tests
# (model, crash harness, tamper, space, CLI, fuzz smoke, file system, real
# FUSE mounts, the key server and network-bound unlock), then 100,000 fsx
# operations through a mount. Ends with one
# line counting every test: "all: N passed, M failed".
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh test
log=$(mktemp)
trap 'rm -f "$log"' EXIT
cargo fmt --all -- --check
cargo clippy --workspace --all-targets --quiet -- -D warnings
cargo clippy -p lsvfs-keyserver --no-default-features --features client --all-targets --quiet -- -D warnings
scripts/layers.py
cargo test --workspace --quiet 2>&1 | tee "$log"
scripts/fsx.sh 100000
awk '/^test result:/ {p += $4; f += $6} END {printf "all: %d passed, %d failed\n", p + 1, f}' "$log"
