#!/usr/bin/env bash
# Installs what lsvfs's scripts need, and nothing twice: the one list of
# system packages and cargo tools. Idempotent, and silent when everything
# is present. scripts/test.sh, scripts/demo.sh, the benchmarks and .ci/run
# all call it.
#
#   scripts/setup.sh [GROUP...]      groups: demo, test, bench, package (default: test)
#
# Where something is missing and cannot be installed (not root, no
# apt-get), it prints one message naming every missing piece and how to
# get it, and exits 1, before any long work starts.
set -euo pipefail

# "command package" pairs: the command the scripts run, the Debian package
# that provides it.
demo_tools=(
  "cc build-essential"        # C compilers for crates that build C
  "pkg-config pkg-config"     # finds libtss2 for the build
  "/usr/include/tss2/tss2_esys.h libtss2-dev"   # the TPM 2.0 store links libtss2 (tss-esapi)
  "fusermount3 fuse3"         # FUSE mounts (unprivileged unmount, the tests' cleanup)
  "python3 python3"           # demo: a free loopback port
)
test_tools=(
  "${demo_tools[@]}"
  "pgrep procps"              # kill -9 tests find the daemon
  "swtpm swtpm"               # a software TPM 2.0 for the TPM store tests
  "setfacl acl"               # POSIX ACL tests (cp -a, setfacl)
  "getfacl acl"
  "setfattr attr"             # xattr tests
  "getfattr attr"
  "git git"                   # real-program tests (git, rsync, cp -a, tar)
  "rsync rsync"
  "tar tar"
  "strace strace"             # the flush-interval test
  "setpriv util-linux"        # tests as an unprivileged user
  "mount mount"               # mount(8) tests
  "systemd-analyze systemd"   # shipped unit files are verified
  "sha256sum coreutils"
  "gcore gdb"                 # key hygiene: a core of a process holding keys
  "/usr/bin/python3 python3"  # a socket impostor run as another user (not a per-user shim)
  "script bsdutils"           # a terminal for the progress bar test
  "curl curl"                 # the S3 tests make buckets and list keys
)
bench_tools=(
  "${demo_tools[@]}"
  "fio fio"
  "stress-ng stress-ng"       # the mixed-load rows
  "dbench dbench"             # many clients at once: rate and slowest operation
  "gocryptfs gocryptfs"
  "cryfs cryfs"
  "bc bc"
  "jq jq"
  "openssl openssl"
  "perf linux-perf"
  "restic restic"             # the export benchmark's peer
  "/usr/bin/time time"        # peak RSS (GNU time -v)
)
package_tools=(
  "cc build-essential"
  "pkg-config pkg-config"
  "/usr/include/tss2/tss2_esys.h libtss2-dev"
  "dpkg-shlibdeps dpkg-dev"   # cargo deb: the package's library dependencies
  "gzip gzip"                 # manual pages
  "man man-db"                # package check: man lsvfs
  "mount mount"
  "systemd-analyze systemd"   # package check: the installed units verify
  "python3 python3"           # the demo, run against the installed binaries
  "fusermount3 fuse3"
)
package_cargo=(
  "cargo-deb cargo-deb"       # builds the .deb
)
# "binary crate" pairs installed with `cargo install`.
test_cargo=(
  "fsx fsx"                   # the fsx file-system exerciser
  "cargo-deny cargo-deny"     # dependency policy (deny.toml)
)

groups=("$@")
[ ${#groups[@]} -gt 0 ] || groups=(test)
tools=()
cargo_tools=()
for g in "${groups[@]}"; do
  case $g in
    demo) tools+=("${demo_tools[@]}") ;;
    test) tools+=("${test_tools[@]}"); cargo_tools+=("${test_cargo[@]}") ;;
    bench) tools+=("${bench_tools[@]}") ;;
    package) tools+=("${package_tools[@]}"); cargo_tools+=("${package_cargo[@]}") ;;
    *) echo "setup.sh: unknown group '$g' (demo, test, bench, package)" >&2; exit 2 ;;
  esac
done

export PATH="$HOME/.cargo/bin:$PATH"
# A command on PATH, or (an absolute path) a file that must exist.
have() { case $1 in /*) [ -e "$1" ] ;; *) command -v "$1" >/dev/null 2>&1 ;; esac; }

missing_pkgs=()
for t in "${tools[@]}"; do
  read -r cmd pkg <<<"$t"
  have "$cmd" || missing_pkgs+=("$pkg")
done
missing_crates=()
for t in "${cargo_tools[@]}"; do
  read -r bin crate <<<"$t"
  have "$bin" || missing_crates+=("$crate")
done
# De-duplicate, keeping order.
dedup() { printf '%s\n' "$@" | awk 'NF && !seen[$0]++'; }
mapfile -t missing_pkgs < <(dedup "${missing_pkgs[@]+"${missing_pkgs[@]}"}")
mapfile -t missing_crates < <(dedup "${missing_crates[@]+"${missing_crates[@]}"}")

problems=()
have cargo || problems+=("cargo: install a Rust toolchain with rustup (https://rustup.rs)")
if have rustup; then
  for c in rustfmt clippy; do
    rustup component list --installed 2>/dev/null | grep -q "^$c" \
      || rustup component add "$c" >/dev/null 2>&1 \
      || problems+=("$c: rustup component add $c")
  done
fi

if [ ${#missing_pkgs[@]} -gt 0 ]; then
  if [ "$(id -u)" -eq 0 ] && have apt-get; then
    echo "setup.sh: installing ${missing_pkgs[*]}" >&2
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq >/dev/null
    apt-get install -y -qq --no-install-recommends "${missing_pkgs[@]}" >/dev/null
  else
    problems+=("Debian packages ${missing_pkgs[*]}: as root, apt-get install ${missing_pkgs[*]}")
  fi
fi
if [ ${#missing_crates[@]} -gt 0 ]; then
  if have cargo; then
    for c in "${missing_crates[@]}"; do
      echo "setup.sh: cargo install $c" >&2
      cargo install --quiet --locked "$c" || problems+=("$c: cargo install --locked $c")
    done
  else
    problems+=("cargo tools ${missing_crates[*]}: cargo install ${missing_crates[*]}")
  fi
fi
# An S3-compatible server for the export tests: moto's, from PyPI, in a
# virtual environment of its own (the system Python stays untouched).
moto=/opt/lsvfs-moto/bin/moto_server
if [[ " ${groups[*]} " == *" test "* ]] && ! have "$moto"; then
  if [ "$(id -u)" -eq 0 ]; then
    echo "setup.sh: installing moto (S3 test server) in /opt/lsvfs-moto" >&2
    if ! /usr/bin/python3 -c 'import ensurepip, venv' 2>/dev/null && have apt-get; then
      export DEBIAN_FRONTEND=noninteractive
      apt-get update -qq >/dev/null
      apt-get install -y -qq --no-install-recommends python3-venv >/dev/null
    fi
    { /usr/bin/python3 -m venv /opt/lsvfs-moto \
        && /opt/lsvfs-moto/bin/pip install -q 'moto[server]==5.*'; } >/dev/null 2>&1 \
      || problems+=("moto: python3 -m venv /opt/lsvfs-moto && /opt/lsvfs-moto/bin/pip install 'moto[server]==5.*'")
  else
    problems+=("moto (an S3 test server): as root, python3 -m venv /opt/lsvfs-moto && /opt/lsvfs-moto/bin/pip install 'moto[server]==5.*'")
  fi
fi
[ -e /dev/fuse ] || problems+=("/dev/fuse: load the fuse module (modprobe fuse) or give the container --device /dev/fuse")

if [ ${#problems[@]} -gt 0 ]; then
  {
    echo "setup.sh: cannot run lsvfs's ${groups[*]} here; missing:"
    printf '  - %s\n' "${problems[@]}"
  } >&2
  exit 1
fi
