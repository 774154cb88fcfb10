#!/usr/bin/env bash
# Runs every test: lints, unit tests, and the integration tests that start
# real daemons and real runc sandboxes. Run as root.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/install-deps.sh --test
cargo fmt --check
scripts/build.sh
cargo clippy --workspace --all-targets -- -D warnings
cargo test --workspace
