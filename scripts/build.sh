#!/usr/bin/env bash
# Builds everything: the workspace, and hangar-init as a static binary (it
# runs inside arbitrary images, so it can depend on no libc of theirs).
# Usage: scripts/build.sh [--release]
set -euo pipefail
cd "$(dirname "$0")/.."
profile_flag=()
[[ "${1:-}" == "--release" ]] && profile_flag=(--release)
cargo build --workspace --bins "${profile_flag[@]}"
CARGO_TARGET_X86_64_UNKNOWN_LINUX_GNU_RUSTFLAGS="-C target-feature=+crt-static" \
  cargo build -p hangar-init --target x86_64-unknown-linux-gnu "${profile_flag[@]}"
