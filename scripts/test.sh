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
# Dependency policy (deny.toml): licenses, bans and sources always; known
# vulnerabilities when the RustSec database can be fetched (it lives on
# github.com, which some build machines cannot reach).
cargo deny --log-level error check bans licenses sources
if timeout 60 cargo deny --log-level error fetch db >/dev/null 2>&1; then
  cargo deny --log-level error check advisories
else
  echo "cargo deny: advisories not checked: the RustSec database (github.com/RustSec/advisory-db) is unreachable from here"
fi
cargo test --workspace --quiet 2>&1 | tee "$log"
scripts/fsx.sh 100000
awk '/^test result:/ {p += $4; f += $6} END {printf "all: %d passed, %d failed\n", p + 1, f}' "$log"
