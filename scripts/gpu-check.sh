#!/usr/bin/env bash
# The GPU checks, on a CUDA machine that has PyTorch and transformers but no Rust: run from the
# repository root with .gpu/ beside it (made by `bash scripts/cuda-build.sh` on a build
# machine). In one go, for issue 2 (point 12) and issue 4 (points 3 and 9):
#   1. the oracle tests, on the CPU and on CUDA (every architecture against transformers), and
#      the SAE tensor engine on CUDA against the CPU kernels;
#   2. the forward pass (GPT-2-small shape, batch 8 × 128) against PyTorch on the same GPU;
#   3. SAE training (topk and relu-l1, d_in 512 → 8192, batch 4096) against PyTorch there;
#   4. the binary on the bundled model: `generate` and a short `sae train` on CUDA.
# Logs go to $OUT (or .gpu/out), six files (the device tool brings back eight at most); the
# summary is printed last.
#   bash scripts/gpu-check.sh [SAE_STEPS]
set -uo pipefail
cd "$(dirname "$0")/.."
steps="${1:-200}"
out="${OUT:-.gpu/out}"
work=/tmp/monoscope-gpu
mkdir -p "$out" "$work"
: >"$out/summary.txt"
: >"$out/other.log"
python3 -c "import sys, tarfile; tarfile.open(sys.argv[1]).extractall(sys.argv[2])" \
  .gpu/monoscope-gpu.tar.xz "$work"
chmod +x "$work"/bin/*
# The test binaries read fixtures below the folder they were built in.
built_at=$(cat .gpu/built_at)
[ -e "$built_at" ] || { mkdir -p "$(dirname "$built_at")" && ln -s "$PWD" "$built_at"; }
# The driver's libcuda, and cuBLAS, cuRAND and the CUDA runtime of CUDA 13 (the build's): the
# toolkit's, or those of the Python packages' NVIDIA wheels. The driver must be 580 or newer.
libs=$work/lib
mapfile -t places < <(python3 -c 'import site
for p in site.getsitepackages() + [site.getusersitepackages()]: print(p + "/nvidia")')
for name in libcuda.so.1 libcublas.so.13 libcublasLt.so.13 libcurand.so.10 libcudart.so.13; do
  found=$(find /usr/local/nvidia/ /usr/local/cuda*/ /usr/lib/x86_64-linux-gnu /usr/lib64 \
    "${places[@]}" -name "$name" -not -path '*/stubs/*' 2>/dev/null | head -1)
  if [ -z "$found" ]; then
    echo "no $name on this machine: the build needs CUDA 13's libraries" | tee -a "$out/summary.txt"
    exit 1
  fi
  libs="$libs:$(dirname "$found")"
done
export LD_LIBRARY_PATH="$libs:${LD_LIBRARY_PATH:-}"
nvidia-smi -L 2>&1 | tee -a "$out/summary.txt"

echo "== 1. oracle tests; the SAE tensor engine on cuda against the CPU kernels" |
  tee -a "$out/summary.txt"
"$work/bin/oracle" --test-threads 1 2>&1 | tee "$out/tests.log" | tail -3 | tee -a "$out/summary.txt"
"$work/bin/sae_tests" on_cuda 2>&1 | tee -a "$out/tests.log" | tail -3 | tee -a "$out/summary.txt"

echo "== 2. forward pass, GPT-2-small shape, batch 8 x 128, on cuda" | tee -a "$out/summary.txt"
MONOSCOPE_FORWARD_DEVICE=cuda "$work/bin/forward_bench" --bench --noplot 2>&1 |
  tee "$out/forward.log" | grep -E "time:|thrpt:" | tee -a "$out/summary.txt"
python3 benches/reference/forward_torch.py --device cuda 2>&1 | tee -a "$out/summary.txt"

echo "== 3. SAE training, $steps steps, on cuda" | tee -a "$out/summary.txt"
data=/tmp/sae-synthetic.safetensors
[ -f "$data" ] || python3 benches/reference/sae_synthetic.py --out "$data" >>"$out/other.log" 2>&1
rust=$(MONOSCOPE_SAE_COMPARE="$data" MONOSCOPE_SAE_STEPS="$steps" MONOSCOPE_SAE_DEVICE=cuda \
  "$work/bin/sae_bench" 2>>"$out/other.log")
torch=""
for v in topk_dense topk_sparse relu_l1; do
  torch+=$(python3 benches/reference/sae_torch.py --data "$data" --variant "$v" --steps "$steps" \
    --device cuda)$'\n'
done
printf '%s\n%s\n' "$rust" "$torch" >"$out/sae.jsonl"
python3 benches/reference/sae_ratios.py "$rust" "$torch" | tee -a "$out/summary.txt"

echo "== 4. the binary on the bundled model, on cuda" | tee -a "$out/summary.txt"
"$work/bin/monoscope" generate --device cuda --prompt "The capital of Japan is" \
  --max-new-tokens 4 2>&1 | tee -a "$out/summary.txt"
rm -rf /tmp/sae-gpu
"$work/bin/monoscope" sae train --device cuda --hook blocks.4.mlp.hook_post \
  --out /tmp/sae-gpu --tokens 200000 --batch-size 1024 --lr 1e-3 --log-every 20 \
  >"$out/sae_train.log" 2>&1
tail -2 "$out/sae_train.log" | tee -a "$out/summary.txt"
echo "== summary"
cat "$out/summary.txt"
