#!/usr/bin/env bash
# Builds the Debian package target/debian/lsvfs_VERSION-1_ARCH.deb with
# cargo-deb: lsvfs and lsvfs-keyserver, the mount(8)/umount(8) helper links
# (/usr/sbin/mount.lsvfs, /usr/sbin/umount.fuse.lsvfs), the systemd units,
# manual pages (clap_mangen), shell completions (clap_complete) and an
# example key-server configuration.
#
# The binaries are portable (baseline x86-64; the AES instructions are
# found at run time), as every lsvfs build is.
#
#   scripts/package.sh            prints the path of the .deb
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh package
export PATH="$HOME/.cargo/bin:$PATH"

cargo build --release --locked --quiet --workspace
bin=target/release

gen=target/package
rm -rf "$gen"
mkdir -p "$gen/man" "$gen/completions" "$gen/links" "$gen/units"
"$bin/lsvfs" generate-man "$gen/man"
"$bin/lsvfs-keyserver" generate-man "$gen/man"
gzip -9n "$gen"/man/*
"$bin/lsvfs" completions bash >"$gen/completions/lsvfs.bash"
"$bin/lsvfs" completions zsh >"$gen/completions/_lsvfs"
"$bin/lsvfs" completions fish >"$gen/completions/lsvfs.fish"
ln -s ../bin/lsvfs "$gen/links/mount.lsvfs"
ln -s ../bin/lsvfs "$gen/links/umount.fuse.lsvfs"
cp systemd/lsvfs-mount@.service "$gen/units/"
sed -e "s#/usr/local/bin/lsvfs-keyserver#/usr/bin/lsvfs-keyserver#" \
    -e "s#/usr/local/share/doc/lsvfs-keyserver/#/usr/share/doc/lsvfs/#" \
    keyserver/systemd/lsvfs-keyserver.service >"$gen/units/lsvfs-keyserver.service"

deb=$(cargo deb -p lsvfs --no-build --locked --strip -o "$PWD/target/debian" 2>&1 | tail -1)
[ -f "$deb" ] || { echo "package.sh: cargo deb did not report a .deb: $deb" >&2; exit 1; }
echo "$deb"
