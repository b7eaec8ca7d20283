#!/usr/bin/env bash
# The main command: installs what is missing (scripts/setup.sh, Rust included), builds the
# release binary and runs it with these arguments — none opens the workbench window on the
# bundled world model and SAE: `bash scripts/run.sh`, `bash scripts/run.sh info --json`.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
cargo_env="${CARGO_HOME:-$HOME/.cargo}/env"
[ -f "$cargo_env" ] && . "$cargo_env"
exec cargo run --release --locked -- "$@"
