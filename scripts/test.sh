#!/usr/bin/env bash
# The whole test suite: formatting and lints, unit and integration tests
# (model, crash harness, tamper, space, CLI, fuzz smoke, file system, real
# FUSE mounts, the key server and network-bound unlock), the mount tests
# again over /dev/fuse when the suite ran them over FUSE io_uring, then
# 100,000 fsx operations through a mount. Ends with one
# line counting every test: "all: N passed, M failed".
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh test
log=$(mktemp)
# FUSE over io_uring (Linux 6.14+): on for the suite, so that every mount
# serves through the io_uring queues (mount's default, --transport auto);
# the mount tests then run again over /dev/fuse. Put back as found.
uring=/sys/module/fuse/parameters/enable_uring
uring_was=""
if [ -w "$uring" ]; then
  uring_was=$(cat "$uring")
  echo 1 >"$uring"
else
  echo "FUSE over io_uring: not in this kernel ($uring); every mount test runs over /dev/fuse"
fi
restore() {
  rm -f "$log"
  if [ -n "$uring_was" ]; then
    if [ "$uring_was" = Y ]; then echo 1 >"$uring"; else echo 0 >"$uring"; fi
  fi
}
trap restore EXIT
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
if [ -n "$uring_was" ]; then
  echo "== the mount tests again, over /dev/fuse"
  LSVFS_TRANSPORT=dev cargo test --quiet --test mount --test file_lifetime --test snapshots \
    --test host_mount --test stalls 2>&1 | tee -a "$log"
fi
scripts/fsx.sh 100000
awk '/^test result:/ {p += $4; f += $6} END {printf "all: %d passed, %d failed\n", p + 1, f}' "$log"
