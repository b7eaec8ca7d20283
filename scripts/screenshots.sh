#!/usr/bin/env bash
# Opens the real window under a virtual X server (Xvfb, Mesa's software OpenGL), visits each
# panel — a feature page, a ROME edit of Japan → Yokohama, knowledge neurons — saves a PNG of
# each to docs/screenshots/, and prints the frame times measured while jobs ran.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
[ -f "$HOME/.cargo/env" ] && . "$HOME/.cargo/env"
need=()
command -v xvfb-run >/dev/null 2>&1 || need+=(xvfb xauth)
dpkg -s libgl1-mesa-dri >/dev/null 2>&1 || need+=(libgl1-mesa-dri)
if [ ${#need[@]} -gt 0 ]; then
  sudo=""
  [ "$(id -u)" -ne 0 ] && sudo="sudo"
  $sudo apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq "${need[@]}"
fi
out="${1:-docs/screenshots}"
mkdir -p "$out"
cargo build --release --locked
xvfb-run -a -s "-screen 0 1400x900x24" ./target/release/monoscope gui --screenshots "$out"
