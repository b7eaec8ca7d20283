#!/usr/bin/env bash
# Builds monoscope with `--features cuda` on a machine without a CUDA toolkit or GPU, and packs
# what a GPU machine without Rust needs to run the GPU checks (scripts/gpu-check.sh) into
# .gpu/ (git-ignored; ~20 MB, for the device tool's `carry`).
#
# The toolkit comes from PyPI (NVIDIA's CUDA 13.0 wheels: nvcc, headers, cuBLAS, cuRAND,
# NVRTC) into ~/.cache/monoscope/cuda13; the driver library is linked against a stub made here
# (libcuda.so.1 exports only names; the GPU machine's driver provides the real one). PTX is
# built for compute capability $CUDA_COMPUTE_CAP (default 90: H100/H200).
#   bash scripts/cuda-build.sh            # build, then pack .gpu/
set -euo pipefail
cd "$(dirname "$0")/.."
root="${MONOSCOPE_CUDA_ROOT:-$HOME/.cache/monoscope/cuda13}"
cuda="$root/nvidia/cu13"
if [ ! -f "$root/ready" ]; then
  mkdir -p "$root/wheels"
  for pkg in nvidia-cuda-nvcc nvidia-cuda-crt nvidia-cuda-cccl nvidia-cuda-runtime \
    nvidia-cuda-nvrtc nvidia-cublas nvidia-nvvm; do
    python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.11 \
      --platform manylinux2014_x86_64 --platform manylinux_2_27_x86_64 \
      -d "$root/wheels" "$pkg==13.0.*"
  done
  python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.11 \
    --platform manylinux_2_27_x86_64 -d "$root/wheels" "nvidia-curand==10.4.0.*"
  for w in "$root"/wheels/*.whl; do (cd "$root" && python3 -m zipfile -e "$w" .); done
  chmod +x "$cuda"/bin/* "$cuda"/nvvm/bin/*
  ln -sfn lib "$cuda/lib64"
  for f in "$cuda"/lib/lib{cublas,cublasLt,cudart,curand,nvrtc}.so.*; do
    case "$f" in *alt*|*builtins*) continue ;; esac
    ln -sf "$(basename "$f")" "${f%%.so.*}.so"
  done
  # The driver API names cudarc links against, as empty functions in a libcuda.so.1 stub.
  mkdir -p "$cuda/lib/stubs"
  cargo fetch --locked
  version=$(awk '/^name = "cudarc"$/ {getline; gsub(/[^0-9.]/, ""); print}' Cargo.lock)
  cudarc=$(find "${CARGO_HOME:-$HOME/.cargo}/registry/src" -maxdepth 2 -type d \
    -name "cudarc-$version" | head -1)
  grep -ohE "fn cu[A-Za-z0-9_]+" "$cudarc"/src/driver/sys/mod.rs | sort -u |
    sed 's/fn \(.*\)/void \1(void) {}/' >"$root/cuda_stub.c"
  cc -shared -fPIC -o "$cuda/lib/stubs/libcuda.so" -Wl,-soname,libcuda.so.1 "$root/cuda_stub.c"
  touch "$root/ready"
fi
export CUDA_ROOT="$cuda" PATH="$cuda/bin:$PATH" CUDA_COMPUTE_CAP="${CUDA_COMPUTE_CAP:-90}"
export LIBRARY_PATH="$cuda/lib:$cuda/lib/stubs"
names=(monoscope oracle sae_tests sae_bench forward_bench)
mapfile -t built < <(cargo build --release --locked --features cuda --bin monoscope \
  --test oracle --test sae --bench sae --bench forward --message-format=json-render-diagnostics |
  python3 scripts/executables.py bin:monoscope test:oracle test:sae bench:sae bench:forward)
[ ${#built[@]} -eq ${#names[@]} ] || { echo "the build gave no executables" >&2; exit 1; }

# Pack: the stripped binaries and the system libraries they need beyond glibc, in one xz
# archive whose window spans them all (each binary holds the same CUDA kernels: ~300 MB packs
# into ~20 MB).
stage=$(mktemp -d)
mkdir -p "$stage/bin" "$stage/lib"
for i in "${!names[@]}"; do strip -o "$stage/bin/${names[$i]}" "${built[$i]}"; done
for lib in libopenblas.so.0 libgfortran.so.5 libquadmath.so.0; do
  cp -L "$(ldconfig -p | awk -v l="$lib" '$1 == l && /x86-64/ {print $NF; exit}')" "$stage/lib/"
done
rm -rf .gpu && mkdir .gpu
tar -C "$stage" -cf - bin lib | xz -T1 --lzma2=preset=9,dict=256MiB >.gpu/monoscope-gpu.tar.xz
rm -rf "$stage"
pwd >.gpu/built_at # the test binaries find their fixtures below the path they were built at
du -sh .gpu
echo "The device call carries .gpu; the tree and it must stay under 64 MiB together, so move" \
  "assets/sae aside for the call (the GPU checks do not read it)."
