#!/usr/bin/env bash
# Builds what the Debian-image tests need, once:
#   debian-test-rootfs.sh DIR             -> DIR/rootfs: Debian bookworm with apt, curl, git, ca-certificates
#   debian-test-rootfs.sh --apt-repo DIR  -> DIR: a flat apt repository holding one package, hangar-hello
# Both build into a .tmp sibling and rename it into place, so an interrupted run
# never leaves a half-built result that a later run would take as done.
set -euo pipefail

usage() { echo "usage: $0 DIR | $0 --apt-repo DIR" >&2; exit 2; }

# Installs the Debian packages named after each missing command (cmd:package ...).
need() {
  local missing=() pair
  for pair in "$@"; do command -v "${pair%%:*}" >/dev/null || missing+=("${pair#*:}"); done
  ((${#missing[@]})) || return 0
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >/dev/null
}

# Removes a leftover .tmp directory from a crashed run. --one-file-system so
# that a mount left inside it can never lead rm into the host's /proc or /dev.
clear_tmp() { [[ ! -e $1 ]] || rm -rf --one-file-system "$1"; }

build_rootfs() {
  local dir=$1 out=$1/rootfs tmp=$1/rootfs.tmp
  [[ -d $out ]] && return 0
  need mmdebstrap:mmdebstrap
  mkdir -p "$dir"
  clear_tmp "$tmp"
  # The host's own deb822 sources (the Debian mirror, with updates and security),
  # so this works wherever the host's apt does. Variant apt: the Essential set
  # plus apt, the smallest in which apt-get still works. Check-Valid-Until off
  # as on the host: its mirror serves a dated snapshot whose Release has expired.
  # No translations, man pages or docs (dpkg skips them for later installs too).
  # A private mount namespace: mmdebstrap's /proc, /sys and /dev mounts in the
  # target die with it even if it is killed.
  unshare --mount --propagation private \
    mmdebstrap --quiet --mode=root --format=directory --variant=apt \
      --include=curl,git,ca-certificates \
      --aptopt='Acquire::Check-Valid-Until "false"' \
      --aptopt='Acquire::Languages "none"' \
      --dpkgopt='path-exclude=/usr/share/locale/*' --dpkgopt='path-exclude=/usr/share/man/*' \
      --dpkgopt='path-exclude=/usr/share/doc/*' --dpkgopt='path-include=/usr/share/doc/*/copyright' \
      --customize-hook='grep -rlsZ deb.debian.org "$1/etc/apt/sources.list" "$1/etc/apt/sources.list.d" | xargs -0r rm -f' \
      --customize-hook='rm -f "$1/etc/resolv.conf" && : >"$1/etc/resolv.conf"' \
      --customize-hook='rm -rf "$1"/var/lib/apt/lists/* "$1"/var/cache/apt/*' \
      bookworm "$tmp" /etc/apt/sources.list.d/debian.sources
  # Tests write their own sources.list; the lists directory must exist for apt-get update.
  mkdir -p "$tmp/var/lib/apt/lists/partial"
  mv -T "$tmp" "$out"
}

build_apt_repo() {
  local dir=${1%/} tmp=${1%/}.tmp
  [[ -f $dir/Release ]] && return 0
  need apt-ftparchive:apt-utils
  clear_tmp "$tmp"
  pkg=$(mktemp -d)
  trap 'rm -rf "$pkg"' EXIT  # pkg is global so the trap still sees it at exit
  mkdir -p "$pkg/DEBIAN" "$pkg/usr/bin" "$tmp"
  # mktemp makes it 0700, and dpkg would give that mode to the target's "/".
  chmod 0755 "$pkg" "$pkg/usr" "$pkg/usr/bin"
  cat >"$pkg/DEBIAN/control" <<'EOF'
Package: hangar-hello
Version: 1.0
Architecture: all
Maintainer: Hangar tests <hangar@localhost>
Description: Prints a greeting; proves that apt installed it from the local mirror.
EOF
  printf '#!/bin/sh\necho "hello from the local mirror"\n' >"$pkg/usr/bin/hangar-hello"
  chmod 0755 "$pkg/usr/bin/hangar-hello"
  dpkg-deb --root-owner-group --build "$pkg" "$tmp/hangar-hello_1.0_all.deb" >/dev/null
  # A flat repository ("deb [trusted=yes] http://HOST:PORT/ ./"): Packages and
  # Release side by side. Release is written outside the directory first so that
  # apt-ftparchive does not list (and hash) the half-written Release itself.
  (cd "$tmp" && apt-ftparchive packages . >Packages && apt-ftparchive release . >"$pkg/Release")
  mv "$pkg/Release" "$tmp/Release"
  [[ ! -e $dir ]] || rm -rf "$dir"  # an older run's copy without a Release: incomplete
  mv -T "$tmp" "$dir"
}

case ${1:-} in
  --apt-repo) [[ $# -eq 2 ]] || usage; build_apt_repo "$2" ;;
  -*|'') usage ;;
  *) [[ $# -eq 1 ]] || usage; build_rootfs "$1" ;;
esac
