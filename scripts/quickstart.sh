#!/usr/bin/env bash
# From a fresh Debian machine to a running daemon with a ready-made image.
# Run as root. Data lives in ${HANGAR_DATA_DIR:-/var/lib/hangar}.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/install-deps.sh
scripts/build.sh --release
data=${HANGAR_DATA_DIR:-/var/lib/hangar}
install -d -m 700 "$data" "$data/imports"
image="$data/imports/busybox"
[[ -f "$image/index.json" ]] || HANGAR=target/release/hangar scripts/busybox-image.sh "$image"
cat <<MSG
Hangar is starting. In another shell, as root:
  export PATH=$PWD/target/release:\$PATH HANGAR_DATA_DIR=$data
  hangar machine run oci:$image:latest --name first
  hangar machine exec first -- sh -c 'echo hello from \$(hostname)'
  hangar machine stop first && hangar machine start first
MSG
exec target/release/hangar serve --data-dir "$data" --listen "${HANGAR_LISTEN:-127.0.0.1:4280}"
