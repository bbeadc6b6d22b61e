#!/usr/bin/env bash
# Builds and installs lsvfs-keyserver: the binary, its systemd unit, and
# /etc/lsvfs-keyserver with a sample config, a master key (0600) and a
# self-signed TLS certificate. Safe to run twice: existing config, keys and
# certificate are kept; the binary and the unit are replaced.
#
# Environment:
#   PREFIX=/usr/local     where bin/ and share/doc/ go
#   DESTDIR=              install under this root (packaging, tests); skips systemctl
#   BIN=path              install this binary instead of building one
#   KEYSERVER_NAMES="..." names/IPs for the certificate (default: hostname, localhost, 127.0.0.1)
set -euo pipefail
cd "$(dirname "$0")/.."

prefix=${PREFIX:-/usr/local}
dest=${DESTDIR:-}
etc="$dest/etc/lsvfs-keyserver"
unitdir="$dest/etc/systemd/system"

if [ -z "$dest" ] && [ "$(id -u)" -ne 0 ]; then
  echo "install-keyserver: run as root (or set DESTDIR)" >&2
  exit 1
fi

if [ -z "${BIN:-}" ]; then
  cargo build --release -p lsvfs-keyserver
  BIN="${CARGO_TARGET_DIR:-target}/release/lsvfs-keyserver"
fi
[ -x "$BIN" ] || { echo "install-keyserver: $BIN is not executable" >&2; exit 1; }

install -d -m 0755 "$dest$prefix/bin" "$dest$prefix/share/doc/lsvfs-keyserver" "$unitdir"
install -m 0755 "$BIN" "$dest$prefix/bin/lsvfs-keyserver.new"
mv -f "$dest$prefix/bin/lsvfs-keyserver.new" "$dest$prefix/bin/lsvfs-keyserver"
bin="$dest$prefix/bin/lsvfs-keyserver"
install -m 0644 docs/PROTOCOL.md keyserver/README.md "$dest$prefix/share/doc/lsvfs-keyserver/"

unit=$(mktemp)
trap 'rm -f "$unit"' EXIT
sed -e "s#/usr/local/bin/lsvfs-keyserver#$prefix/bin/lsvfs-keyserver#" \
    -e "s#/usr/local/share/doc/#$prefix/share/doc/#" \
    keyserver/systemd/lsvfs-keyserver.service >"$unit"
install -m 0644 "$unit" "$unitdir/lsvfs-keyserver.service"

install -d -m 0755 "$etc"
if [ ! -e "$etc/config.toml" ]; then
  install -m 0644 keyserver/systemd/config.toml "$etc/config.toml"
  echo "wrote $etc/config.toml"
fi
if [ ! -e "$etc/master-key" ]; then
  "$bin" gen-master-key "$etc/master-key"
fi
if [ ! -e "$etc/cert.pem" ] && [ ! -e "$etc/key.pem" ]; then
  read -r -a names <<<"${KEYSERVER_NAMES:-$(hostname -f 2>/dev/null || hostname) localhost 127.0.0.1}"
  "$bin" gen-cert --cert "$etc/cert.pem" --key "$etc/key.pem" "${names[@]}"
fi

if [ -z "$dest" ] && [ -d /run/systemd/system ]; then
  systemctl daemon-reload
fi

cat <<MSG

lsvfs-keyserver installed.

Next steps:
  1. Review $etc/config.toml (listen address, challenge lifetime).
  2. Back up $etc/master-key somewhere safe: without it the KEKs in
     /var/lib/lsvfs-keyserver cannot be decrypted.
  3. Give hosts the certificate to pin: $etc/cert.pem
  4. Start it:   systemctl enable --now lsvfs-keyserver
  5. Enroll a host and authorize it for a volume:
       lsvfs-keyserver admin enroll NAME HOST_ID
       lsvfs-keyserver admin authorize NAME VOLUME_ID
MSG
