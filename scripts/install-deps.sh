#!/usr/bin/env bash
# Installs the system packages Hangar needs (Debian), skipping what is there.
# Usage: scripts/install-deps.sh [--test]   (--test adds what the tests use)
set -euo pipefail
cd "$(dirname "$0")/.."
need=(runc btrfs-progs busybox-static)
# docker-registry, skopeo, htpasswd (apache2-utils) and openssl: a real
# registry for the pull tests, with basic auth, tokens and TLS.
# mmdebstrap and apt-utils: the Debian test image and apt repository
# (installed here: tests building both at once would race for apt's lock).
[[ "${1:-}" == "--test" ]] && need+=(gcc runsc docker-registry skopeo apache2-utils openssl mmdebstrap apt-utils)
missing=()
for pkg in "${need[@]}"; do
  dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "install ok installed" || missing+=("$pkg")
done
if ((${#missing[@]})); then
  echo "installing: ${missing[*]}"
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >/dev/null
fi

if [[ "${1:-}" == "--test" ]]; then
  # The MCP tests' clients (the official Python SDK) and the OpenAPI
  # document's validator, pinned, in a venv.
  venv=target/test-tools/venv
  [[ -x "$venv/bin/python" ]] || python3 -m venv "$venv"
  "$venv/bin/pip" install -q --disable-pip-version-check -r crates/cli/tests/mcp/requirements.txt \
    -r crates/daemon/tests/requirements.txt
  # And the MCP Inspector CLI and the conformance suite, pinned by the lock.
  npm_dir=target/test-tools/npm
  if ! cmp -s crates/cli/tests/mcp/package-lock.json "$npm_dir/package-lock.json"; then
    mkdir -p "$npm_dir"
    cp crates/cli/tests/mcp/package.json crates/cli/tests/mcp/package-lock.json "$npm_dir/"
    npm ci --prefix "$npm_dir" --no-audit --no-fund --loglevel=error
  fi
fi
