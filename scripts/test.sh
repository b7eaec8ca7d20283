#!/usr/bin/env bash
# The test command: installs what is missing, then runs every test (no Python, no network
# beyond crates.io: the oracle fixtures are committed).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
[ -f "$HOME/.cargo/env" ] && . "$HOME/.cargo/env"
if cargo nextest --version >/dev/null 2>&1; then
  cargo nextest run --locked --all-targets --no-fail-fast
else
  cargo test --locked --all-targets
fi
