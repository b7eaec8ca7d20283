#!/usr/bin/env bash
# The test command: installs what is missing, then runs every test. The oracle fixtures are
# committed (no model downloads); the GUI's panels are compared with snapshot images rendered
# headless; the Parquet export is also read back by pyarrow, DuckDB and
# the notebook, in a Python venv that scripts/python-env.sh makes from PyPI.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
[ -f "$HOME/.cargo/env" ] && . "$HOME/.cargo/env"
# The GUI snapshot tests render through wgpu on Mesa's software Vulkan driver (lavapipe).
if ! dpkg -s mesa-vulkan-drivers libvulkan1 >/dev/null 2>&1; then
  sudo=""
  [ "$(id -u)" -ne 0 ] && sudo="sudo"
  $sudo apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq mesa-vulkan-drivers libvulkan1
fi
MONOSCOPE_PYTHON="$(bash scripts/python-env.sh)"
export MONOSCOPE_PYTHON
if cargo nextest --version >/dev/null 2>&1; then
  cargo nextest run --locked --all-targets --no-fail-fast
else
  cargo test --locked --all-targets
fi
