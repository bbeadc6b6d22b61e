#!/usr/bin/env bash
# What one FUSE request costs in the kernel's round trip, in one run: a
# file system that does no work, served over /dev/fuse and over FUSE
# io_uring (benches/fuse_transport.rs), and lsvfs as it is served today
# (over /dev/fuse), each timing getxattr(2) loops on one file.
#
#   scripts/bench-fuse-transport.sh [WORKDIR] [CALLS]    (as root)
#
# Turns on the kernel's FUSE io_uring (fuse.enable_uring) where it exists,
# and puts it back as it was at the end.
set -euo pipefail
cd "$(dirname "$0")/.."
root=${1:-/tmp/lsvfs-transport}
calls=${2:-50000}
param=/sys/module/fuse/parameters/enable_uring
cargo build --release --quiet
lsvfs=target/release/lsvfs
mkdir -p "$root"
was=""
if [ -w "$param" ]; then
  was=$(cat "$param")
  echo 1 >"$param"
fi
cleanup() {
  "$lsvfs" unmount "$root/mnt" >/dev/null 2>&1 || fusermount3 -uz "$root/mnt" 2>/dev/null || true
  if [ -n "$was" ]; then [ "$was" = Y ] && echo 1 >"$param" || echo 0 >"$param"; fi
}
trap cleanup EXIT
cargo bench --quiet --bench fuse_transport -- --dir "$root" --calls "$calls"
rm -rf "$root/v.vol" "$root/key"
mkdir -p "$root/mnt"
"$lsvfs" keygen "$root/key" >/dev/null
"$lsvfs" create "$root/v.vol" --size 4G --key-file "$root/key" >/dev/null
"$lsvfs" mount "$root/v.vol" "$root/mnt" --key-file "$root/key" >/dev/null
echo x >"$root/mnt/f"
setfattr -n user.x -v 1 "$root/mnt/f"
cargo bench --quiet --bench fuse_transport -- --measure "$root/mnt/f" --calls "$calls" \
  --label "lsvfs over /dev/fuse"
