#!/usr/bin/env bash
# The lsvfs demo: build, create a volume, write and read data through the
# engine, and check it. Works on a fresh machine with a Rust toolchain.
set -euo pipefail
cd "$(dirname "$0")/.."

cargo build --release --quiet
lsvfs=target/release/lsvfs
work=$(mktemp -d /tmp/lsvfs-demo.XXXXXX)
trap 'fusermount3 -uz "$work/mnt" 2>/dev/null || true; rm -rf "$work"' EXIT
command -v fusermount3 >/dev/null || { apt-get update -qq && apt-get install -y -qq fuse3 >/dev/null; }
echo "== working in $work"

run() { echo "\$ lsvfs $*"; "$lsvfs" "$@"; }

run keygen "$work/key"
run create "$work/data.vol" --size 1G --key-file "$work/key"
head -c 3000000 /dev/urandom >"$work/payload"
# Raw blocks from offset 0 replace the (empty) file system `create` made.
run write-blocks "$work/data.vol" --key-file "$work/key" --offset 0 --input "$work/payload"
run read-blocks "$work/data.vol" --key-file "$work/key" --offset 0 --length 3002368 --output "$work/back"
cmp <(head -c 3000000 "$work/back") "$work/payload"
echo "== read back 3000000 bytes: identical"
if grep -qF "$(head -c 64 "$work/payload" | od -An -tx1 | tr -d ' \n' | head -c 32)" <(od -An -tx1 "$work/data.vol" | tr -d ' \n'); then
  echo "== plaintext found in the backing file!" >&2
  exit 1
fi
echo "== the backing file does not contain the plaintext"
echo "== the file system, through a FUSE mount"
mkdir "$work/mnt"
run create "$work/fs.vol" --size 1G --key-file "$work/key"
run mount "$work/fs.vol" "$work/mnt" --key-file "$work/key"
cp -a /usr/include/linux "$work/mnt/"
echo "hello from lsvfs" >"$work/mnt/hello.txt"
ls -la "$work/mnt" | head
diff -r /usr/include/linux "$work/mnt/linux" && echo "== cp -a /usr/include/linux into the mount: identical"
df -h "$work/mnt"
run unmount "$work/mnt"
run info "$work/data.vol" --key-file "$work/key"
run check "$work/data.vol" --key-file "$work/key"
run check "$work/fs.vol" --key-file "$work/key"
ls -ls "$work/data.vol"
echo "== demo finished"
