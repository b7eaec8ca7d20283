#!/usr/bin/env bash
# The test command: installs what is missing, then runs every test. The oracle fixtures are
# committed (no model downloads); the GUI's panels are compared with snapshot images rendered
# headless; the Parquet export is also read back by pyarrow, DuckDB and
# the notebook, in a Python venv that scripts/python-env.sh makes from PyPI.
set -euo pipefail
cd "$(dirname "$0")/.."
# The GUI snapshot tests render through wgpu on Mesa's software Vulkan driver (lavapipe).
bash scripts/setup.sh mesa-vulkan-drivers libvulkan1
cargo_env="${CARGO_HOME:-$HOME/.cargo}/env"
[ -f "$cargo_env" ] && . "$cargo_env"
MONOSCOPE_PYTHON="$(bash scripts/python-env.sh)"
export MONOSCOPE_PYTHON
if cargo nextest --version >/dev/null 2>&1; then
  cargo nextest run --locked --all-targets --no-fail-fast
else
  cargo test --locked --all-targets
fi
