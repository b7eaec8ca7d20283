#!/usr/bin/env bash
# Every hook point, monoscope beside TransformerLens on this machine: on the bundled world
# model and every fixture architecture (GPT-2, GPT-Neo, GPT-NeoX, GPT-J, Llama, Llama 3.1 and YaRN rope scaling,
# Mistral, Qwen2, Qwen3, Gemma, Gemma 2, Gemma 3 (text and multimodal), OLMo 1, OLMo 2, OLMo 3, Phi-2, Phi-3 and its LongRoPE, SmolLM3), one
# prompt with Japanese in it is traced at every hook (`monoscope trace --hooks '*'`), run
# through TransformerLens's run_with_cache on the same token ids, and each hook's value is
# compared with TransformerLens's under the same name (max |difference| / max |value|, the
# largest over layers). Also lists the hooks one side has and the other lacks.
#   pip install transformer_lens && bash benches/compare_hooks.sh
set -euo pipefail
cd "$(dirname "$0")/.."
cargo build --release --locked >&2
out=$(mktemp -d)
trap 'rm -rf "$out"' EXIT
for model in assets/world tests/fixtures/models/*; do
  name=$(basename "$model")
  if [ "$name" = phi ]; then
    # TransformerLens's bridge refuses Phi's per-head query and key LayerNorms: compare a copy
    # with them switched off (Phi-2 itself has none).
    cp -r "$model" "$out/phi-model"
    python3 -c "import json, sys; p = sys.argv[1]; c = json.load(open(p)); c['qk_layernorm'] = False; json.dump(c, open(p, 'w'))" "$out/phi-model/config.json"
    model="$out/phi-model"
  fi
  ./target/release/monoscope trace --model "$model" --prompt "The capital of Japan is Tokyo. 日本の首都は東京です。" \
    --hooks '*' --out "$out/$name.safetensors" > /dev/null
  python3 benches/reference/hooks_tl.py --model "$model" --trace "$out/$name.safetensors" \
    2>/dev/null > "$out/$name.json"
done
python3 - "$out" <<'PY'
import glob, json, os, re, sys, importlib.metadata
out = sys.argv[1]
print(f"transformer_lens {importlib.metadata.version('transformer_lens')}")
worst_overall = 0.0
for path in sorted(glob.glob(f"{out}/*.json")):
    name = os.path.basename(path).removesuffix(".json")
    report = json.load(open(path))
    kinds = {}
    for hook, diff in report["differences"].items():
        kinds.setdefault(re.sub(r"blocks\.\d+\.", "blocks.L.", hook), []).append(diff)
    mismatched = sorted(k for k, v in kinds.items() if None in v)
    worst = {k: max(v) for k, v in kinds.items() if None not in v}
    top = max(worst, key=worst.get)
    worst_overall = max(worst_overall, worst[top])
    print(f"{name:<9} {len(report['differences']):4} hooks compared, largest relative difference "
          f"{worst[top]:.1e} ({top})")
    if mismatched:
        print(f"          hidden keys differ at: {', '.join(mismatched)}")
    for side, key in (("monoscope", "monoscope_only"), ("TransformerLens", "transformer_lens_only")):
        only = sorted({re.sub(r"blocks\.\d+\.", "blocks.L.", h) for h in report[key]})
        if only:
            print(f"          only in {side}: {', '.join(only)}")
print(f"largest relative difference over every model and hook: {worst_overall:.1e}")
PY
