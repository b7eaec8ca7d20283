#!/usr/bin/env bash
# Installs what building monoscope needs on a fresh Debian/Ubuntu machine, skipping what is
# already there: a C toolchain and pkg-config (tokenizers' oniguruma is built from source),
# OpenBLAS with LAPACK (ndarray-linalg links the system library for ROME's solves), and a
# Rust toolchain if cargo is missing; and the libraries the window opens with (X11/Wayland
# client libraries, xkbcommon, OpenGL/EGL — loaded at run time, so building needs none).
# Extra Debian packages given as arguments are installed too when missing (the test and
# screenshot scripts name theirs: `bash scripts/setup.sh mesa-vulkan-drivers`).
set -euo pipefail
need=()
for pkg in "$@"; do
  dpkg -s "$pkg" >/dev/null 2>&1 || need+=("$pkg")
done
command -v cc >/dev/null 2>&1 || need+=(build-essential)
command -v pkg-config >/dev/null 2>&1 || need+=(pkg-config)
command -v curl >/dev/null 2>&1 || need+=(curl ca-certificates)
dpkg -s libopenblas-dev >/dev/null 2>&1 || need+=(libopenblas-dev)
for lib in libxkbcommon-x11-0 libx11-6 libxcursor1 libxrandr2 libxi6 libgl1 libegl1 \
  libwayland-client0 libwayland-egl1; do
  dpkg -s "$lib" >/dev/null 2>&1 || need+=("$lib")
done
if [ ${#need[@]} -gt 0 ]; then
  sudo=""
  [ "$(id -u)" -ne 0 ] && sudo="sudo"
  $sudo apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq "${need[@]}"
fi
if ! command -v cargo >/dev/null 2>&1; then
  if [ -x "$HOME/.cargo/bin/cargo" ]; then
    echo "cargo is in ~/.cargo/bin: add it to PATH (source ~/.cargo/env)" >&2
  else
    echo "installing Rust with rustup" >&2
    curl --proto '=https' --tlsv1.2 -sSf https://sh.rustup.rs | sh -s -- -y --profile minimal
  fi
fi
