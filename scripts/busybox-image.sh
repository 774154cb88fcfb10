#!/usr/bin/env bash
# Makes a tiny OCI image layout from Debian's busybox-static: the image the
# quickstart and the tests use. Usage: scripts/busybox-image.sh LAYOUT_DIR [TAG]
set -euo pipefail
layout=${1:?usage: busybox-image.sh LAYOUT_DIR [TAG]}
tag=${2:-latest}
hangar=${HANGAR:-$(dirname "$0")/../target/debug/hangar}
busybox=$(command -v busybox) || { echo "busybox not found: apt-get install busybox-static" >&2; exit 1; }
rootfs=$(mktemp -d)
trap 'rm -rf "$rootfs"' EXIT
mkdir -p "$rootfs"/{bin,sbin,usr/bin,usr/sbin,etc,root,tmp,var/tmp,home,proc,sys,dev,run}
chmod 1777 "$rootfs/tmp" "$rootfs/var/tmp"
cp "$busybox" "$rootfs/bin/busybox"
for applet in $("$busybox" --list); do
  [[ -e "$rootfs/bin/$applet" ]] || ln -s busybox "$rootfs/bin/$applet"
done
printf 'root:x:0:0:root:/root:/bin/sh\nnobody:x:65534:65534:nobody:/nonexistent:/bin/false\n' >"$rootfs/etc/passwd"
printf 'root:x:0:\nnogroup:x:65534:\n' >"$rootfs/etc/group"
# A long sleep as the main process: it dies on the stop signal at once.
"$hangar" image from-dir "$rootfs" "oci:$layout:$tag" -- sleep 2147483647
