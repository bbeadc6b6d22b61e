#!/usr/bin/env bash
# Runs one cargo-fuzz target (libFuzzer with AddressSanitizer) for a while
# and reports its executions and crashes.
#
#   scripts/fuzz.sh TARGET [MINUTES]       (default 10 minutes)
#   scripts/fuzz.sh list                   the targets
#
# Targets decode untrusted bytes: open_volume (a whole backing store, or
# patches to a valid one), fs_metadata (inodes, directory entries, the
# superblock, B+tree nodes, ACLs, chunk items), key_file, sealed_store,
# control_request (the mount's control socket), keyserver_request (the key
# server's HTTP bodies), export_stream (export files and chunk records).
# Corpus and crashes stay in fuzz/corpus/TARGET and fuzz/artifacts/TARGET
# (not committed).
#
# cargo-fuzz needs nightly-only compiler flags; on the stable toolchain they
# are enabled with RUSTC_BOOTSTRAP=1.
set -euo pipefail
cd "$(dirname "$0")/.."
target=${1:?usage: scripts/fuzz.sh TARGET [MINUTES] (or: scripts/fuzz.sh list)}
minutes=${2:-10}
export PATH="$HOME/.cargo/bin:$PATH"
command -v cargo-fuzz >/dev/null || cargo install --quiet --locked cargo-fuzz
export RUSTC_BOOTSTRAP=1
if [ "$target" = list ]; then
  (cd fuzz && cargo fuzz list)
  exit 0
fi
mkdir -p "fuzz/corpus/$target" "fuzz/artifacts/$target"
log=$(mktemp)
trap 'rm -f "$log"' EXIT
set +e
(cd fuzz && cargo fuzz run "$target" "corpus/$target" -- \
  -max_total_time=$((minutes * 60)) -artifact_prefix="artifacts/$target/" -print_final_stats=1) 2>&1 | tee "$log" | grep -E "^#[0-9]+.*(pulse|DONE)|ERROR|panicked|SUMMARY" || true
status=${PIPESTATUS[0]}
set -e
execs=$(grep -E "^stat::number_of_executed_units" "$log" | awk '{print $2}')
crashes=$(find "fuzz/artifacts/$target" -type f | wc -l)
echo "fuzz $target: ${minutes} min, ${execs:-?} executions, $crashes crashes (fuzz/artifacts/$target)"
exit "$status"
