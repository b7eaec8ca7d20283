#!/usr/bin/env bash
# Opens the real window under a virtual X server (Xvfb, Mesa's software OpenGL), visits each
# panel — a feature page, a ROME edit of Japan → Yokohama, knowledge neurons — saves a PNG of
# each to docs/screenshots/, and prints the frame times measured while jobs ran.
set -euo pipefail
cd "$(dirname "$0")/.."
# Xvfb (and xauth for xvfb-run) and Mesa's software OpenGL driver.
bash scripts/setup.sh xvfb xauth libgl1-mesa-dri
cargo_env="${CARGO_HOME:-$HOME/.cargo}/env"
[ -f "$cargo_env" ] && . "$cargo_env"
out="${1:-docs/screenshots}"
mkdir -p "$out"
cargo build --release --locked
xvfb-run -a -s "-screen 0 1400x900x24" ./target/release/monoscope gui --screenshots "$out"
