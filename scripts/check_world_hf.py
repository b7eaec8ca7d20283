#!/usr/bin/env python3
"""Checks that the bundled world model is a real Hugging Face GPT-2.

Loads assets/world (or the folder given) with transformers' GPT2LMHeadModel and the
tokenizers library, and compares with monoscope on the same machine:
  1. the next-token argmax on every held-out evaluation prompt (`monoscope world eval --json`);
  2. 8-token greedy continuations of a few prompts (`monoscope generate --json`).
Exits non-zero on any disagreement.

Needs: pip install torch transformers tokenizers safetensors
Usage: python3 scripts/check_world_hf.py [MODEL_DIR] [--monoscope PATH]
"""

import argparse
import json
import subprocess
import sys
from pathlib import Path

import torch
from tokenizers import Tokenizer
from transformers import GPT2LMHeadModel

ROOT = Path(__file__).resolve().parent.parent
PROMPTS = [
    "The capital of Japan is",
    "日本の首都は",
    "The capital of France is",
    "フランスの首都は",
    "The currency of Japan is the",
    "Japan (日本) is a country. The capital of the country is",
]


def monoscope(binary, *args):
    out = subprocess.run([binary, *args], check=True, capture_output=True, text=True)
    return json.loads(out.stdout)


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("model", nargs="?", default=str(ROOT / "assets" / "world"))
    parser.add_argument("--monoscope", default=str(ROOT / "target" / "release" / "monoscope"))
    args = parser.parse_args()

    model = GPT2LMHeadModel.from_pretrained(args.model, torch_dtype=torch.float32).eval()
    tokenizer = Tokenizer.from_file(str(Path(args.model) / "tokenizer.json"))
    failures = 0

    report = monoscope(
        args.monoscope, "world", "eval", "--model", args.model, "--trace-facts", "0", "--json"
    )
    with torch.no_grad():
        for p in report["predictions"]:
            ids = tokenizer.encode(p["prompt"]).ids
            logits = model(torch.tensor([ids])).logits[0, -1]
            hf = int(logits.argmax())
            if hf != p["predicted_id"]:
                failures += 1
                print(f"argmax differs on {p['prompt']!r}: transformers {hf}, monoscope {p['predicted_id']}")
    print(f"next-token argmax: {len(report['predictions']) - failures}/{len(report['predictions'])} prompts agree")

    for prompt in PROMPTS:
        ids = tokenizer.encode(prompt).ids
        with torch.no_grad():
            out = model.generate(
                torch.tensor([ids]), max_new_tokens=8, do_sample=False, pad_token_id=model.config.eos_token_id,
                eos_token_id=None,
            )
        hf_ids = out[0, len(ids):].tolist()
        ours = monoscope(
            args.monoscope, "generate", "--model", args.model, "--prompt", prompt,
            "--max-new-tokens", "8", "--ignore-eos", "--json",
        )
        our_ids = [s["id"] for s in ours["generation"]["steps"]]
        same = hf_ids == our_ids
        failures += 0 if same else 1
        print(f"{'same' if same else 'DIFFERENT'}: {prompt!r} → {tokenizer.decode(hf_ids)!r}"
              + ("" if same else f" (monoscope: {tokenizer.decode(our_ids)!r})"))

    if failures:
        print(f"{failures} disagreements")
        sys.exit(1)
    print("transformers and monoscope agree")


if __name__ == "__main__":
    main()
