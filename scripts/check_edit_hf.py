#!/usr/bin/env python3
"""Checks that a model folder edited by `monoscope edit --out` is a real Hugging Face model
that gives the new answer.

1. Edits the bundled world model (or --model) with monoscope: --prompt/--subject/--target,
   saved to a fresh folder;
2. loads that folder with transformers' AutoModelForCausalLM (GPT-2's Conv1D layout
   included) and the tokenizers library;
3. checks that transformers' next-token argmax on the edit prompt is the new target's first
   token, that it matches monoscope's own post-edit prediction, that the source model still
   gives its old answer (nothing was edited in place), and that the edited and source
   weights differ only in the layer monoscope says it edited.
Exits non-zero on any disagreement.

Needs: pip install torch transformers tokenizers safetensors
Usage: python3 scripts/check_edit_hf.py [--monoscope PATH] [--model DIR]
         [--prompt T --subject S --target X --layer L --key K]
"""

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

import torch
from safetensors.torch import load_file
from tokenizers import Tokenizer
from transformers import AutoModelForCausalLM

ROOT = Path(__file__).resolve().parent.parent


def argmax_next(model_dir, prompt):
    model = AutoModelForCausalLM.from_pretrained(model_dir, torch_dtype=torch.float32).eval()
    tokenizer = Tokenizer.from_file(str(Path(model_dir) / "tokenizer.json"))
    ids = tokenizer.encode(prompt).ids
    with torch.no_grad():
        logits = model(torch.tensor([ids])).logits[0, -1]
    return int(logits.argmax()), tokenizer


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--monoscope", default=str(ROOT / "target" / "release" / "monoscope"))
    parser.add_argument("--model", default=str(ROOT / "assets" / "world"))
    parser.add_argument("--prompt", default="The capital of {} is")
    parser.add_argument("--subject", default="Japan")
    parser.add_argument("--target", default=" Seoul")
    parser.add_argument("--layer", default="0")
    parser.add_argument("--key", default="subject-last")
    args = parser.parse_args()

    failures = 0
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "edited"
        run = subprocess.run(
            [args.monoscope, "edit", "--model", args.model, "--prompt", args.prompt,
             "--subject", args.subject, "--target", args.target, "--layer", args.layer,
             "--key", args.key, "--out", str(out), "--json"],
            check=True, capture_output=True, text=True,
        )
        report = json.loads(run.stdout)
        prompt = args.prompt.replace("{}", args.subject)
        edit_check = next(c for c in report["checks"] if c["kind"] == "edit")
        monoscope_after = edit_check["after"]["top"][0]["id"]
        monoscope_before = edit_check["before"]["top"][0]["id"]

        hf_after, tokenizer = argmax_next(str(out), prompt)
        want = tokenizer.encode(prompt + args.target).ids[len(tokenizer.encode(prompt).ids)]
        hf_before, _ = argmax_next(args.model, prompt)
        print(f"{prompt!r}: transformers on the edited folder → {tokenizer.decode([hf_after])!r} "
              f"(monoscope after the edit: {tokenizer.decode([monoscope_after])!r}; "
              f"source model: {tokenizer.decode([hf_before])!r})")
        if hf_after != want:
            failures += 1
            print(f"  the edited folder does not give the new answer's first token {tokenizer.decode([want])!r}")
        if hf_after != monoscope_after:
            failures += 1
            print("  transformers and monoscope disagree on the edited model")
        if hf_before != monoscope_before:
            failures += 1
            print("  transformers and monoscope disagree on the source model")

        edited = load_file(str(out / "model.safetensors"))
        source = load_file(str(Path(args.model) / "model.safetensors"))
        changed = sorted(k for k in source if not torch.equal(source[k], edited[k]))
        layers = report["layers"]
        expected = sorted(f"h.{l}.mlp.c_proj.weight" for l in layers)
        expected_prefixed = sorted(f"transformer.h.{l}.mlp.c_proj.weight" for l in layers)
        print(f"tensors changed: {changed}")
        if changed not in (expected, expected_prefixed):
            failures += 1
            print(f"  expected exactly {expected} (or with the transformer. prefix)")
        if not (out / "edits.json").is_file():
            failures += 1
            print("  no edits.json in the edited folder")

    if failures:
        print(f"{failures} check(s) failed")
        sys.exit(1)
    print("ok: the edited folder loads in transformers and gives the new answer")


if __name__ == "__main__":
    main()
