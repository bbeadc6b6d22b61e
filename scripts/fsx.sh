#!/usr/bin/env bash
# The fsx file-system exerciser through a real mount: 100,000 random
# reads, writes, truncates and mmaps compared against its own model, then
# lsvfs check. Usage: scripts/fsx.sh [NUMOPS] [LSVFS_BINARY]
set -euo pipefail
cd "$(dirname "$0")/.."
ops=${1:-100000}
lsvfs=${2:-target/debug/lsvfs}
fsx=$(command -v fsx || echo "$HOME/.cargo/bin/fsx")
[ -x "$fsx" ] || { echo "fsx is missing: cargo install fsx" >&2; exit 1; }
work=$(mktemp -d /tmp/lsvfs-fsx.XXXXXX)
trap 'fusermount3 -uz "$work/m" 2>/dev/null || true; rm -rf "$work"' EXIT
mkdir "$work/m" "$work/artifacts"
"$lsvfs" keygen "$work/k" >/dev/null
"$lsvfs" create "$work/v.vol" --size 1G --key-file "$work/k" >/dev/null
"$lsvfs" mount "$work/v.vol" "$work/m" --key-file "$work/k" >/dev/null
"$fsx" -N "$ops" -S 7 -P "$work/artifacts" "$work/m/fsxfile"
"$lsvfs" unmount "$work/m" >/dev/null
"$lsvfs" check "$work/v.vol" --key-file "$work/k"
echo "fsx: $ops operations, no miscompare"
