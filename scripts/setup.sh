#!/usr/bin/env bash
# Installs what building monoscope needs on a fresh Debian/Ubuntu machine, skipping what is
# already there: a C toolchain and pkg-config (tokenizers' oniguruma is built from source),
# OpenBLAS with LAPACK (ndarray-linalg links the system library for ROME's solves), and Rust
# (rustup, with rustfmt and clippy) when rustc is missing or older than the locked
# dependencies need; and the libraries the window opens with (X11/Wayland
# client libraries, xkbcommon, OpenGL/EGL — loaded at run time, so building needs none).
# Extra Debian packages given as arguments are installed too when missing (the test and
# screenshot scripts name theirs: `bash scripts/setup.sh mesa-vulkan-drivers`).
set -euo pipefail
CALLER_PATH="$PATH"
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
# Rust: the locked dependencies need rustc 1.89 or newer (Debian 12 and Ubuntu 24.04 ship
# older ones), and CI's fmt and clippy checks need those two components.
MIN_RUST=1.89
cargo_env="${CARGO_HOME:-$HOME/.cargo}/env"
[ -f "$cargo_env" ] && . "$cargo_env"
rust_ok() {
  local v
  v=$(rustc --version 2>/dev/null | awk '{print $2}') || return 1
  [ -n "$v" ] && [ "$(printf '%s\n%s\n' "$MIN_RUST" "$v" | sort -V | head -1)" = "$MIN_RUST" ]
}
if ! rust_ok; then
  if command -v rustup >/dev/null 2>&1; then
    # Makes stable the default toolchain: the one in use is too old to build monoscope.
    echo "updating Rust with rustup (rustc >= $MIN_RUST needed)" >&2
    rustup toolchain install stable --profile minimal -c rustfmt,clippy
    rustup default stable
  else
    echo "installing Rust with rustup (rustc >= $MIN_RUST needed)" >&2
    curl --proto '=https' --tlsv1.2 -sSf https://sh.rustup.rs |
      sh -s -- -y --profile minimal -c rustfmt,clippy
  fi
  [ -f "$cargo_env" ] && . "$cargo_env"
  if ! rust_ok; then
    echo "rustc >= $MIN_RUST is installed but an older one comes first on PATH ($(command -v rustc))" >&2
    exit 1
  fi
fi
if ! { cargo fmt --version && cargo clippy --version; } >/dev/null 2>&1; then
  if command -v rustup >/dev/null 2>&1; then
    rustup component add rustfmt clippy
  else
    echo "note: cargo fmt or cargo clippy is missing (CI's checks need both)" >&2
  fi
fi
if [[ ":$CALLER_PATH:" != *":$HOME/.cargo/bin:"* && -x "$HOME/.cargo/bin/cargo" ]]; then
  echo "note: cargo is in ~/.cargo/bin; a new shell (or '. ~/.cargo/env') puts it on PATH" >&2
fi
