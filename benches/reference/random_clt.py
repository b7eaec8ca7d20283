#!/usr/bin/env python3
"""A random JumpReLU cross-layer transcoder for a GPT-2-architecture Hugging Face folder (the
bundled world model by default), written by circuit-tracer 0.5.0's own
`CrossLayerTranscoder.to_safetensors` with the `config.yaml` its repositories carry: the
cross-layer transcoder for benches/compare_attribution.sh. Its encoder is scaled to the
residual stream on the prompt, and `--threshold` sets how many features fire (2.75: about 0.3%
of a layer's features per token).

    /opt/saelens-venv/bin/python benches/reference/random_clt.py --out DIR [--features 16384]
"""

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "scripts"))
import circuit_tracer_fixtures as ct  # noqa: E402  (also patches huggingface-hub for 0.5.0)

import torch  # noqa: E402


def main():
    root = Path(__file__).resolve().parents[2]
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default=str(root / "assets/world"))
    ap.add_argument("--out", required=True)
    ap.add_argument("--features", type=int, default=16384, help="features per layer")
    ap.add_argument("--threshold", type=float, default=2.75)
    ap.add_argument("--prompt", default="The capital of Japan is")
    args = ap.parse_args()
    model, tokenizer, c = ct.hooked_gpt2(args.model)
    ids = torch.tensor([c.bos_token_id] + tokenizer.encode(args.prompt), dtype=torch.long)
    generator = torch.Generator().manual_seed(7)
    clt = ct.cross_layer_transcoder(
        model, ids, c.n_layer, c.n_embd, generator, width=args.features, threshold=args.threshold
    )
    out = Path(args.out)
    clt.to_safetensors(str(out))
    (out / "config.yaml").write_text(
        "model_kind: cross_layer_transcoder\n"
        'feature_input_hook: "hook_resid_mid"\n'
        'feature_output_hook: "hook_mlp_out"\n'
    )
    files = sorted(out.glob("W_*.safetensors"))
    print(f"{out}: {len(files)} files, {sum(f.stat().st_size for f in files) / 1e6:.0f} MB")


if __name__ == "__main__":
    main()
