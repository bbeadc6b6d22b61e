#!/usr/bin/env bash
# The whole test suite: formatting and lints, unit and integration tests
# (model, crash harness, tamper, space, CLI, fuzz smoke, file system, real
# FUSE mounts), then 100,000 fsx operations through a mount. Ends with one
# line counting every test: "all: N passed, M failed".
set -euo pipefail
cd "$(dirname "$0")/.."
log=$(mktemp)
trap 'rm -f "$log"' EXIT
cargo fmt --all -- --check
cargo clippy --all-targets --quiet -- -D warnings
cargo test --quiet 2>&1 | tee "$log"
scripts/fsx.sh 100000
awk '/^test result:/ {p += $4; f += $6} END {printf "all: %d passed, %d failed\n", p + 1, f}' "$log"
