#!/usr/bin/env bash
# Builds the Debian package (scripts/package.sh), installs it on this
# machine with dpkg -i, and uses it as an administrator would: the demo
# against the installed binaries, a volume in an fstab file mounted with
# `mount -a` and unmounted with `umount`, `man lsvfs`, the installed units
# through systemd-analyze verify. Purges the package at the end. Root only.
set -euo pipefail
cd "$(dirname "$0")/.."
[ "$(id -u)" -eq 0 ] || { echo "package-check.sh: run as root (it installs a package)" >&2; exit 1; }
deb=$(scripts/package.sh | tail -1)
echo "== built $deb ($(du -h "$deb" | cut -f1))"
dpkg -i "$deb"
work=$(mktemp -d /tmp/lsvfs-package.XXXXXX)
cleanup() {
  umount "$work/m" 2>/dev/null || true
  rm -rf "$work"
  dpkg -P lsvfs >/dev/null 2>&1 || true
}
trap cleanup EXIT

echo "== installed"
dpkg -L lsvfs | grep -E '/s?bin/|/systemd/system/|man1/lsvfs\.1|man8/mount|completions/' | sort
lsvfs --version
lsvfs-keyserver --version
[ "$(readlink -f /sbin/mount.lsvfs)" = /usr/bin/lsvfs ] || { echo "mount.lsvfs does not lead to /usr/bin/lsvfs" >&2; exit 1; }

echo "== the demo, against the installed binaries"
LSVFS_BIN_DIR=/usr/bin scripts/demo.sh >"$work/demo.log" 2>&1 || { cat "$work/demo.log"; exit 1; }
grep -E "^== (using|demo finished)" "$work/demo.log"

echo "== a volume in fstab: mount -a, write, umount, check"
lsvfs keygen "$work/k" >/dev/null
lsvfs create "$work/v.vol" --size 256M --key-file "$work/k" >/dev/null
mkdir "$work/m"
echo "$work/v.vol $work/m lsvfs _netdev,nodev,key_file=$work/k 0 0" | tee "$work/fstab"
mount --fstab "$work/fstab" -a
findmnt -t fuse.lsvfs "$work/m"
echo "written through fstab" >"$work/m/hello"
umount "$work/m"
findmnt "$work/m" >/dev/null && { echo "still mounted after umount" >&2; exit 1; }
lsvfs check "$work/v.vol" --key-file "$work/k"
mount --fstab "$work/fstab" -a
[ "$(cat "$work/m/hello")" = "written through fstab" ]
umount "$work/m"

echo "== man lsvfs"
MANPAGER=cat MANWIDTH=80 man lsvfs | head -12
man -w mount.lsvfs lsvfs-mount lsvfs-keyserver

echo "== the installed units verify"
cp /usr/lib/systemd/system/lsvfs-mount@.service "$work/lsvfs-mount@srv-data.service"
systemd-analyze verify --man=no "$work/lsvfs-mount@srv-data.service" /usr/lib/systemd/system/lsvfs-keyserver.service
echo "== package check passed"
