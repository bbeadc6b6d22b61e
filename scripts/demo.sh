#!/usr/bin/env bash
# The lsvfs demo: build; start a key server on loopback; enroll this host;
# create a volume registered with the key server, mount it with no key
# file, write files, take a snapshot, change files, list the snapshot,
# read and restore from it, unmount; then raw blocks through the engine
# and a `cp -a` round trip. Works on a fresh machine with a Rust toolchain.
#
# LSVFS_BIN_DIR=/usr/bin scripts/demo.sh runs it against installed
# binaries (the package) instead of building them.
set -euo pipefail
cd "$(dirname "$0")/.."

scripts/setup.sh demo
if [ -n "${LSVFS_BIN_DIR:-}" ]; then
  lsvfs=$LSVFS_BIN_DIR/lsvfs
  ks=$LSVFS_BIN_DIR/lsvfs-keyserver
else
  cargo build --release --quiet --workspace
  lsvfs=target/release/lsvfs
  ks=target/release/lsvfs-keyserver
fi
echo "== using $lsvfs and $ks"
work=$(mktemp -d /tmp/lsvfs-demo.XXXXXX)
ks_pid=
cleanup() {
  fusermount3 -uz "$work/mnt" 2>/dev/null || true
  fusermount3 -uz "$work/net" 2>/dev/null || true
  [ -n "$ks_pid" ] && kill "$ks_pid" 2>/dev/null || true
  rm -rf "$work"
}
trap cleanup EXIT
echo "== working in $work"

run() { echo "\$ lsvfs $*"; "$lsvfs" "$@"; }
ksrun() { echo "\$ lsvfs-keyserver $*"; "$ks" "$@"; }

echo "== a key server on 127.0.0.1, with TLS"
mkdir "$work/ks"
ksrun gen-cert --cert "$work/ks/cert.pem" --key "$work/ks/key.pem" 127.0.0.1 >/dev/null
ksrun gen-master-key "$work/ks/master-key" >/dev/null
port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
cat >"$work/ks/config.toml" <<TOML
listen = "127.0.0.1:$port"
tls_cert = "$work/ks/cert.pem"
tls_key = "$work/ks/key.pem"
state_dir = "$work/ks/state"
admin_socket = "$work/ks/admin.sock"
master_key = "$work/ks/master-key"
TOML
"$ks" serve --config "$work/ks/config.toml" >"$work/ks/log" 2>&1 &
ks_pid=$!
for _ in $(seq 50); do grep -q "listening on" "$work/ks/log" && break; sleep 0.1; done
grep "listening on" "$work/ks/log"
url=https://127.0.0.1:$port
export LSVFS_STORE=$work/store   # this host's sealed store (default /var/lib/lsvfs)
echo "== this host: identity and sealed store, enrolled on the key server"
# (Not `tee /dev/stderr`: with stderr redirected to a file, that reopens
# and truncates the file.)
init_out=$(run host init --keyserver "$url" --ca "$work/ks/cert.pem")
echo "$init_out"
host_id=$(awk '/^host id:/ {print $3}' <<<"$init_out")
ksrun admin --socket "$work/ks/admin.sock" enroll demo-host "$host_id"
echo "== a volume registered with the key server, mounted with no key file"
run create "$work/net.vol" --size 1G --keyserver "$url"
mkdir "$work/net"
run mount "$work/net.vol" "$work/net"
mkdir -p "$work/net/docs"
echo "hello from lsvfs" >"$work/net/docs/hello.txt"
cp -a /usr/include/linux/fs.h "$work/net/docs/"
ls -la "$work/net/docs"
echo "== a snapshot: instant, read-only under .snapshots/NAME"
run snapshot create "$work/net" before-edit
echo "edited after the snapshot" >"$work/net/docs/hello.txt"
rm "$work/net/docs/fs.h"
run snapshot list "$work/net"
ls -la "$work/net/.snapshots/before-edit/docs"
echo "live:     $(cat "$work/net/docs/hello.txt")"
echo "snapshot: $(cat "$work/net/.snapshots/before-edit/docs/hello.txt")"
if (echo x >"$work/net/.snapshots/before-edit/docs/hello.txt") 2>/dev/null; then
  echo "== a snapshot took a write!" >&2
  exit 1
fi
echo "== writing into the snapshot fails (read-only file system), as it must"
cp -a "$work/net/.snapshots/before-edit/docs/fs.h" "$work/net/docs/" && echo "== restored docs/fs.h from the snapshot with cp -a"
run unmount "$work/net"
run check "$work/net.vol"
ksrun admin --socket "$work/ks/admin.sock" audit --limit 5

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
