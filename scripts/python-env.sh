#!/usr/bin/env bash
# Makes the Python environment for the export checker and notebooks: a venv at
# ${MONOSCOPE_PYENV:-~/.cache/monoscope/pyenv} with pyarrow, pandas, duckdb, nbclient, nbformat,
# ipykernel, matplotlib and safetensors (for notebooks/read_a_trace.ipynb). Reuses the venv as
# it is when it already imports all of them (no network); otherwise installs what is missing (python3 and python3-venv with apt-get on
# Debian/Ubuntu, the packages from PyPI). Registers nothing outside the venv.
# Prints one line on stdout, the absolute path of the venv's python; progress goes to stderr.
#
#   py=$(bash scripts/python-env.sh) && "$py" tests/python/check_export.py export
set -euo pipefail
env_dir="${MONOSCOPE_PYENV:-$HOME/.cache/monoscope/pyenv}"
packages=(pyarrow pandas duckdb nbclient nbformat ipykernel matplotlib safetensors)
imports="import $(IFS=,; echo "${packages[*]}")"
py="$env_dir/bin/python"

ready() { [ -x "$py" ] && "$py" -c "$imports" >/dev/null 2>&1; }

if ! ready; then
  # Debian splits venv's ensurepip into python3-venv; without it `python3 -m venv` fails.
  if ! command -v python3 >/dev/null 2>&1 || ! python3 -c 'import venv, ensurepip' >/dev/null 2>&1; then
    sudo=""
    [ "$(id -u)" -ne 0 ] && sudo="sudo"
    echo "installing python3 and python3-venv with apt-get" >&2
    $sudo apt-get update -qq >&2
    $sudo env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq python3 python3-venv >&2
  fi
  if ! { [ -x "$py" ] && "$py" -m pip --version >/dev/null 2>&1; }; then
    echo "creating the venv $env_dir" >&2
    mkdir -p "$(dirname "$env_dir")"
    python3 -m venv --clear "$env_dir" >&2
  fi
  echo "installing ${packages[*]} into $env_dir" >&2
  "$py" -m pip install --quiet "${packages[@]}" >&2
  if ! ready; then
    echo "the venv $env_dir still cannot run: $imports" >&2
    "$py" -c "$imports" >&2
    exit 1
  fi
fi
# Absolute even when MONOSCOPE_PYENV is relative; not resolved through symlinks, so the
# path stays inside the venv (its python is usually a link to the base interpreter).
cd "$env_dir" && echo "$PWD/bin/python"
